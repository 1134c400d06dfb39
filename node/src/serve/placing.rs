//! Automatic placement on a live server: what this machine can do (measured once per
//! model, compute mode, threads, CPU and kernel path, cached), how many blocks fit,
//! which span to take at start, and the watcher that tells the server when to move.
//! The rule itself is [`crate::placement`]; this file is its I/O.

use crate::fetch;
use crate::net::NetHandle;
use crate::placement::{self, Holding, Move, memory};
use libp2p::PeerId;
use pollen_protocol::{ModelId, VerifiedAnnouncement};
use pollen_shard::{BlockRange, BlockSpan, CacheLimits, LoadOptions, ModelFile};
use rand::Rng;
use std::ops::Range;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// An announcement this short-lived is a goodbye (a draining server sends one of 2 s):
/// placement counts its server as gone.
const GOODBYE_LIFETIME_MS: u64 = 2_500;

/// Checks in a row that may name the same other server, which stays put, before it
/// counts as pinned (a server started with `--blocks` never moves); a mover that is
/// only slow has moved well before.
const NAMED_AND_STAYED: u32 = 2;

/// Cache folder kind for measurements.
const CACHE_KIND: &str = "throughput";

/// What this machine does with one block of the model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    /// Decode: tokens/s through one block, one token at a time.
    pub decode_tps: f64,
    /// Prefill: tokens/s through one block, 64 tokens at once.
    pub prefill_tps: f64,
    /// Bytes one block's weights take in memory, as loaded.
    pub block_weight_bytes: u64,
}

/// Tokens in the prefill measurement.
const PREFILL_TOKENS: usize = 64;

/// Measures one block (the first) of `file`: decode and prefill speed, and its weights'
/// size. Blocking.
pub fn measure(file: &ModelFile, load: &LoadOptions) -> Result<Measured, pollen_shard::ShardError> {
    let cfg = file.config()?;
    let span = BlockSpan::load(
        file,
        BlockRange::new(0, 1, cfg.num_blocks)?,
        load,
        &mut |_, _| {},
    )?;
    let hidden = cfg.hidden_size;
    let device = span.device().clone();
    let one = candle_core::Tensor::zeros((1, 1, hidden), candle_core::DType::F32, &device)?;
    let mut cache = span.new_cache(CacheLimits::default());
    span.forward(&one, 0, &mut cache)?;
    // Decode: at least 32 steps and 0.2 s.
    let started = Instant::now();
    let mut steps = 0usize;
    while steps < 32 || (started.elapsed() < Duration::from_millis(200) && steps < 4096) {
        steps += 1;
        span.forward(&one, steps, &mut cache)?;
    }
    let decode_tps = steps as f64 / started.elapsed().as_secs_f64().max(1e-9);
    // Prefill: a fresh cache each time, at least 3 runs and 0.2 s.
    let many = candle_core::Tensor::zeros(
        (1, PREFILL_TOKENS, hidden),
        candle_core::DType::F32,
        &device,
    )?;
    let mut cache = span.new_cache(CacheLimits::default());
    span.forward(&many, 0, &mut cache)?;
    let started = Instant::now();
    let mut runs = 0usize;
    while runs < 3 || (started.elapsed() < Duration::from_millis(200) && runs < 256) {
        runs += 1;
        let mut cache = span.new_cache(CacheLimits::default());
        span.forward(&many, 0, &mut cache)?;
    }
    let prefill_tps = (runs * PREFILL_TOKENS) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(Measured {
        decode_tps,
        prefill_tps,
        block_weight_bytes: span.weight_bytes() as u64,
    })
}

/// What decides how fast this machine runs a block, besides the model, the compute mode
/// and the threads: the CPU (its model name and the instruction-set features the kernels
/// use) and the kernel path this process runs (`POLLEN_KERNEL` may force a slower one).
/// A measurement is cached under these and used only where they are the same: a cache
/// folder copied to another machine, or a run on another kernel path, measures anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`), or the architecture where none is known.
    pub cpu: String,
    /// The speed-relevant CPU features present, comma-separated.
    pub features: String,
    /// The fast mode's kernel path in this process ([`pollen_shard::kernels::active_path`]).
    pub kernel: String,
}

