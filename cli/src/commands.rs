//! The one-shot commands, the background node and the headless `listen`.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use p2p_node::NodeEvent;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    control::{self, Kind, Request},
    discovery::{self, Need},
    identity::Paths,
    ops,
    output::{event_json, event_line},
    running::{open_node, print_discovery, serve_control, warn_if_not_announced, StopSignals},
    Global,
};

/// `p2p-node register NAME`.
pub async fn register(g: &Global, paths: &Paths, name: &str) -> Result<()> {
    let request = Request::Register { name: name.into() };
    ops::run(g, paths, request, Need::Use).await?.print(false);
    Ok(())
}

/// `p2p-node peers [--json]`.
pub async fn peers(g: &Global, paths: &Paths, json: bool) -> Result<()> {
    ops::run(g, paths, Request::Peers, Need::Use)
        .await?
        .print(json);
    Ok(())
}

/// `p2p-node send TO TEXT [--json]`.
pub async fn send(g: &Global, paths: &Paths, to: &str, text: &str, json: bool) -> Result<()> {
    let request = Request::Send {
        to: to.into(),
        text: text.into(),
    };
    ops::run(g, paths, request, Need::Use).await?.print(json);
    Ok(())
}

/// `p2p-node history PEER [--limit N] [--json]`. A NodeId or a name this node already
/// knows needs no discovery; any other name is looked up (and the LAN searched) only
/// then.
pub async fn history(
    g: &Global,
    paths: &Paths,
    peer: &str,
    limit: usize,
    json: bool,
) -> Result<()> {
    let request = Request::History {
        peer: peer.into(),
        limit,
    };
    ops::run(g, paths, request, Need::Nothing)
        .await?
        .print(json);
    Ok(())
}

/// `p2p-node status [--json]`.
pub async fn status(g: &Global, paths: &Paths, json: bool) -> Result<()> {
    ops::run(g, paths, Request::Status, Need::Nothing)
        .await?
        .print(json);
    Ok(())
}

/// `p2p-node stop`: asks the daemon (or `listen`) running on the data directory to log
/// out, and waits until it has.
pub async fn stop(paths: &Paths) -> Result<()> {
    let Some(output) = control::ask(&paths.data_dir, &Request::Stop).await? else {
        println!("no node is running on {}", paths.data_dir.display());
        return Ok(());
    };
    output.print(false);
    // Logged out once the data directory's lock is free.
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        match p2p_node::datadir::lock(&paths.data_dir) {
            Ok(_) => break,
            Err(p2p_node::datadir::LockError::Locked { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the node did not stop within {} s; it may still be logging out",
                STOP_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("stopped");
    Ok(())
}

/// How long `stop` waits for the node to log out.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// How long `daemon` waits for the node it started to answer.
const DAEMON_START_WAIT: Duration = Duration::from_secs(30);

/// `p2p-node daemon`: starts `daemon --foreground` in the background, detached from the
/// terminal, its log in `daemon.log` in the data directory, and waits until it answers.
pub async fn daemon(paths: &Paths) -> Result<()> {
    if let Some(output) = control::ask(&paths.data_dir, &Request::Status).await? {
        output.print(false);
        anyhow::bail!("a node is already running on {}", paths.data_dir.display());
    }
    p2p_node::datadir::prepare(&paths.data_dir)?;
    let log_path = paths.data_dir.join("daemon.log");
    p2p_crypto::owner_only::check(&log_path)?;
    let log = p2p_crypto::owner_only::open_options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let exe = std::env::current_exe().context("cannot find this program")?;
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the background node")?;
    let deadline = Instant::now() + DAEMON_START_WAIT;
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            anyhow::bail!("the background node exited ({status}): {last}");
        }
        if let Ok(Some(_)) = control::ask(&paths.data_dir, &Request::Status).await {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the background node (pid {}) did not answer within {} s; see {}",
                child.id(),
                DAEMON_START_WAIT.as_secs(),
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "node running in the background (pid {}), log in {}; p2p-node status shows it, \
         p2p-node stop stops it",
        child.id(),
        log_path.display()
    );
    Ok(())
}

/// `p2p-node daemon --foreground`: a node with no terminal: logged in, answering the
/// other commands on its control socket, until SIGINT, SIGTERM or `p2p-node stop`.
pub async fn daemon_foreground(g: &Global, paths: &Paths) -> Result<()> {
    let node = open_node(g, paths, Need::Serve).await?;
    let stop = CancellationToken::new();
    let control = serve_control(&node, paths, Kind::Daemon, &stop);
    eprintln!(
        "node {} running in the background (pid {})",
        node.node_id(),
        std::process::id()
    );
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            // No terminal to lose: a hang-up is ignored.
            _ = hangup.recv() => continue,
            _ = stop.cancelled() => break,
        }
    }
    drop(control);
    node.shutdown().await;
    eprintln!("logged out");
    Ok(())
}

