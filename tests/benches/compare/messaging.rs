//! Figures 1–4 and 8: messaging between nodes against the raw QUIC baseline.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use p2p_node::{
    node::{SendStatus, MAX_WRITE_BATCH},
    wire::MAX_TEXT_LEN,
    Endpoint, NodeEvent, TransportSettings,
};
use tokio::task::JoinSet;

use crate::{
    history,
    load::{bounded, closed_loop, one_at_a_time, Load},
    nodes::{self, send_delivered, BenchNode, Discovery, Opts},
    raw::{self, Mode},
    report::{median, ms, Row, Target},
    Config,
};

/// Size of the small chat message.
pub const SMALL: usize = 100;

/// Longest a phase bounded by its operation count may take.
const PHASE_CAP: Duration = Duration::from_secs(300);

/// Longest wait for stream credit, and for the peer to end a long-lived stream.
const STREAM_CLOSE: Duration = Duration::from_secs(10);

/// Everything figures 1–4 and 8 share: two pairs of nodes (durable, in-memory) and the
/// raw servers with an open connection each.
pub struct Fixture {
    disco_url: String,
    a: BenchNode,
    b: BenchNode,
    ma: BenchNode,
    mb: BenchNode,
    echo: raw::Server,
    _sink: raw::Server,
    client: Endpoint,
    echo_conn: quinn::Connection,
    sink_conn: quinn::Connection,
    small: Arc<str>,
}

impl Fixture {
    pub async fn start(disco: &Discovery) -> Result<Fixture> {
        let url = disco.url.as_str();
        let durable = Opts {
            discovery: Some(url),
            ..Opts::default()
        };
        let in_memory = Opts {
            in_memory: true,
            ..durable
        };
        let b = BenchNode::start(durable).await?;
        let a = BenchNode::start(durable).await?;
        let mb = BenchNode::start(in_memory).await?;
        let ma = BenchNode::start(in_memory).await?;
        let small: Arc<str> = "m".repeat(SMALL).into();
        // Open the connections (and warm the paths up) outside any measurement.
        send_delivered(&a.node, &b.to, &small).await?;
        send_delivered(&ma.node, &mb.to, &small).await?;
        send_delivered(&ma.node, &b.to, &small).await?;
        let echo = raw::Server::start(Mode::Echo).await?;
        let sink = raw::Server::start(Mode::Sink).await?;
        let client = raw::endpoint().await?;
        let echo_conn = client.connect(echo.addr, echo.id).await?.quic().clone();
        let sink_conn = client.connect(sink.addr, sink.id).await?.quic().clone();
        raw::exchange(&echo_conn, &small).await?;
        Ok(Fixture {
            disco_url: url.to_owned(),
            a,
            b,
            ma,
            mb,
            echo,
            _sink: sink,
            client,
            echo_conn,
            sink_conn,
            small,
        })
    }

    pub async fn stop(self) -> Result<()> {
        self.a.stop().await?;
        self.b.stop().await?;
        self.ma.stop().await?;
        self.mb.stop().await?;
        Ok(())
    }
}

/// `Node::send` from `from` to `to` with `in_flight` concurrent senders.
async fn node_load(
    from: &BenchNode,
    to: &BenchNode,
    text: &Arc<str>,
    in_flight: usize,
    dur: Duration,
    max_ops: usize,
) -> Result<Load> {
    let node = from.node.clone();
    let to = to.to;
    let text = text.clone();
    closed_loop(in_flight, dur, max_ops, move |_| {
        let (node, text) = (node.clone(), text.clone());
        async move { send_delivered(&node, &to, &text).await }
    })
    .await
}

/// The raw echo with a stream per message, `in_flight` concurrent.
async fn raw_load(fx: &Fixture, in_flight: usize, dur: Duration) -> Result<Load> {
    let conn = fx.echo_conn.clone();
    let text = fx.small.clone();
    closed_loop(in_flight, dur, usize::MAX, move |_| {
        let (conn, text) = (conn.clone(), text.clone());
        async move { raw::exchange(&conn, &text).await }
    })
    .await
}

