//! `GET /`: a search page built into the binary, so a running `serve` can be tried from a
//! browser with nothing else installed.
//!
//! One file of plain HTML, CSS and JavaScript (`page.html`, no build step, nothing loaded from
//! elsewhere) that calls the same API as any client: `GET /info` for the model and the index,
//! `POST /search` for the hits, the reasoning and the time split. API errors are shown as the
//! server words them; a 401 asks for the key, which stays in the tab's `sessionStorage`.
//!
//! The page itself needs no key (the `auth` middleware lets `GET /` through): it holds no data,
//! and a browser cannot send a key before the page has asked for it. Its Content-Security-Policy
//! allows only the page's own inline script and style, by their SHA-256, and requests to this
//! server; together with the page writing every API value as text, a document or a model output
//! that contains markup stays text.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::Digest;
use std::sync::LazyLock;

const PAGE: &str = include_str!("page.html");

/// The policy, computed once: hashes instead of `'unsafe-inline'`, so markup that got into the
/// page some other way could not run script.
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        sha256_source(inline(PAGE, "script")),
        sha256_source(inline(PAGE, "style")),
    )
});

/// The text between `<tag>` and `</tag>`, exactly as the browser hashes it.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).expect("page.html has the element") + open.len();
    let len = page[start..]
        .find(&format!("</{tag}>"))
        .expect("page.html closes the element");
    &page[start..start + len]
}

/// A CSP hash source, `sha256-BASE64`.
fn sha256_source(text: &str) -> String {
    let d = sha2::Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(d)
    )
}

/// The search page.
pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The page changes with the binary; revalidating costs one small request.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_hashes_the_only_inline_script_and_style() {
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "<{tag}>");
            let body = inline(PAGE, tag);
            assert!(body.len() > 100, "<{tag}> is empty");
            assert!(CSP.contains(&sha256_source(body)), "{}", *CSP);
        }
        assert!(!CSP.contains("unsafe"), "{}", *CSP);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_writes_no_html() {
        for needle in ["http://", "https://", "src=", "@import", "url("] {
            assert!(!PAGE.contains(needle), "page.html contains {needle:?}");
        }
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!PAGE.contains(sink), "page.html uses {sink}");
        }
    }
}
