//! The browser client, embedded at build time from `web/`, served with a strict
//! Content-Security-Policy and no referrer.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'none'";

/// The page and its assets, with their Content-Security-Policy: `frame_ancestors` (origins,
/// checked by the configuration) may show the page in a frame; none may without them.
#[derive(Clone)]
pub struct Assets {
    csp: HeaderValue,
}

impl Assets {
    pub fn new(frame_ancestors: &[String]) -> Self {
        let ancestors: Vec<String> = frame_ancestors
            .iter()
            .filter_map(|o| super::origin::normalize(o).ok())
            .collect();
        let ancestors = if ancestors.is_empty() {
            "'none'".to_owned()
        } else {
            ancestors.join(" ")
        };
        let csp = format!("{CSP}; frame-ancestors {ancestors}");
        Self {
            // Normalized origins are plain ASCII; the fallback is the strictest policy.
            csp: HeaderValue::from_str(&csp).unwrap_or_else(|_| {
                HeaderValue::from_static(
                    "default-src 'none'; frame-ancestors 'none'; form-action 'none'",
                )
            }),
        }
    }

    /// `GET /chat?session_key=…`: the page (it reads the key itself and drops it from
    /// the URL).
    pub fn chat_page(&self) -> Response {
        self.serve("index.html")
    }

    /// `GET /assets/{file}`.
    pub fn asset(&self, Path(file): Path<String>) -> Response {
        self.serve(&file)
    }

    fn serve(&self, name: &str) -> Response {
        let Some((_, body)) = ASSETS.iter().find(|(n, _)| *n == name) else {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        };
        let headers: [(HeaderName, HeaderValue); 5] = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(name)),
            ),
            (header::CONTENT_SECURITY_POLICY, self.csp.clone()),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ];
        (headers, *body).into_response()
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}
