//! Figure 7: resident memory of the accepting side holding many idle peer connections,
//! measured in a child process (this bench re-executed with `--mem-child node|raw`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use p2p_crypto::NodeId;
use p2p_node::Endpoint;
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    load::bounded,
    messaging::{order, SMALL},
    nodes::{BenchNode, Opts},
    raw::{self, Mode},
    report::{Row, Target},
    Config,
};

/// The argument that turns this bench into a memory child.
pub const CHILD_ARG: &str = "--mem-child";
/// Environment variable telling the node child its connection limit.
const CHILD_MAX_CONNS: &str = "BENCH_CHILD_MAX_CONNECTIONS";

/// Handshakes in progress at once while the clients connect.
const CONNECT_CONCURRENCY: usize = 32;

/// The child: starts a node (durable store in a temporary directory, no discovery) or a
/// bare endpoint running the raw echo, prints `READY <addr> <node id>`, and runs until
/// its standard input closes.
pub fn child_main(kind: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        });
        match kind {
            "node" => {
                let max: usize = std::env::var(CHILD_MAX_CONNS)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(256);
                let node = BenchNode::start(Opts {
                    max_connections: Some(max),
                    ..Opts::default()
                })
                .await?;
                ready(node.node.local_addr()?, node.id)?;
                stdin_closed.await?;
                node.stop().await?;
            }
            "raw" => {
                let server = raw::Server::start(Mode::Echo).await?;
                ready(server.addr, server.id)?;
                stdin_closed.await?;
            }
            other => bail!("unknown child kind {other:?}"),
        }
        Ok(())
    })
}

fn ready(addr: SocketAddr, id: NodeId) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {addr} {id}")?;
    out.flush()?;
    Ok(())
}

/// A running child (this bench re-executed); killed (by its pid, through `Child`) if
/// still running when dropped.
pub struct ChildProc {
    child: Child,
}

impl ChildProc {
    /// Runs this bench with `args` and `envs` and waits for the first line it prints,
    /// which must start with `READY`; returns the line's other words.
    pub fn start(
        args: &[&std::ffi::OsStr],
        envs: &[(&str, String)],
    ) -> Result<(ChildProc, Vec<String>)> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let proc = ChildProc { child };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .context("the child did not get ready")?;
        let mut words = line.split_whitespace().map(str::to_owned);
        if words.next().as_deref() != Some("READY") {
            bail!("unexpected line from the child: {line:?}");
        }
        Ok((proc, words.collect()))
    }

    fn spawn(kind: &str, max_conns: usize) -> Result<(ChildProc, SocketAddr, NodeId)> {
        let (proc, words) = Self::start(
            &[CHILD_ARG.as_ref(), kind.as_ref()],
            &[(CHILD_MAX_CONNS, max_conns.to_string())],
        )?;
        let [addr, id] = &words[..] else {
            bail!("unexpected READY line from the memory child: {words:?}");
        };
        Ok((proc, addr.parse()?, id.parse()?))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the child's stdin (it then shuts down) and waits for it, at most `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Result<()> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("child exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("child did not exit within {timeout:?}")
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// CPU time (ns, user and system) of process `pid` so far, ended threads included, from
/// `/proc/PID/stat` (in clock ticks: 100 a second, the kernel's `USER_HZ` on Linux).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name, in parentheses, may hold spaces: fields count from after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("unreadable /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("unreadable /proc/PID/stat")
    };
    Ok((ticks(11)? + ticks(12)?) * 10_000_000)
}

/// Context switches so far of the live threads of process `pid` (ended threads are not
/// counted), from `/proc/PID/task/*/status`.
pub fn context_switches(pid: u32) -> Result<u64> {
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        switches += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(switches)
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Connects every client to the child and sends one message on each connection (so the
/// child has accepted and served it); returns the open connections.
async fn connect_all(
    clients: &[Endpoint],
    addr: SocketAddr,
    id: NodeId,
    text: &Arc<str>,
) -> Result<Vec<quinn::Connection>> {
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for ep in clients {
        let (ep, permits, text) = (ep.clone(), permits.clone(), text.clone());
        set.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            bounded(async {
                let conn = ep.connect(addr, id).await?;
                raw::exchange(conn.quic(), &text).await?;
                Ok(conn.quic().clone())
            })
            .await
        });
    }
    let mut conns = Vec::with_capacity(clients.len());
    while let Some(r) = set.join_next().await {
        conns.push(r??);
    }
    Ok(conns)
}

/// One child: RSS when idle, then with every client connected. Returns KiB (idle, full).
async fn measure(kind: &str, clients: &[Endpoint], text: &Arc<str>) -> Result<(u64, u64)> {
    let max_conns = clients.len() + 64;
    let (child, addr, id) = tokio::task::spawn_blocking({
        let kind = kind.to_owned();
        move || ChildProc::spawn(&kind, max_conns)
    })
    .await??;
    let idle = rss_kib(child.pid())?;
    let conns = connect_all(clients, addr, id, text).await?;
    let full = rss_kib(child.pid())?;
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    drop(conns);
    tokio::task::spawn_blocking(move || child.finish(Duration::from_secs(20))).await??;
    Ok((idle, full))
}

/// Figure 7.
pub async fn run(cfg: &Config, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let n = cfg.conns;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(raw::endpoint().await?);
    }
    let text: Arc<str> = "r".repeat(SMALL).into();
    let mut total = Row::new(
        format!("7. RSS of the accepting side with {n} idle peer connections"),
        "MiB",
        Target::None,
    );
    let mut per_conn = Row::new(
        format!("7. RSS per connection ((with {n} − idle) / {n})"),
        "KiB",
        Target::None,
    );
    let mut idle_row = Row::new("7. RSS of the accepting side, idle", "MiB", Target::None);
    for run in 0..cfg.runs {
        let mut r = [(0u64, 0u64); 2];
        for phase in order(run, 2) {
            r[phase] = measure(if phase == 0 { "raw" } else { "node" }, &clients, &text).await?;
        }
        let (raw, node) = (r[0], r[1]);
        let mib = |kib: u64| kib as f64 / 1024.0;
        let per = |(idle, full): (u64, u64)| full.saturating_sub(idle) as f64 / n as f64;
        total.push(mib(node.1), Some(mib(raw.1)));
        per_conn.push(per(node), Some(per(raw)));
        idle_row.push(mib(node.0), Some(mib(raw.0)));
    }
    for c in &clients {
        c.close(0, b"done");
    }
    notes.push(format!(
        "Figure 7: the child is this bench re-executed (`{CHILD_ARG} node|raw`); the node child \
         has a durable store, no discovery, and max_connections = {} (the default 256 would \
         refuse the rest); {n} client endpoints (one UDP socket each) in the parent, each \
         sending one message before RSS is read; open-files soft limit {}.",
        n + 64,
        open_files_limit().map_or("unknown".into(), |l| l.to_string())
    ));
    Ok(vec![total, per_conn, idle_row])
}
