//! The server role: hold a span of blocks, announce it, run inference
//! sessions, pass each step's output straight to the next server of the route.

use crate::manifest::manifest_from_digest;
use crate::net::book::now_ms;
use crate::net::{self, InboundInfer, NetConfig, NetHandle, Role};
use crate::wire::{from_wire, to_wire};
use anyhow::{Context, Result, anyhow, bail};
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::{
    Announcement, BlockRange as WireRange, ErrorCode, HiddenStates, InferRequest, InferResponse,
    ModelId, PeerIdBytes, ProtocolError, RouteHop, SessionId, SignedAnnouncement, WireDType,
};
use pollen_shard::{BlockRange, BlockSpan, CacheLimits, LoadOptions, ModelFile, SpanCache};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Model file.
    pub model: PathBuf,
    /// Blocks to serve, `A:B`.
    pub blocks: String,
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
}

struct Session {
    /// Taken out while a step computes (the step holds the session's lock).
    cache: Option<SpanCache>,
    next: Option<(PeerId, Vec<Multiaddr>)>,
    wire_dtype: WireDType,
    last_used: Instant,
}

/// A running server's shared state.
struct Server {
    span: Arc<BlockSpan>,
    wire_blocks: WireRange,
    model_id: ModelId,
    me: PeerId,
    net: NetHandle,
    sessions: std::sync::Mutex<HashMap<SessionId, Arc<Mutex<Session>>>>,
    cfg: ServeConfig,
    draining: AtomicBool,
    steps: AtomicU64,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> InferResponse {
    InferResponse::Error(ProtocolError::new(code, msg.into()))
}

fn parse_peer(p: &PeerIdBytes) -> Result<PeerId> {
    PeerId::from_bytes(&p.0).map_err(|e| anyhow!("bad peer id in route: {e}"))
}

fn parse_addrs(addrs: &[String]) -> Vec<Multiaddr> {
    addrs.iter().filter_map(|a| a.parse().ok()).collect()
}

impl Server {
    fn session_count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn get(&self, id: SessionId) -> Option<Arc<Mutex<Session>>> {
        self.sessions.lock().ok().and_then(|s| s.get(&id).cloned())
    }

    fn remove(&self, id: SessionId) -> Option<Arc<Mutex<Session>>> {
        self.sessions.lock().ok().and_then(|mut s| s.remove(&id))
    }

    async fn handle(self: Arc<Self>, job: InboundInfer) {
        let InboundInfer {
            peer,
            request,
            channel,
        } = job;
        let response = match request {
            InferRequest::Open {
                session,
                model_id,
                route,
                hop,
                budget,
                wire_dtype,
            } => {
                self.open(
                    session,
                    model_id,
                    route,
                    hop as usize,
                    budget.max_tokens,
                    wire_dtype,
                )
                .await
            }
            InferRequest::Forward {
                session,
                position,
                step,
                hidden,
            } => self.forward(session, position, step, hidden).await,
            InferRequest::Close { session } => self.close(session).await,
        };
        if let InferResponse::Error(e) = &response {
            tracing::debug!("answering {peer} with error {:?}: {}", e.code, e.message);
        }
        self.net.respond(channel, response).await;
    }

