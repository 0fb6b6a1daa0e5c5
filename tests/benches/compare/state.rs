//! Figure 11: state at scale. A node's history holding a million messages over a thousand
//! conversations, and a discovery server holding a hundred thousand live presences and
//! names, each against itself at a small size in the same run.

use std::{
    io::{Read, Write},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{AppState, Client, ServerConfig};
use p2p_node::{
    node::MAX_WRITE_BATCH,
    store::{Store, WriteOp},
    wire::ChatMessage,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::{
    discovery::{rate, wrk, wrk_installed},
    memory::{context_switches, cpu_ns, rss_kib, ChildProc},
    report::{quantile, Row, Target},
    Config,
};

/// The argument that turns this bench into a discovery-server child.
pub const CHILD_ARG: &str = "--state-child";
/// Conversations of the big history.
const CONVERSATIONS: usize = 1000;
/// Bytes of each message body.
const BODY: usize = 100;
/// Messages at the start and at the end of the fill whose insert rates are compared.
const WINDOW_BATCHES: usize = 10;
/// Queries for the last-50 latency quantiles.
const QUERIES: usize = 2000;
const PAGE: usize = 50;
/// Records (presence and name each) of the small and the big discovery server.
const SMALL_POPULATION: usize = 1000;
const TTL: Duration = Duration::from_secs(600);
/// Messages queued for offline peers in the outbox measurement, their size, and peers.
const QUEUED: usize = 20 * 1024;
const QUEUED_BODY: usize = 1000;
const QUEUED_PEERS: usize = 10;
/// Reads timed of each kind in the outbox measurement (the median is reported).
const OUTBOX_READS: usize = 5;

/// Figure 11 (history part synchronous: run on a blocking thread).
pub async fn run(cfg: &Config, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let c = cfg.clone();
    let (mut rows, history_notes) = tokio::task::spawn_blocking(move || history(&c)).await??;
    notes.extend(history_notes);
    rows.extend(discovery(cfg, notes).await?);
    Ok(rows)
}

/// A batch of incoming messages: message `first + j` is in conversation
/// `(first + j) % CONVERSATIONS`, stamped with its own increasing time.
fn batch(peers: &[NodeId], first: usize, len: usize, body: &str) -> Result<Vec<WriteOp>> {
    (first..first + len)
        .map(|i| {
            Ok(WriteOp::Incoming {
                peer: peers[i % peers.len()],
                msg: ChatMessage::text(body, 1)?,
                now_ms: 1_000_000 + i as u64,
            })
        })
        .collect()
}

/// `QUERIES` last-50 reads of random conversations: sorted latencies.
fn last_page_latencies(store: &Store, peers: &[NodeId], rng: &mut StdRng) -> Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(QUERIES);
    for _ in 0..QUERIES {
        let peer = &peers[rng.gen_range(0..peers.len())];
        let t = Instant::now();
        let page = store.history(peer, PAGE, None)?;
        lat.push(t.elapsed());
        ensure!(!page.is_empty(), "empty conversation");
    }
    lat.sort();
    Ok(lat)
}

fn history(cfg: &Config) -> Result<(Vec<Row>, Vec<String>)> {
    let n = cfg.scale_msgs;
    let window = WINDOW_BATCHES * MAX_WRITE_BATCH;
    ensure!(
        n >= 2 * window,
        "BENCH_SCALE_MSGS must be at least {}",
        2 * window
    );
    let mut insert = Row::new(
        format!("11. history insert rate at the {n}th message (baseline: the first {window}, same store)"),
        "msg/s",
        Target::AtLeast(0.8),
    );
    let mut p99 = Row::new(
        format!("11. history last {PAGE} p99 with {n} msgs in {CONVERSATIONS} convs (baseline: the 1 ms budget)"),
        "ms",
        Target::AtMost(1.0),
    );
    let mut p99_small = Row::new(
        format!("11. history last {PAGE} p99 with {n} msgs (baseline: the same after the first {window})"),
        "ms",
        Target::None,
    );
    let mut outbox = Row::new(
        format!("11. an outbox round's read, {QUEUED} msgs of {QUEUED_BODY} bytes queued (baseline: every entry with its message)"),
        "ms",
        Target::None,
    );
    let mut notes = Vec::new();
    let body = "h".repeat(BODY);
    for _ in 0..cfg.runs {
        let (schedule, whole) = outbox_reads()?;
        outbox.push(schedule, Some(whole));
    }
    for run in 0..cfg.runs {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.redb");
        let store = Store::open(&path)?;
        let peers: Vec<NodeId> = (0..CONVERSATIONS)
            .map(|_| SecretKey::generate().public())
            .collect();
        let mut rng = StdRng::seed_from_u64(run as u64);
        let batches = n / MAX_WRITE_BATCH;
        let mut took = Vec::with_capacity(batches);
        let mut small_lat = Vec::new();
        let fill = Instant::now();
        for b in 0..batches {
            let ops = batch(&peers, b * MAX_WRITE_BATCH, MAX_WRITE_BATCH, &body)?;
            let t = Instant::now();
            for r in store.write_batch(&ops)? {
                r?;
            }
            took.push(t.elapsed());
            if b + 1 == WINDOW_BATCHES {
                small_lat = last_page_latencies(&store, &peers, &mut rng)?;
            }
        }
        let fill = fill.elapsed();
        let rate = |d: &[Duration]| window as f64 / d.iter().sum::<Duration>().as_secs_f64();
        insert.push(
            rate(&took[batches - WINDOW_BATCHES..]),
            Some(rate(&took[..WINDOW_BATCHES])),
        );
        let lat = last_page_latencies(&store, &peers, &mut rng)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        p99.push(ms(quantile(&lat, 0.99)), Some(1.0));
        p99_small.push(
            ms(quantile(&lat, 0.99)),
            Some(ms(quantile(&small_lat, 0.99))),
        );
        drop(store);
        let bytes = std::fs::metadata(&path)?.len();
        notes.push(format!(
            "Figure 11, run {}: {} messages of {BODY} bytes over {CONVERSATIONS} conversations \
             stored in {:.1} s ({:.0} msg/s overall); node.redb {:.0} MiB, {:.0} bytes per message; \
             last-{PAGE} p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            run + 1,
            batches * MAX_WRITE_BATCH,
            fill.as_secs_f64(),
            (batches * MAX_WRITE_BATCH) as f64 / fill.as_secs_f64(),
            bytes as f64 / (1024.0 * 1024.0),
            bytes as f64 / (batches * MAX_WRITE_BATCH) as f64,
            ms(quantile(&lat, 0.5)),
            ms(quantile(&lat, 0.99)),
            ms(quantile(&lat, 1.0)),
        ));
    }
    Ok((vec![insert, p99, p99_small, outbox], notes))
}

/// An outbox holding [`QUEUED`] messages for offline peers: the median time, in ms, of
/// the read a retry round makes (the entries' bookkeeping, [`Store::outbox_schedule`])
/// and of reading every entry with its message ([`Store::outbox`], what a round read
/// before).
fn outbox_reads() -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("node.redb"))?;
    let peers: Vec<NodeId> = (0..QUEUED_PEERS)
        .map(|_| SecretKey::generate().public())
        .collect();
    let body = "q".repeat(QUEUED_BODY);
    for first in (0..QUEUED).step_by(MAX_WRITE_BATCH) {
        let ops = (first..(first + MAX_WRITE_BATCH).min(QUEUED))
            .map(|i| {
                Ok(WriteOp::Outgoing {
                    to: peers[i % QUEUED_PEERS],
                    msg: ChatMessage::text(&body, i as u64)?,
                    now_ms: 1_000_000 + i as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for r in store.write_batch(&ops)? {
            r?;
        }
    }
    store.flush()?;
    let (mut schedule, mut whole) = (Vec::new(), Vec::new());
    for _ in 0..OUTBOX_READS {
        let t = Instant::now();
        let mut slots = 0;
        store.outbox_schedule(|_, queue| slots += queue.len())?;
        schedule.push(t.elapsed());
        let t = Instant::now();
        let entries = store.outbox()?.len();
        whole.push(t.elapsed());
        ensure!(
            slots == QUEUED && entries == QUEUED,
            "outbox holds {slots} / {entries} entries, not {QUEUED}"
        );
    }
    schedule.sort();
    whole.sort();
    let ms = |d: &[Duration]| d[d.len() / 2].as_secs_f64() * 1e3;
    Ok((ms(&schedule), ms(&whole)))
}

/// The discovery child: `p2p_discovery` on a redb file, per-IP write and connection
/// limits lifted (the load comes from one address), on a loopback port; prints `READY <url>`, and runs until
/// its standard input closes.
pub fn child_main(db: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = ServerConfig {
            db_path: Some(db.into()),
            write_rate_per_sec: 1e9,
            write_burst: u32::MAX,
            // The verifying client and the bare HTTP one each keep a pool open.
            max_connections_per_ip: 1024,
            ..ServerConfig::default()
        };
        let state = AppState::open(config)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "READY {url}")?;
            out.flush()?;
        }
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        });
        p2p_discovery::serve(listener, state, async move {
            let _ = stdin_closed.await;
        })
        .await?;
        Ok(())
    })
}