/// Streams a node allows a peer at once: the raw echo uses as many.
fn streams_allowed() -> usize {
    usize::try_from(TransportSettings::default().max_concurrent_bidi_streams).unwrap_or(1)
}

/// Opens a stream on `conn`, failing after `STREAM_CLOSE` without stream credit.
async fn open_stream(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    Ok(tokio::time::timeout(STREAM_CLOSE, conn.open_bi())
        .await
        .context("no stream credit from the peer")??)
}

/// The raw echo on long-lived streams: `in_flight` senders share as many streams as a
/// node allows per connection (`TransportSettings::max_concurrent_bidi_streams`, the
/// node's own limit too), each stream carrying frame after frame. They live on a
/// connection of their own: quinn announces freed stream credit (MAX_STREAMS) only once
/// more than 1/8 of the window is free, so after the stream-per-message phases the
/// shared echo connection may keep up to 1/8 of its slots unannounced for as long as it
/// stays idle, and this needs all of them at once.
async fn raw_long_lived_load(fx: &Fixture, in_flight: usize, dur: Duration) -> Result<Load> {
    let conn = fx
        .client
        .connect(fx.echo.addr, fx.echo.id)
        .await?
        .quic()
        .clone();
    let mut pool = Vec::new();
    for _ in 0..in_flight.clamp(1, streams_allowed()) {
        let (send, recv) = open_stream(&conn).await?;
        pool.push(Arc::new(tokio::sync::Mutex::new((send, recv, Vec::new()))));
    }
    let pool = Arc::new(pool);
    let text = fx.small.clone();
    let load = closed_loop(in_flight, dur, usize::MAX, {
        let pool = pool.clone();
        move |w| {
            let (pool, text) = (pool.clone(), text.clone());
            async move {
                let mut guard = pool[w % pool.len()].lock().await;
                let (send, recv, buf) = &mut *guard;
                raw::exchange_on(send, recv, buf, &text).await
            }
        }
    })
    .await;
    for s in pool.iter() {
        let mut guard = s.lock().await;
        let (send, recv, buf) = &mut *guard;
        raw::close_stream(send, recv, buf, STREAM_CLOSE).await?;
    }
    conn.close(0u32.into(), b"done");
    load
}

/// The disk limits of this run (raw redb beside the nodes), measured off the runtime.
async fn disk_limits(commits: usize) -> Result<history::DiskLimits> {
    tokio::task::spawn_blocking(move || history::disk_limits(10 * MAX_WRITE_BATCH, commits)).await?
}