    async fn open(
        &self,
        session: SessionId,
        model_id: ModelId,
        route: Vec<RouteHop>,
        hop: usize,
        max_tokens: u32,
        wire_dtype: WireDType,
    ) -> InferResponse {
        if self.draining.load(Ordering::Relaxed) {
            return err(ErrorCode::Busy, "this server is shutting down");
        }
        if model_id != self.model_id {
            return err(
                ErrorCode::UnknownModel,
                format!("this server serves model {}, not {model_id}", self.model_id),
            );
        }
        let Some(me) = route.get(hop) else {
            return err(ErrorCode::BadRequest, "hop outside the route");
        };
        let range = self.span.range();
        if me.blocks.start() as usize != range.start || me.blocks.end() as usize != range.end {
            return err(
                ErrorCode::SpanMismatch,
                format!(
                    "this server holds blocks {range}, the route asks for {}:{}",
                    me.blocks.start(),
                    me.blocks.end()
                ),
            );
        }
        if parse_peer(&me.peer).ok() != Some(self.me) {
            return err(
                ErrorCode::BadRequest,
                "the route names another peer at this hop",
            );
        }
        let limits = CacheLimits {
            max_tokens: (max_tokens as usize).min(self.cfg.max_session_tokens),
            ..CacheLimits::default()
        };
        let next = match route.get(hop + 1) {
            None => None,
            Some(h) => match parse_peer(&h.peer) {
                Ok(p) => Some((p, parse_addrs(&h.addrs))),
                Err(e) => return err(ErrorCode::BadRequest, e.to_string()),
            },
        };
        {
            let Ok(mut sessions) = self.sessions.lock() else {
                return err(ErrorCode::Internal, "session table poisoned");
            };
            if sessions.contains_key(&session) {
                return err(
                    ErrorCode::BadRequest,
                    format!("session {} is already open", session.0),
                );
            }
            if sessions.len() >= self.cfg.max_sessions {
                return err(
                    ErrorCode::Busy,
                    format!("this server is full ({} sessions)", self.cfg.max_sessions),
                );
            }
            sessions.insert(
                session,
                Arc::new(Mutex::new(Session {
                    cache: Some(self.span.new_cache(limits)),
                    next: next.clone(),
                    wire_dtype,
                    last_used: Instant::now(),
                })),
            );
        }
        let mut free = limits.max_tokens as u32;
        if let Some((peer, addrs)) = next {
            let req = InferRequest::Open {
                session,
                model_id,
                route,
                hop: (hop + 1) as u32,
                budget: pollen_protocol::SessionBudget {
                    max_tokens,
                    max_message_bytes: pollen_protocol::limits::MAX_INFER_REQUEST_BYTES as u32,
                    idle_timeout_ms: self.cfg.idle_timeout.as_millis() as u32,
                },
                wire_dtype,
            };
            match self
                .net
                .infer(peer, addrs, req, Duration::from_secs(30))
                .await
            {
                Ok(InferResponse::Opened { free_tokens, .. }) => free = free.min(free_tokens),
                Ok(InferResponse::Error(e)) => {
                    self.remove(session);
                    return InferResponse::Error(e);
                }
                Ok(other) => {
                    self.remove(session);
                    return err(
                        ErrorCode::Internal,
                        format!("next server answered {other:?}"),
                    );
                }
                Err(e) => {
                    self.remove(session);
                    return err(ErrorCode::Internal, format!("next server {peer}: {e:#}"));
                }
            }
        }
        InferResponse::Opened {
            session,
            free_tokens: free,
        }
    }

    async fn forward(
        &self,
        session: SessionId,
        position: u32,
        step: u64,
        hidden: HiddenStates,
    ) -> InferResponse {
        let Some(entry) = self.get(session) else {
            return err(
                ErrorCode::UnknownSession,
                format!("no open session {}", session.0),
            );
        };
        let mut s = entry.lock().await;
        s.last_used = Instant::now();
        let input = match from_wire(&hidden, self.span.config().hidden_size, self.span.device()) {
            Ok(t) => t,
            Err(e) => return err(ErrorCode::BadRequest, e.to_string()),
        };
        let span = self.span.clone();
        let Some(mut cache) = s.cache.take() else {
            return err(
                ErrorCode::Internal,
                "session cache lost by an earlier failure",
            );
        };
        let pos = position as usize;
        let result = tokio::task::spawn_blocking(move || {
            let out = span.forward(&input, pos, &mut cache);
            (out, cache)
        })
        .await;
        let (out, cache) = match result {
            Ok(r) => r,
            Err(e) => return err(ErrorCode::Internal, format!("compute task failed: {e}")),
        };
        // The span leaves the cache as it was when a step fails.
        s.cache = Some(cache);
        let out = match out {
            Ok(o) => o,
            Err(pollen_shard::ShardError::CacheFull { detail }) => {
                return err(ErrorCode::OverBudget, detail);
            }
            Err(e @ pollen_shard::ShardError::PositionMismatch { .. }) => {
                return err(ErrorCode::BadRequest, e.to_string());
            }
            Err(e) => return err(ErrorCode::Internal, e.to_string()),
        };
        self.steps.fetch_add(1, Ordering::Relaxed);
        let wire = match to_wire(&out, s.wire_dtype) {
            Ok(w) => w,
            Err(e) => return err(ErrorCode::Internal, e.to_string()),
        };
        match s.next.clone() {
            None => InferResponse::Output {
                session,
                step,
                position,
                hidden: wire,
            },
            Some((peer, addrs)) => {
                let req = InferRequest::Forward {
                    session,
                    position,
                    step,
                    hidden: wire,
                };
                match self
                    .net
                    .infer(peer, addrs, req, Duration::from_secs(120))
                    .await
                {
                    Ok(resp) => resp,
                    Err(e) => err(ErrorCode::Internal, format!("next server {peer}: {e:#}")),
                }
            }
        }
    }