impl Machine {
    /// This machine and this process's kernel path.
    pub fn this() -> Self {
        Self {
            cpu: cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string()),
            features: cpu_features().join(","),
            kernel: pollen_shard::kernels::active_path().to_string(),
        }
    }

    /// One line naming all of it, as stored next to a cached measurement.
    pub fn describe(&self) -> String {
        format!(
            "cpu={}; features={}; kernel={}; arch={}",
            self.cpu,
            self.features,
            self.kernel,
            std::env::consts::ARCH
        )
    }
}

/// The CPU's model name from `/proc/cpuinfo` (Linux), if any.
fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    };
    field("model name").or_else(|| {
        // aarch64 names the core by implementer and part.
        let (i, p) = (field("CPU implementer")?, field("CPU part")?);
        Some(format!("implementer {i} part {p}"))
    })
}

/// The CPU features that change which kernels run, present on this CPU.
fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut present = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    present.push($f);
                }
            )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_aarch64_feature_detected!($f) {
                    present.push($f);
                }
            )*};
        }
        check!("neon", "dotprod", "i8mm", "fp16");
    }
    present
}

/// The cache key of a measurement: model, compute mode (weights mode and device),
/// the protocol version (a new one may change what a mode computes, and its
/// speed: version 4 keeps the CPU modes' keys and values in f16, 5 changes their
/// exponential), threads,
/// kernel path, and a digest of the whole [`Machine`] (CPU model and features).
fn cache_key(model_id: &ModelId, compute: &str, threads: usize, machine: &Machine) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    };
    let digest = blake3::hash(machine.describe().as_bytes()).to_hex();
    format!(
        "{model_id}-{}-v{}-t{threads}-{}-{}.json",
        safe(compute),
        pollen_protocol::PROTOCOL_VERSION,
        safe(&machine.kernel),
        &digest.as_str()[..16]
    )
}

/// A measurement as cached: with the machine it was taken on.
#[derive(serde::Serialize, serde::Deserialize)]
struct Cached {
    machine: String,
    measured: Measured,
}

/// The cached text of measurement `m`, taken on `machine`.
fn to_cache(m: &Measured, machine: &Machine) -> Option<String> {
    serde_json::to_string(&Cached {
        machine: machine.describe(),
        measured: *m,
    })
    .ok()
}

/// A cached measurement read back: usable only when taken on the same `machine` and sane
/// (a file renamed or copied from elsewhere, an older format or a broken one is not).
fn from_cache(text: &str, machine: &Machine) -> Option<Measured> {
    let c: Cached = serde_json::from_str(text).ok()?;
    let m = c.measured;
    (c.machine == machine.describe()
        && m.decode_tps.is_finite()
        && m.decode_tps > 0.0
        && m.block_weight_bytes > 0)
        .then_some(m)
}

/// This machine's measurement for the model: from the cache folder when there (taken on
/// this same [`Machine`], in this compute mode, with these threads), else measured (a
/// second or two) and cached. Blocking.
pub fn measured(
    file: &ModelFile,
    load: &LoadOptions,
    model_id: &ModelId,
    compute: &str,
    threads: usize,
) -> Result<(Measured, bool), pollen_shard::ShardError> {
    let machine = Machine::this();
    let key = cache_key(model_id, compute, threads, &machine);
    let cached = fetch::read_cached(CACHE_KIND, &key).and_then(|t| from_cache(&t, &machine));
    if let Some(m) = cached {
        return Ok((m, true));
    }
    let m = measure(file, load)?;
    if let Some(text) = to_cache(&m, &machine) {
        fetch::write_cached(CACHE_KIND, &key, &text);
    }
    Ok((m, false))
}

/// Bytes one block needs at full load: its weights, and the KV cache of every session at
/// its token limit (`kv_per_token` bytes a token in one block).
pub fn bytes_per_block(m: &Measured, kv_per_token: usize, sessions: usize, tokens: usize) -> u64 {
    let kv = (kv_per_token as u64)
        .saturating_mul(tokens as u64)
        .saturating_mul(sessions.max(1) as u64);
    m.block_weight_bytes.saturating_add(kv)
}

