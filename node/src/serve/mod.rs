//! The server role: hold a span of blocks, announce it, and run inference sessions,
//! each step's output sent straight on to the next hop.
//!
//! Rooms: this file is the lifecycle (load, start, serve, drain, stop); [`sessions`] is
//! the session table; [`session`] the data path of one session and `steps` its steps;
//! [`announce`] what the server announces.
//!
//! Shutdown is a tree: `stop` (first Ctrl-C) drains — the announcement is withdrawn, new
//! sessions are refused, running ones get `grace` to finish; `kill` (second Ctrl-C)
//! cancels every session at once. Every task the server starts lives in one of its
//! `JoinSet`s and is awaited before `run` returns.

pub mod announce;

/// The most tokens (prompt and answer) a server holds per session unless told otherwise
/// (`pollen serve --max-session-tokens`).
pub const DEFAULT_MAX_SESSION_TOKENS: usize = 2048;

pub mod batch;
pub mod placing;
pub mod session;
pub mod sessions;
mod steps;

use crate::blocks;
use crate::net::stream::FrameWriter;
use crate::net::{self, NetConfig, NetError, NetHandle, Role};
use crate::threads::ShortWork;
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::{BlockRange as WireRange, ModelId, SignedAnnouncement};
use pollen_shard::{BlockRange, BlockSpan, LoadOptions, ModelFile, ShardError};
use sessions::SessionTable;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Model file.
    pub model: PathBuf,
    /// Blocks to serve, `A:B`; `None` chooses a span from the swarm's coverage and moves
    /// it when the swarm needs it elsewhere ([`crate::placement`]).
    pub blocks: Option<String>,
    /// Weights and device.
    pub load: LoadOptions,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers.
    pub bootstrap: Vec<Multiaddr>,
    /// Identity key file.
    pub identity: PathBuf,
    /// mDNS discovery.
    pub mdns: bool,
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// Most tokens per session.
    pub max_session_tokens: usize,
    /// Sessions idle this long are closed.
    pub idle_timeout: Duration,
    /// Announcements are valid this long and renewed at a third of it.
    pub announce_ttl: Duration,
    /// On Ctrl-C, running sessions get this long to finish.
    pub grace: Duration,
    /// Spans computed at once (the compute permits); the rest wait their turn.
    pub compute_slots: usize,
    /// About how long each part of a prompt computes: a prompt is computed in parts,
    /// each under its own permit, other sessions' steps between them
    /// ([`batch::in_parts`]: by rows or by blocks, whichever gives the same bits as
    /// whole); zero computes prompts whole.
    pub prompt_part: Duration,
    /// The most decode steps computed as one batch (`1`: each alone); batches are no
    /// larger than the span's [`BlockSpan::batch_rows`].
    pub max_batch: usize,
    /// Bytes of KV cache all sessions together may hold (each session takes, at open,
    /// the most its token limit needs); `None` for enough to fill every session.
    pub max_cache_bytes: Option<usize>,
    /// Memory this server may use, weights and runtime together (`--max-memory`):
    /// automatic placement fits as many blocks as this allows, and the runtime's KV
    /// caches and activations live in what the weights leave. `None`: a safe share of
    /// the memory free at start ([`crate::placement::memory::default_budget`]).
    pub max_memory_bytes: Option<u64>,
    /// Blocks to hold under automatic placement, overriding what `max_memory_bytes`
    /// allows (`--num-blocks`).
    pub num_blocks: Option<usize>,
    /// How often automatic placement re-checks whether moving helps the swarm (jittered
    /// by up to a quarter either way); a server leaving triggers a check sooner.
    pub rebalance_every: Duration,
    /// Caps per client and per peer: sessions, streams, and how soon a session that
    /// never steps is freed.
    pub peer_limits: sessions::PeerLimits,
    /// Connection caps, and whether to run a relay.
    pub net: net::NetOptions,
}

