//! The real `p2p-node discovery` under a low open-file limit: idle connections past the
//! caps are refused (not accepted until the process runs out of descriptors), `/healthz`
//! keeps answering, and the log on a pipe carries no colour codes.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use p2p_tests::{p2p_node_bin, private_tempdir, Proc, T};

/// Starts `p2p-node -v discovery` on 127.0.0.1:0 with an open-file limit of `nofile`
/// (soft and hard, so it cannot be raised); returns the process and its address.
fn discovery_with_file_limit(dir: &std::path::Path, nofile: u32) -> (Proc, SocketAddr) {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$@\""))
        .arg("sh")
        .arg(p2p_node_bin())
        .arg("-v")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("discovery")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(dir.join("discovery.redb"));
    p2p_tests::clean_env(&mut cmd);
    cmd.env_remove("NO_COLOR");
    let mut p = Proc::spawn(cmd);
    let line = p.expect_line(T, |l| l.contains("http://"));
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .expect("url in line")
        .parse()
        .expect("address");
    (p, addr)
}

/// A (non-blocking) connection from the loopback address `from` (Linux routes all of 127/8
/// to lo), made within 2 s.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
    }
    let stream = RT.with(|rt| {
        rt.block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::from((from, 0)))?;
            tokio::time::timeout(Duration::from_secs(2), s.connect(to))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
        })
    })?;
    stream.into_std()
}

/// `GET /healthz` from `from`; the status, or an error, within `within`.
fn healthz(from: Ipv4Addr, to: SocketAddr, within: Duration) -> std::io::Result<u16> {
    let mut s = connect_from(from, to)?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(within))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))
}

/// Polls `/healthz` until it answers 200, within `bound`; returns how long it took.
fn healthz_answers_within(from: Ipv4Addr, to: SocketAddr, bound: Duration) -> Duration {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < bound {
        match healthz(from, to, bound.saturating_sub(start.elapsed())) {
            Ok(200) => return start.elapsed(),
            other => last = Some(format!("{other:?}")),
        }
        std::thread::yield_now();
    }
    panic!("/healthz did not answer 200 within {bound:?}; last: {last:?}");
}

#[test]
fn idle_connections_under_a_low_file_limit_leave_healthz_answering() {
    let dir = private_tempdir();
    let (mut server, addr) = discovery_with_file_limit(dir.path(), 256);
    let caps = server.expect_line(T, |l| l.starts_with("open-file limit"));
    assert_eq!(
        caps,
        "open-file limit 256: up to 192 connections, 64 per client address"
    );

    // 100 idle connections from one address: 64 are held, the rest refused at once.
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..100)
        .map(|_| connect_from(one, addr).expect("connect"))
        .collect();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Refused connections get the JSON 503 and are closed; held ones get nothing.
    let mut answers: Vec<Vec<u8>> = vec![Vec::new(); idle.len()];
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        for (s, got) in idle.iter_mut().zip(&mut answers) {
            s.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 512];
            if let Ok(n) = s.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        let refused = answers.iter().filter(|a| !a.is_empty()).count();
        if refused >= 36 || Instant::now() > deadline {
            break refused;
        }
        std::thread::yield_now();
    };
    for a in answers.iter().filter(|a| !a.is_empty()) {
        let text = String::from_utf8_lossy(a);
        assert!(
            text.starts_with("HTTP/1.1 503") && text.contains("too_many_connections"),
            "{text}"
        );
    }
    assert_eq!(
        refused, 36,
        "64 of 100 connections from one address are held"
    );
    let took = healthz_answers_within(Ipv4Addr::new(127, 0, 0, 200), addr, Duration::from_secs(2));
    assert!(took < Duration::from_secs(2));

    // 200 more from five other addresses: 300 in all, past the global cap of 192 and
    // past the file limit of 256. Nothing fails to be accepted for want of descriptors;
    // the idle ones are closed by the header deadline (10 s), and /healthz answers.
    for a in 2..7u8 {
        for _ in 0..40 {
            if let Ok(s) = connect_from(Ipv4Addr::new(127, 0, 0, a), addr) {
                idle.push(s);
            }
        }
    }
    healthz_answers_within(Ipv4Addr::new(127, 0, 0, 201), addr, Duration::from_secs(15));
    let stderr = server.stderr();
    assert!(
        !stderr.contains("accept failed") && !stderr.contains("Too many open files"),
        "{stderr}"
    );
    drop(idle);
    server.terminate(T);
}

#[test]
fn the_log_on_a_pipe_has_no_colour_codes() {
    let dir = private_tempdir();
    let (mut server, addr) = discovery_with_file_limit(dir.path(), 1024);
    healthz_answers_within(Ipv4Addr::LOCALHOST, addr, Duration::from_secs(5));
    server.terminate(T);
    let stderr = server.stderr();
    assert!(stderr.contains("INFO"), "-v logs at info: {stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}