/// A memory budget as people read it, with where it came from.
pub fn describe_budget(budget: u64, source: memory::BudgetSource) -> String {
    format!("{} ({})", memory::format_size(budget), source.describe())
}

/// How many times this server's own measured one-block throughput a peer's claimed
/// throughput may count for in placement.
pub const CLAIM_CAP_FACTOR: f64 = 4.0;

/// A peer's claimed throughput (tokens/s through its span, counted for each block of it)
/// as placement counts it: sane, and at most [`CLAIM_CAP_FACTOR`] times `own_tps`, this
/// server's own measured throughput through a span as long as the peer's (its one-block
/// throughput over the span's length: [`holdings`]). This bounds how far a server that
/// lies about its speed can make a span look covered and steer honest servers away from
/// it (to as much as four servers as fast as this one), at the cost of undercounting a
/// peer more than that much faster than this machine. Without a usable measure of its
/// own, only [`placement::sane_throughput`] applies.
pub fn capped_claim(claimed: f64, own_tps: f64) -> f64 {
    let claimed = placement::sane_throughput(claimed);
    if own_tps.is_finite() && own_tps > 0.0 {
        claimed.min(placement::sane_throughput(own_tps * CLAIM_CAP_FACTOR))
    } else {
        claimed
    }
}

/// The swarm's holdings of `model_id` in compute mode `compute` (the spans a route may
/// chain with this server's), this server's own left out, goodbyes counted as gone, each
/// claimed throughput capped by [`capped_claim`] against what this server would do through
/// the claimed span (`own_block_tps`, its measured one-block decode throughput, over the
/// span's length: a claim on a long span counts for no more than one on a block).
pub fn holdings(
    book: &[VerifiedAnnouncement],
    model_id: &ModelId,
    compute: &str,
    num_blocks: usize,
    me: &PeerId,
    own_block_tps: f64,
) -> Vec<Holding<Vec<u8>>> {
    let me = me.to_bytes();
    book.iter()
        .filter(|a| a.model_id == *model_id && a.compute == compute)
        .filter(|a| a.num_blocks as usize == num_blocks && a.peer.0 != me)
        .filter(|a| a.expires_at_ms.saturating_sub(a.issued_at_ms) > GOODBYE_LIFETIME_MS)
        .map(|a| {
            let span = a.blocks.start() as usize..(a.blocks.end() as usize).min(num_blocks);
            let len = span.len().max(1) as f64;
            Holding {
                who: a.peer.0.clone(),
                throughput: capped_claim(f64::from(a.throughput), own_block_tps / len),
                span,
            }
        })
        .collect()
}

/// Where this server is: its span and its span throughput (tokens/s).
pub type Place = (Range<usize>, f64);

/// What the watcher needs to know.
pub struct Watch {
    /// The node's network.
    pub net: NetHandle,
    /// This server.
    pub me: PeerId,
    /// The model.
    pub model_id: ModelId,
    /// Its compute mode.
    pub compute: String,
    /// Blocks of the model.
    pub num_blocks: usize,
    /// Mean time between checks.
    pub every: Duration,
    /// This server's measured decode throughput through one block (tokens/s): peers'
    /// claims are capped against it ([`capped_claim`]).
    pub block_tps: f64,
}

/// How often the watcher lists the swarm (a gather asks the entry points and every
/// server of the model for its list, so a swarm of N servers each gathering costs
/// about N² list requests a round).
///
/// The bound: at most one gather per `base` (`every / 6`, clamped to 0.5–10 s: 10 s at
/// the default `every` of 60 s) while the swarm's holdings change; each gather that
/// finds them unchanged doubles the wait, up to `cap` (`every`, at least `base`), so a
/// quiet swarm costs about one gather per `every` instead of one per `base` (6 times
/// fewer at the defaults). Any change resets the wait to `base`. A server that leaves
/// is still noticed within `base`: between gathers the watcher checks, locally and for
/// free, whether a holder it was connected to has disconnected, and gathers at once if
/// so. Every wait is jittered by [`POLL_JITTER`] either way so servers do not gather in
/// step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The shortest wait between gathers.
    pub base: Duration,
    /// The longest.
    pub cap: Duration,
    current: Duration,
}

