//! The bootstrap role: a stable entry point with a persistent identity, a
//! Kademlia server, a relay v2 server and an AutoNAT server, and an HTTP page
//! that shows which blocks of which model are served by whom.

use crate::net::{self, NetConfig, NetHandle, Role, book};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::builder::TypedValueParser as _;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A bootstrap node's command-line settings (shared by `pollen bootstrap`
/// and the `pollen-bootstrap` binary).
#[derive(clap::Args, Debug, Clone)]
pub struct BootstrapArgs {
    /// Address to listen on (repeatable). Default: all interfaces, TCP port 4001 and QUIC port 4001.
    #[arg(long = "listen")]
    pub listen: Vec<Multiaddr>,
    /// Identity key file, created on first run (mode 0600), so the peer id survives restarts.
    /// Default: $POLLEN_CACHE_DIR/bootstrap.key.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Serve /health (JSON) and a status page over HTTP on this address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Do not look for peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Require this token on the HTTP page and /health (`Authorization: Bearer TOKEN`, or
    /// `?token=TOKEN`). A private mesh's page must be on a loopback address or have one.
    #[arg(long, env = "POLLEN_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Most announcements held in all.
    #[arg(long, default_value_t = book::MAX_BOOK_ENTRIES,
          value_parser = clap::value_parser!(u32).range(16..=1_048_576).map(|v| v as usize))]
    pub max_announcements: usize,
    /// Most announcements held for one announcing peer (one per model it serves).
    #[arg(long, default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096).map(|v| v as usize))]
    pub max_announcements_per_peer: usize,
    /// Most announcements held that one connected peer sent (a flood of sybil keys over
    /// one connection fills its own share, not the book).
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576).map(|v| v as usize))]
    pub max_announcements_per_sender: usize,
    /// Most announcements held that peers at one IP address sent.
    #[arg(long, default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576).map(|v| v as usize))]
    pub max_announcements_per_ip: usize,
    /// Publishes a second one peer may send, sustained (a burst of 16 times as many,
    /// at least 32, is allowed); an IP address may send 8 times as many. Beyond it
    /// publishes are refused as busy.
    #[arg(long, default_value_t = 2.0, value_parser = publish_rate)]
    pub publish_rate: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub caps: crate::net::ConnectionCaps,
}

/// Parses a bootstrap address, which must name the bootstrap's peer id (`/p2p/…`): a
/// node dials it and checks that the peer who answers is that one.
pub fn parse_bootstrap_addr(s: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a multiaddr: {e}"))?;
    if !addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
        return Err(format!(
            "`{s}` names no peer id: give the bootstrap's full address, ending in /p2p/<peer id>, \
             as it prints it on its first line"
        ));
    }
    Ok(addr)
}

fn publish_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && (0.01..=10_000.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0.01..=10000"))
    }
}

impl BootstrapArgs {
    /// The settings with their defaults filled in.
    pub fn config(&self) -> BootstrapConfig {
        let listen = if self.listen.is_empty() {
            crate::net::private::default_listen(
                ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect(),
            )
        } else {
            self.listen.clone()
        };
        BootstrapConfig {
            listen,
            identity: self
                .identity
                .clone()
                .unwrap_or_else(|| crate::fetch::cache_dir().join("bootstrap.key")),
            http: self.http,
            http_token: self.http_token.clone(),
            mdns: !self.no_mdns,
            limits: self.limits(),
            caps: self.caps,
        }
    }

    /// The caps of the announcement book from the flags.
    pub fn limits(&self) -> book::BookLimits {
        let burst = (self.publish_rate * 16.0).clamp(32.0, 1e6) as u32;
        book::BookLimits {
            max_entries: self.max_announcements,
            per_peer: self.max_announcements_per_peer,
            per_sender: self.max_announcements_per_sender,
            per_ip: self.max_announcements_per_ip,
            publish_burst: burst,
            publish_per_s: self.publish_rate,
            ip_publish_burst: burst.saturating_mul(8),
            ip_publish_per_s: self.publish_rate * 8.0,
        }
    }
}

/// Runs a bootstrap node from its command line until Ctrl-C or SIGTERM.
pub async fn run_cli(args: &BootstrapArgs) -> Result<()> {
    let stop = CancellationToken::new();
    crate::signals::watch(stop.clone(), CancellationToken::new());
    run(args.config(), stop).await
}

