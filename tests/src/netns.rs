//! A small internet in network namespaces, for tests that need NATs between nodes.
//!
//! ```text
//!                      pub (198.18.0.1: the discovery server and its relay)
//!                       │ bridge
//!          ┌────────────┴────────────┐
//!   r1 wan 198.18.0.11        r2 wan 198.18.0.12     NAT routers: masquerade, and a
//!   r1 lan 192.168.1.1        r2 lan 192.168.1.1     stateful firewall like any home
//!          │                         │               router's (nothing unsolicited in)
//!   h1 192.168.1.2            h2 192.168.1.2         two homes, the same private subnet
//! ```
//!
//! Everything is created by [`NatLab::build`] under names unique to this process and
//! deleted when the lab is dropped, also when a test fails. Creating namespaces needs
//! root (CI runs as root). Without it the lab is not built: [`NatLab::build`] returns
//! `None` and the test says it was skipped, unless `P2P_REQUIRE_NETNS=1` is set (as
//! `.ci/run` does), in which case a missing capability fails the test.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// How a router translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Linux masquerade: keeps the source port when it can (endpoint-independent
    /// mapping), filters by address and port.
    PortPreserving,
    /// Masquerade with `--random-fully`: a new random port per destination (symmetric).
    Symmetric,
}

/// A host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The public host with the discovery server.
    Public,
    /// Behind the first router.
    Home1,
    /// Behind the second router.
    Home2,
}

/// The public host's address.
pub const PUBLIC_IP: &str = "198.18.0.1";
/// The routers' public addresses.
pub const ROUTER_IPS: [&str; 2] = ["198.18.0.11", "198.18.0.12"];

pub(crate) static NEXT: AtomicU32 = AtomicU32::new(0);

/// Namespaces, links and rules of one test.
#[derive(Debug)]
pub struct NatLab {
    prefix: String,
    namespaces: Vec<String>,
}

