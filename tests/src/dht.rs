//! A Mainline DHT of a few nodes in this process, on 127.0.0.1 (each on a port the
//! system picks), for tests and benchmarks: nothing leaves the machine, and the public
//! DHT is never contacted.

use std::net::Ipv4Addr;

use mainline::{async_dht::AsyncDht, Dht};

/// A local DHT; its nodes stop when it is dropped.
#[derive(Debug)]
pub struct Testnet {
    /// `IP:PORT` of its nodes, to bootstrap clients from.
    pub bootstrap: Vec<String>,
    nodes: Vec<AsyncDht>,
}

impl Testnet {
    /// `count` (at least 1) server-mode nodes: the first alone, the others bootstrapped
    /// from it; returns once each has joined.
    pub async fn start(count: usize) -> Testnet {
        let first = Dht::builder()
            .server_mode()
            .no_bootstrap()
            .bind_address(Ipv4Addr::LOCALHOST)
            .port(0)
            .build()
            .expect("DHT node")
            .as_async();
        let bootstrap = vec![first.info().await.local_addr().to_string()];
        let mut nodes = vec![first];
        for _ in 1..count.max(1) {
            let node = Dht::builder()
                .server_mode()
                .bootstrap(&bootstrap)
                .bind_address(Ipv4Addr::LOCALHOST)
                .port(0)
                .build()
                .expect("DHT node")
                .as_async();
            node.bootstrapped().await;
            nodes.push(node);
        }
        let mut addrs = Vec::with_capacity(nodes.len());
        for n in &nodes {
            addrs.push(n.info().await.local_addr().to_string());
        }
        Testnet {
            bootstrap: addrs,
            nodes,
        }
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has none (never: it starts with at least one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
