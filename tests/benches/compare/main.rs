//! p2p-node side by side with its baselines, in one run, printed as one table.
//!
//! ```text
//! cargo bench -p p2p-tests --bench compare
//! BENCH_QUICK=1 cargo bench -p p2p-tests --bench compare     # smoke run, seconds
//! ```
//!
//! Every figure is measured `BENCH_RUNS` times (default 3); each run measures p2p-node
//! and its baseline back to back (alternating which goes first), and the ratio is
//! computed within the run. The table shows medians. See BENCHMARKS.md for what each
//! figure means.
//!
//! Environment (all optional):
//!
//! | variable | default (quick) | meaning |
//! |---|---|---|
//! | `BENCH_QUICK` | unset | `1`: short phases and small counts, one run |
//! | `BENCH_RUNS` | 3 (1) | repetitions of every figure |
//! | `BENCH_SECS` | 2 (0.3) | length of each timed phase, seconds |
//! | `BENCH_INFLIGHT` | 256 | messages in flight for figures 1 and 3 |
//! | `BENCH_BULK_MIB` | 64 (4) | bytes of figure 3 |
//! | `BENCH_SETUP_ITERS` | 10 (3) | fresh connections per run in figure 4 |
//! | `BENCH_HISTORY_MSGS` | 10240 (1024) | messages inserted per run in figure 5 |
//! | `BENCH_DISC_CONC` | 32 | concurrent requests in figure 6 |
//! | `BENCH_CONNS` | 1000 (100) | idle connections in figure 7 |
//! | `BENCH_PEERS` | 1,10,100 (1,10) | peer counts of figure 8 |
//! | (figure 9) | | `BENCH_SETUP_ITERS` fresh pairs per run time the move to a direct path |
//! | `BENCH_SCALE_MSGS` | 1048576 (40960) | messages in figure 11's history |
//! | `BENCH_SCALE_RECORDS` | 100000 (5000) | presences and names in figure 11's discovery server |
//! | (figure 10) | | PostgreSQL (started by the bench when installed) 1 vs 2 instances vs redb; DHT times on a local testnet |
//! | `BENCH_ONLY` | all | figures to run, e.g. `1,2` or `msgs,latency` |
//! | `BENCH_PROFILE` | unset | run one side of one figure alone (for a profiler) and print what it did: `send`, `send-mem`, `rtt`, `rtt-mem`, `bulk`, `bulk-mem`, `setup`, `setup-mem`, `setup-raw` (figure 4's bare endpoint), `peers`, `peers-mem`, `raw-peers` (figure 8's most peers, node or raw echo), `raw-send`, `raw-rtt`, `history-insert`, `history-sender`, `history-read`, `lookups` (figure 6's wrk on our server), `lookups-client` (its verifying client); the workload is framed by `profile: measuring` and `profile: done` on stderr |
//! | `RUST_LOG` | unset | the nodes' logs on stderr at that filter (e.g. `p2p_node=debug`), for a look inside one `BENCH_PROFILE` workload |
//! | `BENCH_PROFILE_HOLD` | unset | `1`: after `profile: done`, wait for a line on stdin before tearing down |

mod discovery;
mod history;
mod load;
mod memory;
mod messaging;
mod nodes;
mod raw;
mod relay;
mod report;
mod scale_out;
mod state;

use std::{str::FromStr, time::Duration};

use anyhow::{Context, Result};

/// The allocator of the `p2p-node` binary (mimalloc without transparent huge pages), so
/// the in-process nodes, the raw baselines and the child servers allocate as the program
/// does (BENCHMARKS.md, item 15).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What to run, and how much.
#[derive(Debug, Clone)]
pub struct Config {
    pub runs: usize,
    pub phase: Duration,
    pub in_flight: usize,
    pub bulk_bytes: usize,
    pub setup_iters: usize,
    pub history_msgs: usize,
    pub disc_conc: usize,
    pub conns: usize,
    pub peers: Vec<usize>,
    pub scale_msgs: usize,
    pub scale_records: usize,
    only: Option<Vec<String>>,
}