/// Figure 1: small messages per second, many in flight. The durable target is against
/// the lower of the node's two limits measured in the same run: the transport (the raw
/// echo on long-lived streams) and the disk (raw redb inserting the same rows with
/// group commit).
pub async fn throughput(cfg: &Config, fx: &Fixture, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let k = cfg.in_flight;
    let mut durable = Row::new(
        format!(
            "1. small msgs/s, {k} in flight, durable (baseline: min(raw long-lived streams, raw redb group commit))"
        ),
        "msg/s",
        Target::AtLeast(0.5),
    );
    let mut memory = Row::new(
        format!(
            "1. small msgs/s, {k} in flight, in-memory store (baseline: raw long-lived streams)"
        ),
        "msg/s",
        Target::AtLeast(0.85),
    );
    let mut vs_per_message = Row::new(
        format!("1. small msgs/s, {k} in flight, durable (baseline: raw stream per message)"),
        "msg/s",
        Target::None,
    );
    let mut both_files = Row::new(
        format!(
            "1. small msgs/s, {k} in flight, durable (baseline: raw redb writing the same rows into two files at once, {k} per commit)"
        ),
        "msg/s",
        Target::None,
    );
    let mut backlog = Row::new(
        format!(
            "1. an outbox of {BACKLOG} small msgs drained when their durable recipient comes online (baseline: the same sent to it live, {k} in flight)"
        ),
        "msg/s",
        Target::None,
    );
    let mut saturation = Vec::new();
    let mut limits = Vec::new();
    for run in 0..cfg.runs {
        // Alternate the order so slow drift of the shared machine does not favour one side.
        let mut rates = [0.0f64; 6];
        for phase in order(run, 6) {
            rates[phase] = match phase {
                0 => raw_load(fx, k, cfg.phase).await?.per_sec(),
                1 => node_load(&fx.a, &fx.b, &fx.small, k, cfg.phase, usize::MAX)
                    .await?
                    .per_sec(),
                2 => node_load(&fx.ma, &fx.mb, &fx.small, k, cfg.phase, usize::MAX)
                    .await?
                    .per_sec(),
                3 => raw_long_lived_load(fx, k, cfg.phase).await?.per_sec(),
                4 => disk_limits(0).await?.insert_rate,
                _ => {
                    let text = fx.small.clone();
                    tokio::task::spawn_blocking(move || {
                        history::two_files_limit(10 * MAX_WRITE_BATCH, &text, k)
                    })
                    .await??
                }
            };
        }
        let [raw_rate, node_rate, mem_rate, ll, disk, two_files] = rates;
        // Is the raw baseline saturated at k? Compare with a quarter of it.
        let quarter = raw_load(fx, (k / 4).max(1), cfg.phase).await?.per_sec();
        saturation.push(quarter / raw_rate.max(1e-9));
        limits.push(format!("{ll:.0} / {disk:.0}"));
        durable.push(node_rate, Some(ll.min(disk)));
        memory.push(mem_rate, Some(ll));
        vs_per_message.push(node_rate, Some(raw_rate));
        both_files.push(node_rate, Some(two_files));
        let (drained, live) = drain_backlog(fx, k).await?;
        backlog.push(drained, Some(live));
    }
    let sat = median(&saturation);
    notes.push(format!(
        "Figure 1: the raw echo at {} in flight reaches {sat:.2}x (median) of its rate at {k} \
         in flight, so {k} {} (a node allows {} concurrent streams per connection; \
         further senders wait for stream credit).",
        (k / 4).max(1),
        if sat >= 0.9 {
            "saturates it"
        } else {
            "is needed to saturate it; raise BENCH_INFLIGHT if the ratio is well below 1"
        },
        streams_allowed(),
    ));
    notes.push(format!(
        "Figure 1: the two limits per run, raw long-lived streams / raw redb group commit \
         (msgs/s): {}.",
        limits.join(", ")
    ));
    Ok(vec![durable, memory, vs_per_message, both_files, backlog])
}

/// Messages in the outbox of [`drain_backlog`].
const BACKLOG: usize = 1000;

