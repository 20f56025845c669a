//! What keeps one client from starving or exhausting the server: the accept loop (a cap on
//! open connections, a deadline for request headers that also closes idle keep-alive
//! connections), a body deadline, a per-request deadline, a cap on each client's
//! concurrent generations, a Host allowlist, and OpenAI-shaped errors for requests refused
//! before they reach a handler (414, 431, a path that is not UTF-8).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::openai::ApiError;
use super::AppState;
use crate::{Error, Result};

/// Connection and request limits of `samkv serve` (all have defaults; 0 is refused).
#[derive(clap::Args, Clone, Debug)]
pub struct ConnLimits {
    /// Open connections at once; more are answered 503 and closed (bounds file descriptors).
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a request's body (408 after).
    #[arg(long, default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// Seconds a generation may take from arrival (queueing included) to its last token;
    /// then it is stopped: 504, or an error event ending the stream.
    #[arg(long, default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// Generations (and uploads) one client may have queued or running at once (429 over
    /// it). A client is its API key when one is sent, else its IP address.
    #[arg(long, default_value_t = 4)]
    pub max_requests_per_client: usize,
    /// Longest request target (path and query) in bytes (414 over it).
    #[arg(long, default_value_t = 8192)]
    pub max_uri_bytes: usize,
    /// Most bytes of request headers (431 over it).
    #[arg(long, default_value_t = 32768)]
    pub max_header_bytes: usize,
}

impl ConnLimits {
    pub fn check(&self) -> Result<()> {
        let all = [
            self.max_connections as u64,
            self.header_timeout_secs,
            self.body_timeout_secs,
            self.request_timeout_secs,
            self.max_requests_per_client as u64,
            self.max_uri_bytes as u64,
            self.max_header_bytes as u64,
        ];
        if all.contains(&0) {
            return Err(Error::InvalidInput(
                "--max-connections, the --*-timeout-secs, --max-requests-per-client, \
                 --max-uri-bytes and --max-header-bytes must be at least 1"
                    .into(),
            ));
        }
        // Durations far beyond any use would overflow deadline arithmetic.
        if all[1..4].iter().any(|&s| s > 365 * 24 * 3600) {
            return Err(Error::InvalidInput(
                "timeouts must be at most a year (31536000 seconds)".into(),
            ));
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs)
    }
}

/// The peer address of a connection, set by the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Who sent a request ([`client_key`]), for the per-client cap.
#[derive(Clone, Debug)]
pub struct ClientId(pub String);

/// The body deadline, read by the JSON extractor.
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub Duration);

/// A path segment (a document or model id) as a String; a segment that is not UTF-8 is
/// a 400 in OpenAI's shape instead of axum's plain-text rejection.
pub struct DocPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for DocPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| DocPath(p.0))
            .map_err(|e| {
                ApiError::invalid(format!(
                    "the id in the path is not valid ({}); ids are 1-128 of A-Z a-z 0-9 . _ : -",
                    e.body_text()
                ))
                .code("invalid_id")
            })
    }
}

/// Refuses, in OpenAI's error shape, a request whose Host is not allowed (421), whose target
/// is too long (414) or whose headers are too large (431).
pub async fn check_request(
    State(st): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let lim = &st.opts.limits;
    if !st.opts.allowed_hosts.is_empty() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        if !host_allowed(&st.opts.allowed_hosts, host) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_request_error",
                format!("host `{host}` is not served here (--allowed-hosts)"),
            )
            .code("host_not_allowed")
            .into_response();
        }
    }
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > lim.max_uri_bytes {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "invalid_request_error",
            format!(
                "the request target is {uri_len} bytes, more than this server accepts ({}, --max-uri-bytes)",
                lim.max_uri_bytes
            ),
        )
        .code("uri_too_long")
        .into_response();
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > lim.max_header_bytes {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request headers are {header_bytes} bytes, more than this server accepts ({}, --max-header-bytes)",
                lim.max_header_bytes
            ),
        )
        .code("headers_too_large")
        .into_response();
    }
    let peer = req.extensions().get::<Peer>().copied();
    let client = ClientId(client_key(req.headers(), peer));
    req.extensions_mut().insert(BodyTimeout(lim.body_timeout()));
    req.extensions_mut().insert(client);
    next.run(req).await
}