    async fn close(&self, session: SessionId) -> InferResponse {
        if let Some(entry) = self.get(session) {
            let next = entry.lock().await.next.clone();
            if let Some((peer, addrs)) = next {
                let _ = self
                    .net
                    .infer(
                        peer,
                        addrs,
                        InferRequest::Close { session },
                        Duration::from_secs(10),
                    )
                    .await;
            }
            // Removed only now, so a draining server waits for the close to travel on.
            self.remove(session);
        }
        InferResponse::Closed { session }
    }

    fn reap_idle(&self) {
        let idle = self.cfg.idle_timeout;
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|id, s| {
                let keep = s
                    .try_lock()
                    .map(|s| s.last_used.elapsed() < idle)
                    .unwrap_or(true);
                if !keep {
                    tracing::info!("closing session {} after {idle:?} idle", id.0);
                }
                keep
            });
        }
    }

    fn announcement(
        &self,
        addrs: &[Multiaddr],
        throughput: f32,
        ttl: Duration,
        seq: u64,
    ) -> Announcement {
        let now = now_ms();
        let free_sessions = if self.draining.load(Ordering::Relaxed) {
            0
        } else {
            self.cfg.max_sessions.saturating_sub(self.session_count()) as u32
        };
        Announcement {
            peer: PeerIdBytes(self.me.to_bytes()),
            model_id: self.model_id,
            model_name: self.span.config().name.chars().take(200).collect(),
            num_blocks: self.span.config().num_blocks as u32,
            blocks: self.wire_blocks,
            throughput,
            free_sessions,
            free_cache_tokens: (free_sessions as usize * self.cfg.max_session_tokens)
                .min(u32::MAX as usize) as u32,
            addrs: addrs.iter().take(16).map(|a| a.to_string()).collect(),
            issued_at_ms: now,
            expires_at_ms: now + ttl.as_millis() as u64,
            seq,
        }
    }
}

/// Measures this span's decode speed (tokens/s through these blocks alone).
fn measure_throughput(span: &BlockSpan) -> f32 {
    let Ok(x) = candle_core::Tensor::zeros(
        (1, 1, span.config().hidden_size),
        candle_core::DType::F32,
        span.device(),
    ) else {
        return 0.0;
    };
    let mut cache = span.new_cache(CacheLimits::default());
    let _ = span.forward(&x, 0, &mut cache);
    let started = Instant::now();
    let steps = 8;
    for i in 1..=steps {
        if span.forward(&x, i, &mut cache).is_err() {
            return 0.0;
        }
    }
    steps as f32 / started.elapsed().as_secs_f32().max(1e-6)
}

