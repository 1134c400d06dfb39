//! Prometheus metrics of this process, in OpenMetrics text at `/metrics`.
//!
//! One registry per process ([`global`]), filled by one-line hooks on the data paths:
//! the server's session task, the client's generation loop, the session streams and the
//! swarm's connection events. Every hook is an atomic add (or, for a labelled family, a
//! read lock and a hash); none waits on anything. Which metrics move depends on the role
//! of the process: a server counts the tokens it runs through its span and the time of
//! its steps, a client the tokens it generates and its round trips through the route.
//!
//! `pollen serve --metrics ADDR` serves [`router`] on its own small listener
//! ([`listen`]); `pollen api` merges [`router`] into its own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Hop labels above this are reported as this (the protocol allows 128 hops).
const MAX_HOP_LABEL: u32 = pollen_protocol::limits::MAX_ROUTE_HOPS as u32;

/// Which side of a session a figure is about.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    /// A server holding a span.
    Server,
    /// A client generating through a route (or from a local model).
    Client,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SplitLabel {
    by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HopLabel {
    hop: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    side: &'static str,
    code: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Step times from 1 ms to about 33 s.
fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Registers `metric` in `registry` as `name` (with `unit`, if any) and returns it: the
/// registry holds a handle to the same counts.
fn add<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

/// [`Metrics`] with each field `FIELD = NAME, UNIT, METRIC, HELP;` made and registered
/// under `pollen_NAME`, in the order given (the order of the text at `/metrics`).
macro_rules! metrics {
    ($($field:ident = $name:literal, $unit:expr, $metric:expr, $help:literal;)*) => {{
        let mut registry = Registry::with_prefix("pollen");
        Metrics {
            $($field: add(&mut registry, $name, $help, $unit, $metric),)*
            registry,
        }
    }};
}

/// The metrics of one process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions_open: Family<SideLabel, Gauge>,
    sessions: Family<SideLabel, Counter>,
    tokens_generated: Counter,
    tokens_processed: Family<PhaseLabel, Counter>,
    step_seconds: HistogramFamily<HopLabel>,
    route_step_seconds: Histogram,
    bytes_sent: Counter,
    bytes_received: Counter,
    errors: Family<ErrorLabels, Counter>,
    peers_connected: Gauge,
    batch_steps: Histogram,
    batch_wait_seconds: Histogram,
    prompt_parts: Family<SplitLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        metrics! {
            sessions_open = "sessions_open", None, Family::default(),
                "Inference sessions open now (side: server or client)";
            sessions = "sessions", None, Family::default(),
                "Inference sessions opened (side: server or client)";
            tokens_generated = "tokens_generated", None, Counter::default(),
                "Tokens this process generated (sampled) as a client";
            tokens_processed = "tokens_processed", None, Family::default(),
                "Token positions this server ran through its span (phase: prompt for steps of \
                 several tokens, decode for single-token steps)";
            step_seconds = "step", Some(Unit::Seconds),
                HistogramFamily::new_with_constructor(step_histogram),
                "On a server, from a step's Forward arriving to its output sent on, by this \
                 server's hop in the route";
            route_step_seconds = "route_step", Some(Unit::Seconds), step_histogram(),
                "On a client, one step's round trip through the whole route";
            bytes_sent = "sent", Some(Unit::Bytes), Counter::default(),
                "Bytes of session frames sent (length prefixes included)";
            bytes_received = "received", Some(Unit::Bytes), Counter::default(),
                "Bytes of session frames received (length prefixes included)";
            errors = "errors", None, Family::default(),
                "Failures by protocol error code (side: server for failures it reports, \
                 client for those it meets)";
            peers_connected = "peers_connected", None, Gauge::default(),
                "Peers this node has a connection with";
            batch_steps = "batch_steps", None, Histogram::new(exponential_buckets(1.0, 2.0, 7)),
                "On a server, the decode steps of different sessions computed in one pass \
                 over its weights (1: a step alone)";
            batch_wait_seconds = "batch_wait", Some(Unit::Seconds),
                Histogram::new(exponential_buckets(0.000_125, 2.0, 7)),
                "On a server, how long a batch waited for other sessions' decode steps due \
                 within its window before computing (0: none due)";
            prompt_parts = "prompt_parts", None, Family::default(),
                "On a server, parts of long prompts computed, other sessions' steps between \
                 them (by: rows, each part some rows through every block; blocks, every row \
                 through some blocks)";
        }
    }

    /// Every metric as OpenMetrics text (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A session opened on `side`; it counts as open until the guard drops.
    pub fn session(&'static self, side: Side) -> SessionGuard {
        let label = SideLabel { side: side.name() };
        self.sessions.get_or_create(&label).inc();
        self.sessions_open.get_or_create(&label).inc();
        SessionGuard {
            metrics: self,
            label,
        }
    }

    /// A client generated (sampled) `n` tokens.
    pub fn tokens_generated(&self, n: usize) {
        self.tokens_generated.inc_by(n as u64);
    }

    /// A server ran a step of `tokens` positions through its span.
    pub fn tokens_processed(&self, tokens: usize) {
        let phase = if tokens > 1 { "prompt" } else { "decode" };
        self.tokens_processed
            .get_or_create(&PhaseLabel { phase })
            .inc_by(tokens as u64);
    }

    /// A server computed `steps` sessions' decode steps in one pass over its weights.
    pub fn batch(&self, steps: usize) {
        self.batch_steps.observe(steps as f64);
    }

    /// A batch waited `waited` for steps due soon before computing.
    pub fn batch_wait(&self, waited: std::time::Duration) {
        self.batch_wait_seconds.observe(waited.as_secs_f64());
    }

    /// A server computed one part of a long prompt, split `by` rows or blocks.
    pub fn prompt_part(&self, by: &'static str) {
        self.prompt_parts.get_or_create(&SplitLabel { by }).inc();
    }

    /// Times a server's step at hop `hop` of its route, until the guard drops.
    pub fn server_step(&'static self, hop: usize) -> StepTimer {
        let hop = u32::try_from(hop).unwrap_or(u32::MAX).min(MAX_HOP_LABEL);
        StepTimer {
            metrics: self,
            hop: Some(hop),
            start: Instant::now(),
        }
    }

    /// Times a client's round trip through the route, until the guard drops.
    pub fn route_step(&'static self) -> StepTimer {
        StepTimer {
            metrics: self,
            hop: None,
            start: Instant::now(),
        }
    }

    /// `n` bytes of session frames went out.
    pub fn sent(&self, n: u64) {
        self.bytes_sent.inc_by(n);
    }

    /// `n` bytes of session frames came in.
    pub fn received(&self, n: u64) {
        self.bytes_received.inc_by(n);
    }

    /// A failure with `code` on `side`.
    pub fn error(&self, side: Side, code: pollen_protocol::ErrorCode) {
        self.error_named(side, code.name());
    }

    /// A failure that has no protocol code (`no_route`, `net`, ...) on `side`.
    pub fn error_named(&self, side: Side, code: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                side: side.name(),
                code,
            })
            .inc();
    }

    /// A client's failure, by the code of the hop that failed, or its kind.
    pub fn client_error(&self, e: &crate::client::ClientError) {
        use crate::client::ClientError as E;
        match e {
            E::HopFailed(f) => self.error(Side::Client, f.code),
            E::NoRoute { .. } => self.error_named(Side::Client, "no_route"),
            E::Protocol { .. } => self.error_named(Side::Client, "protocol"),
            E::Net(_) | E::NoEntry(_) => self.error_named(Side::Client, "net"),
            _ => self.error_named(Side::Client, "internal"),
        }
    }

    /// A generation through the swarm ended: its tokens, or its failure (hop failures
    /// are counted as the client meets them, healed or not, so only the others here).
    pub fn generation(
        &self,
        result: &Result<pollen_shard::generate::Generation, crate::client::ClientError>,
    ) {
        use crate::client::ClientError as E;
        match result {
            Ok(g) => self.tokens_generated(g.tokens.len()),
            Err(E::HopFailed(_) | E::Protocol { .. }) => {}
            Err(e) => self.client_error(e),
        }
    }

    /// A peer connected (its first connection).
    pub fn peer_connected(&self) {
        self.peers_connected.inc();
    }

    /// A peer's last connection closed.
    pub fn peer_disconnected(&self) {
        self.peers_connected.dec();
    }
}