/// Runs a command; `Err` with its output if it fails.
pub(crate) fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether namespaces can be made here; the reason if not.
pub(crate) fn capable() -> Result<(), String> {
    for tool in ["ip", "iptables"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    let probe = format!(
        "p2pprobe{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    run(&["ip", "netns", "add", &probe])?;
    let _ = run(&["ip", "netns", "del", &probe]);
    Ok(())
}

/// Whether namespaces can be made here; `false` (and a note on stderr) when not, unless
/// `P2P_REQUIRE_NETNS=1`, which makes that a failure.
pub(crate) fn usable() -> bool {
    let Err(why) = capable() else { return true };
    if std::env::var("P2P_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("network namespaces are required (P2P_REQUIRE_NETNS=1) but: {why}");
    }
    eprintln!("skipping: cannot create network namespaces here ({why}); run as root");
    false
}

impl NatLab {
    /// Builds the lab with the two routers' NAT kinds. `None` (and a note on stderr)
    /// when this machine cannot, unless `P2P_REQUIRE_NETNS=1`, which makes that a
    /// failure.
    pub fn build(nat1: Nat, nat2: Nat) -> Option<NatLab> {
        if !usable() {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut lab = NatLab {
            prefix: format!("p{}x{n}", std::process::id() % 100_000),
            namespaces: Vec::new(),
        };
        if let Err(e) = lab.create(nat1, nat2) {
            // Dropping the lab deletes what was made.
            panic!("cannot build the NAT lab: {e}");
        }
        Some(lab)
    }

    /// The namespace of a host.
    pub fn ns(&self, host: Host) -> String {
        match host {
            Host::Public => format!("{}pub", self.prefix),
            Host::Home1 => format!("{}h1", self.prefix),
            Host::Home2 => format!("{}h2", self.prefix),
        }
    }

    fn router(&self, i: usize) -> String {
        format!("{}r{i}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    fn create(&mut self, nat1: Nat, nat2: Nat) -> Result<(), String> {
        let public = self.ns(Host::Public);
        self.add_ns(&public)?;
        run(&["ip", "-n", &public, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &public, "link", "set", "br0", "up"])?;
        run(&[
            "ip",
            "-n",
            &public,
            "addr",
            "add",
            &format!("{PUBLIC_IP}/24"),
            "dev",
            "br0",
        ])?;
        for (i, nat) in [(1usize, nat1), (2, nat2)] {
            let router = self.router(i);
            let home = self.ns(if i == 1 { Host::Home1 } else { Host::Home2 });
            self.add_ns(&router)?;
            self.add_ns(&home)?;
            // Veth pairs are created in the root namespace under unique short names,
            // then moved and renamed.
            let (w, wp) = (
                format!("{}w{i}", self.prefix),
                format!("{}W{i}", self.prefix),
            );
            let (l, lh) = (
                format!("{}l{i}", self.prefix),
                format!("{}L{i}", self.prefix),
            );
            run(&["ip", "link", "add", &w, "type", "veth", "peer", "name", &wp])?;
            run(&["ip", "link", "set", &w, "netns", &router])?;
            run(&["ip", "link", "set", &wp, "netns", &public])?;
            run(&[
                "ip", "-n", &public, "link", "set", &wp, "master", "br0", "up",
            ])?;
            run(&["ip", "-n", &router, "link", "set", &w, "name", "wan", "up"])?;
            let wan_ip = format!("{}/24", ROUTER_IPS[i - 1]);
            run(&["ip", "-n", &router, "addr", "add", &wan_ip, "dev", "wan"])?;
            run(&["ip", "link", "add", &l, "type", "veth", "peer", "name", &lh])?;
            run(&["ip", "link", "set", &l, "netns", &router])?;
            run(&["ip", "link", "set", &lh, "netns", &home])?;
            run(&["ip", "-n", &router, "link", "set", &l, "name", "lan", "up"])?;
            run(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                "192.168.1.1/24",
                "dev",
                "lan",
            ])?;
            run(&["ip", "-n", &home, "link", "set", &lh, "name", "eth0", "up"])?;
            run(&[
                "ip",
                "-n",
                &home,
                "addr",
                "add",
                "192.168.1.2/24",
                "dev",
                "eth0",
            ])?;
            run(&[
                "ip",
                "-n",
                &home,
                "route",
                "add",
                "default",
                "via",
                "192.168.1.1",
            ])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            let mut masquerade = vec![
                "ip",
                "netns",
                "exec",
                &router,
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ];
            if nat == Nat::Symmetric {
                masquerade.push("--random-fully");
            }
            run(&masquerade)?;
            // A home router's firewall: replies get in, nothing unsolicited does.
            for chain in ["INPUT", "FORWARD"] {
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &router,
                    "iptables",
                    "-A",
                    chain,
                    "-i",
                    "wan",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ])?;
                run(&[
                    "ip", "netns", "exec", &router, "iptables", "-A", chain, "-i", "wan", "-j",
                    "DROP",
                ])?;
            }
        }
        Ok(())
    }

    /// Drops (or, with `block = false`, allows again) UDP between the two homes' public
    /// addresses, in both routers, so only the relay connects them.
    pub fn block_udp_between_homes(&self, block: bool) {
        let op = if block { "-I" } else { "-D" };
        for (i, other) in [(1usize, ROUTER_IPS[1]), (2, ROUTER_IPS[0])] {
            let router = self.router(i);
            for (dir, flag) in [
                ("OUTPUT", "-d"),
                ("INPUT", "-s"),
                ("FORWARD", "-d"),
                ("FORWARD", "-s"),
            ] {
                let args = [
                    "ip", "netns", "exec", &router, "iptables", op, dir, flag, other, "-p", "udp",
                    "-j", "DROP",
                ];
                if let Err(e) = run(&args) {
                    panic!("cannot change the UDP block: {e}");
                }
            }
        }
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links and rules; veth peers go with them.
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
