//! A LAN with no internet in network namespaces: hosts on one switch (a bridge), each
//! with one address in 10.77.0.0/24 and no default route, multicast on.
//!
//! ```text
//!              sw (bridge br0)
//!       ┌──────────┼──────────┐
//!   h0 10.77.0.2  h1 10.77.0.3  h2 10.77.0.4 ...
//! ```
//!
//! Everything is deleted when the lab is dropped, also when a test fails; see
//! [`crate::netns`] for what happens without root.

use std::sync::atomic::Ordering;

use crate::netns::{run, usable, NEXT};

/// Namespaces of one LAN.
#[derive(Debug)]
pub struct LanLab {
    prefix: String,
    hosts: usize,
    namespaces: Vec<String>,
}

impl LanLab {
    /// Builds a LAN of `hosts` hosts (at most 200); `None` when this machine cannot.
    pub fn build(hosts: usize) -> Option<LanLab> {
        assert!(hosts <= 200);
        if !usable() {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut lab = LanLab {
            prefix: format!("l{}x{n}", std::process::id() % 100_000),
            hosts,
            namespaces: Vec::new(),
        };
        if let Err(e) = lab.create() {
            panic!("cannot build the LAN: {e}");
        }
        Some(lab)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        assert!(i < self.hosts);
        format!("{}h{i}", self.prefix)
    }

    /// The address of host `i`.
    pub fn ip(i: usize) -> String {
        format!("10.77.0.{}", i + 2)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    fn create(&mut self) -> Result<(), String> {
        let sw = format!("{}sw", self.prefix);
        self.add_ns(&sw)?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..self.hosts {
            let host = self.ns(i);
            self.add_ns(&host)?;
            let (a, b) = (
                format!("{}a{i}", self.prefix),
                format!("{}b{i}", self.prefix),
            );
            run(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            run(&["ip", "link", "set", &a, "netns", &host])?;
            run(&["ip", "link", "set", &b, "netns", &sw])?;
            run(&["ip", "-n", &sw, "link", "set", &b, "master", "br0", "up"])?;
            run(&["ip", "-n", &host, "link", "set", &a, "name", "eth0", "up"])?;
            let addr = format!("{}/24", Self::ip(i));
            run(&["ip", "-n", &host, "addr", "add", &addr, "dev", "eth0"])?;
        }
        Ok(())
    }

    /// Turns multicast on host `i`'s interface off (or on again).
    pub fn set_multicast(&self, i: usize, on: bool) {
        let mode = if on { "on" } else { "off" };
        if let Err(e) = run(&[
            "ip",
            "-n",
            &self.ns(i),
            "link",
            "set",
            "eth0",
            "multicast",
            mode,
        ]) {
            panic!("cannot set multicast {mode}: {e}");
        }
    }

    /// Drops incoming UDP on host `i` with `probability` (0 to 1), as a lossy link does
    /// (iptables' statistic match; this kernel has no netem).
    pub fn drop_udp(&self, i: usize, probability: f64) {
        let p = format!("{probability}");
        let ns = self.ns(i);
        let args = [
            "ip",
            "netns",
            "exec",
            &ns,
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
            "-j",
            "DROP",
        ];
        if let Err(e) = run(&args) {
            panic!("cannot add the loss rule: {e}");
        }
    }

    /// Cuts host `i` off the switch (or connects it again), as a pulled cable.
    pub fn set_connected(&self, i: usize, connected: bool) {
        let sw = format!("{}sw", self.prefix);
        let port = format!("{}b{i}", self.prefix);
        let state = if connected { "up" } else { "down" };
        if let Err(e) = run(&["ip", "-n", &sw, "link", "set", &port, state]) {
            panic!("cannot set the switch port {state}: {e}");
        }
    }
}

impl Drop for LanLab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