/// A discovery child on the redb file `db`, and its URL.
async fn start_server(db: &Path) -> Result<(ChildProc, String)> {
    let db = db.to_owned();
    let (child, words) = tokio::task::spawn_blocking(move || {
        ChildProc::start(&[CHILD_ARG.as_ref(), db.as_os_str()], &[])
    })
    .await??;
    let [url] = &words[..] else {
        bail!("unexpected READY line from the discovery child: {words:?}");
    };
    let url = url.clone();
    Client::new(&url)?.health().await?;
    Ok((child, url))
}

fn rss_bytes(child: &ChildProc) -> Result<u64> {
    Ok(rss_kib(child.pid())? * 1024)
}

/// Stops a child gracefully (its stdin closed), at most a minute.
async fn stop_server(child: ChildProc) -> Result<()> {
    tokio::task::spawn_blocking(move || child.finish(Duration::from_secs(60))).await?
}

/// Claims a name and announces a presence for every key of `keys[range]`, `conc` at once.
async fn populate(
    client: &Client,
    keys: &Arc<Vec<SecretKey>>,
    range: std::ops::Range<usize>,
    conc: usize,
) -> Result<()> {
    let mut set = JoinSet::new();
    for lane in 0..conc {
        let (client, keys, range) = (client.clone(), keys.clone(), range.clone());
        set.spawn(async move {
            for i in range.skip(lane).step_by(conc) {
                ensure!(
                    client.claim_name(&keys[i], &format!("user-{i}")).await?,
                    "name user-{i} taken"
                );
                let addr = format!("192.0.2.{}:4433", 1 + i % 250).parse()?;
                client.announce(&keys[i], None, &[addr], TTL).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// The id of lookup number `i` among `len`: a cheap, well-spread index per request.
fn spread(i: usize, len: usize) -> usize {
    i.wrapping_mul(2_654_435_761) % len
}

/// Lookups per second of the server alone: `GET /v1/peers/{id}` of random ids among
/// `ids`, each answer read whole and not verified (a client's own work is the same
/// whatever the server holds); with the server's CPU time per lookup.
async fn server_lookups(
    url: &str,
    ids: Arc<Vec<NodeId>>,
    cfg: &Config,
    server: &ChildProc,
) -> Result<(f64, Duration)> {
    let n = ids.len();
    let before = (cpu_ns(server.pid())?, context_switches(server.pid())?);
    let http = reqwest::Client::builder().build()?;
    let base = Arc::new(url.to_owned());
    let (per_sec, failed) = rate(cfg.disc_conc, cfg.phase, move |i| {
        let (http, base, ids) = (http.clone(), base.clone(), ids.clone());
        async move {
            let resp = http
                .get(format!("{base}/v1/peers/{}", ids[spread(i, ids.len())]))
                .send()
                .await?;
            ensure!(
                resp.status() == reqwest::StatusCode::OK,
                "{}",
                resp.status()
            );
            ensure!(!resp.bytes().await?.is_empty(), "empty answer");
            Ok(())
        }
    })
    .await?;
    ensure!(failed == 0, "{failed} lookups failed");
    let after = (cpu_ns(server.pid())?, context_switches(server.pid())?);
    let served = (per_sec * cfg.phase.as_secs_f64()).max(1.0);
    let cpu = Duration::from_secs_f64(after.0.saturating_sub(before.0) as f64 / 1e9 / served);
    eprintln!(
        "figure 11: {n} ids, {per_sec:.0} req/s, server {:.2} us CPU and {:.2} context switches per lookup",
        cpu.as_secs_f64() * 1e6,
        after.1.saturating_sub(before.1) as f64 / served,
    );
    Ok((per_sec, cpu))
}

/// Lookups per second by wrk (a client far cheaper than reqwest, so more of the two
/// cores is the server's), of each of `ids` in turn; `None` without wrk. wrk's script
/// walks `cfg.scale_records` paths whatever the number of ids (the ids repeat), so its
/// own work per request is the same in both phases and only the server's differs. Prints
/// the server's CPU time and context switches per lookup beside the rate.
async fn wrk_lookups(
    have_wrk: bool,
    url: &str,
    ids: &[NodeId],
    cfg: &Config,
    server: &ChildProc,
    dir: &std::path::Path,
) -> Result<Option<f64>> {
    if !have_wrk || ids.is_empty() {
        return Ok(None);
    }
    let before = (cpu_ns(server.pid())?, context_switches(server.pid())?);
    let paths: Vec<String> = (0..cfg.scale_records.max(ids.len()))
        .map(|i| format!("/v1/peers/{}", ids[i % ids.len()]))
        .collect();
    let secs = cfg.phase.as_secs_f64().ceil().max(1.0) as u64;
    let w = wrk(url, &paths, cfg.disc_conc, secs, dir).await?;
    ensure!(w.bad == 0, "{} wrk lookups failed", w.bad);
    let after = (cpu_ns(server.pid())?, context_switches(server.pid())?);
    let served = (w.per_sec * secs as f64).max(1.0);
    eprintln!(
        "figure 11: {} ids, wrk {:.0} req/s, server {:.2} us CPU and {:.2} context switches per lookup",
        ids.len(),
        w.per_sec,
        after.0.saturating_sub(before.0) as f64 / 1e3 / served,
        after.1.saturating_sub(before.1) as f64 / served,
    );
    Ok(Some(w.per_sec))
}

/// Lookups per second through the verifying client, of random ids among `ids`.
async fn lookups(client: &Client, ids: Arc<Vec<NodeId>>, cfg: &Config) -> Result<f64> {
    let client = client.clone();
    let (per_sec, failed) = rate(cfg.disc_conc, cfg.phase, move |i| {
        let (client, ids) = (client.clone(), ids.clone());
        async move {
            let found = client.lookup_id(&ids[spread(i, ids.len())]).await?;
            ensure!(found.is_some(), "announced node not found");
            Ok(())
        }
    })
    .await?;
    ensure!(failed == 0, "{failed} lookups failed");
    Ok(per_sec)
}

async fn discovery(cfg: &Config, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let big = cfg.scale_records;
    ensure!(
        big > SMALL_POPULATION,
        "BENCH_SCALE_RECORDS must exceed {SMALL_POPULATION}"
    );
    let mut lookup = Row::new(
        format!("11. discovery lookups/s with {big} presences + names, HTTP GET (baseline: the same server at {SMALL_POPULATION})"),
        "req/s",
        Target::AtLeast(0.8),
    );
    let mut with_wrk = Row::new(
        format!(
            "11. the same lookups with wrk -t1 -c{} (each id in turn, from a list of {big} paths; baseline: the same at {SMALL_POPULATION})",
            cfg.disc_conc
        ),
        "req/s",
        Target::AtLeast(0.8),
    );
    let have_wrk = wrk_installed();
    if !have_wrk {
        with_wrk.missing = Some("wrk not installed".into());
    }
    let mut verified = Row::new(
        format!("11. the same through the verifying client (its memo of verified signatures holds the {SMALL_POPULATION}, not the {big})"),
        "req/s",
        Target::None,
    );
    eprintln!("figure 11: generating {big} identities");
    let keys: Arc<Vec<SecretKey>> = Arc::new(
        tokio::task::spawn_blocking(move || (0..big).map(|_| SecretKey::generate()).collect())
            .await?,
    );
    let ids: Vec<NodeId> = keys.iter().map(|k| k.public()).collect();
    for run in 0..cfg.runs {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("discovery.redb");
        let (server, url) = start_server(&db).await?;
        let client = Client::new(&url)?;
        let empty_rss = rss_bytes(&server)?;
        populate(&client, &keys, 0..SMALL_POPULATION, cfg.disc_conc).await?;
        let small_rss = rss_bytes(&server)?;
        eprintln!(
            "figure 11: {SMALL_POPULATION} records in the server (pid {})",
            server.pid()
        );
        let small_ids = Arc::new(ids[..SMALL_POPULATION].to_vec());
        let (small_http, small_cpu) = server_lookups(&url, small_ids.clone(), cfg, &server).await?;
        let small_wrk = wrk_lookups(have_wrk, &url, &small_ids, cfg, &server, dir.path()).await?;
        let small = lookups(&client, small_ids, cfg).await?;
        let fill = Instant::now();
        populate(&client, &keys, SMALL_POPULATION..big, cfg.disc_conc).await?;
        let fill = fill.elapsed();
        eprintln!(
            "figure 11: {big} records in the server (pid {})",
            server.pid()
        );
        let big_rss = rss_bytes(&server)?;
        let all_ids = Arc::new(ids.clone());
        let (large_http, large_cpu) = server_lookups(&url, all_ids.clone(), cfg, &server).await?;
        let large_wrk = wrk_lookups(have_wrk, &url, &all_ids, cfg, &server, dir.path()).await?;
        let large = lookups(&client, all_ids, cfg).await?;
        lookup.push(large_http, Some(small_http));
        if let (Some(large), Some(small)) = (large_wrk, small_wrk) {
            with_wrk.push(large, Some(small));
        }
        verified.push(large, Some(small));
        // Restart on the same file: names are durable, presence is announced again.
        stop_server(server).await?;
        let restart = Instant::now();
        let (server, url) = start_server(&db).await?;
        let up = restart.elapsed();
        let client = Client::new(&url)?;
        let found = client.lookup_name(&format!("user-{}", big - 1)).await?;
        ensure!(found.is_some(), "a name is lost across the restart");
        let rss_restarted = rss_bytes(&server)?;
        let db_bytes = std::fs::metadata(&db)?.len();
        stop_server(server).await?;
        let per = |a: u64, b: u64, n: usize| (a as f64 - b as f64) / n as f64;
        notes.push(format!(
            "Figure 11, run {}: discovery server (redb, in a child process) with {big} names and \
             live presences: filled {} in {:.1} s ({:.0} claims + announces/s); RSS empty {:.1} MiB, \
             at {SMALL_POPULATION} records {:.1} MiB, at {big} {:.1} MiB ({:.0} bytes per record \
             beyond the first {SMALL_POPULATION}); discovery.redb {:.1} MiB ({:.0} bytes per name); \
             restart to serving {:.0} ms (RSS after restart, names only: {:.1} MiB); the \
             server's CPU per lookup (whole process, /proc/PID/stat) {:.1} us at {SMALL_POPULATION} \
             records, {:.1} us at {big}",
            run + 1,
            big - SMALL_POPULATION,
            fill.as_secs_f64(),
            2.0 * (big - SMALL_POPULATION) as f64 / fill.as_secs_f64(),
            empty_rss as f64 / 1048576.0,
            small_rss as f64 / 1048576.0,
            big_rss as f64 / 1048576.0,
            per(big_rss, small_rss, big - SMALL_POPULATION),
            db_bytes as f64 / 1048576.0,
            db_bytes as f64 / big as f64,
            up.as_secs_f64() * 1e3,
            rss_restarted as f64 / 1048576.0,
            small_cpu.as_secs_f64() * 1e6,
            large_cpu.as_secs_f64() * 1e6,
        ));
    }
    Ok(vec![lookup, with_wrk, verified])
}