/// Jitter of every wait of the watcher: ±20%.
pub const POLL_JITTER: f64 = 0.2;

impl Backoff {
    /// The backoff of a watcher that checks placement about every `every`.
    pub fn new(every: Duration) -> Self {
        let base = (every / 6).clamp(Duration::from_millis(500), Duration::from_secs(10));
        let cap = every.max(base);
        Self {
            base,
            cap,
            current: base,
        }
    }

    /// The wait (before jitter) until the next gather, after one that found the swarm
    /// `changed` since the one before.
    pub fn after(&mut self, changed: bool) -> Duration {
        self.current = if changed {
            self.base
        } else {
            (self.current * 2).min(self.cap)
        };
        self.current
    }
}

/// Most servers the watcher remembers as pinned: each is learned at most once per
/// placement check, and the oldest is forgotten first.
const MAX_PINS: usize = 256;

/// Gathers in a row that may miss a pinned server before it is forgotten (one missing
/// page of a gather must not cost another round of naming it).
const PIN_MISSES: u32 = 3;

/// Servers that were named to move and stayed put: pinned with `--blocks`, which no
/// announcement field says, so learned by watching. Placement passes them over (they
/// still count for coverage) while they hold the span they were pinned at.
#[derive(Debug, Default)]
pub struct Pins {
    /// Who, at which span, and how many gathers in a row missed it.
    held: Vec<(Vec<u8>, Range<usize>, u32)>,
}

impl Pins {
    /// Remembers `who` as pinned at `span`.
    pub fn learn(&mut self, who: Vec<u8>, span: Range<usize>) {
        self.held.retain(|(p, _, _)| *p != who);
        if self.held.len() >= MAX_PINS {
            self.held.remove(0);
        }
        self.held.push((who, span, 0));
    }

    /// Updates from a gather: a pinned server seen at another span moved (it was not
    /// pinned, or restarted elsewhere) and is forgotten; one not seen is forgotten after
    /// [`PIN_MISSES`] gathers in a row.
    pub fn update<K: AsRef<[u8]>>(&mut self, swarm: &[Holding<K>]) {
        self.held.retain_mut(|(p, span, misses)| {
            match swarm.iter().find(|h| h.who.as_ref() == p.as_slice()) {
                Some(h) => {
                    *misses = 0;
                    h.span == *span
                }
                None => {
                    *misses += 1;
                    *misses < PIN_MISSES
                }
            }
        });
    }

    /// Whether placement may name `who` to move.
    pub fn movable(&self, who: &[u8]) -> bool {
        !self.held.iter().any(|(p, _, _)| p.as_slice() == who)
    }

