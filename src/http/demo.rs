//! `GET /demo?sku=A&sku=B&location=L`: a live availability page, plain
//! HTML and JavaScript with no build step (`demo/index.html`), meant as a
//! starting point for a storefront.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("demo/index.html");

pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