/// A durable node queues [`BACKLOG`] small messages for a durable peer that is offline
/// (on a discovery server that keeps no mailbox, so only the outbox delivers them); the
/// peer comes online. Returns the messages per second from the sender seeing it online
/// to the last one delivered, and then the same number sent to it live, `k` in flight.
async fn drain_backlog(fx: &Fixture, k: usize) -> Result<(f64, f64)> {
    let disco = Discovery::start_without_mailbox().await?;
    let opts = Opts {
        discovery: Some(&disco.url),
        ..Opts::default()
    };
    // The sender reads the online list often, so it sees the peer come online soon.
    let sender_dir = p2p_tests::private_tempdir();
    let sender = nodes::builder(opts, &sender_dir)
        .timings(p2p_node::Timings {
            presence_poll: Duration::from_millis(100),
            ..p2p_node::Timings::default()
        })
        .bind()
        .await?;
    let key = p2p_crypto::SecretKey::generate();
    let to = key.public();
    let text = fx.small.clone();
    let queued = closed_loop(k, PHASE_CAP, BACKLOG, {
        let (node, text) = (sender.clone(), text.clone());
        move |_| {
            let (node, text) = (node.clone(), text.clone());
            async move {
                let out = node.send_to(&to, &text).await?;
                ensure!(out.status == SendStatus::Queued, "sent to an offline peer");
                Ok(())
            }
        }
    })
    .await?;
    ensure!(queued.ops == BACKLOG, "queued {} of {BACKLOG}", queued.ops);
    let mut events = sender.subscribe();
    let dir = p2p_tests::private_tempdir();
    let recipient = nodes::keyed_builder(key, opts, &dir).bind().await?;
    nodes::wait_event(
        &mut events,
        Duration::from_secs(10),
        |ev| matches!(ev, NodeEvent::PeerOnline { node_id, .. } if *node_id == to),
    )
    .await?;
    let start = Instant::now();
    let mut delivered = 0;
    while delivered < BACKLOG {
        let left = PHASE_CAP.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(NodeEvent::MessageDelivered { to: peer, .. })) if peer == to => delivered += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("the sender's events: {e}"),
            Err(_) => anyhow::bail!("{delivered} of {BACKLOG} queued messages delivered"),
        }
    }
    let drained = BACKLOG as f64 / start.elapsed().as_secs_f64();
    let node = sender.clone();
    let live = closed_loop(k, PHASE_CAP, BACKLOG, move |_| {
        let (node, text) = (node.clone(), text.clone());
        async move { send_delivered(&node, &to, &text).await }
    })
    .await?
    .per_sec();
    recipient.shutdown().await;
    sender.shutdown().await;
    Ok((drained, live))
}

/// Figure 2: round-trip latency with one message outstanding. The durable target is
/// against what an ack must cost: the raw round trip plus one durable redb commit of one
/// row (the receiver's), both measured in the same run.
pub async fn latency(cfg: &Config, fx: &Fixture) -> Result<Vec<Row>> {
    let mut p50 = Row::new(
        "2. round trip p50, 1 outstanding, durable (baseline: raw round trip + one durable redb commit)",
        "ms",
        Target::AtMost(1.2),
    );
    let mut p99 = Row::new(
        "2. round trip p99, 1 outstanding, durable (raw: stream per message)",
        "ms",
        Target::None,
    );
    let mut mem = Row::new(
        "2. round trip p50, in-memory store (raw: stream per message)",
        "ms",
        Target::None,
    );
    let mut one_stream = Row::new(
        "2. round trip p50, durable (raw: one long-lived stream)",
        "ms",
        Target::None,
    );
    let mut commit = Row::new(
        "2. one durable redb commit of one row, p50 (the part of the baseline that is the disk)",
        "ms",
        Target::None,
    );
    let mut receiver_only = Row::new(
        "2. round trip p50, only the receiver durable (baseline: raw round trip + one durable redb commit)",
        "ms",
        Target::None,
    );
    let mut both_ends = Row::new(
        "2. round trip p50, durable (baseline: raw round trip + two one-row commits started together on two files of this disk)",
        "ms",
        Target::None,
    );
    let dur = cfg.phase;
    for run in 0..cfg.runs {
        let mut results: [Option<Load>; 5] = [None, None, None, None, None];
        let mut fsync = Duration::ZERO;
        let mut fsync_pair = Duration::ZERO;
        for phase in order(run, 6) {
            let load = match phase {
                0 => {
                    let conn = &fx.echo_conn;
                    one_at_a_time(dur, usize::MAX, || raw::exchange(conn, &fx.small)).await?
                }
                1 => {
                    let (mut send, mut recv) = open_stream(&fx.echo_conn).await?;
                    let mut buf = Vec::new();
                    let start = Instant::now();
                    let mut lat = Vec::new();
                    while start.elapsed() < dur {
                        let t = Instant::now();
                        raw::exchange_on(&mut send, &mut recv, &mut buf, &fx.small).await?;
                        lat.push(t.elapsed());
                    }
                    raw::close_stream(&mut send, &mut recv, &mut buf, STREAM_CLOSE).await?;
                    Load::from_latencies(lat, start.elapsed())
                }
                2 => {
                    one_at_a_time(dur, usize::MAX, || {
                        send_delivered(&fx.a.node, &fx.b.to, &fx.small)
                    })
                    .await?
                }
                3 => {
                    one_at_a_time(dur, usize::MAX, || {
                        send_delivered(&fx.ma.node, &fx.mb.to, &fx.small)
                    })
                    .await?
                }
                4 => {
                    one_at_a_time(dur, usize::MAX, || {
                        send_delivered(&fx.ma.node, &fx.b.to, &fx.small)
                    })
                    .await?
                }
                _ => {
                    let limits = disk_limits(200).await?;
                    (fsync, fsync_pair) = (limits.commit_p50, limits.commit_pair_p50);
                    continue;
                }
            };
            results[phase] = Some(load);
        }
        let [Some(raw), Some(raw_one), Some(node), Some(node_mem), Some(to_durable)] = results
        else {
            anyhow::bail!("a latency phase did not run");
        };
        p50.push(ms(node.p50()), Some(ms(raw.p50() + fsync)));
        p99.push(ms(node.p99()), Some(ms(raw.p99())));
        mem.push(ms(node_mem.p50()), Some(ms(raw.p50())));
        one_stream.push(ms(node.p50()), Some(ms(raw_one.p50())));
        commit.push(ms(fsync), None);
        receiver_only.push(ms(to_durable.p50()), Some(ms(raw.p50() + fsync)));
        both_ends.push(ms(node.p50()), Some(ms(raw.p50() + fsync_pair)));
    }
    Ok(vec![
        p50,
        p99,
        mem,
        one_stream,
        commit,
        receiver_only,
        both_ends,
    ])
}

