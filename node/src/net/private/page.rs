//! Who may see a private mesh's status page: loopback only, unless a token is required.

use super::MeshConfig;
use std::sync::Arc;

/// A private mesh's status page shows who serves what: it may listen only on a loopback
/// address unless it requires a token.
pub fn check_page(
    addr: std::net::SocketAddr,
    mesh: &MeshConfig,
    token: Option<&str>,
) -> Result<(), PageError> {
    if token.is_some_and(|t| t.len() < 16) {
        return Err(PageError::ShortToken);
    }
    if mesh.is_private() && !addr.ip().is_loopback() && token.is_none() {
        return Err(PageError::Exposed { addr });
    }
    Ok(())
}

/// Why the status page may not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    /// A private mesh's page on a non-loopback address without a token.
    #[error(
        "refusing to show a private mesh's page on {addr}: bind --http to a loopback address (127.0.0.1:PORT), or require a token with --http-token (or POLLEN_HTTP_TOKEN)"
    )]
    Exposed {
        /// The address asked for.
        addr: std::net::SocketAddr,
    },
    /// A token too short to resist guessing.
    #[error("--http-token must have at least 16 characters")]
    ShortToken,
}

/// `router` answering 401 to requests without `token` (as a bearer token or `?token=`);
/// unchanged when `token` is none.
pub fn with_token(router: axum::Router, token: Option<String>) -> axum::Router {
    let Some(token) = token else {
        return router;
    };
    let token = Arc::new(token);
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                if request_has_token(&req, &token) {
                    next.run(req).await
                } else {
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::UNAUTHORIZED,
                        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                        "this private mesh's page needs its token\n",
                    ))
                }
            }
        },
    ))
}

fn request_has_token(req: &axum::extract::Request, token: &str) -> bool {
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    [bearer, query]
        .into_iter()
        .flatten()
        .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
