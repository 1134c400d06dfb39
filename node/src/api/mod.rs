//! `pollen api`: an OpenAI-compatible HTTP API, and a web page with a chat and a live
//! view of the swarm, all served by one axum router.
//!
//! Rooms: [`cli`] (the subcommand), [`openai`] (the `/v1` endpoints, their request checks, SSE streaming and
//! errors), [`web`] (the page, its assets compiled into the binary, and the swarm view's
//! JSON). Generation goes through a [`Backend`]: a whole local model or a swarm client.

pub mod cli;
pub mod openai;
pub mod web;

use crate::backend::Backend;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every handler shares.
#[derive(Debug)]
pub struct ApiState {
    /// The model to generate with.
    pub backend: Backend,
    /// The swarm view, cached briefly so that many open pages cost one query.
    pub swarm_view: web::SwarmViewCache,
    /// Fired when the server shuts down: running generations stop.
    pub shutdown: CancellationToken,
}

/// The policy headers on every answer: no MIME sniffing, no framing, and only this
/// origin's scripts, styles and connections.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// The router: `/v1/...`, the page and its assets, `/api/swarm`, `/metrics`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .merge(openai::routes())
        .merge(web::routes())
        .with_state(state)
        .merge(crate::metrics::router())
        .layer(axum::middleware::map_response(security_headers))
}

/// Which `Host` names a listener answers. A page whose own name an attacker re-points at
/// this server's address (DNS rebinding) sends its own name in `Host`: a name the
/// server does not know is refused. Known: `localhost`, IP addresses (on a loopback
/// listener only loopback ones and the bound one), and the names given with
/// `--allow-host`. A non-loopback listener that requires a token answers every name
/// (the token, which another site's page cannot send, guards it).
#[derive(Debug, Clone)]
pub struct Hosts {
    bound: SocketAddr,
    names: Vec<String>,
    any: bool,
}

impl Hosts {
    /// The names a listener bound to `bound` answers, with `names` allowed besides, and
    /// whether it requires a token.
    pub fn new(bound: SocketAddr, names: &[String], token: bool) -> Self {
        Self {
            bound,
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            any: token && !bound.ip().is_loopback(),
        }
    }

    /// Whether a request naming `host` (its `Host` header) may reach this listener.
    pub fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let name = if let Some(rest) = host.strip_prefix('[') {
            match rest.split_once(']') {
                Some((ip6, port)) if port.is_empty() || port.starts_with(':') => ip6,
                _ => return false,
            }
        } else {
            match host.rsplit_once(':') {
                Some((name, _port)) => name,
                None => host,
            }
        };
        // A final dot names the same host (`localhost.`).
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name == "localhost" || self.names.contains(&name) {
            return true;
        }
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) if self.bound.ip().is_loopback() => ip.is_loopback() || ip == self.bound.ip(),
            Ok(_) => true,
            Err(_) => false,
        }
    }
}

/// `router` refusing (403, in OpenAI's error shape) requests whose `Host` names what
/// `hosts` does not allow ([`Hosts::allows`]). A request without a `Host` (not a
/// browser's) passes.
pub fn with_host_check(router: Router, hosts: Hosts) -> Router {
    let hosts = Arc::new(hosts);
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let hosts = hosts.clone();
            async move {
            let host = req
                .headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap_or("\u{fffd}").to_string())
                .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
            match host {
                Some(h) if !hosts.allows(&h) => {
                    let body = serde_json::json!({"error": {
                        "message": format!(
                            "this server answers only requests addressed to localhost, an IP address of it or a host name it was told to allow (`pollen api --allow-host`; it listens on {}), not `{h}`",
                            hosts.bound
                        ),
                        "type": "invalid_request_error",
                        "param": null,
                        "code": "host_not_allowed",
                    }});
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::FORBIDDEN,
                        axum::Json(body),
                    ))
                }
                _ => next.run(req).await,
            }
            }
        },
    ))
}

/// Serves `state` on `listener` until `stop` fires. With `token`, every route answers
/// 401 without it (`Authorization: Bearer TOKEN` or `?token=TOKEN`); requests for host
/// names it does not know get 403 ([`Hosts`], with `allow_hosts` besides).
pub async fn serve(
    state: Arc<ApiState>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    allow_hosts: &[String],
    stop: CancellationToken,
) -> std::io::Result<()> {
    let bound = listener.local_addr()?;
    let shutdown = state.shutdown.clone();
    let hosts = Hosts::new(bound, allow_hosts, token.is_some());
    let app = crate::net::private::with_token(router(state), token);
    let app = with_host_check(app, hosts).layer(axum::middleware::map_response(security_headers));
    let stopped = stop.clone();
    let served = axum::serve(
        crate::http_listener::guarded(listener),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        stopped.cancelled().await;
        // Streams in flight end now; their sessions are freed.
        shutdown.cancel();
    })
    .into_future();
    // A connection whose client reads nothing (its TCP window shut) would hold a
    // graceful shutdown forever: past `SHUTDOWN_WAIT` the rest are dropped.
    tokio::select! {
        r = served => r,
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(crate::http_listener::SHUTDOWN_WAIT).await;
        } => {
            tracing::warn!(
                "API connections still open {:?} after stopping; dropping them",
                crate::http_listener::SHUTDOWN_WAIT
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Hosts;

    fn addr(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn loopback_listeners_refuse_foreign_host_names() {
        let lo = Hosts::new(addr("127.0.0.1:8080"), &[], false);
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:1",
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "localhost.:8080",
        ] {
            assert!(lo.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil.example:8080",
            "10.0.0.1:8080",
            "[::1]x",
            "",
        ] {
            assert!(!lo.allows(bad), "{bad}");
        }
        assert!(Hosts::new(addr("127.0.0.2:9"), &[], false).allows("127.0.0.2:9"));
        // A token does not open a loopback listener to foreign names.
        assert!(!Hosts::new(addr("127.0.0.1:9"), &[], true).allows("evil.example"));
    }

    #[test]
    fn open_listeners_without_a_token_answer_addresses_and_known_names_only() {
        let names = ["MyBox.lan".to_string()];
        let wide = Hosts::new(addr("0.0.0.0:9"), &names, false);
        for ok in [
            "192.0.2.7:9",
            "[2001:db8::1]:9",
            "localhost",
            "mybox.lan:9",
            "mybox.lan.:9",
        ] {
            assert!(wide.allows(ok), "{ok}");
        }
        for bad in [
            "anything.example",
            "evil.example:9",
            "mybox.lan.evil.example",
        ] {
            assert!(!wide.allows(bad), "{bad}");
        }
        // With a token, every name: another site's page cannot send it.
        assert!(Hosts::new(addr("0.0.0.0:9"), &[], true).allows("anything.example"));
    }
}