/// Figure 3: bulk throughput as the largest messages.
pub async fn bulk(cfg: &Config, fx: &Fixture) -> Result<Vec<Row>> {
    let count = (cfg.bulk_bytes / MAX_TEXT_LEN).max(1);
    let bytes = count * MAX_TEXT_LEN;
    let mib = bytes as f64 / (1024.0 * 1024.0);
    let big: Arc<str> = "b".repeat(MAX_TEXT_LEN).into();
    let k = cfg.in_flight;
    let mut durable = Row::new(
        format!("3. bulk {mib:.0} MiB as {count} msgs of 16 KiB, {k} in flight, durable"),
        "MiB/s",
        Target::AtLeast(0.5),
    );
    let mut memory = Row::new(
        format!("3. bulk {mib:.0} MiB as 16 KiB msgs, in-memory store"),
        "MiB/s",
        Target::None,
    );
    let mut disk = Row::new(
        format!(
            "3. bulk, durable (baseline: the disk's limit, raw redb writing the same rows into two files at once, {k} per commit)"
        ),
        "MiB/s",
        Target::None,
    );
    for run in 0..cfg.runs {
        let mut rates = [0.0f64; 4];
        for phase in order(run, 4) {
            let secs = match phase {
                0 => raw::bulk(&fx.sink_conn, bytes).await?.as_secs_f64(),
                3 => {
                    let text = big.clone();
                    let rate = tokio::task::spawn_blocking(move || {
                        history::two_files_limit(count, &text, k)
                    })
                    .await??;
                    count as f64 / rate.max(1e-9)
                }
                1 => {
                    let l = node_load(&fx.a, &fx.b, &big, k, PHASE_CAP, count).await?;
                    ensure!(l.ops == count, "bulk phase ended after {} messages", l.ops);
                    l.elapsed.as_secs_f64()
                }
                _ => {
                    let l = node_load(&fx.ma, &fx.mb, &big, k, PHASE_CAP, count).await?;
                    ensure!(l.ops == count, "bulk phase ended after {} messages", l.ops);
                    l.elapsed.as_secs_f64()
                }
            };
            rates[phase] = mib / secs.max(1e-9);
        }
        durable.push(rates[1], Some(rates[0]));
        memory.push(rates[2], Some(rates[0]));
        disk.push(rates[1], Some(rates[3]));
    }
    Ok(vec![durable, memory, disk])
}

