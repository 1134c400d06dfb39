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

/// `router` answering 401 to requests without `token` (as a bearer token, `?token=` or
/// the cookie a `?token=` sets); unchanged when `token` is none.
///
/// A page opened as `/?token=TOKEN` loads its style, script and data from other paths
/// without the query: an answer to a request that brought the token in its query sets
/// it as an `HttpOnly`, `SameSite=Strict` cookie (scripts cannot read it, other sites'
/// pages do not send it), so the browser's next requests carry it.
pub fn with_token(router: axum::Router, token: Option<String>) -> axum::Router {
    let Some(token) = token else {
        return router;
    };
    let token = Arc::new(token);
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                match token_in(&req, &token) {
                    Some(via) => {
                        let mut res = next.run(req).await;
                        if via == Via::Query
                            && let Some(cookie) = set_cookie(&token)
                        {
                            res.headers_mut()
                                .append(axum::http::header::SET_COOKIE, cookie);
                        }
                        res
                    }
                    None => axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::UNAUTHORIZED,
                        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                        "this page needs its token: open it as /?token=TOKEN, or send \
                         `Authorization: Bearer TOKEN`\n",
                    )),
                }
            }
        },
    ))
}

/// The cookie that carries the token.
const COOKIE: &str = "pollen_token";

/// How a request brought the token.
#[derive(Debug, PartialEq, Eq)]
enum Via {
    Header,
    Query,
    Cookie,
}

fn token_in(req: &axum::extract::Request, token: &str) -> Option<Via> {
    let is = |t: &str| constant_time_eq(t.as_bytes(), token.as_bytes());
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(is) {
        return Some(Via::Header);
    }
    // Percent-decoded, as a browser encodes it.
    let query =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri())
            .ok()
            .and_then(|q| q.0.get("token").cloned());
    if query.as_deref().is_some_and(is) {
        return Some(Via::Query);
    }
    let cookie = req
        .headers()
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(is);
    cookie.then_some(Via::Cookie)
}

/// The `Set-Cookie` value carrying `token`, if its characters may stand in a cookie
/// (RFC 6265's cookie-octets; a token with others works as a header or query only).
fn set_cookie(token: &str) -> Option<axum::http::HeaderValue> {
    let octet = |b: u8| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
    if !token.bytes().all(octet) {
        return None;
    }
    axum::http::HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    ))
    .ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