/// `p2p-node listen [--json]`: prints events until SIGINT or SIGTERM, then logs out.
pub async fn listen(g: &Global, paths: &Paths, json: bool) -> Result<()> {
    let node = open_node(g, paths, Need::Serve).await?;
    let mut events = node.subscribe();
    let stop = CancellationToken::new();
    let control = serve_control(&node, paths, Kind::Listen, &stop);
    if json {
        if let Some(status) = node.discovery_status() {
            println!("{}", discovery::status_json(&status.borrow()));
        }
    } else {
        print_discovery(&node);
    }
    warn_if_not_announced(&node).await;
    let quic = node.local_addr()?;
    if json {
        println!(
            "{}",
            json!({
                "event": "ready",
                "node_id": node.node_id().to_string(),
                "quic_addr": quic.to_string(),
                "discovery": node.discovery_url(),
            })
        );
    } else {
        println!("listening as {} on {quic}; Ctrl-C to stop", node.node_id());
    }
    let mut signals = StopSignals::new()?;
    loop {
        tokio::select! {
            () = signals.recv() => break,
            _ = stop.cancelled() => break,
            ev = events.recv() => match ev {
                Ok(ev) => print_event(&ev, json),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("missed {n} events (output too slow)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    drop(control);
    node.shutdown().await;
    if !json {
        println!("logged out");
    }
    Ok(())
}

/// Binds the relay: on `opts.listen`, where the HTTP server's own address (`http`, as
/// bound) stands in for the default (the same address as `--listen`, port 0 included).
fn bind_relay(
    opts: &RelayOptions,
    key: &std::path::Path,
    listen: SocketAddr,
    http: SocketAddr,
) -> Result<(p2p_discovery::relay::Relay, std::fs::File)> {
    let (secret, created) = p2p_crypto::keyfile::load_or_create(key, None)
        .with_context(|| format!("cannot load the relay key {}", key.display()))?;
    if created {
        println!("created relay identity in {}", key.display());
    }
    // Two relays with one key would be taken for one: peers of the other would be
    // unreachable. The lock goes when the process does.
    let lock = std::fs::File::open(key)
        .with_context(|| format!("cannot open the relay key {}", key.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "the relay key {} is in use by another discovery server; give this one its own with --relay-key",
            key.display()
        );
    }
    let relay = bind_relay_socket(opts, &secret, listen, http)?;
    Ok((relay, lock))
}

/// Binds the relay's UDP socket (see [`bind_relay`]).
fn bind_relay_socket(
    opts: &RelayOptions,
    secret: &p2p_crypto::SecretKey,
    listen: SocketAddr,
    http: SocketAddr,
) -> Result<p2p_discovery::relay::Relay> {
    let config = p2p_discovery::relay::RelayConfig::default;
    let same = opts.listen == listen;
    let first = if same { http } else { opts.listen };
    match p2p_discovery::relay::Relay::bind(first, secret, config()) {
        Ok(r) => Ok(r),
        // Any port was asked for: the HTTP port number was only a preference.
        Err(_) if same && listen.port() == 0 => Ok(p2p_discovery::relay::Relay::bind(
            SocketAddr::new(http.ip(), 0),
            secret,
            config(),
        )?),
        Err(e) => Err(anyhow::Error::new(e).context(
            "cannot start the relay; give it another address with --relay-listen, or run without one with --no-relay",
        )),
    }
}

/// Prints the "key changed" warnings a one-shot command ran into on stderr.
fn print_event(ev: &NodeEvent, json: bool) {
    if json {
        println!("{}", event_json(ev));
    } else if let Some(line) = event_line(ev) {
        println!("{line}");
    }
}

/// Where and as whom the standalone server's relay runs.
pub struct RelayOptions {
    /// UDP address (the HTTP address by default).
    pub listen: SocketAddr,
    /// Its identity key file (created mode 0600). Default: relay.key beside the
    /// database.
    pub key: Option<PathBuf>,
    /// The address to advertise for it, if not the server's own host.
    pub advertise: Option<SocketAddr>,
}

/// The per-address limit on write requests of a standalone server.
pub struct WriteLimits {
    /// Sustained writes per second.
    pub per_sec: f64,
    /// Burst of writes.
    pub burst: u32,
}

/// Where the standalone server keeps its state.
pub enum StoreChoice {
    /// A redb file (default: discovery.redb in the data directory).
    Redb(Option<PathBuf>),
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

/// Opens the store; returns it, how to name it to the user, and the default relay key.
async fn open_discovery_store(
    paths: &Paths,
    choice: StoreChoice,
) -> Result<(Arc<dyn p2p_discovery::Store>, String, PathBuf)> {
    match choice {
        StoreChoice::Redb(db) => {
            let db = match db {
                Some(db) => {
                    let parent = p2p_crypto::owner_only::parent_dir(&db);
                    if !parent.exists() {
                        p2p_crypto::owner_only::create_dir(&parent)?;
                    }
                    db
                }
                None => {
                    paths.prepare()?;
                    paths.discovery_db()
                }
            };
            let store = p2p_discovery::open_store(&db.to_string_lossy())
                .await
                .with_context(|| format!("cannot open discovery database {}", db.display()))?;
            let key = db.with_file_name("relay.key");
            Ok((store, format!("database {}", db.display()), key))
        }
        StoreChoice::Postgres(url) => {
            let target = p2p_discovery::describe_url(&url)?;
            let store = p2p_discovery::open_store(&url)
                .await
                .with_context(|| format!("cannot use the discovery database {target}"))?;
            paths.prepare()?;
            let key = paths.data_dir.join("relay.key");
            Ok((store, format!("database {target}"), key))
        }
    }
}

/// `p2p-node discovery --listen ADDR [--db PATH | --store URL|PATH] [--relay-listen ADDR |
/// --no-relay]`: a standalone discovery server and its relay. A redb database is created
/// with mode 0600 (and a missing directory for it with mode 0700), and refused if group
/// or others may access it; without `--db` it is in the data directory, whose rules
/// apply. A PostgreSQL database gets its schema on first use; any number of servers may
/// share it.
pub async fn discovery(
    paths: &Paths,
    listen: SocketAddr,
    store: StoreChoice,
    relay: Option<RelayOptions>,
    limits: WriteLimits,
) -> Result<()> {
    if !(limits.per_sec.is_finite() && limits.per_sec > 0.0) || limits.burst == 0 {
        anyhow::bail!("--write-rate and --write-burst must be positive");
    }
    // Watched from before the server says it listens: a SIGTERM right after that line
    // is a clean stop.
    let mut signals = StopSignals::new()?;
    let (store, described, default_key) = open_discovery_store(paths, store).await?;
    let config = p2p_discovery::ServerConfig {
        write_rate_per_sec: limits.per_sec,
        write_burst: limits.burst,
        ..Default::default()
    };
    let state =
        p2p_discovery::AppState::new(config.clone(), store, Arc::new(p2p_discovery::SystemClock));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    // Held while the server runs: one instance per relay key.
    let mut _key_lock = None;
    let relay = match relay {
        Some(opts) => {
            let key = opts.key.clone().unwrap_or(default_key);
            let (relay, lock) = bind_relay(&opts, &key, listen, addr)?;
            _key_lock = Some(lock);
            match opts.advertise {
                Some(public) => state.set_relay_at(&relay, public)?,
                None => state.set_relay(&relay)?,
            }
            Some(relay)
        }
        None => None,
    };
    println!("discovery server listening on http://{addr} ({described})");
    if let Some((soft, _)) = p2p_discovery::nofile_limit() {
        println!(
            "open-file limit {soft}: up to {} connections, {} per client address",
            p2p_discovery::connection_cap(config.max_connections, Some(soft)),
            config.max_connections_per_ip
        );
    }
    match &relay {
        Some(r) => println!(
            "relay listening on udp {} (relay id {}); --no-relay turns it off",
            r.local_addr()?,
            r.node_id()
        ),
        None => println!(
            "no relay (--no-relay): nodes behind NATs reach each other only through the mailbox"
        ),
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let signals = {
        let stop = stop.clone();
        async move {
            signals.recv().await;
            stop.cancel();
        }
    };
    let relay_task = {
        let stop = stop.clone();
        async move {
            if let Some(relay) = relay {
                relay.serve(stop.cancelled_owned()).await;
            }
        }
    };
    let shutdown = stop.clone().cancelled_owned();
    let (served, (), ()) = tokio::join!(
        async {
            let r = p2p_discovery::serve(listener, state, shutdown).await;
            stop.cancel();
            r
        },
        relay_task,
        async {
            tokio::select! {
                _ = signals => {}
                _ = stop.cancelled() => {}
            }
        }
    );
    served?;
    println!("discovery server stopped");
    Ok(())
}
