//! The web dashboard: one page of plain HTML, CSS and JavaScript, compiled
//! into the binary (no Node build step). It holds no data of its own: it
//! asks the token for the API and reads everything from `/api/`, so it
//! sees exactly what that token may see.
//!
//! Served without a token (there is nothing in it to guard), under a
//! Content-Security-Policy that lets it load only itself and talk only to
//! its own origin.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The dashboard's routes: `/` and its two assets.
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    let set = |v: &'static str| HeaderValue::from_static(v);
    headers.insert(header::CONTENT_TYPE, set(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, set(POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, set("nosniff"));
    headers.insert(header::REFERRER_POLICY, set("no-referrer"));
    headers.insert(header::CACHE_CONTROL, set("no-cache"));
    response
}