/// One fresh sender node: bound, and its first presence poll has listed the receiver (so
/// the send dials the announced address without a lookup). Then the timed part: `send`
/// until `Delivered` (insert, dial, handshake, message, receiver's commit and ack,
/// delivered mark).
async fn node_setup_once(fx: &Fixture, to: &BenchNode, in_memory: bool) -> Result<Duration> {
    let dir = p2p_tests::private_tempdir();
    let builder = nodes::builder(
        Opts {
            discovery: Some(&fx.disco_url),
            in_memory,
            ..Opts::default()
        },
        &dir,
    );
    let mut events = builder.subscribe();
    let node = builder.bind().await?;
    let want = to.id;
    nodes::wait_event(
        &mut events,
        Duration::from_secs(10),
        |ev| matches!(ev, NodeEvent::PeerOnline { node_id, .. } if *node_id == want),
    )
    .await?;
    let t = Instant::now();
    bounded(send_delivered(&node, &to.to, &fx.small)).await?;
    let elapsed = t.elapsed();
    bounded(async {
        node.shutdown().await;
        Ok(())
    })
    .await?;
    Ok(elapsed)
}

/// A fresh bare endpoint (bound before the clock starts): connect to `addr`, then one
/// message and its ack on a new stream.
async fn raw_setup_once(
    fx: &Fixture,
    addr: std::net::SocketAddr,
    id: p2p_crypto::NodeId,
) -> Result<Duration> {
    let ep = raw::endpoint().await?;
    let t = Instant::now();
    bounded(async {
        let conn = ep.connect(addr, id).await?;
        raw::exchange(conn.quic(), &fx.small).await
    })
    .await?;
    let elapsed = t.elapsed();
    ep.close(0, b"done");
    Ok(elapsed)
}

/// Figure 4: a fresh connection up to the first acknowledged message.
pub async fn setup(cfg: &Config, fx: &Fixture) -> Result<Vec<Row>> {
    let n = cfg.setup_iters;
    let mut durable = Row::new(
        format!("4. fresh connection to 1st ack (median of {n}), durable"),
        "ms",
        Target::AtMost(1.2),
    );
    let mut memory = Row::new(
        format!("4. fresh connection to 1st ack (median of {n}), in-memory store"),
        "ms",
        Target::AtMost(1.2),
    );
    // The receiving node alone: a bare client (sending exactly what the raw client sends)
    // opening a fresh connection to the node.
    let mut to_durable = Row::new(
        format!("4. bare client → node, fresh connection to 1st ack (median of {n}), durable"),
        "ms",
        Target::None,
    );
    let mut to_memory = Row::new(
        format!("4. bare client → node, fresh connection to 1st ack (median of {n}), in-memory"),
        "ms",
        Target::None,
    );
    // The durable row's own limit: the raw exchange plus the one durable write the
    // receiver must make before it acknowledges, a lone commit made in the same round
    // (after the same idle as the receiver's write, not right after another commit).
    let mut durable_limit = Row::new(
        format!("4. fresh connection to 1st ack (median of {n}), durable (baseline: raw + one lone durable redb commit, made in the same rounds)"),
        "ms",
        Target::None,
    );
    let mut lone = history::LoneCommits::new()?;
    let (b_addr, mb_addr) = (fx.b.node.local_addr()?, fx.mb.node.local_addr()?);
    for run in 0..cfg.runs {
        let mut times: [Vec<f64>; 6] = Default::default();
        for i in 0..n {
            for phase in order(run + i, 6) {
                let d = match phase {
                    5 => tokio::task::block_in_place(|| lone.commit())?,
                    0 => raw_setup_once(fx, fx.echo.addr, fx.echo.id).await?,
                    1 => node_setup_once(fx, &fx.b, false).await?,
                    2 => node_setup_once(fx, &fx.mb, true).await?,
                    3 => raw_setup_once(fx, b_addr, fx.b.id).await?,
                    _ => raw_setup_once(fx, mb_addr, fx.mb.id).await?,
                };
                times[phase].push(ms(d));
            }
        }
        let raw = median(&times[0]);
        durable.push(median(&times[1]), Some(raw));
        durable_limit.push(median(&times[1]), Some(raw + median(&times[5])));
        memory.push(median(&times[2]), Some(raw));
        to_durable.push(median(&times[3]), Some(raw));
        to_memory.push(median(&times[4]), Some(raw));
    }
    Ok(vec![durable, durable_limit, memory, to_durable, to_memory])
}