/// An open session, counted in `sessions_open` until dropped.
#[derive(Debug)]
#[must_use = "the session counts as open only while the guard lives"]
pub struct SessionGuard {
    metrics: &'static Metrics,
    label: SideLabel,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.metrics.sessions_open.get_or_create(&self.label).dec();
    }
}

/// A step being timed; observed when dropped.
#[derive(Debug)]
#[must_use = "the step is timed until the guard drops"]
pub struct StepTimer {
    metrics: &'static Metrics,
    hop: Option<u32>,
    start: Instant,
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        match self.hop {
            Some(hop) => self
                .metrics
                .step_seconds
                .get_or_create(&HopLabel { hop })
                .observe(secs),
            None => self.metrics.route_step_seconds.observe(secs),
        }
    }
}

/// This process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

async fn scrape() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        global().encode(),
    )
}

/// `GET /metrics`: this process's metrics as OpenMetrics text, for Prometheus.
pub fn router() -> axum::Router {
    axum::Router::new().route("/metrics", axum::routing::get(scrape))
}

/// Serves [`router`] on `addr` (port 0 picks a free one) in a task of its own; the
/// address it listens on. It has no authentication: bind it to loopback or a private
/// network.
pub async fn listen(
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(crate::http_listener::guarded(listener), router()).await {
            tracing::warn!("the metrics listener stopped: {e}");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn leak() -> &'static Metrics {
        Box::leak(Box::new(Metrics::new()))
    }

    /// The value of the sample line starting with `name` (labels included).
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn hooks_move_their_metrics() {
        let m = leak();
        let open = m.session(Side::Server);
        m.tokens_processed(7);
        m.tokens_processed(1);
        m.tokens_generated(1);
        m.sent(100);
        m.received(40);
        m.error(Side::Server, pollen_protocol::ErrorCode::Busy);
        m.peer_connected();
        drop(m.server_step(2));
        drop(m.server_step(10_000));
        drop(m.route_step());
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            sample(&text, "pollen_sessions_open{side=\"server\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "pollen_sessions_total{side=\"server\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "pollen_tokens_processed_total{phase=\"prompt\"}"),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, "pollen_tokens_processed_total{phase=\"decode\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "pollen_tokens_generated_total"), Some(1.0));
        assert_eq!(sample(&text, "pollen_sent_bytes_total"), Some(100.0));
        assert_eq!(sample(&text, "pollen_received_bytes_total"), Some(40.0));
        assert_eq!(
            sample(&text, "pollen_errors_total{side=\"server\",code=\"busy\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "pollen_peers_connected"), Some(1.0));
        assert_eq!(
            sample(&text, "pollen_step_seconds_count{hop=\"2\"}"),
            Some(1.0)
        );
        // A hostile hop index cannot make a label of its own beyond the protocol's limit.
        assert_eq!(
            sample(&text, "pollen_step_seconds_count{hop=\"128\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "pollen_route_step_seconds_count"), Some(1.0));
        drop(open);
        let text = m.encode();
        assert_eq!(
            sample(&text, "pollen_sessions_open{side=\"server\"}"),
            Some(0.0)
        );
    }
}