/// Why a server could not start or stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The identity key file could not be read or created.
    #[error(transparent)]
    Identity(#[from] net::identity::IdentityError),
    /// The model or the span could not be loaded.
    #[error("loading the span: {0}")]
    Load(#[from] ShardError),
    /// The network could not start, or stopped.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The span cannot be announced.
    #[error("span: {0}")]
    Span(#[from] pollen_protocol::BlockRangeError),
    /// The loading task panicked.
    #[error("the loading task failed: {0}")]
    Task(String),
}

/// A running server's shared state.
pub(crate) struct Server {
    span: Arc<BlockSpan>,
    wire_blocks: WireRange,
    model_id: ModelId,
    compute: String,
    throughput: f32,
    me: PeerId,
    /// This server's ed25519 identity secret: it signs failure reports (and announcements).
    secret: [u8; 32],
    net: NetHandle,
    table: Arc<SessionTable<FrameWriter>>,
    kv_budget: Arc<sessions::Budget>,
    kv_per_token: usize,
    cfg: ServeConfig,
    draining: AtomicBool,
    /// Fired when the server starts to drain: every session tells its client, which
    /// moves the session elsewhere.
    leaving: CancellationToken,
    steps: AtomicU64,
    permits: Semaphore,
    /// Decode steps waiting to be computed together.
    batch: batch::Queue,
    /// Where a lone one-row step computes on the CPU: on its session's worker while such
    /// steps take a few milliseconds ([`ShortWork`]), where [`Server::computes_alone`].
    lone_steps: ShortWork,
    /// How long prompts are computed in parts (`None`: whole); see [`batch::in_parts`].
    prompt_parts: Option<batch::Parts>,
    /// Where next hops are checked to be servers.
    next_hops: announce::NextHops,
}

impl Server {
    /// Whether this server computes one step at a time with one thread (`--threads 1`,
    /// a volunteer's default) on the CPU: only then may a lone step run on its session's
    /// worker. With more, a step would share candle's thread pool with a prompt part or a
    /// batch beside it and take as long as they do; a GPU's work stays on the blocking
    /// pool.
    fn computes_alone(&self) -> bool {
        self.cfg.compute_slots <= 1 && self.span.device().is_cpu()
    }
}

/// The bootstraps of `cfg`, with their peer ids where the address names one.
fn bootstrap_peers(addrs: &[Multiaddr]) -> Vec<(Option<PeerId>, Multiaddr)> {
    addrs
        .iter()
        .map(|a| {
            let id = a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            });
            (id, a.clone())
        })
        .collect()
}

/// Makes every bootstrap of `bootstraps` an entry point (a peer we publish to): dials
/// those we are not connected to (again, after a bootstrap restarts), and takes one
/// that dialed us first (its mDNS found us on the local network) as it is, without a
/// dial its configured address may not even allow (a public address seen from inside
/// its own network).
async fn dial_missing(
    net: &NetHandle,
    bootstraps: &[(Option<PeerId>, Multiaddr)],
    tasks: &mut JoinSet<()>,
) {
    let peers = net.peers().await.unwrap_or_default();
    for (id, addr) in bootstraps {
        if let Some(id) = id
            && let Some(p) = peers.iter().find(|p| p.peer == *id)
        {
            if !p.entry && !net.make_entry(*id).await.unwrap_or(false) {
                tracing::debug!("bootstrap {id} went away before it became an entry point");
            }
            continue;
        }
        let (net, addr) = (net.clone(), addr.clone());
        tasks.spawn(async move {
            if let Err(e) = net.dial_with_retry(&addr, Duration::from_secs(8)).await {
                tracing::warn!("{e}");
            }
        });
    }
}