/// `n` bare client endpoints.
async fn client_endpoints(n: usize) -> Result<Vec<Endpoint>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(raw::endpoint().await?);
    }
    Ok(clients)
}

/// Connects every client to the target (in parallel) and returns the connections.
async fn connect_all(
    clients: &[Endpoint],
    addr: std::net::SocketAddr,
    id: p2p_crypto::NodeId,
) -> Result<Vec<quinn::Connection>> {
    let mut set = JoinSet::new();
    for (i, ep) in clients.iter().enumerate() {
        let ep = ep.clone();
        set.spawn(bounded(async move { Ok((i, ep.connect(addr, id).await?)) }));
    }
    let mut conns: Vec<Option<quinn::Connection>> = vec![None; clients.len()];
    while let Some(r) = set.join_next().await {
        let (i, c) = r??;
        conns[i] = Some(c.quic().clone());
    }
    Ok(conns.into_iter().flatten().collect())
}

/// Each of `conns` sends one message at a time (stream per message) for the phase.
async fn peers_load(conns: Vec<quinn::Connection>, text: &Arc<str>, dur: Duration) -> Result<Load> {
    let conns = Arc::new(conns);
    let text = text.clone();
    let n = conns.len();
    let load = closed_loop(n, dur, usize::MAX, {
        let conns = conns.clone();
        move |w| {
            let (conns, text) = (conns.clone(), text.clone());
            async move { raw::exchange(&conns[w], &text).await }
        }
    })
    .await;
    for c in conns.iter() {
        c.close(0u32.into(), b"done");
    }
    load
}

/// Figure 8: 1, 10, 100 peers sending to one node at once, against the raw echo with the
/// same client endpoints.
pub async fn scale(cfg: &Config, fx: &Fixture) -> Result<Vec<Row>> {
    let most = cfg.peers.iter().copied().max().unwrap_or(1);
    let clients = client_endpoints(most).await?;
    let node_addr = fx.b.node.local_addr()?;
    let mut rows = Vec::new();
    for &n in &cfg.peers {
        let mut rate = Row::new(
            format!("8. {n} peer(s) → 1 node (durable), 1 outstanding each: msgs/s"),
            "msg/s",
            if n >= 100 {
                Target::AtLeast(0.5)
            } else {
                Target::None
            },
        );
        let mut p99 = Row::new(
            format!("8. {n} peer(s) → 1 node (durable): p99 latency"),
            "ms",
            if n >= 100 {
                Target::AtMost(2.0)
            } else {
                Target::None
            },
        );
        for run in 0..cfg.runs {
            let mut loads: [Option<Load>; 2] = [None, None];
            for phase in order(run, 2) {
                let conns = if phase == 0 {
                    connect_all(&clients[..n], fx.echo.addr, fx.echo.id).await?
                } else {
                    connect_all(&clients[..n], node_addr, fx.b.id).await?
                };
                loads[phase] = Some(peers_load(conns, &fx.small, cfg.phase).await?);
            }
            let [Some(raw), Some(node)] = loads else {
                anyhow::bail!("a scale phase did not run");
            };
            rate.push(node.per_sec(), Some(raw.per_sec()));
            p99.push(ms(node.p99()), Some(ms(raw.p99())));
        }
        rows.push(rate);
        rows.push(p99);
    }
    for c in &clients {
        c.close(0, b"done");
    }
    Ok(rows)
}

