//! A real server on 127.0.0.1:0 under slow, idle and odd clients: every refusal it
//! writes carries the JSON error body, deadlines cut what stalls, connections are
//! capped per address, metric labels stay bounded, and `/healthz` keeps answering
//! meanwhile.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use p2p_discovery::{AppState, ServerConfig};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::oneshot,
};

/// How long `/healthz` may take while the server is under attack.
const HEALTHZ_BOUND: Duration = Duration::from_secs(2);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(config: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = AppState::open(config).expect("state");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            p2p_discovery::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        Self {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the server stops in time")
            .expect("server task");
    }
}

fn fast_config() -> ServerConfig {
    ServerConfig {
        header_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    }
}

/// A connection to `addr` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .expect("bind source");
    socket.connect(addr).await.expect("connect")
}

/// Reads a whole response (the connection closes or its Content-Length is in), within
/// `within`. Returns the status and the body.
async fn read_response(stream: &mut TcpStream, within: Duration) -> (u16, String) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        if let Some((status, body)) = parse_response(&buf) {
            return (status, body);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return parse_response(&buf).unwrap_or_else(|| {
                    panic!(
                        "connection closed without a whole response: {:?}",
                        String::from_utf8_lossy(&buf)
                    )
                })
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!(
                "no whole response within {within:?}: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

fn parse_response(buf: &[u8]) -> Option<(u16, String)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    let body = buf.get(end + 4..end + 4 + len)?;
    Some((status, String::from_utf8_lossy(body).into_owned()))
}

/// Sends `request` on a new connection and reads the response.
async fn exchange(addr: SocketAddr, request: &[u8], within: Duration) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    read_response(&mut s, within).await
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert!(v["message"].is_string(), "{body}");
    v["error"].as_str().expect("error code").to_owned()
}

/// `/healthz` answers 200 within [`HEALTHZ_BOUND`].
async fn assert_healthy(addr: SocketAddr) {
    let started = Instant::now();
    let (status, body) = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        HEALTHZ_BOUND,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < HEALTHZ_BOUND);
}

/// Waits until the server closes `s` (EOF or reset), within `within`; returns what it
/// sent before closing.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("the server kept the connection open past {within:?}"),
        }
    }
}

