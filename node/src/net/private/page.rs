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
        "refusing to show a private mesh's page on {addr}: bind it to a loopback address (127.0.0.1:PORT), or require a token with --http-token (or POLLEN_HTTP_TOKEN)"
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
                    // The API's paths answer in OpenAI's error shape, which its
                    // clients read; the page's in plain text.
                    None if req.uri().path().starts_with("/v1/") => {
                        axum::response::IntoResponse::into_response((
                            axum::http::StatusCode::UNAUTHORIZED,
                            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                            axum::Json(serde_json::json!({"error": {
                                "message": "this API needs its token: send \
                                    `Authorization: Bearer TOKEN` (an OpenAI client's \
                                    api_key)",
                                "type": "invalid_request_error",
                                "param": null,
                                "code": "invalid_api_key",
                            }})),
                        ))
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

/// The cookie that carries `token`: named after a hash of it, since browsers keep
/// cookies per host, not per port, and two of Pollen's pages on one host (an API and a
/// bootstrap's page) with different tokens would otherwise overwrite each other's.
fn cookie_name(token: &str) -> String {
    let hash = blake3::hash(token.as_bytes()).to_hex();
    format!("pollen_token_{}", &hash[..12])
}

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
    // As written, or percent-decoded as a browser encodes it (a `+` stays a `+` in
    // the first).
    let raw = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let decoded =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri())
            .ok()
            .and_then(|q| q.0.get("token").cloned());
    if raw.is_some_and(is) || decoded.as_deref().is_some_and(is) {
        return Some(Via::Query);
    }
    let name = cookie_name(token);
    let cookie = req
        .headers()
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(name.as_str())?.strip_prefix('='))
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
        "{}={token}; Path=/; HttpOnly; SameSite=Strict",
        cookie_name(token)
    ))
    .ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(uri: &str, header: Option<(&str, &str)>) -> axum::extract::Request {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some((k, v)) = header {
            b = b.header(k, v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_token_is_found_in_a_header_the_query_or_its_own_cookie() {
        let token = "a+token/with=odd&chars-0123456789";
        let via = |uri: &str, h| token_in(&request(uri, h), token);
        let bearer = format!("Bearer {token}");
        assert_eq!(
            via("/", Some(("authorization", &bearer))),
            Some(Via::Header)
        );
        // A `+` as written, or percent-encoded as a browser sends it.
        assert_eq!(via("/x?a=1&token=a+token/with=odd", None), None);
        let encoded = "a%2Btoken%2Fwith%3Dodd%26chars-0123456789";
        assert_eq!(via(&format!("/x?token={encoded}"), None), Some(Via::Query));
        let plain = "plain-token-0123456789";
        let found = token_in(&request(&format!("/?token={plain}"), None), plain);
        assert_eq!(found, Some(Via::Query));
        let plus = "plus+token+0123456789";
        let found = token_in(&request(&format!("/?token={plus}"), None), plus);
        assert_eq!(found, Some(Via::Query), "a raw `+` is not a space here");
        // The cookie under the token's own name only.
        let cookie = format!("other=1; {}={plain}", cookie_name(plain));
        let found = token_in(&request("/", Some(("cookie", &cookie))), plain);
        assert_eq!(found, Some(Via::Cookie));
        let foreign = format!("{}={plain}", cookie_name("another-token-0123456789"));
        let found = token_in(&request("/", Some(("cookie", &foreign))), plain);
        assert_eq!(found, None);
        assert_eq!(token_in(&request("/", None), plain), None);
        // Only cookie-safe tokens get a cookie.
        assert!(set_cookie("a token; with spaces").is_none());
        let set = set_cookie(plain).unwrap();
        assert!(
            set.to_str()
                .unwrap()
                .ends_with("; Path=/; HttpOnly; SameSite=Strict")
        );
    }
}