/// Runs a server until `stop` fires (first Ctrl-C); `kill` (second Ctrl-C) ends it at once.
pub async fn run(cfg: ServeConfig, stop: CancellationToken, kill: CancellationToken) -> Result<()> {
    let keypair = net::identity::load_or_create(&cfg.identity)?;
    let secret = net::identity::ed25519_secret(&keypair)?;
    let me = keypair.public().to_peer_id();
    let model = cfg.model.clone();
    let blocks = cfg.blocks.clone();
    let load = cfg.load.clone();
    let (span, model_id, throughput) = tokio::task::spawn_blocking(move || -> Result<_> {
        let file = ModelFile::open(&model)?;
        let num_blocks = file.config()?.num_blocks;
        let range = BlockRange::parse(&blocks, num_blocks)?;
        let pb = crate::progress::bar("loading", range.len());
        let span = BlockSpan::load(&file, range, &load, &mut |d, _| pb.set_position(d as u64))?;
        pb.finish_and_clear();
        let digest = pollen_shard::digest::digest(&file, &mut |_, _| {})?;
        let id = manifest_from_digest(&digest).id();
        let tps = measure_throughput(&span);
        Ok((span, id, tps))
    })
    .await
    .context("loading task failed")??;
    let net_cancel = CancellationToken::new();
    let net = net::start(
        NetConfig {
            keypair,
            listen: cfg.listen.clone(),
            bootstrap: cfg.bootstrap.clone(),
            mdns: cfg.mdns,
            role: Role::Server,
            infer_timeout: Duration::from_secs(120),
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
        },
        net_cancel.clone(),
    )
    .await?;
    let handle = net.handle.clone();
    let mut inbound = net.inbound;
    let range = span.range();
    let wire_blocks =
        WireRange::new(range.start as u32, range.end as u32).map_err(|e| anyhow!("{e}"))?;
    let server = Arc::new(Server {
        wire_blocks,
        span: Arc::new(span),
        model_id,
        me,
        net: handle.clone(),
        sessions: std::sync::Mutex::new(HashMap::new()),
        cfg: cfg.clone(),
        draining: AtomicBool::new(false),
        steps: AtomicU64::new(0),
    });
    // Bootstraps are dialed now and again whenever the connection is gone, so
    // a restarted bootstrap learns of this server at its next renewal.
    let bootstraps: Vec<(Option<PeerId>, Multiaddr)> = cfg
        .bootstrap
        .iter()
        .map(|a| {
            let id = a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            });
            (id, a.clone())
        })
        .collect();
    let dial_missing = |handle: NetHandle, bootstraps: Vec<(Option<PeerId>, Multiaddr)>| async move {
        let connected: Vec<PeerId> = handle
            .peers()
            .await
            .map(|p| p.into_iter().map(|p| p.peer).collect())
            .unwrap_or_default();
        for (id, addr) in bootstraps {
            if id.is_some_and(|id| connected.contains(&id)) {
                continue;
            }
            let h = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = h.dial_with_retry(&addr, Duration::from_secs(8)).await {
                    tracing::warn!("{e:#}");
                }
            });
        }
    };
    dial_missing(handle.clone(), bootstraps.clone()).await;
    // At most this many requests are computed or forwarded at once; beyond it
    // the server answers `busy` instead of queueing without bound.
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_sessions.max(1) * 2));
    let dispatch = |job: InboundInfer| {
        let server = server.clone();
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    let _permit = permit;
                    server.handle(job).await;
                });
            }
            Err(_) => {
                let net = server.net.clone();
                tokio::spawn(async move {
                    net.respond(
                        job.channel,
                        err(ErrorCode::Busy, "this server is saturated; try another"),
                    )
                    .await;
                });
            }
        }
    };
    // Wait for the listeners to report their addresses.
    let addrs = handle
        .wait_listening(cfg.listen.len().max(1), Duration::from_secs(2))
        .await?;
    let mut seq = 1u64;
    let sign = |a: Announcement| SignedAnnouncement::sign(a, &secret).map_err(|e| anyhow!("{e}"));
    handle
        .set_own_announcement(Some(sign(server.announcement(
            &addrs,
            throughput,
            cfg.announce_ttl,
            seq,
        ))?))
        .await?;
    let range = server.span.range();
    println!("ready peer {me} model {model_id} blocks {range} throughput {throughput:.1}");
    for a in &addrs {
        println!("listening {a}/p2p/{me}");
    }
    let mut renew = tokio::time::interval(cfg.announce_ttl / 3);
    renew.tick().await;
    let mut reap = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = kill.cancelled() => break,
            _ = renew.tick() => {
                dial_missing(handle.clone(), bootstraps.clone()).await;
                seq += 1;
                let addrs = handle.listen_addrs().await.unwrap_or_default();
                handle.set_own_announcement(Some(sign(server.announcement(&addrs, throughput, cfg.announce_ttl, seq))?)).await?;
            }
            _ = reap.tick() => server.reap_idle(),
            job = inbound.recv() => match job {
                Some(job) => dispatch(job),
                None => bail!("the network task stopped"),
            },
        }
    }
    // Drain: withdraw the announcement, refuse new sessions, let running ones finish.
    server.draining.store(true, Ordering::Relaxed);
    eprintln!("draining: withdrawing the announcement and refusing new sessions");
    seq += 1;
    let addrs = handle.listen_addrs().await.unwrap_or_default();
    let goodbye = sign(server.announcement(&addrs, throughput, Duration::from_secs(2), seq))?;
    handle
        .set_own_announcement_and_wait(Some(goodbye), Duration::from_secs(3))
        .await?;
    let deadline = Instant::now() + cfg.grace;
    while server.session_count() > 0 && Instant::now() < deadline && !kill.is_cancelled() {
        tokio::select! {
            _ = kill.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            job = inbound.recv() => if let Some(job) = job { dispatch(job) },
        }
        server.reap_idle();
    }
    net_cancel.cancel();
    eprintln!(
        "stopped after {} steps; {} sessions were still open",
        server.steps.load(Ordering::Relaxed),
        server.session_count()
    );
    Ok(())
}