    /// How many servers are remembered as pinned.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Who holds what, as compared between gathers to see the swarm change.
fn layout(swarm: &[Holding<Vec<u8>>]) -> Vec<(Vec<u8>, Range<usize>)> {
    let mut l: Vec<_> = swarm
        .iter()
        .map(|h| (h.who.clone(), h.span.clone()))
        .collect();
    l.sort_by(|a, b| (&a.0, a.1.start, a.1.end).cmp(&(&b.0, b.1.start, b.1.end)));
    l
}

/// Re-checks the swarm about every `every` (jittered by a quarter either way) and a few
/// seconds after a server leaves; sends a move when [`placement::plan_move`] names this
/// server, then waits until `place` changes (the move done) before checking again.
/// Between checks it gathers as [`Backoff`] bounds.
pub async fn watch_swarm(
    w: Watch,
    mut place: watch::Receiver<Place>,
    moves: mpsc::Sender<Move<Vec<u8>>>,
    cancel: CancellationToken,
) {
    let me = w.me.to_bytes();
    let mut backoff = Backoff::new(w.every);
    let poll = backoff.base;
    let jittered = |base: Duration, spread: f64| {
        base.mul_f64(1.0 + rand::rng().random_range(-spread..=spread))
    };
    let mut due = tokio::time::Instant::now() + jittered(w.every, 0.25);
    let mut next_gather = tokio::time::Instant::now();
    let mut known: Option<Vec<(Vec<u8>, Range<usize>)>> = None;
    // Holders this node was connected to at the last gather: one disconnecting is the
    // cheap sign that a server left.
    let mut connected: Vec<PeerId> = Vec::new();
    let mut pins = Pins::default();
    // The server last named to move, from where, how many checks in a row, and when first.
    let mut named: Option<(Vec<u8>, Range<usize>, u32, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(jittered(poll, POLL_JITTER)) => {}
        }
        let now = tokio::time::Instant::now();
        if now < due && now < next_gather {
            // Free: the node's own connection list, no message sent.
            let Ok(peers) = w.net.peers().await else {
                continue;
            };
            if connected.iter().all(|c| peers.iter().any(|p| p.peer == *c)) {
                continue;
            }
            tracing::debug!("a server of the model disconnected: listing the swarm");
        }
        let Ok(book) = w.net.gather(Some(w.model_id)).await else {
            next_gather = tokio::time::Instant::now() + jittered(poll, POLL_JITTER);
            continue;
        };
        let mut swarm = holdings(
            &book,
            &w.model_id,
            &w.compute,
            w.num_blocks,
            &w.me,
            w.block_tps,
        );
        pins.update(&swarm);
        let now_layout = layout(&swarm);
        let changed = known.as_ref() != Some(&now_layout);
        if let Some(before) = &known {
            let gone = before
                .iter()
                .filter(|(p, _)| !now_layout.iter().any(|(q, _)| q == p))
                .count();
            if gone > 0 {
                tracing::info!("{gone} server(s) left: checking placement soon");
                let soon = tokio::time::Instant::now() + jittered(poll, 0.5);
                due = due.min(soon);
            }
        }
        known = Some(now_layout);
        next_gather = tokio::time::Instant::now() + jittered(backoff.after(changed), POLL_JITTER);
        if let Ok(peers) = w.net.peers().await {
            connected = peers
                .into_iter()
                .map(|p| p.peer)
                .filter(|p| swarm.iter().any(|h| h.who == p.to_bytes()))
                .collect();
        }
        if tokio::time::Instant::now() < due {
            continue;
        }
        due = tokio::time::Instant::now() + jittered(w.every, 0.25);
        let (span, throughput) = place.borrow().clone();
        swarm.push(Holding {
            who: me.clone(),
            span,
            throughput,
        });
        // Off the runtime's workers: the plan tries every holder at every place, so its
        // time grows with holders × blocks² (16,384 holders of an 80-block model, a full
        // book: about 0.6 s).
        let num_blocks = w.num_blocks;
        let planned = tokio::task::spawn_blocking(move || {
            let m = placement::plan_move_among(num_blocks, &swarm, placement::MARGIN, |k| {
                pins.movable(k)
            });
            (m, pins)
        })
        .await;
        let m = match planned {
            Ok((m, back)) => {
                pins = back;
                m
            }
            Err(e) => {
                tracing::error!("placement: planning failed: {e}");
                pins = Pins::default();
                None
            }
        };
        let Some(m) = m else {
            named = None;
            continue;
        };
        if m.who != me {
            let now = tokio::time::Instant::now();
            let (times, since) = match &named {
                Some((p, from, n, since)) if *p == m.who && *from == m.from => (n + 1, *since),
                _ => (1, now),
            };
            // Named at two checks at least a short check interval apart (a check brought
            // forward by a departure must not catch a mover still loading its span).
            if times >= NAMED_AND_STAYED && now - since >= w.every.mul_f64(0.75) {
                let peer = PeerId::from_bytes(&m.who)
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                tracing::info!("placement: {peer} stays put (pinned?): passing it over");
                pins.learn(m.who, m.from);
                named = None;
                due = tokio::time::Instant::now() + jittered(poll, POLL_JITTER);
            } else {
                tracing::debug!("placement: another server should move first");
                named = Some((m.who, m.from, times, since));
            }
            continue;
        }
        named = None;
        if moves.send(m).await.is_err() {
            return;
        }
        // Wait for the move (or its failure: the server then sends the same place again).
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = place.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
        }
        next_gather = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpu: &str, features: &str, kernel: &str) -> Machine {
        Machine {
            cpu: cpu.into(),
            features: features.into(),
            kernel: kernel.into(),
        }
    }

    #[test]
    fn cache_keys_are_file_names() {
        let id = ModelId::from_bytes([7; 32]);
        let m = machine("AMD EPYC 9004/x", "avx2,avx512vnni", "avx512-vnni");
        let key = cache_key(&id, "fast/cpu", 1, &m);
        let v = pollen_protocol::PROTOCOL_VERSION;
        assert!(
            key.contains(&format!("-fast-cpu-v{v}-t1-avx512-vnni-")),
            "{key}"
        );
        assert!(key.ends_with(".json"), "{key}");
        assert!(!key.contains('/') && !key.contains(' '), "{key}");
    }

    #[test]
    fn measurements_are_keyed_by_cpu_kernel_threads_and_mode() {
        let id = ModelId::from_bytes([7; 32]);
        let epyc = machine(
            "AMD EPYC 9654",
            "avx2,fma,f16c,avx512f,avx512bw,avx512vnni",
            "avx512-vnni",
        );
        let forced_avx2 = Machine {
            kernel: "avx2".into(),
            ..epyc.clone()
        };
        let other_cpu = Machine {
            cpu: "Intel(R) Xeon(R) Gold 6130".into(),
            ..epyc.clone()
        };
        let fewer_features = Machine {
            features: "avx2,fma,f16c".into(),
            ..epyc.clone()
        };
        let keys = [
            cache_key(&id, "fast/cpu", 1, &epyc),
            cache_key(&id, "fast/cpu", 1, &forced_avx2),
            cache_key(&id, "fast/cpu", 1, &other_cpu),
            cache_key(&id, "fast/cpu", 1, &fewer_features),
            cache_key(&id, "fast/cpu", 2, &epyc),
            cache_key(&id, "exact/cpu", 1, &epyc),
            cache_key(&ModelId::from_bytes([8; 32]), "fast/cpu", 1, &epyc),
        ];
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:#?}");
        // The same machine, mode and threads find the same entry.
        assert_eq!(keys[0], cache_key(&id, "fast/cpu", 1, &epyc.clone()));
    }

    #[test]
    fn a_measurement_from_another_machine_or_kernel_is_not_reused() {
        let m = Measured {
            decode_tps: 140.0,
            prefill_tps: 700.0,
            block_weight_bytes: 3 << 20,
        };
        let epyc = machine("AMD EPYC 9654", "avx2,avx512vnni", "avx512-vnni");
        let text = to_cache(&m, &epyc).expect("serialised");
        assert_eq!(from_cache(&text, &epyc), Some(m));
        // Copied (even under the right file name) to another CPU, or read back by a run
        // forced onto another kernel path: measured again.
        let laptop = machine("Intel(R) Core(TM) i5-8250U", "avx2", "avx2");
        assert_eq!(from_cache(&text, &laptop), None);
        let forced = Machine {
            kernel: "avx2".into(),
            ..epyc.clone()
        };
        assert_eq!(from_cache(&text, &forced), None);
        // A bare measurement (the older format, with no machine) or a broken one: anew.
        let bare = serde_json::to_string(&m).expect("serialised");
        assert_eq!(from_cache(&bare, &epyc), None);
        let zero = Measured {
            decode_tps: 0.0,
            ..m
        };
        assert_eq!(
            from_cache(&to_cache(&zero, &epyc).expect("text"), &epyc),
            None
        );
        assert_eq!(from_cache("{", &epyc), None);
    }

    #[test]
    fn this_machine_names_its_kernel_path_and_cpu() {
        let m = Machine::this();
        assert_eq!(m.kernel, pollen_shard::kernels::active_path());
        assert!(!m.cpu.is_empty());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            m.features.split(',').any(|f| f == "avx2"),
            std::arch::is_x86_feature_detected!("avx2")
        );
    }

    #[test]
    fn claims_count_for_at_most_a_multiple_of_our_own_speed() {
        // Ours: 100 tokens/s through one block; claims count for at most 400.
        assert_eq!(capped_claim(50.0, 100.0), 50.0);
        assert_eq!(capped_claim(400.0, 100.0), 400.0);
        assert_eq!(capped_claim(1e5, 100.0), 100.0 * CLAIM_CAP_FACTOR);
        assert_eq!(capped_claim(f64::NAN, 100.0), 0.0);
        assert_eq!(capped_claim(-1.0, 100.0), 0.0);
        // Without a measure of our own, only the sanity clamp applies.
        assert_eq!(capped_claim(1e5, 0.0), 1e5);
        assert_eq!(
            capped_claim(1e300, f64::NAN),
            placement::MAX_CLAIMED_THROUGHPUT
        );
    }

    fn announced(n: u8, model_id: ModelId, blocks: (u32, u32), tps: f32) -> VerifiedAnnouncement {
        use ed25519_dalek::SigningKey;
        use pollen_protocol::{
            Announcement, BlockRange as WireRange, FreshnessPolicy, SignedAnnouncement,
            peer_id_bytes_for_ed25519,
        };
        let key = [n; 32];
        let peer =
            peer_id_bytes_for_ed25519(&SigningKey::from_bytes(&key).verifying_key().to_bytes());
        let now = crate::clock::unix_ms();
        let a = Announcement {
            peer,
            model_id,
            model_name: "m".into(),
            num_blocks: 20,
            blocks: WireRange::new(blocks.0, blocks.1).expect("a range"),
            throughput: tps,
            free_sessions: 1,
            free_cache_tokens: 1000,
            addrs: vec![],
            compute: "exact/cpu".into(),
            next_rtts: vec![],
            issued_at_ms: now,
            expires_at_ms: now + 30_000,
            seq: 1,
        };
        SignedAnnouncement::sign(a, &key)
            .expect("signed")
            .verify(now, &FreshnessPolicy::default())
            .expect("verified")
    }

    #[test]
    fn a_sybil_claiming_a_span_does_not_steer_a_joining_server_away() {
        let id = ModelId::from_bytes([7; 32]);
        // Blocks 0:10: only a sybil, claiming 100 000 tokens/s. Blocks 10:20: two honest
        // servers of 30 each (three times this one). This server does 100 through one
        // block, 10 through ten.
        let book = [
            announced(1, id, (0, 10), 1e5),
            announced(2, id, (10, 20), 30.0),
            announced(3, id, (10, 20), 30.0),
        ];
        let me = PeerId::random();
        let swarm = holdings(&book, &id, "exact/cpu", 20, &me, 100.0);
        let totals = placement::totals(20, &swarm);
        assert_eq!(
            totals[0], 40.0,
            "the claim counts for 4 × 10, four servers as fast as this one through ten blocks"
        );
        assert_eq!(
            totals[10], 60.0,
            "honest claims under the cap count in full"
        );
        // A one-block sybil counts for 4 × 100 on its block, no more than the long one
        // on each of its.
        let one = holdings(
            &[announced(4, id, (0, 1), 1e5)],
            &id,
            "exact/cpu",
            20,
            &me,
            100.0,
        );
        assert_eq!(one[0].throughput, 400.0);
        let span = placement::choose_span(20, &swarm, &me.to_bytes(), 10, 10.0);
        assert_eq!(
            span,
            0..10,
            "it joins the span the sybil claimed, now the weakest"
        );
        // Uncapped, the claim would have sent it to 10:20.
        let uncapped = holdings(&book, &id, "exact/cpu", 20, &me, 0.0);
        let span = placement::choose_span(20, &uncapped, &me.to_bytes(), 10, 10.0);
        assert_eq!(span, 10..20);
    }

    #[test]
    fn quiet_swarms_are_listed_less_often_within_a_stated_bound() {
        // The defaults: a check a minute, so a gather at most every 10 s.
        let mut b = Backoff::new(Duration::from_secs(60));
        assert_eq!(b.base, Duration::from_secs(10));
        assert_eq!(b.cap, Duration::from_secs(60));
        let waits: Vec<u64> = (0..5).map(|_| b.after(false).as_secs()).collect();
        assert_eq!(waits, [20, 40, 60, 60, 60]);
        // An hour of a quiet swarm: at most 60 gathers plus the climb, against 360 at a
        // fixed 10 s.
        let mut b = Backoff::new(Duration::from_secs(60));
        let (mut t, mut gathers) = (Duration::ZERO, 0);
        while t < Duration::from_secs(3600) {
            t += b.after(false).mul_f64(1.0 - POLL_JITTER);
            gathers += 1;
        }
        assert!(gathers <= 3600 / 48 + 3, "{gathers} gathers an hour");
        // A change brings the wait back to the base at once.
        assert_eq!(b.after(true), Duration::from_secs(10));
        // Short checks (the tests' 4 s) keep the floor of 0.5 s and a cap of `every`.
        let mut b = Backoff::new(Duration::from_secs(4));
        assert_eq!(b.base, Duration::from_secs(4) / 6);
        assert_eq!(b.after(false), Duration::from_secs(4) / 6 * 2);
        for _ in 0..10 {
            b.after(false);
        }
        assert_eq!(b.after(false), Duration::from_secs(4));
        let b = Backoff::new(Duration::from_secs(1));
        assert_eq!(
            (b.base, b.cap),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
    }

    fn held(who: u8, span: Range<usize>) -> Holding<Vec<u8>> {
        Holding {
            who: vec![who],
            span,
            throughput: 10.0,
        }
    }

    #[test]
    fn a_pinned_server_is_passed_over_until_it_moves() {
        let mut pins = Pins::default();
        pins.learn(vec![1], 0..15);
        assert!(!pins.movable(&[1]));
        assert!(pins.movable(&[2]));
        // Gathers that miss it (a lost page, a slow peer) do not forget it at once...
        for _ in 1..PIN_MISSES {
            pins.update(&[held(2, 15..30)]);
            assert!(!pins.movable(&[1]), "forgotten after one incomplete gather");
        }
        // ...and seeing it again at its span starts the count over.
        pins.update(&[held(1, 0..15)]);
        for _ in 1..PIN_MISSES {
            pins.update::<Vec<u8>>(&[]);
        }
        assert!(!pins.movable(&[1]));
        // Gone for good: forgotten.
        pins.update::<Vec<u8>>(&[]);
        assert!(pins.movable(&[1]));
        // Seen at another span: it could move after all, and counts as movable again.
        pins.learn(vec![3], 0..15);
        pins.update(&[held(3, 15..30)]);
        assert!(pins.movable(&[3]));
        assert!(pins.is_empty());
    }

    #[test]
    fn pins_are_capped() {
        let mut pins = Pins::default();
        for i in 0..(MAX_PINS as u32 + 10) {
            pins.learn(i.to_le_bytes().to_vec(), 0..1);
        }
        assert_eq!(pins.len(), MAX_PINS);
        assert!(pins.movable(&0u32.to_le_bytes()), "the oldest went first");
        assert!(!pins.movable(&(MAX_PINS as u32 + 9).to_le_bytes()));
    }

    #[test]
    fn a_block_costs_its_weights_and_a_full_kv_load() {
        let m = Measured {
            decode_tps: 1.0,
            prefill_tps: 1.0,
            block_weight_bytes: 1000,
        };
        let cfg = pollen_shard::ModelConfig {
            architecture: "llama".into(),
            name: "tiny".into(),
            hidden_size: 8,
            intermediate_size: 16,
            num_heads: 1,
            num_kv_heads: 1,
            num_blocks: 4,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_dim: 8,
            rope_interleaved: false,
            tied_embeddings: true,
            max_seq_len: 64,
        };
        // 2 × 1 head × 8 dims × 4 bytes = 64 bytes a token in f32 (exact
        // mode, or a GPU); f16 in the fast mode on the CPU, half of it.
        let exact = pollen_shard::LoadOptions {
            device: candle_core::Device::Cpu,
            mode: pollen_shard::WeightMode::Exact,
        };
        let kv = exact.kv_bytes_per_token_per_block(&cfg);
        assert_eq!(bytes_per_block(&m, kv, 2, 10), 1000 + 64 * 20);
        let fast = pollen_shard::LoadOptions {
            mode: pollen_shard::WeightMode::Fast,
            ..exact
        };
        let kv = fast.kv_bytes_per_token_per_block(&cfg);
        assert_eq!(bytes_per_block(&m, kv, 2, 10), 1000 + 32 * 20);
    }
}
