//! Figure 5: the node's history store (`p2p_node::store::Store`) against raw redb with
//! the same tables (`p2p_node::store::tables`), the same value encoding (postcard) and
//! the same commit policy (`Durability::Immediate`, redb's default); and the store
//! encrypted (`Store::open_with_key`, as with a passphrase-protected identity) against
//! the same store in clear.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use p2p_crypto::{history::HistoryKey, NodeId, SecretKey};
use p2p_node::{
    node::MAX_WRITE_BATCH,
    store::{
        tables::{RowKeyRef, RowValueRef, CONVERSATIONS, HISTORY, MESSAGE_IDS, OUTBOX},
        Direction, MessageStatus, Store, WriteOp,
    },
    wire::{Body, ChatMessage},
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table};
use serde::{Deserialize, Serialize};

use crate::{
    messaging::{order, SMALL},
    report::{Row, Target},
    Config,
};

/// The record of a `history` row, field for field as the node stores it.
#[derive(Serialize, Deserialize)]
struct MessageRecord {
    direction: Direction,
    sent_at_ms: u64,
    body: Body,
    status: MessageStatus,
}

/// The value of an `outbox` row, field for field as the node stores it (the message
/// itself is in its history row).
#[derive(Serialize)]
struct OutboxRecord {
    attempts: u32,
    next_attempt_ms: u64,
    created_ms: u64,
    mailbox_deposited: bool,
}

const PEERS: usize = 10;
const HISTORY_PAGE: usize = 50;

fn peers() -> Vec<NodeId> {
    (0..PEERS).map(|_| SecretKey::generate().public()).collect()
}

fn messages(n: usize, peers: &[NodeId]) -> Result<Vec<(NodeId, ChatMessage)>> {
    let text = "h".repeat(SMALL);
    (0..n)
        .map(|i| Ok((peers[i % peers.len()], ChatMessage::text(text.as_str(), 1)?)))
        .collect()
}

fn record(msg: &ChatMessage, direction: Direction, status: MessageStatus) -> Result<Vec<u8>> {
    Ok(postcard::to_allocvec(&MessageRecord {
        direction,
        sent_at_ms: msg.sent_at_ms,
        body: msg.body.clone(),
        status,
    })?)
}

/// Appends the row `(at, id)` of `peer`'s conversation as the node does: linked to the
/// conversation's newest row, which it then becomes.
fn append(
    history: &mut Table<'_, RowKeyRef, RowValueRef>,
    conversations: &mut Table<'_, &'static [u8; 32], RowKeyRef>,
    peer: &[u8; 32],
    (at, id): (u64, &[u8; 16]),
    value: &[u8],
) -> Result<()> {
    let head = conversations.get(peer)?.map(|g| {
        let (at, id) = g.value();
        (at, *id)
    });
    history.insert((at, id), (peer, head.as_ref().map(|(a, i)| (*a, i)), value))?;
    conversations.insert(peer, (at, id))?;
    Ok(())
}

/// The node's store at `path`: clear, or encrypted under `key`.
fn open_store(path: &Path, key: Option<&HistoryKey>) -> Result<Store> {
    Ok(match key {
        Some(k) => Store::open_with_key(path, k.clone(), true)?,
        None => Store::open(path)?,
    })
}

/// Group commit as the node's writer thread does it: batches of `MAX_WRITE_BATCH`, one
/// `write_batch` each (a synced write-log record, and a fold every
/// `p2p_node::store::FOLD_WRITES` writes), every message with its own stamp, and a fold
/// at the end.
fn node_insert(
    path: &Path,
    key: Option<&HistoryKey>,
    msgs: &[(NodeId, ChatMessage)],
) -> Result<Duration> {
    let store = open_store(path, key)?;
    let start = Instant::now();
    for (i, batch) in msgs.chunks(MAX_WRITE_BATCH).enumerate() {
        let ops: Vec<WriteOp> = batch
            .iter()
            .enumerate()
            .map(|(j, (peer, msg))| WriteOp::Incoming {
                peer: *peer,
                msg: msg.clone(),
                now_ms: stamp(i, j),
            })
            .collect();
        for r in store.write_batch(&ops)? {
            r?;
        }
    }
    // Every row in the database itself, not only in its write log.
    store.flush()?;
    Ok(start.elapsed())
}

/// A distinct, increasing local time per message, as the writer stamps them.
fn stamp(batch: usize, i: usize) -> u64 {
    1_000_000 + (batch * MAX_WRITE_BATCH + i) as u64
}