/// Loads the span and the model id (blocking: call from a blocking task).
fn load(cfg: &ServeConfig, compute: &str) -> Result<(BlockSpan, ModelId, f32), ServeError> {
    let file = ModelFile::open(&cfg.model)?;
    let num_blocks = file.config()?.num_blocks;
    let range = BlockRange::parse(cfg.blocks.as_deref().unwrap_or_default(), num_blocks)?;
    let pb = crate::progress::bar("loading", range.len());
    let span = BlockSpan::load(&file, range, &cfg.load, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    let id = crate::model::model_id(&cfg.model, &mut |_, _| {})?;
    // The same measure as automatic placement's (one block, cached), so that pinned and
    // placed servers announce comparable speeds.
    let threads = cfg.compute_slots.max(1);
    let (measured, _) = placing::measured(&file, &cfg.load, &id, compute, threads)?;
    let tps = (measured.decode_tps / span.range().len().max(1) as f64) as f32;
    Ok((span, id, tps))
}

/// A span loaded for a move, and the move.
type Loaded = (BlockSpan, crate::placement::Move<Vec<u8>>);

/// What automatic placement keeps while the server runs.
struct Automatic {
    num_blocks: usize,
    len: usize,
    measured: placing::Measured,
}

impl Automatic {
    /// Tokens/s through a span of this server's length.
    fn span_throughput(&self) -> f64 {
        self.measured.decode_tps / self.len.max(1) as f64
    }
}

/// Loads blocks `range` of the model (in a blocking task), with a progress bar.
async fn load_span(
    cfg: &ServeConfig,
    range: std::ops::Range<usize>,
) -> Result<BlockSpan, ServeError> {
    let (path, opts) = (cfg.model.clone(), cfg.load.clone());
    tokio::task::spawn_blocking(move || {
        let file = ModelFile::open(&path)?;
        let num_blocks = file.config()?.num_blocks;
        let range = BlockRange::new(range.start, range.end, num_blocks)?;
        let pb = crate::progress::bar("loading", range.len());
        let span = BlockSpan::load(&file, range, &opts, &mut |d, _| pb.set_position(d as u64))?;
        pb.finish_and_clear();
        Ok(span)
    })
    .await
    .map_err(|e| ServeError::Task(e.to_string()))?
}

/// Automatic placement at start: measure this machine (or read the cached measurement),
/// size the span to the memory budget, read the swarm's coverage through the
/// bootstraps, choose the span and load it.
async fn start_automatic(
    cfg: &ServeConfig,
    handle: &NetHandle,
    bootstraps: &[(Option<PeerId>, Multiaddr)],
    me: PeerId,
    compute: &str,
) -> Result<(BlockSpan, ModelId, f32, Automatic), ServeError> {
    let (path, opts) = (cfg.model.clone(), cfg.load.clone());
    let (threads, mode) = (cfg.compute_slots.max(1), compute.to_string());
    let (config, model_id, (measured, cached)) =
        tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
            let file = ModelFile::open(&path)?;
            let config = file.config()?;
            let id = crate::model::model_id(&path, &mut |_, _| {})?;
            let measured = placing::measured(&file, &opts, &id, &mode, threads)?;
            Ok((config, id, measured))
        })
        .await
        .map_err(|e| ServeError::Task(e.to_string()))??;
    let num_blocks = config.num_blocks;
    let (budget, source) = match cfg.max_memory_bytes {
        Some(b) => (b, crate::placement::memory::BudgetSource::Given),
        None => crate::placement::memory::default_budget(&cfg.load.device),
    };
    let kv_per_token = cfg.load.kv_bytes_per_token_per_block(&config);
    let per_block = placing::bytes_per_block(
        &measured,
        kv_per_token,
        cfg.max_sessions,
        cfg.max_session_tokens,
    );
    let len = crate::placement::blocks_that_fit(num_blocks, budget, per_block, cfg.num_blocks);
    println!(
        "measured {:.0} tokens/s decode and {:.0} tokens/s prefill through one block ({}); \
         {len} of {num_blocks} blocks {} (memory {}, {} a block with a full KV load)",
        measured.decode_tps,
        measured.prefill_tps,
        if cached { "cached" } else { "measured now" },
        if cfg.num_blocks.is_some() {
            "asked for (--num-blocks)"
        } else {
            "fit"
        },
        placing::describe_budget(budget, source),
        crate::placement::memory::format_size(per_block),
    );
    // The swarm's coverage, as the client reads it: through the bootstraps (or mDNS).
    let dials = bootstraps
        .iter()
        .map(|(_, a)| handle.dial_with_retry(a, Duration::from_secs(8)));
    for r in futures::future::join_all(dials).await {
        if let Err(e) = r {
            tracing::warn!("{e}");
        }
    }
    if bootstraps.is_empty() && cfg.mdns {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let book = handle.gather(Some(model_id)).await.unwrap_or_else(|e| {
        tracing::warn!("cannot read the swarm's coverage ({e}): choosing as if alone");
        Vec::new()
    });
    let swarm = placing::holdings(
        &book,
        &model_id,
        compute,
        num_blocks,
        &me,
        measured.decode_tps,
    );
    let auto = Automatic {
        num_blocks,
        len,
        measured,
    };
    let throughput = auto.span_throughput();
    let range = crate::placement::choose_span(num_blocks, &swarm, &me.to_bytes(), len, throughput);
    let totals = crate::placement::totals(num_blocks, &swarm);
    println!(
        "placement: blocks {}:{} of {num_blocks}, next to {} server{} ({} uncovered)",
        range.start,
        range.end,
        swarm.len(),
        if swarm.len() == 1 { "" } else { "s" },
        match crate::placement::uncovered(&totals) {
            1 => "1 block was".to_string(),
            n => format!("{n} blocks were"),
        },
    );
    let span = load_span(cfg, range).await?;
    Ok((span, model_id, throughput as f32, auto))
}