/// The order of `n` phases in run `run`: forwards on even runs, backwards on odd ones.
pub fn order(run: usize, n: usize) -> Vec<usize> {
    if run.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

/// Runs one side of one figure alone, for a profiler (`BENCH_PROFILE`): `send`,
/// `send-mem`, `rtt`, `rtt-mem`, `bulk`, `bulk-mem`, `setup`, `setup-mem`, `setup-raw`,
/// `peers`, `peers-mem`, `raw-peers`, `raw-send`, `raw-rtt`. Returns a line saying what it
/// did.
pub async fn profile(cfg: &Config, fx: &Fixture, what: &str) -> Result<Option<String>> {
    let k = cfg.in_flight;
    let dur = cfg.phase;
    let big: Arc<str> = "b".repeat(MAX_TEXT_LEN).into();
    let bulk_count = (cfg.bulk_bytes / MAX_TEXT_LEN).max(1);
    let (pair_a, pair_b) = if what.ends_with("-mem") {
        (&fx.ma, &fx.mb)
    } else {
        (&fx.a, &fx.b)
    };
    // A profiler started with collection off can switch it on at this line.
    eprintln!("profile: measuring {what}");
    let load = match what.trim_end_matches("-mem") {
        "send" => node_load(pair_a, pair_b, &fx.small, k, dur, usize::MAX).await?,
        "rtt" => {
            one_at_a_time(dur, usize::MAX, || {
                send_delivered(&pair_a.node, &pair_b.to, &fx.small)
            })
            .await?
        }
        "bulk" => node_load(pair_a, pair_b, &big, k, PHASE_CAP, bulk_count).await?,
        "setup" | "setup-raw" => {
            let start = Instant::now();
            let mut lat = Vec::new();
            while start.elapsed() < dur {
                lat.push(if what == "setup-raw" {
                    raw_setup_once(fx, fx.echo.addr, fx.echo.id).await?
                } else {
                    node_setup_once(fx, pair_b, what.ends_with("-mem")).await?
                });
            }
            Load::from_latencies(lat, start.elapsed())
        }
        "peers" | "raw-peers" => {
            let clients = client_endpoints(cfg.peers.iter().copied().max().unwrap_or(1)).await?;
            let conns = if what == "raw-peers" {
                connect_all(&clients, fx.echo.addr, fx.echo.id).await?
            } else {
                connect_all(&clients, pair_b.node.local_addr()?, pair_b.id).await?
            };
            let load = peers_load(conns, &fx.small, dur).await?;
            for c in &clients {
                c.close(0, b"done");
            }
            load
        }
        "raw-send" => raw_load(fx, k, dur).await?,
        "raw-rtt" => {
            one_at_a_time(dur, usize::MAX, || raw::exchange(&fx.echo_conn, &fx.small)).await?
        }
        _ => return Ok(None),
    };
    tokio::task::spawn_blocking(crate::profile_hold).await?;
    Ok(Some(format!(
        "{what}: {} operations in {:.2} s ({:.0}/s), p50 {:.3} ms, p99 {:.3} ms",
        load.ops,
        load.elapsed.as_secs_f64(),
        load.per_sec(),
        ms(load.p50()),
        ms(load.p99())
    )))
}