/// The same rows in the same tables, same batches, one commit each.
fn raw_insert(db: &Database, msgs: &[(NodeId, ChatMessage)]) -> Result<Duration> {
    raw_insert_batched(db, msgs, MAX_WRITE_BATCH)
}

/// [`raw_insert`] with `batch` rows per commit.
fn raw_insert_batched(
    db: &Database,
    msgs: &[(NodeId, ChatMessage)],
    batch: usize,
) -> Result<Duration> {
    let start = Instant::now();
    for (i, batch) in msgs.chunks(batch.max(1)).enumerate() {
        let txn = db.begin_write()?;
        {
            let mut history = txn.open_table(HISTORY)?;
            let mut conversations = txn.open_table(CONVERSATIONS)?;
            let mut ids = txn.open_table(MESSAGE_IDS)?;
            for (j, (peer, msg)) in batch.iter().enumerate() {
                // The node deduplicates by id (claiming it in the index): so does the
                // baseline.
                let at = stamp(i, j);
                let value = record(msg, Direction::Incoming, MessageStatus::Received)?;
                ensure!(
                    ids.insert(&msg.id.0, (*peer.as_bytes(), at))?.is_none(),
                    "duplicate id"
                );
                let (history, conversations) = (&mut history, &mut conversations);
                append(
                    history,
                    conversations,
                    peer.as_bytes(),
                    (at, &msg.id.0),
                    &value,
                )?;
            }
        }
        txn.commit()?;
    }
    Ok(start.elapsed())
}

fn open_raw(path: &Path) -> Result<Database> {
    let db = Database::create(path)?;
    let txn = db.begin_write()?;
    txn.open_table(HISTORY)?;
    txn.open_table(CONVERSATIONS)?;
    txn.open_table(MESSAGE_IDS)?;
    txn.open_table(OUTBOX)?;
    txn.commit()?;
    Ok(db)
}