/// A server's state for one span: a move to another span starts a new one, while the
/// old one drains.
fn tenure(
    span: BlockSpan,
    throughput: f32,
    model_id: ModelId,
    (me, secret): (PeerId, [u8; 32]),
    handle: &NetHandle,
    cfg: &ServeConfig,
    compute: &str,
) -> Result<Arc<Server>, ServeError> {
    let kv_per_token = span.kv_bytes_per_token();
    let kv_max = cfg.max_cache_bytes.unwrap_or_else(|| {
        kv_per_token
            .saturating_mul(cfg.max_session_tokens)
            .saturating_mul(cfg.max_sessions.max(1))
    });
    Ok(Arc::new(Server {
        wire_blocks: blocks::to_wire(span.range())?,
        kv_budget: sessions::Budget::new(sessions::memory_budget(
            cfg.max_memory_bytes,
            span.weight_bytes(),
            kv_max,
            span.step_memory_bytes(cfg.max_session_tokens, 0),
            cfg.compute_slots,
        )),
        kv_per_token,
        batch: batch::Queue::new(span.batch_rows(), cfg.max_batch),
        lone_steps: ShortWork::default(),
        prompt_parts: batch::Parts::of(&span, cfg.prompt_part),
        span: Arc::new(span),
        model_id,
        compute: compute.to_string(),
        throughput,
        me,
        secret,
        net: handle.clone(),
        table: SessionTable::with_limits(cfg.max_sessions.max(1), cfg.peer_limits),
        cfg: cfg.clone(),
        draining: AtomicBool::new(false),
        leaving: CancellationToken::new(),
        steps: AtomicU64::new(0),
        // One step at a time on a GPU (see `steps::compute`).
        permits: Semaphore::new(if cfg.load.device.is_cpu() {
            cfg.compute_slots.max(1)
        } else {
            1
        }),
        next_hops: announce::NextHops::default(),
    }))
}