/// Whether `host` (a Host header: name or IP, maybe `:port`) is allowed: an entry with a
/// port must match exactly, one without matches any port.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().map_or(host, |h| &host[..h.len() + 2]),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
}

/// Counts each client's requests in flight, for --max-requests-per-client.
#[derive(Default)]
pub struct ClientSlots(Mutex<HashMap<String, usize>>);

/// One client's slot, released on drop.
pub struct ClientSlot(Arc<ClientSlots>, String);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl ClientSlots {
    pub fn try_acquire(self: &Arc<Self>, client: &str, max: usize) -> Option<ClientSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(client.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot(self.clone(), client.to_string()))
    }
}

/// Who a request comes from, for the per-client cap: its API key (hashed, never kept in
/// clear) when it sends one, else its IP address.
pub fn client_key(headers: &axum::http::HeaderMap, peer: Option<Peer>) -> String {
    use sha2::{Digest, Sha256};
    match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(a) => format!("key:{}", hex::encode(&Sha256::digest(a.as_bytes())[..8])),
        None => peer.map_or("unknown".into(), |p| format!("ip:{}", p.0.ip())),
    }
}

/// A 503 written by hand to a connection over --max-connections (no handler runs for it).
fn over_capacity_response(max: usize) -> Vec<u8> {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        format!("the server has {max} connections open (--max-connections); retry shortly"),
    )
    .code("too_many_connections")
    .body()
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown` resolves: HTTP/1.1, at most
/// `max_connections` at once, with the header deadline. Accept errors (EMFILE under a low
/// fd limit) are logged and retried, never fatal.
pub async fn serve_conns(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let conns = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let header_timeout = Duration::from_secs(limits.header_timeout_secs);
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed ({e}); retrying (is the fd limit low?)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            let max = limits.max_connections;
            tokio::spawn(async move {
                let mut s = stream;
                let resp = over_capacity_response(max);
                let write = s.write_all(&resp);
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
            });
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(addr));
                    let mut app = app.clone();
                    async move {
                        use tower::Service;
                        app.call(req.map(axum::body::Body::new)).await
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("connection from {addr}: {e}");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_with_or_without_port() {
        let a = vec![
            "localhost".to_string(),
            "api.example:8443".into(),
            "[::1]".into(),
        ];
        assert!(host_allowed(&a, "localhost:8080") && host_allowed(&a, "LOCALHOST"));
        assert!(host_allowed(&a, "api.example:8443") && !host_allowed(&a, "api.example:80"));
        assert!(host_allowed(&a, "[::1]:8080"));
        assert!(!host_allowed(&a, "evil.example") && !host_allowed(&a, "localhost.evil:80"));
    }

    #[test]
    fn client_slots_cap_and_release() {
        let s = Arc::new(ClientSlots::default());
        let a = s.try_acquire("x", 2).expect("1");
        let _b = s.try_acquire("x", 2).expect("2");
        assert!(s.try_acquire("x", 2).is_none());
        assert!(s.try_acquire("y", 2).is_some());
        drop(a);
        assert!(s.try_acquire("x", 2).is_some());
    }

    #[test]
    fn limits_refuse_zero_and_huge() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            l: ConnLimits,
        }
        assert!(W::parse_from(["x"]).l.check().is_ok());
        assert!(W::parse_from(["x", "--max-connections", "0"])
            .l
            .check()
            .is_err());
        assert!(
            W::parse_from(["x", "--request-timeout-secs", "18446744073709551615"])
                .l
                .check()
                .is_err()
        );
    }
}