#[tokio::test]
async fn an_oversize_content_length_is_refused_before_the_body() {
    let server = Server::start(ServerConfig::default()).await;
    for path in ["/v1/names", "/v1/presence", "/healthz"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 300000\r\n\r\n"
        );
        // No body is sent: the answer comes from the headers alone.
        let (status, body) = exchange(server.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(error_code(&body), "body_too_large");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_content_length_at_the_limit_is_read() {
    let server = Server::start(ServerConfig {
        max_body_bytes: 100,
        ..ServerConfig::default()
    })
    .await;
    for (len, status, code) in [(100, 400, "malformed_json"), (101, 413, "body_too_large")] {
        let req = format!(
            "POST /v1/names HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n{}",
            "x".repeat(len)
        );
        let (got, body) = exchange(server.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(got, status, "{len}: {body}");
        assert_eq!(error_code(&body), code);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_healthz_keeps_answering() {
    let server = Server::start(fast_config()).await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        s.write_all(
            b"POST /v1/names HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"rec",
        )
        .await
        .expect("write");
        stalled.push(s);
    }
    assert_healthy(server.addr).await;
    for s in &mut stalled {
        let (status, body) = read_response(s, Duration::from_secs(4)).await;
        assert_eq!(status, 408, "{body}");
        assert_eq!(error_code(&body), "request_timeout");
    }
    assert_healthy(server.addr).await;
    server.stop().await;
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let server = Server::start(fast_config()).await;
    // Trickling headers: a byte every 200 ms never completes within the 1 s deadline.
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Idle: one request answered, then nothing.
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, _) = read_response(&mut idle, Duration::from_secs(2)).await;
    assert_eq!(status, 200);
    // Silent: connected, never a byte.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");

    let started = Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n";
    let mut sent = 0;
    let mut open = slow.len();
    while open > 0 && sent < request.len() {
        open = 0;
        for s in &mut slow {
            if s.write_all(&request[sent..=sent]).await.is_ok() {
                open += 1;
            }
        }
        sent += 1;
        assert_healthy(server.addr).await;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.tick().await;
        tick.tick().await;
    }
    for s in &mut slow {
        closed_within(s, Duration::from_secs(3)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the trickling connections were cut by the header deadline"
    );
    closed_within(&mut idle, Duration::from_secs(3)).await;
    closed_within(&mut silent, Duration::from_secs(3)).await;
    assert_healthy(server.addr).await;
    server.stop().await;
}

#[tokio::test]
async fn connections_are_capped_per_address_with_a_json_refusal() {
    let server = Server::start(ServerConfig {
        max_connections_per_ip: 4,
        ..ServerConfig::default()
    })
    .await;
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(attacker, server.addr).await);
    }
    // The server counts a connection once it accepts it: a request on each shows that.
    for s in &mut held {
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let (status, _) = read_response(s, Duration::from_secs(2)).await;
        assert_eq!(status, 200);
    }
    let mut fifth = connect_from(attacker, server.addr).await;
    let (status, body) = read_response(&mut fifth, Duration::from_secs(2)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&body), "too_many_connections");
    // Others are served.
    assert_healthy(server.addr).await;
    // A closed connection gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect_from(attacker, server.addr).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let (status, _) = read_response(&mut s, Duration::from_secs(2)).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::task::yield_now().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn odd_methods_are_rate_limited_and_counted_as_other() {
    let server = Server::start(ServerConfig::default()).await;
    let long = "X".repeat(10_000);
    let mut limited = false;
    for i in 0..100 {
        let method = if i == 0 {
            long.clone()
        } else {
            format!("ODD{i}")
        };
        let req = format!("{method} /v1/names HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let (status, body) = exchange(server.addr, req.as_bytes(), Duration::from_secs(2)).await;
        let code = error_code(&body);
        assert!(
            (status == 405 && code == "method_not_allowed")
                || (status == 429 && code == "rate_limited"),
            "{status} {body}"
        );
        limited |= status == 429;
    }
    assert!(
        limited,
        "100 writes with odd methods from one address are limited"
    );
    assert_healthy(server.addr).await;
    let (status, metrics) = exchange(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        !metrics.contains("ODD") && !metrics.contains("XXXX"),
        "{metrics}"
    );
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("discovery_requests_total{"))
        .count();
    assert!(series <= 4, "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn protocol_refusals_carry_the_json_error_body() {
    let server = Server::start(ServerConfig::default()).await;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"\x01\x02 garbage\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "uri_too_long",
        ),
        (
            {
                let mut r = b"GET /healthz HTTP/1.1\r\nhost: x\r\n".to_vec();
                for i in 0..200 {
                    r.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
                }
                r.extend_from_slice(b"\r\n");
                r
            },
            431,
            "headers_too_large",
        ),
    ];
    for (req, want_status, want_code) in cases {
        let (status, body) = exchange(server.addr, &req, Duration::from_secs(2)).await;
        assert_eq!(status, want_status, "{body}");
        assert_eq!(error_code(&body), want_code);
    }
    assert_healthy(server.addr).await;
    server.stop().await;
}

#[tokio::test]
async fn only_utf8_application_json_is_json() {
    let server = Server::start(ServerConfig::default()).await;
    for (content_type, want) in [
        ("application/foo+json", 415),
        ("application/json; charset=utf-16", 415),
        ("text/plain", 415),
        ("application/json; charset=utf-8", 400),
        ("application/json", 400),
    ] {
        let req = format!(
            "POST /v1/names HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        let (status, body) = exchange(server.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(status, want, "{content_type}: {body}");
        let code = error_code(&body);
        let expected = if want == 415 {
            "unsupported_media_type"
        } else {
            "malformed_json"
        };
        assert_eq!(code, expected, "{content_type}");
    }
    server.stop().await;
}
