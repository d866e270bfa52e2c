//! HTTP conventions every orderflow server follows: RFC 9457 problem+json errors with stable
//! `type`s and nothing internal in them, `/healthz`, request ids and security headers on every
//! response ([`edge`]), and serving until a cancellation token fires (in-flight requests
//! finish).

use std::net::SocketAddr;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `lines[0].quantity`.
    pub field: String,
    pub message: String,
}

/// An RFC 9457 problem document. `type` is a stable URN per kind of problem
/// (`urn:orderflow:problem:<code>`); clients switch on it, never on `detail`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Seconds to wait before retrying (`Retry-After`), for 429 and 503.
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, title: &str) -> Self {
        Self {
            kind: format!("urn:orderflow:problem:{code}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: None,
            errors: Vec::new(),
            retry_after: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found")
            .detail(format!("{what} does not exist"))
    }

    /// For failures whose cause must not leak (database, broker); log the cause separately.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Temporarily unavailable",
        )
        .detail(format!("{what} is temporarily unavailable; retry later"))
        .retry_after(1)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let mut response = (status, Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Header carrying the request id, in requests (a caller's own, if sane) and responses.
pub const REQUEST_ID: &str = "x-request-id";

/// Headers every response carries: these APIs serve JSON to programs, never pages to frame,
/// sniff or embed.
const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-resource-policy", "same-origin"),
];

/// Wraps a public router: every request gets a request id (the caller's `x-request-id` when it
/// is 1–128 visible ASCII characters, else a new UUID), visible to handlers in the request
/// headers and echoed in the response, and every response gets the security headers.
/// A handler that panics answers a problem+json `500` (the panic is logged, nothing of it is
/// sent) instead of dropping the connection.
pub fn edge(router: Router) -> Router {
    router
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(request_context))
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("A request handler panicked.");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal error",
    )
    .into_response()
}

async fn request_context(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    let id = given.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request.headers_mut().insert(REQUEST_ID, value.clone());
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, value);
    for (name, content) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(content));
    }
    response
}

/// `/healthz`: the process is alive and serving.
pub fn health_routes() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}

/// Fallback for unknown routes: a problem document, not an empty 404.
pub async fn not_found_fallback() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no-such-route", "No such route")
}

/// A bound listener (port 0 picks a free port) serving `router` until `cancel` fires, over
/// plain HTTP or TLS ([`Server::bind_tls`]).
pub struct Server {
    listener: TcpListener,
    router: Router,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// How long in-flight requests of a TLS listener get to finish once `cancel` fires.
const TLS_DRAIN: std::time::Duration = std::time::Duration::from_secs(15);

impl Server {
    pub async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            router,
            tls: None,
        })
    }

    /// Binds with TLS when `tls` names a certificate (mutual TLS when it names client CAs),
    /// plain HTTP otherwise.
    pub async fn bind_tls(
        addr: SocketAddr,
        router: Router,
        tls: &crate::config::TlsSettings,
    ) -> Result<Self, BindError> {
        let config = if tls.enabled() {
            Some(crate::tls::server_config(tls)?)
        } else {
            None
        };
        let mut server = Self::bind(addr, router).await?;
        server.tls = config;
        Ok(server)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether this listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `cancel`, then lets in-flight requests finish.
    pub async fn run(self, cancel: CancellationToken) -> std::io::Result<()> {
        // Connection info lets handlers and middleware see the peer's address (rate limits).
        let service = self
            .router
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        let Some(config) = self.tls else {
            return axum::serve(self.listener, service)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
        };
        let handle = axum_server::Handle::new();
        let stopper = handle.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            stopper.graceful_shutdown(Some(TLS_DRAIN));
        });
        let listener = self.listener.into_std()?;
        axum_server::from_tcp_rustls(
            listener,
            axum_server::tls_rustls::RustlsConfig::from_config(config),
        )?
        .handle(handle)
        .serve(service)
        .await
    }
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// An error and its sources on one line. HTTP clients hide the cause in the sources: reqwest
/// says "error sending request", and only its sources say the TLS handshake failed, and why.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
