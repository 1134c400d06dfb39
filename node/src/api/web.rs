//! The web page: a streaming chat and a live view of the swarm. Its HTML, script and
//! style are compiled into the binary; the page fetches nothing from anywhere else.
//!
//! `GET /api/swarm` feeds the view: per model, how many servers cover each block, and
//! the servers with their spans, throughput and reachability.

use super::ApiState;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// How long one look at the swarm serves every page that asks.
const VIEW_TTL: Duration = Duration::from_millis(1000);

/// Longest one look at the swarm may take; past it the view says so.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// The latest swarm view and when it was taken. One request at a time refreshes it;
/// the others are answered with the view at hand meanwhile, so none waits on the
/// swarm for longer than [`GATHER_TIMEOUT`].
#[derive(Debug, Default)]
pub struct SwarmViewCache {
    latest: std::sync::Mutex<Option<(Instant, Value)>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl SwarmViewCache {
    /// The view and its age, if any (the lock is held for a clone only).
    fn get(&self) -> Option<(Instant, Value)> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, view: Value) {
        *self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), view));
    }
}

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/api/swarm", get(swarm))
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}

async fn app_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
}

async fn style_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
}

/// How a server can be reached, from the addresses it announces: through a relay, on a
/// public address, or only on private or loopback ones.
pub fn reachability(addrs: &[String]) -> &'static str {
    use libp2p::multiaddr::Protocol;
    let parsed: Vec<libp2p::Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let direct: Vec<&libp2p::Multiaddr> = parsed
        .iter()
        .filter(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
        .collect();
    let public = direct.iter().any(|a| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => {
                !(ip.is_private()
                    || ip.is_loopback()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_documentation())
            }
            Protocol::Ip6(ip) => {
                !(ip.is_loopback()
                    || ip.is_unspecified()
                    || (ip.segments()[0] & 0xfe00) == 0xfc00
                    || (ip.segments()[0] & 0xffc0) == 0xfe80)
            }
            Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) => true,
            _ => false,
        })
    });
    if public {
        "public"
    } else if !direct.is_empty() {
        "local"
    } else if parsed.len() > direct.len() {
        "relayed"
    } else {
        "unknown"
    }
}

/// Adds, per model, `coverage` (servers per block; for the client's own model `id`,
/// only those of its compute mode `mode`, the only ones it routes through) and, per
/// server, `reachability`. Servers' modes are compared as `status` prints them.
pub fn enrich(mut status: Value, id: &str, mode: &str) -> Value {
    let mode = pollen_protocol::printable(mode);
    status["compute"] = json!(mode);
    if let Some(models) = status.get_mut("models").and_then(Value::as_array_mut) {
        for m in models {
            let mine = m["id"].as_str() == Some(id);
            let n = m["num_blocks"].as_u64().unwrap_or(0).min(1 << 16) as usize;
            let mut coverage = vec![0u32; n];
            if let Some(servers) = m.get_mut("servers").and_then(Value::as_array_mut) {
                for s in servers {
                    let (a, b) = (
                        s["blocks"][0].as_u64().unwrap_or(0) as usize,
                        s["blocks"][1].as_u64().unwrap_or(0) as usize,
                    );
                    if !mine || s["compute"].as_str() == Some(mode.as_str()) {
                        for c in coverage.iter_mut().take(b.min(n)).skip(a) {
                            *c += 1;
                        }
                    }
                    let addrs: Vec<String> = s["addrs"]
                        .as_array()
                        .map(|v| {
                            v.iter()
                                .filter_map(|a| a.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    s["reachability"] = json!(reachability(&addrs));
                }
            }
            m["coverage"] = json!(coverage);
        }
    }
    status
}

/// The view of a local backend: one "server", this process, holding every block.
fn local_view(state: &ApiState) -> Value {
    let n = state.backend.num_blocks();
    json!({
        "mode": "local",
        "model": state.backend.name(),
        "models": [{
            "id": state.backend.name(),
            "name": state.backend.name(),
            "num_blocks": n,
            "coverage": [],
            "servers": [],
            "uncovered": [],
        }],
    })
}

async fn swarm(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    let Some(client) = state.backend.swarm_client() else {
        return Json(local_view(&state));
    };
    let cache = &state.swarm_view;
    let fresh = |v: &Option<(Instant, Value)>| {
        v.as_ref()
            .filter(|(at, _)| at.elapsed() < VIEW_TTL)
            .map(|(_, v)| v.clone())
    };
    let seen = cache.get();
    if let Some(v) = fresh(&seen) {
        return Json(v);
    }
    let _refresh = match cache.refreshing.try_lock() {
        Ok(g) => g,
        // Another request is refreshing: the stale view now, or, with none yet, the
        // refresh's own result (it ends within GATHER_TIMEOUT).
        Err(_) => match seen {
            Some((_, v)) => return Json(v),
            None => {
                let g = cache.refreshing.lock().await;
                if let Some((_, v)) = cache.get() {
                    return Json(v);
                }
                g
            }
        },
    };
    if let Some(v) = fresh(&cache.get()) {
        return Json(v);
    }
    let error = |e: String| json!({"mode": "swarm", "model": state.backend.name(), "models": [], "error": e});
    let view = match tokio::time::timeout(GATHER_TIMEOUT, client.net().gather(None)).await {
        Ok(Ok(book)) => {
            let status = crate::status::to_json(&book, crate::clock::unix_ms());
            let model = client.model();
            let mut v = enrich(status, &model.model_id.to_string(), &model.compute);
            v["mode"] = json!("swarm");
            v["model"] = json!(state.backend.name());
            v["model_id"] = json!(state.backend.model_id().map(|id| id.to_string()));
            v
        }
        Ok(Err(e)) => error(e.to_string()),
        Err(_) => error(format!(
            "the swarm did not answer within {} s",
            GATHER_TIMEOUT.as_secs()
        )),
    };
    cache.set(view.clone());
    Json(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachability_from_addresses() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(reachability(&s(&["/ip4/127.0.0.1/tcp/1"])), "local");
        assert_eq!(reachability(&s(&["/ip4/8.8.8.8/tcp/1"])), "public");
        assert_eq!(
            reachability(&s(&[
                "/ip4/8.8.8.8/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
            ])),
            "relayed"
        );
        assert_eq!(reachability(&[]), "unknown");
    }

    #[test]
    fn coverage_counts_servers_of_the_clients_mode_per_block() {
        let servers = json!([
            {"blocks": [0, 2], "addrs": [], "compute": "fast/cpu"},
            {"blocks": [1, 4], "addrs": ["/ip4/10.0.0.1/tcp/5"], "compute": "fast/cpu"},
            {"blocks": [2, 4], "addrs": [], "compute": "exact/cpu"},
            {"blocks": [0, 4], "addrs": []},
        ]);
        let v = enrich(
            json!({"models": [
                {"id": "mine", "num_blocks": 4, "servers": servers},
                {"id": "other", "num_blocks": 4, "servers": servers},
            ]}),
            "mine",
            "fast/cpu",
        );
        assert_eq!(v["models"][0]["coverage"], json!([1, 2, 1, 1]));
        assert_eq!(v["models"][0]["servers"][1]["reachability"], "local");
        assert_eq!(v["compute"], "fast/cpu");
        // Another model's servers all count: this client routes through none of them.
        assert_eq!(v["models"][1]["coverage"], json!([2, 3, 3, 3]));
    }
}