fn env<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().with_context(|| name.to_string()),
        _ => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config> {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let q = |full, small| if quick { small } else { full };
        let peers = match std::env::var("BENCH_PEERS") {
            Ok(v) if !v.trim().is_empty() => v
                .split(',')
                .map(|p| p.trim().parse::<usize>().context("BENCH_PEERS"))
                .collect::<Result<Vec<_>>>()?,
            _ => {
                if quick {
                    vec![1, 10]
                } else {
                    vec![1, 10, 100]
                }
            }
        };
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect());
        Ok(Config {
            runs: env("BENCH_RUNS", q(3, 1))?.max(1),
            phase: Duration::from_secs_f64(env("BENCH_SECS", if quick { 0.3 } else { 2.0 })?),
            in_flight: env("BENCH_INFLIGHT", 256)?.max(1),
            bulk_bytes: env("BENCH_BULK_MIB", q(64, 4))? * 1024 * 1024,
            setup_iters: env("BENCH_SETUP_ITERS", q(10, 3))?.max(1),
            history_msgs: env("BENCH_HISTORY_MSGS", q(10_240, 1024))?.max(1),
            disc_conc: env("BENCH_DISC_CONC", 32)?.max(1),
            conns: env("BENCH_CONNS", q(1000, 100))?.max(1),
            peers,
            scale_msgs: env("BENCH_SCALE_MSGS", q(1 << 20, 40 * 1024))?,
            scale_records: env("BENCH_SCALE_RECORDS", q(100_000, 5000))?,
            only,
        })
    }

    /// Whether figure `n` (also known as `name`) is to run.
    fn wants(&self, n: u32, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| *s == n.to_string() || s == name))
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The end of a profiled workload: says so on stderr and, with `BENCH_PROFILE_HOLD=1`,
/// waits for a line (or the end) on stdin before tearing down, so a profiler driven by
/// these lines can stop collecting first.
pub fn profile_hold() {
    eprintln!("profile: done");
    if std::env::var("BENCH_PROFILE_HOLD").is_ok_and(|v| v == "1") {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

/// `BENCH_PROFILE=<workload>`: one side of one figure alone, for a profiler.
async fn profile(cfg: &Config, what: &str) -> Result<()> {
    let line = if what.starts_with("lookups") {
        discovery::profile(cfg, what).await?
    } else if what.starts_with("history") {
        let (c, w) = (cfg.clone(), what.to_owned());
        tokio::task::spawn_blocking(move || history::profile(&c, &w)).await??
    } else {
        let disco = nodes::Discovery::start().await?;
        let fx = messaging::Fixture::start(&disco).await?;
        let line = messaging::profile(cfg, &fx, what).await?;
        fx.stop().await?;
        line
    };
    match line {
        Some(l) => println!("{l}"),
        None => anyhow::bail!(
            "unknown BENCH_PROFILE {what:?}: send, send-mem, rtt, rtt-mem, bulk, bulk-mem, \
             setup, setup-mem, setup-raw, peers, peers-mem, raw-peers, raw-send, raw-rtt, \
             history-insert, history-sender, history-read, lookups, lookups-client"
        ),
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == state::CHILD_ARG) {
        return state::child_main(args.get(i + 1).context("child database")?);
    }
    if let Some(i) = args.iter().position(|a| a == memory::CHILD_ARG) {
        let kind = args.get(i + 1).context("child kind")?;
        return memory::child_main(kind);
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs this binary without `--bench`: building it is the
        // check; the measurements take minutes and belong to `cargo bench`.
        println!("compare: built; run it with `cargo bench -p p2p-tests --bench compare`");
        return Ok(());
    }
    if std::env::var_os("RUST_LOG").is_some() {
        // For a look inside one figure (with BENCH_PROFILE): the nodes' logs on stderr.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let cfg = Config::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "p2p-node vs baselines: {} CPU(s), {}; {} run(s) per figure, {:.1} s phases",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        cfg.runs,
        cfg.phase.as_secs_f64()
    );
    if let Ok(what) = std::env::var("BENCH_PROFILE") {
        return rt.block_on(profile(&cfg, &what));
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    rt.block_on(async {
        let messaging_figures = [
            (1, "msgs"),
            (2, "latency"),
            (3, "bulk"),
            (4, "setup"),
            (8, "scale"),
        ];
        if messaging_figures.iter().any(|&(n, s)| cfg.wants(n, s)) {
            let disco = nodes::Discovery::start().await?;
            let fx = messaging::Fixture::start(&disco).await?;
            if cfg.wants(1, "msgs") {
                eprintln!("figure 1: small messages per second");
                rows.extend(messaging::throughput(&cfg, &fx, &mut notes).await?);
            }
            if cfg.wants(2, "latency") {
                eprintln!("figure 2: round-trip latency");
                rows.extend(messaging::latency(&cfg, &fx).await?);
            }
            if cfg.wants(3, "bulk") {
                eprintln!("figure 3: bulk throughput");
                rows.extend(messaging::bulk(&cfg, &fx).await?);
            }
            if cfg.wants(4, "setup") {
                eprintln!("figure 4: connection setup to the first ack");
                rows.extend(messaging::setup(&cfg, &fx).await?);
            }
            if cfg.wants(8, "scale") {
                eprintln!("figure 8: many peers to one node");
                rows.extend(messaging::scale(&cfg, &fx).await?);
            }
            fx.stop().await?;
        }
        if cfg.wants(5, "history") {
            eprintln!("figure 5: history store");
            let c = cfg.clone();
            rows.extend(tokio::task::spawn_blocking(move || history::run(&c)).await??);
        }
        if cfg.wants(6, "discovery") {
            eprintln!("figure 6: discovery");
            rows.extend(discovery::run(&cfg, &mut notes).await?);
        }
        if cfg.wants(7, "memory") {
            eprintln!("figure 7: memory with idle connections");
            rows.extend(memory::run(&cfg, &mut notes).await?);
        }
        if cfg.wants(9, "relay") {
            eprintln!("figure 9: through the relay");
            rows.extend(relay::run(&cfg).await?);
        }
        if cfg.wants(10, "scale-out") {
            eprintln!("figure 10: discovery on PostgreSQL, instances, and the DHT");
            rows.extend(scale_out::run(&cfg, &mut notes).await?);
        }
        if cfg.wants(11, "state") {
            eprintln!("figure 11: state at scale");
            rows.extend(state::run(&cfg, &mut notes).await?);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    rows.sort_by_key(|r| r.name.split('.').next().and_then(|n| n.parse::<u32>().ok()));
    report::print_table(&rows, cfg.runs);
    println!();
    for n in notes {
        println!("- {n}");
    }
    Ok(())
}
