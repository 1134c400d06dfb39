//! The bootstrap role: a stable entry point with a persistent identity, a
//! Kademlia server, a relay v2 server and an AutoNAT server, and an HTTP page
//! that shows which blocks of which model are served by whom.

use crate::net::{self, NetConfig, NetHandle, Role};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
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
}

impl BootstrapArgs {
    /// The settings with their defaults filled in.
    pub fn config(&self) -> BootstrapConfig {
        let listen = if self.listen.is_empty() {
            ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect()
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
            mdns: !self.no_mdns,
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
    /// mDNS on the LAN.
    pub mdns: bool,
}

fn is_tcp(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::Tcp(_)))
}

/// Runs until `stop` fires. Prints its dialable address as the first line of stdout.
pub async fn run(cfg: BootstrapConfig, stop: CancellationToken) -> Result<()> {
    let keypair = net::identity::load_or_create(&cfg.identity)?;
    let me = keypair.public().to_peer_id();
    let net_cancel = stop.child_token();
    let (handle, net_task) = net::start(
        NetConfig {
            keypair,
            listen: cfg.listen.clone(),
            mdns: cfg.mdns,
            role: Role::Bootstrap,
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
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
            .with_state(handle.clone());
        let stop_http = stop.clone();
        http_task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop_http.cancelled().await })
                .await;
        }));
    }
    stop.cancelled().await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    net_cancel.cancel();
    let _ = net_task.await;
    Ok(())
}

async fn swarm_json(handle: &NetHandle) -> serde_json::Value {
    let book = handle.book(None).await.unwrap_or_default();
    let peers = handle.peers().await.map(|p| p.len()).unwrap_or(0);
    let mut v = crate::status::to_json(&book, crate::clock::unix_ms());
    v["peer"] = serde_json::json!(handle.peer_id().to_string());
    v["connected_peers"] = serde_json::json!(peers);
    v["status"] = serde_json::json!("ok");
    v
}

async fn health(State(handle): State<NetHandle>) -> impl IntoResponse {
    axum::Json(swarm_json(&handle).await)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn page(State(handle): State<NetHandle>) -> Html<String> {
    let v = swarm_json(&handle).await;
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
        let gaps = m["uncovered"].as_array().cloned().unwrap_or_default();
        if !gaps.is_empty() {
            let text: Vec<String> = gaps.iter().map(|g| format!("{}:{}", g[0], g[1])).collect();
            body.push_str(&format!(
                "<p class=gaptext>Uncovered blocks: {}</p>",
                text.join(", ")
            ));
        }
        body.push_str("<table><tr><th>peer</th><th>blocks</th><th>tokens/s</th><th>free sessions</th><th>age</th></tr>");
        for s in m["servers"].as_array().cloned().unwrap_or_default() {
            body.push_str(&format!(
                "<tr><td><code>{}</code></td><td>{}:{}</td><td>{:.1}</td><td>{}</td><td>{:.0} s</td></tr>",
                escape(s["peer"].as_str().unwrap_or("?")),
                s["blocks"][0],
                s["blocks"][1],
                s["throughput"].as_f64().unwrap_or(0.0),
                s["free_sessions"],
                s["age_s"].as_f64().unwrap_or(0.0)
            ));
        }
        body.push_str("</table>");
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
<title>Pollen swarm</title><style>body{{font-family:sans-serif;margin:2em}}\
.bar{{display:flex;gap:1px;margin:.5em 0}}.bar span{{flex:1;height:1.2em}}.ok{{background:#3a3}}\
.gap{{background:#d33}}.gaptext{{color:#d33}}table{{border-collapse:collapse}}\
td,th{{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}}</style></head>\
<body>{body}</body></html>"
    ))
}
