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

/// Serves `state` on `listener` until `stop` fires; `on_ready` gets the bound address.
pub async fn serve(
    state: Arc<ApiState>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    let app = router(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        stop.cancelled().await;
        // Streams in flight end now; their sessions are freed.
        shutdown.cancel();
    })
    .await
}