/// How a bootstrap node runs.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Identity key file.
    pub identity: PathBuf,
    /// Where to serve `/health` and the status page (none: no HTTP).
    pub http: Option<SocketAddr>,
    /// A token the HTTP side requires (none: open).
    pub http_token: Option<String>,
    /// mDNS on the LAN.
    pub mdns: bool,
    /// Caps of the announcement book (per peer, per IP address, publish rates).
    pub limits: book::BookLimits,
    /// Connection caps.
    pub caps: crate::net::ConnectionCaps,
}

fn is_tcp(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::Tcp(_)))
}

/// Runs until `stop` fires. Prints its dialable address as the first line of stdout.
pub async fn run(cfg: BootstrapConfig, stop: CancellationToken) -> Result<()> {
    if !book::set_process_limits(cfg.limits) {
        tracing::debug!("the announcement book's caps were set already");
    }
    // A page that may not start is refused before the address is printed (a script
    // reads the first line as the sign that the bootstrap is up).
    if let Some(http) = cfg.http {
        let mesh = crate::net::private::process_mesh();
        crate::net::private::check_page(http, &mesh, cfg.http_token.as_deref())
            .context("pollen bootstrap --http")?;
    }
    // Held until the bootstrap ends: a second node with this key file is refused.
    let (keypair, _held) = net::identity::load_and_hold(&cfg.identity)?;
    let me = keypair.public().to_peer_id();
    let net_cancel = stop.child_token();
    let (handle, net_task) = net::start(
        NetConfig {
            keypair,
            listen: cfg.listen.clone(),
            mdns: cfg.mdns,
            role: Role::Bootstrap,
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
            caps: cfg.caps,
            ..NetConfig::new(Role::Bootstrap)
        },
        net_cancel.clone(),
    )?;
    let mut addrs = Vec::new();
    for _ in 0..100 {
        addrs = handle.listen_addrs().await?;
        if addrs.iter().any(is_tcp) || (!cfg.listen.iter().any(is_tcp) && !addrs.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = addrs
        .iter()
        .find(|a| is_tcp(a))
        .or(addrs.first())
        .cloned()
        .context("the bootstrap node got no listen address")?;
    println!("{first}/p2p/{me}");
    for a in addrs.iter().filter(|a| **a != first) {
        println!("also {a}/p2p/{me}");
    }
    let mut http_task = None;
    if let Some(http) = cfg.http {
        let listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("cannot listen for HTTP on {http}"))?;
        let local = listener.local_addr()?;
        println!("http http://{local}/");
        let app = axum::Router::new()
            .route("/health", get(health))
            .route("/", get(page))
            .layer(axum::middleware::map_response(safe_headers))
            .with_state(PageState::new(handle.clone()));
        let token = cfg.http_token.is_some();
        let mut app = crate::net::private::with_token(app, cfg.http_token.clone());
        // A private mesh's page is for its members: a page of another site re-pointed
        // at this address (DNS rebinding) is refused as by the API.
        if crate::net::private::process_mesh().is_private() {
            let hosts = crate::api::Hosts::new(local, &[], token);
            app = crate::api::with_host_check(app, hosts);
        }
        let stop_http = stop.clone();
        http_task = Some(tokio::spawn(async move {
            let _ = axum::serve(crate::http_listener::guarded(listener), app)
                .with_graceful_shutdown(async move { stop_http.cancelled().await })
                .await;
        }));
    }
    stop.cancelled().await;
    if let Some(mut t) = http_task
        && tokio::time::timeout(crate::http_listener::SHUTDOWN_WAIT, &mut t)
            .await
            .is_err()
    {
        tracing::warn!(
            "page connections still open {:?} after stopping; dropping them",
            crate::http_listener::SHUTDOWN_WAIT
        );
        t.abort();
    }
    net_cancel.cancel();
    let _ = net_task.await;
    Ok(())
}

/// Headers on every HTTP answer: no content sniffing, no framing by other sites, and a
/// content security policy that allows nothing but the page's own inline style (the page
/// runs no script).
async fn safe_headers(mut res: axum::response::Response) -> axum::response::Response {
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; \
             base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// How long one snapshot of the swarm serves the page and `/health`.
const SNAPSHOT_FOR: Duration = Duration::from_secs(1);

/// The page's state: the node, and its last snapshot of the swarm as JSON and as the
/// page. Each snapshot copies the whole book in the swarm task and renders it, so
/// requests share one a second at most: it is made in a task of its own, which
/// requests in that second wait for (one that hangs up stops nothing), and what they
/// send is the snapshot's bytes, not a copy each.
#[derive(Clone)]
struct PageState {
    handle: NetHandle,
    last: std::sync::Arc<std::sync::Mutex<Option<(tokio::time::Instant, SharedSnapshot)>>>,
}

type SharedSnapshot = futures::future::Shared<futures::future::BoxFuture<'static, Snapshot>>;

#[derive(Clone)]
struct Snapshot {
    json: axum::body::Bytes,
    html: axum::body::Bytes,
}

impl PageState {
    fn new(handle: NetHandle) -> Self {
        Self {
            handle,
            last: Default::default(),
        }
    }

    async fn snapshot(&self) -> Snapshot {
        use futures::FutureExt;
        let shot = {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match last.as_ref() {
                Some((at, shot)) if at.elapsed() < SNAPSHOT_FOR => shot.clone(),
                _ => {
                    let handle = self.handle.clone();
                    let task = tokio::spawn(async move {
                        let v = swarm_json(&handle).await;
                        Snapshot {
                            json: axum::body::Bytes::from(v.to_string()),
                            html: axum::body::Bytes::from(page_html(&v)),
                        }
                    });
                    let shot = async move {
                        task.await.unwrap_or_else(|e| Snapshot {
                            json: axum::body::Bytes::from(
                                serde_json::json!({"status": "error", "error": e.to_string()})
                                    .to_string(),
                            ),
                            html: axum::body::Bytes::from_static(
                                b"<!doctype html><p>the swarm's snapshot failed</p>",
                            ),
                        })
                    }
                    .boxed()
                    .shared();
                    *last = Some((tokio::time::Instant::now(), shot.clone()));
                    shot
                }
            }
        };
        shot.await
    }
}

async fn swarm_json(handle: &NetHandle) -> serde_json::Value {
    let book = handle.book(None).await.unwrap_or_default();
    let peers = handle.peers().await.map(|p| p.len()).unwrap_or(0);
    let mut v = crate::status::to_json(&book, crate::clock::unix_ms());
    v["peer"] = serde_json::json!(handle.peer_id().to_string());
    v["connected_peers"] = serde_json::json!(peers);
    v["status"] = serde_json::json!("ok");
    // Model names are chosen by peers: no control characters reach a page or a terminal.
    if let Some(models) = v["models"].as_array_mut() {
        for m in models {
            if let Some(name) = m["name"].as_str() {
                m["name"] = serde_json::json!(pollen_protocol::printable(name));
            }
        }
    }
    v
}

async fn health(State(state): State<PageState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.snapshot().await.json,
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Where a model's servers announce more than one compute mode, a paragraph per mode
/// with the blocks no server of that mode serves: a client routes through servers of its
/// own mode only.
fn mode_coverage_html(model: &serde_json::Value) -> String {
    let mut out = String::new();
    for (mode, gaps) in model["uncovered_by_compute"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let (open, what) = match crate::status::gap_list(gaps) {
            None => ("<p>", "every block is served".to_string()),
            Some(text) => ("<p class=gaptext>", format!("uncovered blocks: {text}")),
        };
        out.push_str(&format!(
            "{open}In compute mode <code>{}</code>: {what}</p>",
            escape(mode)
        ));
    }
    out
}

async fn page(State(state): State<PageState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        state.snapshot().await.html,
    )
}

fn page_html(v: &serde_json::Value) -> String {
    let mut body = String::new();
    body.push_str(&format!(
        "<h1>Pollen swarm</h1><p>bootstrap <code>{}</code>, {} connected peers</p>",
        escape(v["peer"].as_str().unwrap_or("")),
        v["connected_peers"]
    ));
    let models = v["models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        body.push_str("<p>No server has announced a model yet.</p>");
    }
    for m in models {
        let n = m["num_blocks"].as_u64().unwrap_or(0).max(1);
        body.push_str(&format!(
            "<h2>{} <small><code>{}</code></small></h2>",
            escape(m["name"].as_str().unwrap_or("?")),
            escape(m["id"].as_str().unwrap_or("?"))
        ));
        // Coverage bar: one cell per block, gaps in red.
        let mut covered = vec![0u32; n as usize];
        for s in m["servers"].as_array().cloned().unwrap_or_default() {
            let (a, b) = (
                s["blocks"][0].as_u64().unwrap_or(0),
                s["blocks"][1].as_u64().unwrap_or(0),
            );
            for i in a..b.min(n) {
                covered[i as usize] += 1;
            }
        }
        body.push_str("<div class=bar>");
        for (i, c) in covered.iter().enumerate() {
            let class = if *c == 0 { "gap" } else { "ok" };
            body.push_str(&format!(
                "<span class={class} title='block {i}: {c} servers'></span>"
            ));
        }
        body.push_str("</div>");
        if let Some(text) = crate::status::gap_list(&m["uncovered"]) {
            body.push_str(&format!("<p class=gaptext>Uncovered blocks: {text}</p>"));
        }
        body.push_str(&mode_coverage_html(&m));
        body.push_str("<table><tr><th>peer</th><th>blocks</th><th>compute</th><th>tokens/s</th><th>free sessions</th><th>age</th></tr>");
        for s in m["servers"].as_array().cloned().unwrap_or_default() {
            body.push_str(&format!(
                "<tr><td><code>{}</code></td><td>{}:{}</td><td><code>{}</code></td><td>{:.1}</td><td>{}</td><td>{:.0} s</td></tr>",
                escape(s["peer"].as_str().unwrap_or("?")),
                s["blocks"][0],
                s["blocks"][1],
                escape(s["compute"].as_str().unwrap_or("?")),
                s["throughput"].as_f64().unwrap_or(0.0),
                s["free_sessions"],
                s["age_s"].as_f64().unwrap_or(0.0)
            ));
        }
        body.push_str("</table>");
    }
    format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
<title>Pollen swarm</title><style>body{{font-family:sans-serif;margin:2em}}\
.bar{{display:flex;gap:1px;margin:.5em 0}}.bar span{{flex:1;height:1.2em}}.ok{{background:#3a3}}\
.gap{{background:#d33}}.gaptext{{color:#d33}}table{{border-collapse:collapse}}\
td,th{{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}}</style></head>\
<body>{body}</body></html>"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_page_shows_coverage_per_compute_mode_where_modes_differ() {
        let one = serde_json::json!({"uncovered": []});
        assert_eq!(mode_coverage_html(&one), "");
        let mixed = serde_json::json!({
            "uncovered": [],
            "uncovered_by_compute": {"exact/cpu": [[15, 30]], "fast/cpu": [], "<b>": []},
        });
        let html = mode_coverage_html(&mixed);
        assert!(html.contains("<p class=gaptext>In compute mode <code>exact/cpu</code>: uncovered blocks: 15:30</p>"), "{html}");
        assert!(
            html.contains("<p>In compute mode <code>fast/cpu</code>: every block is served</p>"),
            "{html}"
        );
        assert!(
            html.contains("&lt;b&gt;") && !html.contains("<b>"),
            "{html}"
        );
    }

    #[test]
    fn a_bootstrap_address_must_name_its_peer() {
        let id = libp2p::PeerId::random();
        let full = format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}");
        assert_eq!(parse_bootstrap_addr(&full).unwrap().to_string(), full);
        let e = parse_bootstrap_addr("/ip4/127.0.0.1/tcp/4001").unwrap_err();
        assert!(e.contains("names no peer id"), "{e}");
        assert!(parse_bootstrap_addr("nonsense").is_err());
    }

    #[test]
    fn publish_rates_are_range_checked() {
        assert_eq!(publish_rate("2").unwrap(), 2.0);
        assert!(publish_rate("0").is_err());
        assert!(publish_rate("NaN").is_err());
        assert!(publish_rate("1e9").is_err());
    }

    #[test]
    fn the_page_strips_control_characters_from_peer_names() {
        let name = "evil\u{1b}[31mred\u{7}";
        assert_eq!(escape(&pollen_protocol::printable(name)), "evil[31mred");
    }
}
