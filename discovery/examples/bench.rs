//! Load generator for the discovery server: lookups/s and announces/s, each request
//! going through the verifying client (so signature checks on both sides count).
//!
//! ```text
//! cargo run --release -p p2p-discovery --example bench -- [SECONDS] [CONCURRENCY] [URL]
//! ```
//!
//! Without URL it starts an in-process server on 127.0.0.1:0 with the write rate limit
//! lifted (a real server would answer `429 rate_limited` to one client IP doing this).
//! Not a test: it prints figures and never fails on them.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use p2p_crypto::SecretKey;
use p2p_discovery::{AppState, Client, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map_or(Ok(5), |s| s.parse())?;
    let conc: usize = args.next().map_or(Ok(32), |s| s.parse())?;
    let url = match args.next() {
        Some(url) => url,
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let state = AppState::open(ServerConfig {
                write_rate_per_sec: 1e9,
                write_burst: u32::MAX,
                ..ServerConfig::default()
            })?;
            tokio::spawn(p2p_discovery::serve(
                listener,
                state,
                std::future::pending(),
            ));
            format!("http://{addr}")
        }
    };
    let client = Client::new(&url)?;
    // A population of online peers to look up.
    let keys: Arc<Vec<SecretKey>> = Arc::new((0..1000).map(|_| SecretKey::generate()).collect());
    for (i, k) in keys.iter().enumerate() {
        let addr = format!("10.0.{}.{}:4433", i / 250, i % 250).parse()?;
        client
            .announce(k, None, &[addr], Duration::from_secs(600))
            .await?;
    }
    println!("server {url}, {conc} concurrent clients, {secs} s per phase");
    for phase in ["lookup", "announce"] {
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for t in 0..conc {
            let (client, keys, done, errors) =
                (client.clone(), keys.clone(), done.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while Instant::now() < deadline {
                    let key = &keys[i % keys.len()];
                    let ok = if phase == "lookup" {
                        matches!(client.lookup_id(&key.public()).await, Ok(Some(_)))
                    } else {
                        let addr = "0.0.0.0:4433".parse().expect("static address");
                        client
                            .announce(key, None, &[addr], Duration::from_secs(600))
                            .await
                            .is_ok()
                    };
                    if ok { &done } else { &errors }.fetch_add(1, Ordering::Relaxed);
                    i += conc;
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let n = done.load(Ordering::Relaxed);
        println!(
            "{phase}: {n} ok, {} errors, {:.0}/s",
            errors.load(Ordering::Relaxed),
            n as f64 / secs as f64
        );
    }
    Ok(())
}