/// The sender's bookkeeping as the node's writer does it under load: a batch of
/// outgoing inserts (history row + outbox entry, durable commit), then, as the acks come
/// back, a batch of delivery marks (outbox entry removed + status updated, committed
/// without waiting for the disk).
fn node_sender(path: &Path, msgs: &[(NodeId, ChatMessage)], dur: Duration) -> Result<f64> {
    let store = Store::open(path)?;
    let start = Instant::now();
    let mut done = 0;
    for (i, batch) in msgs.chunks(MAX_WRITE_BATCH).enumerate() {
        if start.elapsed() >= dur {
            break;
        }
        let inserts: Vec<WriteOp> = batch
            .iter()
            .enumerate()
            .map(|(j, (to, msg))| WriteOp::Outgoing {
                to: *to,
                msg: msg.clone(),
                now_ms: stamp(i, j),
            })
            .collect();
        for r in store.write_batch(&inserts)? {
            r?;
        }
        let marks: Vec<WriteOp> = batch
            .iter()
            .map(|(peer, msg)| WriteOp::Finish {
                peer: *peer,
                id: msg.id,
                status: MessageStatus::Delivered,
            })
            .collect();
        for r in store.write_batch(&marks)? {
            r?;
        }
        done += batch.len();
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn raw_sender(db: &Database, msgs: &[(NodeId, ChatMessage)], dur: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0;
    for (i, batch) in msgs.chunks(MAX_WRITE_BATCH).enumerate() {
        if start.elapsed() >= dur {
            break;
        }
        let txn = db.begin_write()?;
        {
            let mut history = txn.open_table(HISTORY)?;
            let mut conversations = txn.open_table(CONVERSATIONS)?;
            let mut ids = txn.open_table(MESSAGE_IDS)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            for (j, (peer, msg)) in batch.iter().enumerate() {
                let now = stamp(i, j);
                let key = (*peer.as_bytes(), now, msg.id.0);
                let value = record(msg, Direction::Outgoing, MessageStatus::Queued)?;
                ensure!(
                    ids.insert(&msg.id.0, (key.0, key.1))?.is_none(),
                    "duplicate id"
                );
                let (history, conversations) = (&mut history, &mut conversations);
                append(history, conversations, &key.0, (now, &msg.id.0), &value)?;
                let entry = postcard::to_allocvec(&OutboxRecord {
                    attempts: 0,
                    next_attempt_ms: now,
                    created_ms: now,
                    mailbox_deposited: false,
                })?;
                outbox.insert((&key.0, &msg.id.0), entry.as_slice())?;
            }
        }
        txn.commit()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            // Delivered is the entry leaving the outbox, as in the node.
            let mut outbox = txn.open_table(OUTBOX)?;
            for (peer, msg) in batch {
                ensure!(
                    outbox.remove((peer.as_bytes(), &msg.id.0))?.is_some(),
                    "not queued"
                );
            }
        }
        txn.commit()?;
        done += batch.len();
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// "The last 50 messages with a peer", decoded: `Store::history`.
fn node_history(store: &Store, peers: &[NodeId], dur: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0usize;
    while start.elapsed() < dur {
        let page = store.history(&peers[done % peers.len()], HISTORY_PAGE, None)?;
        ensure!(page.len() == HISTORY_PAGE, "short history page");
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// The first read of each conversation after opening the store at `path` (nothing of
/// it decrypted or cached yet): opened again and again, each time every conversation's
/// last page once, only the reads timed.
fn node_history_first(
    path: &Path,
    key: Option<&HistoryKey>,
    peers: &[NodeId],
    dur: Duration,
) -> Result<f64> {
    let mut spent = Duration::ZERO;
    let mut done = 0usize;
    while spent < dur {
        let store = open_store(path, key)?;
        let start = Instant::now();
        for peer in peers {
            let page = store.history(peer, HISTORY_PAGE, None)?;
            ensure!(page.len() == HISTORY_PAGE, "short history page");
        }
        spent += start.elapsed();
        done += peers.len();
    }
    Ok(done as f64 / spent.as_secs_f64())
}

/// The same walk in raw redb: the conversation's newest row, then down the links, values
/// decoded.
fn raw_history(db: &Database, peers: &[NodeId], dur: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0usize;
    while start.elapsed() < dur {
        let p = *peers[done % peers.len()].as_bytes();
        let txn = db.begin_read()?;
        let history = txn.open_table(HISTORY)?;
        let conversations = txn.open_table(CONVERSATIONS)?;
        let mut next = conversations.get(&p)?.map(|g| {
            let (at, id) = g.value();
            (at, *id)
        });
        let mut page = Vec::with_capacity(HISTORY_PAGE);
        while let Some((at, id)) = next.filter(|_| page.len() < HISTORY_PAGE) {
            let row = history.get((at, &id))?;
            let Some(row) = row else { break };
            let (peer, prev, value) = row.value();
            let rec: MessageRecord = postcard::from_bytes(value)?;
            next = prev.map(|(at, id)| (at, *id));
            page.push(((*peer, at, id), rec));
        }
        page.reverse();
        ensure!(page.len() == HISTORY_PAGE, "short history page");
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// Disk limits that the messaging figures compare with, measured on a fresh raw redb
/// database beside the nodes' (synchronous: run it on a blocking thread).
pub struct DiskLimits {
    /// Raw redb group-commit insert rate: the node's rows, batches of
    /// `MAX_WRITE_BATCH`, one durable commit each (msgs/s).
    pub insert_rate: f64,
    /// Median time of one durable commit of one small row.
    pub commit_p50: Duration,
    /// Median time for two such commits started together on two files (as a sender and
    /// its receiver on one disk each write a message), until the later one is done.
    pub commit_pair_p50: Duration,
}

/// Measures [`DiskLimits`] with `msgs` rows and `commits` single-row commits.
pub fn disk_limits(msgs: usize, commits: usize) -> Result<DiskLimits> {
    let dir = tempfile::tempdir()?;
    let rows = messages(msgs, &peers())?;
    let db = open_raw(&dir.path().join("limits.redb"))?;
    let insert_rate = msgs as f64 / raw_insert(&db, &rows)?.as_secs_f64();
    let one = messages(commits, &peers())?;
    let mut times: Vec<Duration> = one
        .iter()
        .enumerate()
        .map(|(i, row)| commit_one(&db, i, row))
        .collect::<Result<_>>()?;
    // The same commits on two files at once, each started as the other is.
    let second = open_raw(&dir.path().join("limits-2.redb"))?;
    let start = std::sync::Barrier::new(2);
    // Rows after those just committed, so each commit inserts a new row on both files.
    let first = one.len();
    let (pairs, other) = std::thread::scope(|s| {
        let other = s.spawn(|| commits_after(&start, &second, &one, first));
        (commits_after(&start, &db, &one, first), other.join())
    });
    let other = other.map_err(|_| anyhow::anyhow!("a commit thread panicked"))??;
    let mut pairs = pairs?;
    for (p, o) in pairs.iter_mut().zip(other) {
        *p = (*p).max(o);
    }
    Ok(DiskLimits {
        insert_rate,
        commit_p50: p50(&mut times),
        commit_pair_p50: p50(&mut pairs),
    })
}

fn p50(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// One durable commit of one row (a batch of one: the same rows, the same commit);
/// returns how long it took.
fn commit_one(db: &Database, i: usize, (peer, msg): &(NodeId, ChatMessage)) -> Result<Duration> {
    let t = Instant::now();
    let txn = db.begin_write()?;
    {
        let mut history = txn.open_table(HISTORY)?;
        let value = record(msg, Direction::Incoming, MessageStatus::Received)?;
        let at = 3_000_000_000 + i as u64;
        history.insert((at, &msg.id.0), (peer.as_bytes(), None, value.as_slice()))?;
    }
    txn.commit()?;
    Ok(t.elapsed())
}

/// A raw redb file for single durable commits made one at a time, whenever the caller
/// likes: figure 4 makes one in each round of its fresh connections, so the commit comes
/// after the same idle time as the receiving node's write there (on a VM the first sync
/// after an idle disk costs several times one made right after another).
pub struct LoneCommits {
    _dir: tempfile::TempDir,
    db: Database,
    rows: Vec<(NodeId, ChatMessage)>,
    next: usize,
}

impl LoneCommits {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = open_raw(&dir.path().join("lone.redb"))?;
        Ok(Self {
            _dir: dir,
            db,
            rows: messages(64, &peers())?,
            next: 0,
        })
    }

    /// One durable commit of one new row (blocking); how long it took.
    pub fn commit(&mut self) -> Result<Duration> {
        let i = self.next;
        self.next += 1;
        commit_one(&self.db, i, &self.rows[i % self.rows.len()])
    }
}

/// [`commit_one`] for each row (numbered from `first`), each after `start` lets both
/// threads go. Goes through every row even after a failed commit, so the other thread
/// never waits at `start` for nobody.
fn commits_after(
    start: &std::sync::Barrier,
    db: &Database,
    rows: &[(NodeId, ChatMessage)],
    first: usize,
) -> Result<Vec<Duration>> {
    let times: Vec<Result<Duration>> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            start.wait();
            commit_one(db, first + i, row)
        })
        .collect();
    times.into_iter().collect()
}

/// The disk's limit for figures 1 and 3: `count` messages of `text`, the node's rows
/// for each, written by raw redb into two fresh files at once, as the sender and the
/// receiver each write every message, `batch` rows per durable commit (all the messages
/// a node can have in flight in one commit: the fewest fsyncs a node could do). Returns
/// the rate in messages per second, until the later of the two writers is done; the
/// rows are built and the files created before both start (synchronous: run it on a
/// blocking thread).
pub fn two_files_limit(count: usize, text: &str, batch: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let peer = SecretKey::generate().public();
    let start = std::sync::Barrier::new(2);
    let took = std::thread::scope(|s| -> Result<Duration> {
        let writers: Vec<_> = ["sender", "receiver"]
            .into_iter()
            .map(|side| {
                let (path, start) = (dir.path().join(format!("{side}.redb")), &start);
                s.spawn(move || -> Result<Duration> {
                    // Each writer has its own rows, as each node decodes its own copy.
                    let rows = (0..count)
                        .map(|_| Ok((peer, ChatMessage::text(text, 1)?)))
                        .collect::<Result<Vec<_>>>();
                    let db = open_raw(&path);
                    // Both wait here even when one failed, so neither waits forever.
                    start.wait();
                    raw_insert_batched(&db?, &rows?, batch)
                })
            })
            .collect();
        let mut took = Duration::ZERO;
        for w in writers {
            let t = w
                .join()
                .map_err(|_| anyhow::anyhow!("a disk-limit writer panicked"))??;
            took = took.max(t);
        }
        Ok(took)
    })?;
    Ok(count as f64 / took.as_secs_f64().max(1e-9))
}

/// Figure 5 (synchronous: run it on a blocking thread).
pub fn run(cfg: &Config) -> Result<Vec<Row>> {
    let n = cfg.history_msgs;
    let peers = peers();
    let mut insert = Row::new(
        format!("5. history insert, group commit of {MAX_WRITE_BATCH} ({n} msgs)"),
        "msg/s",
        Target::None,
    );
    let mut sender = Row::new(
        format!("5. sender bookkeeping: batches of {MAX_WRITE_BATCH} inserts, then their delivery marks"),
        "msg/s",
        Target::None,
    );
    let mut read = Row::new(
        format!("5. history: last {HISTORY_PAGE} of a conversation ({PEERS} convs)"),
        "query/s",
        Target::None,
    );
    let mut sealed_insert = Row::new(
        format!("5. encrypted history insert, group commit of {MAX_WRITE_BATCH} (baseline: the same store in clear)"),
        "msg/s",
        Target::AtLeast(0.9),
    );
    let mut sealed_read = Row::new(
        format!("5. encrypted history: last {HISTORY_PAGE} of a conversation (baseline: the same store in clear)"),
        "query/s",
        Target::AtLeast(0.9),
    );
    let mut sealed_first = Row::new(
        format!("5. encrypted history: first read of a conversation's last {HISTORY_PAGE} after opening (baseline: the same in clear)"),
        "query/s",
        Target::None,
    );
    let key = SecretKey::generate().history_key();
    // Read side: one database of each kind, filled once.
    let dir = tempfile::tempdir()?;
    let fill = messages(PEERS * 1000, &peers)?;
    node_insert(&dir.path().join("read-node.redb"), None, &fill)?;
    let read_store = Store::open(dir.path().join("read-node.redb"))?;
    let first_clear = dir.path().join("first-node.redb");
    node_insert(&first_clear, None, &fill)?;
    let first_sealed = dir.path().join("first-sealed.redb");
    node_insert(&first_sealed, Some(&key), &fill)?;
    node_insert(&dir.path().join("read-sealed.redb"), Some(&key), &fill)?;
    let read_sealed = open_store(&dir.path().join("read-sealed.redb"), Some(&key))?;
    let read_raw = open_raw(&dir.path().join("read-raw.redb"))?;
    raw_insert(&read_raw, &fill)?;
    for run in 0..cfg.runs {
        let msgs = messages(n, &peers)?;
        let mut w = [0.0f64; 3];
        let mut s = [0.0f64; 2];
        let mut r = [0.0f64; 3];
        let mut f = [0.0f64; 2];
        for phase in order(run, 3) {
            let node_path = dir.path().join(format!("node-{run}.redb"));
            let raw_path = dir.path().join(format!("raw-{run}.redb"));
            if phase == 0 {
                let db = open_raw(&raw_path)?;
                w[0] = n as f64 / raw_insert(&db, &msgs)?.as_secs_f64();
                let db = open_raw(&dir.path().join(format!("raw-sender-{run}.redb")))?;
                s[0] = raw_sender(&db, &msgs, cfg.phase)?;
                r[0] = raw_history(&read_raw, &peers, cfg.phase)?;
            } else if phase == 1 {
                w[1] = n as f64 / node_insert(&node_path, None, &msgs)?.as_secs_f64();
                s[1] = node_sender(
                    &dir.path().join(format!("sender-{run}.redb")),
                    &msgs,
                    cfg.phase,
                )?;
                r[1] = node_history(&read_store, &peers, cfg.phase)?;
                f[0] = node_history_first(&first_clear, None, &peers, cfg.phase)?;
            } else {
                let sealed_path = dir.path().join(format!("sealed-{run}.redb"));
                w[2] = n as f64 / node_insert(&sealed_path, Some(&key), &msgs)?.as_secs_f64();
                r[2] = node_history(&read_sealed, &peers, cfg.phase)?;
                f[1] = node_history_first(&first_sealed, Some(&key), &peers, cfg.phase)?;
            }
        }
        insert.push(w[1], Some(w[0]));
        sender.push(s[1], Some(s[0]));
        read.push(r[1], Some(r[0]));
        sealed_insert.push(w[2], Some(w[1]));
        sealed_read.push(r[2], Some(r[1]));
        sealed_first.push(f[1], Some(f[0]));
    }
    Ok(vec![
        insert,
        sender,
        read,
        sealed_insert,
        sealed_read,
        sealed_first,
    ])
}

/// Runs one side of figure 5 alone, for a profiler (`BENCH_PROFILE`): `history-insert`,
/// `history-sender`, `history-read`. Returns a line saying what it did.
pub fn profile(cfg: &Config, what: &str) -> Result<Option<String>> {
    let peers = peers();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("node.redb");
    let line = match what {
        "history-insert" => {
            let msgs = messages(cfg.history_msgs, &peers)?;
            eprintln!("profile: measuring {what}");
            let d = node_insert(&path, None, &msgs)?;
            format!("{what}: {} msgs in {:.2} s", msgs.len(), d.as_secs_f64())
        }
        "history-sender" => {
            let msgs = messages(cfg.history_msgs, &peers)?;
            eprintln!("profile: measuring {what}");
            format!("{what}: {:.0} msg/s", node_sender(&path, &msgs, cfg.phase)?)
        }
        "history-read" => {
            node_insert(&path, None, &messages(PEERS * 1000, &peers)?)?;
            let store = Store::open(&path)?;
            eprintln!("profile: measuring {what}");
            format!(
                "{what}: {:.0} query/s",
                node_history(&store, &peers, cfg.phase)?
            )
        }
        _ => return Ok(None),
    };
    crate::profile_hold();
    Ok(Some(line))
}
