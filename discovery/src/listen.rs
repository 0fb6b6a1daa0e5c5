//! The connection layer of the discovery server: accepting TCP connections within the
//! per-address and global caps, serving each with hyper's HTTP/1.1 server (header and
//! idle deadline), and answering the refusals hyper writes itself with the JSON error
//! body.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request},
    Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tower::ServiceExt;

use crate::{
    api::ErrorBody,
    error::ErrorCode,
    server::{ServerConfig, ServerError},
};

/// File descriptors kept free for everything else the process opens (its database,
/// sockets of a node embedding the server, log files): a quarter of the limit, at
/// least this many.
const RESERVED_FDS: u64 = 32;

/// The open-file limit of this process, as (soft, hard); `None` where it cannot be read.
pub fn nofile_limit() -> Option<(u64, u64)> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok()
}

/// Raises the soft open-file limit of this process to its hard limit where allowed, and
/// returns the limit before and after.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (before, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let after = rlimit::increase_nofile_limit(hard)?;
    Ok((before, after))
}

/// The most connections the server keeps open at once: `configured`, lowered to leave
/// room under a soft open-file limit of `soft`.
pub fn connection_cap(configured: usize, soft: Option<u64>) -> usize {
    let Some(soft) = soft else {
        return configured.max(1);
    };
    let reserve = (soft / 4).max(RESERVED_FDS);
    let fit = usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX);
    configured.min(fit).max(1)
}

/// Open connections per client address, bounded by the global cap (an address whose
/// count drops to zero is forgotten).
#[derive(Debug, Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in the caps, given back on drop.
struct Slot {
    ip: IpAddr,
    per_address: Arc<PerAddress>,
    _global: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .per_address
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize, global: &Arc<Semaphore>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        let permit = Arc::clone(global).try_acquire_owned().ok()?;
        *n += 1;
        Some(Slot {
            ip,
            per_address: Arc::clone(self),
            _global: permit,
        })
    }
}

/// A complete HTTP/1.1 response carrying the JSON error body for `code`, closing the
/// connection.
pub(crate) fn raw_error_response(code: ErrorCode, message: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&ErrorBody {
        error: code.as_str().to_owned(),
        message: message.to_owned(),
    })
    .unwrap_or_default();
    let status = code.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish
/// (idle connections are closed at once).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let soft = nofile_limit().map(|(soft, _)| soft);
    let cap = connection_cap(config.max_connections, soft);
    if cap < config.max_connections {
        tracing::info!(
            configured = config.max_connections,
            cap,
            open_file_limit = soft,
            "discovery server: connection cap lowered to fit the open-file limit"
        );
    }
    let global = Arc::new(Semaphore::new(cap));
    let per_address = Arc::new(PerAddress::default());
    let per_ip = config.max_connections_per_ip.max(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: keep serving the connections we have.
                    tracing::warn!(error = %e, "discovery server: accept failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        let ip = peer.ip().to_canonical();
        let Some(slot) = per_address.take(ip, per_ip, &global) else {
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |req: Request<hyper::body::Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        ));
        let conn = http.serve_connection(TokioIo::new(JsonRefusals::new(stream)), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "discovery connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection over the caps with `503 too_many_connections` and closes it.
/// The response fits in a fresh socket's send buffer, so the (non-blocking) write never
/// waits.
fn refuse(stream: TcpStream) {
    use std::io::Write as _;
    let resp = raw_error_response(
        ErrorCode::TooManyConnections,
        "too many open connections; retry later",
    );
    if let Ok(mut stream) = stream.into_std() {
        let _ = stream.write(&resp);
    }
    tracing::debug!("discovery server: connection refused over the caps");
}

/// The connection's stream, with the bodiless error responses hyper writes on its own
/// (400, 414, 431 for a request it cannot parse) replaced by the same response with the
/// JSON error body. Every response of the router has a body, so a bodiless 400, 414 or
/// 431 can only come from hyper.
struct JsonRefusals<S> {
    inner: S,
    /// A replacement response not yet written out.
    pending: Vec<u8>,
    written: usize,
}

impl<S> JsonRefusals<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// The replacement for `head` if it is one of hyper's own bodiless refusals.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let code = match head.get(..13)? {
        b"HTTP/1.1 400 " => ErrorCode::MalformedRequest,
        b"HTTP/1.1 414 " => ErrorCode::UriTooLong,
        b"HTTP/1.1 431 " => ErrorCode::HeadersTooLarge,
        _ => return None,
    };
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let bodiless = head[..end]
        .split(|&b| b == b'\n')
        .any(|line| line.eq_ignore_ascii_case(b"content-length: 0\r"));
    if !bodiless || end + 4 != head.len() {
        return None;
    }
    let message = match code {
        ErrorCode::UriTooLong => "the request URI is too long",
        ErrorCode::HeadersTooLarge => "the request headers are too large or too many",
        _ => "the request is not valid HTTP/1.1",
    };
    Some(raw_error_response(code, message))
}

impl<S: AsyncWrite + Unpin> JsonRefusals<S> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonRefusals<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRefusals<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if let Some(replaced) = replacement(buf) {
            self.pending = replaced;
            self.written = 0;
            // The original bytes count as written; the replacement goes out first on
            // the next write, flush or shutdown.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_room_under_the_file_limit() {
        assert_eq!(connection_cap(4096, Some(256)), 192);
        assert_eq!(connection_cap(4096, Some(64)), 32);
        assert_eq!(connection_cap(100, Some(1_000_000)), 100);
        assert_eq!(connection_cap(100, None), 100);
        assert_eq!(connection_cap(4096, Some(10)), 1);
    }

    #[test]
    fn hypers_bodiless_refusals_get_the_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 10:00:00 GMT\r\n\r\n";
        let out = replacement(head).expect("replaced");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert!(text.contains("content-type: application/json"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).expect("body");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"], "headers_too_large");
        // A response with a body, or another status, is left alone.
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
        assert!(replacement(with_body).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx").is_none());
    }
}