/// Runs a server until `stop` fires (first Ctrl-C); `kill` (second Ctrl-C) ends it at once.
pub async fn run(
    cfg: ServeConfig,
    stop: CancellationToken,
    kill: CancellationToken,
) -> Result<(), ServeError> {
    // Held until the server ends: a second node with this key file is refused.
    let (keypair, _held) = net::identity::load_and_hold(&cfg.identity)?;
    let secret = net::identity::ed25519_secret(&keypair).ok_or_else(|| {
        net::identity::IdentityError::NotAKey {
            path: cfg.identity.clone(),
            reason: "not an ed25519 key".into(),
        }
    })?;
    let me = keypair.public().to_peer_id();
    let net_cancel = kill.child_token();
    let (handle, net_task) = net::start(
        NetConfig {
            keypair,
            listen: cfg.listen.clone(),
            mdns: cfg.mdns,
            role: Role::Server,
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
            caps: cfg.net.caps,
            relay: cfg.net.relay,
            ..NetConfig::new(Role::Server)
        },
        net_cancel.clone(),
    )?;
    let mut incoming = handle.accept_session_streams()?;
    let bootstraps = bootstrap_peers(&cfg.bootstrap);
    let mut background = JoinSet::new();
    // Worked out once (it reads the file's header and may time a dense product).
    let (model, load_opts) = (cfg.model.clone(), cfg.load.clone());
    let compute =
        tokio::task::spawn_blocking(move || crate::model::compute_mode(&model, &load_opts))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??;
    let (span, model_id, throughput, auto) = if cfg.blocks.is_some() {
        let (load_cfg, load_compute) = (cfg.clone(), compute.clone());
        let (span, model_id, throughput) =
            tokio::task::spawn_blocking(move || load(&load_cfg, &load_compute))
                .await
                .map_err(|e| ServeError::Task(e.to_string()))??;
        (span, model_id, throughput, None)
    } else {
        let (span, model_id, throughput, auto) =
            start_automatic(&cfg, &handle, &bootstraps, me, &compute).await?;
        (span, model_id, throughput, Some(auto))
    };
    let mut server = tenure(
        span,
        throughput,
        model_id,
        (me, secret),
        &handle,
        &cfg,
        &compute,
    )?;
    dial_missing(&handle, &bootstraps, &mut background).await;
    // Session streams: one task each, at most this many at once (sessions, attach and
    // refused streams in flight, and those waiting for their first frame, of which the
    // oldest give way to new ones); beyond it a new stream is dropped at once.
    let mut sessions = JoinSet::new();
    let max_streams = cfg.max_sessions.max(1) * 2 + sessions::WAITING_STREAMS;
    let sessions_cancel = kill.child_token();
    let addrs = handle
        .wait_listening(cfg.listen.len().max(1), Duration::from_secs(2))
        .await?;
    let mut seq = 1u64;
    let sign = |a| SignedAnnouncement::sign(a, &secret);
    // Round trips to next-span servers are measured in the background (asking peers
    // takes time, and a hung peer up to its timeout): this loop must keep accepting
    // session streams meanwhile.
    let rtts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let measuring = Arc::new(AtomicBool::new(false));
    match sign(server.announcement(&addrs, Vec::new(), cfg.announce_ttl, seq)) {
        Ok(a) => handle.set_own_announcement(Some(a)).await?,
        Err(e) => tracing::error!("cannot sign the announcement: {e}"),
    }
    let range = server.span.range();
    // Which of the engine's kernels the fast mode runs on here (POLLEN_KERNEL may force
    // one; a block matrix without a packed form runs on candle's); any other mode runs
    // on candle's.
    let kernel = if server.compute.starts_with("fast/cpu") {
        pollen_shard::kernels::active_path()
    } else {
        "candle"
    };
    println!(
        "ready peer {me} model {model_id} blocks {range} throughput {throughput:.1} compute {} \
         kv-budget {} MB ({} B a token) kernel {kernel}",
        server.compute,
        server.kv_budget.max() / (1024 * 1024),
        server.kv_per_token
    );
    for a in &addrs {
        println!("listening {a}/p2p/{me}");
    }
    let mut renew = tokio::time::interval(cfg.announce_ttl / 3);
    renew.tick().await;
    let mut renewals = 0u64;
    // Automatic placement: a watcher asks for moves; a move loads the new span beside
    // the old one, announces it, and only then tells the old span's sessions to leave.
    let mut tenure_cancel = sessions_cancel.child_token();
    let (place_tx, place_rx) =
        tokio::sync::watch::channel((range.start..range.end, f64::from(throughput)));
    let (move_tx, mut move_rx) = tokio::sync::mpsc::channel(1);
    let mut loading: JoinSet<Result<Loaded, ServeError>> = JoinSet::new();
    if let Some(a) = &auto {
        let watch = placing::Watch {
            net: handle.clone(),
            me,
            model_id,
            compute: compute.clone(),
            num_blocks: a.num_blocks,
            every: cfg.rebalance_every,
            block_tps: a.measured.decode_tps,
        };
        background.spawn(placing::watch_swarm(
            watch,
            place_rx,
            move_tx,
            stop.child_token(),
        ));
    } else {
        drop(move_tx);
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = kill.cancelled() => break,
            _ = renew.tick() => {
                dial_missing(&handle, &bootstraps, &mut background).await;
                // Round trips to next-span servers: at the first renewal, then every third.
                if renewals.is_multiple_of(3) && !measuring.swap(true, Ordering::AcqRel) {
                    let (h, s, r, m) = (handle.clone(), server.clone(), rtts.clone(), measuring.clone());
                    background.spawn(async move {
                        let measured = announce::next_hop_rtts(&h, &s).await;
                        if let Ok(mut r) = r.lock() {
                            *r = measured;
                        }
                        m.store(false, Ordering::Release);
                    });
                }
                renewals += 1;
                seq += 1;
                let addrs = handle.listen_addrs().await.unwrap_or_default();
                let current = rtts.lock().map(|r| r.clone()).unwrap_or_default();
                match sign(server.announcement(&addrs, current, cfg.announce_ttl, seq)) {
                    Ok(a) => handle.set_own_announcement(Some(a)).await?,
                    Err(e) => tracing::error!("cannot sign the announcement: {e}"),
                }
            }
            Some(m) = move_rx.recv(), if loading.is_empty() => {
                println!(
                    "moving: loading blocks {}:{} to replace {}:{} (swarm bottleneck {:.1} tokens/s on {} blocks -> {:.1} on {})",
                    m.to.start, m.to.end, m.from.start, m.from.end, m.bottleneck_before, m.weakest_before,
                    m.bottleneck_after, m.weakest_after,
                );
                let cfg = cfg.clone();
                loading.spawn(async move { Ok((load_span(&cfg, m.to.clone()).await?, m)) });
            }
            Some(done) = loading.join_next(), if !loading.is_empty() => {
                let moved = done
                    .map_err(|e| ServeError::Task(e.to_string()))
                    .and_then(|r| r)
                    .and_then(|(span, m)| {
                        let t = auto.as_ref().map_or(0.0, Automatic::span_throughput);
                        let ids = (me, secret);
                        Ok((tenure(span, t as f32, model_id, ids, &handle, &cfg, &compute)?, m, t))
                    });
                match moved {
                    Ok((new, m, t)) => {
                        let old = std::mem::replace(&mut server, new);
                        if let Ok(mut r) = rtts.lock() {
                            r.clear();
                        }
                        seq += 1;
                        let addrs = handle.listen_addrs().await.unwrap_or_default();
                        match sign(server.announcement(&addrs, Vec::new(), cfg.announce_ttl, seq)) {
                            Ok(a) => handle.set_own_announcement(Some(a)).await?,
                            Err(e) => tracing::error!("cannot sign the announcement: {e}"),
                        }
                        // The old span's sessions move elsewhere (their clients replay);
                        // what has not moved within the grace period is closed, and the
                        // old span's memory goes with its last session.
                        old.draining.store(true, Ordering::Relaxed);
                        old.leaving.cancel();
                        let open = old.table.len();
                        drop(old);
                        let old_cancel = std::mem::replace(&mut tenure_cancel, sessions_cancel.child_token());
                        let grace = cfg.grace;
                        background.spawn(async move {
                            tokio::time::sleep(grace).await;
                            old_cancel.cancel();
                        });
                        println!(
                            "moved blocks {}:{} -> {}:{} ({open} sessions asked to move; swarm bottleneck {:.1} tokens/s on {} blocks -> {:.1} on {})",
                            m.from.start, m.from.end, m.to.start, m.to.end, m.bottleneck_before, m.weakest_before,
                            m.bottleneck_after, m.weakest_after,
                        );
                        place_tx.send_replace((m.to, t));
                    }
                    Err(e) => {
                        eprintln!("placement: the move failed, staying: {e}");
                        place_tx.send_modify(|_| {});
                    }
                }
            }
            Some(_) = background.join_next(), if !background.is_empty() => {}
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            stream = incoming.next() => match stream {
                Some((peer, stream)) => {
                    if sessions.len() >= max_streams {
                        tracing::debug!("dropping a session stream from {peer}: {max_streams} open");
                        continue;
                    }
                    let (server, cancel) = (server.clone(), tenure_cancel.child_token());
                    sessions.spawn(session::serve_stream(server, peer, stream, cancel));
                }
                None => break,
            },
        }
    }
    // Drain: withdraw the announcement, refuse new sessions, and ask the clients of
    // running ones to move them elsewhere (they replay into a new route); whatever has
    // not moved within the grace period is closed.
    server.draining.store(true, Ordering::Relaxed);
    server.leaving.cancel();
    if !kill.is_cancelled() {
        eprintln!("draining: withdrawing the announcement and refusing new sessions");
        seq += 1;
        let addrs = handle.listen_addrs().await.unwrap_or_default();
        let goodbye = sign(server.announcement(&addrs, Vec::new(), Duration::from_secs(2), seq));
        if let Ok(goodbye) = goodbye {
            let acked = handle
                .set_own_announcement_and_wait(Some(goodbye), Duration::from_secs(3))
                .await?;
            if !acked {
                tracing::warn!("not every bootstrap acknowledged the withdrawal within 3 s");
            }
        }
        let deadline = tokio::time::Instant::now() + cfg.grace;
        while !server.table.is_empty() && !kill.is_cancelled() {
            tokio::select! {
                _ = kill.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                stream = incoming.next() => if let Some((peer, stream)) = stream {
                    // Attach streams of running sessions still arrive; new Opens are refused.
                    if sessions.len() < max_streams {
                        let (server, cancel) = (server.clone(), tenure_cancel.child_token());
                        sessions.spawn(session::serve_stream(server, peer, stream, cancel));
                    }
                },
            }
        }
    }
    let left = server.table.len();
    sessions_cancel.cancel();
    while sessions.join_next().await.is_some() {}
    background.shutdown().await;
    net_cancel.cancel();
    let _ = net_task.await;
    eprintln!(
        "stopped after {} steps; {left} sessions were still open",
        server.steps.load(Ordering::Relaxed),
    );
    Ok(())
}
