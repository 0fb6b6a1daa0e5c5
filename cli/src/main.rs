//! `p2p-node`: the command-line program of p2p-node. Thin: it parses arguments, sets up
//! logging and calls the libraries.

mod chat;
mod commands;
mod control;
mod discovery;
mod identity;
mod ops;
mod output;
mod running;
mod session;
mod tui;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// mimalloc, without transparent huge pages. glibc's malloc degrades as a discovery
/// server's heap grows (at 100 000 records a lookup cost 21.6 us of CPU instead of 11.3,
/// a quarter of it in malloc and its arena locks); mimalloc holds it at 13.6 us. With
/// huge pages the idle process took 29 MiB instead of 14 and lookups were slower.
/// BENCHMARKS.md, item 15.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Address a node serves discovery on for the LAN when no discovery option is given
/// (another port if this one is taken).
pub const DEFAULT_EMBEDDED_DISCOVERY: &str = "0.0.0.0:7117";

/// Peer-to-peer chat over QUIC, where who you are is an ed25519 key.
///
/// Run with no command for the interactive chat: full-screen when standard input and output
/// are a terminal, else line by line (for scripts).
///
/// With neither --discovery nor --embedded-discovery, nodes on one LAN find each other by
/// themselves: the chat and `listen` look for the LAN's discovery server with mDNS
/// (DNS-SD service _p2p-discovery._tcp) and use it; when there is none, they serve it
/// themselves on 0.0.0.0:7117 and advertise it. When two serve at once, the one with the
/// lower NodeId stays and the other hands its names and mailboxes over to it; when the
/// serving node leaves, another takes over. One-shot commands (send, peers, register,
/// history) look for 2 s and use what they find, or say that none was found. Every
/// advertisement is signed by the serving node's key; the server in use is shown with its
/// fingerprint. --no-mdns keeps to this machine instead.
#[derive(Debug, Parser)]
#[command(name = "p2p-node", version, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: Global,
    /// Chat line by line even on a terminal: read commands and messages from standard
    /// input, print one line per message or notice (as when input or output is not a
    /// terminal).
    #[arg(long)]
    plain: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Options shared by every command.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Directory holding this node's identity key, history and outbox.
    /// Default: the platform's per-user data directory (e.g. ~/.local/share/p2p-node).
    #[arg(long, global = true, env = "P2P_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// URL of the discovery server to use, e.g. http://192.168.1.20:7117.
    #[arg(
        long,
        global = true,
        env = "P2P_DISCOVERY",
        value_name = "URL",
        conflicts_with = "embedded_discovery"
    )]
    pub discovery: Option<String>,

    /// Run the discovery server inside this node on ADDR (TCP) and use it; others on the
    /// LAN point --discovery at it (it is not advertised with mDNS).
    #[arg(long, global = true, value_name = "ADDR")]
    pub embedded_discovery: Option<SocketAddr>,

    /// Do not look for (or advertise) a discovery server on the LAN with mDNS: serve
    /// discovery on 0.0.0.0:7117, or use the server already on that port of this machine
    /// (http://127.0.0.1:7117).
    #[arg(long, global = true, env = "P2P_NO_MDNS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_mdns: bool,

    /// UDP address for QUIC connections with other nodes. Default: 0.0.0.0:0 (any port).
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Use no relay: peers that cannot reach this node directly (both behind NATs, say)
    /// then reach it only through the mailbox. An embedded discovery server runs no
    /// relay either.
    #[arg(long, global = true)]
    pub no_relay: bool,

    /// Use the BitTorrent Mainline DHT: publish this node's addresses and relay there
    /// (signed with its key), and look peers up there by NodeId when discovery does not
    /// know them or is down. Off by default: it publishes your addresses in a public
    /// table and needs the internet, which a LAN-only setup has no use for.
    #[arg(long, global = true, env = "P2P_DHT", value_parser = clap::builder::BoolishValueParser::new())]
    pub dht: bool,

    /// File whose first line is the passphrase protecting the identity key.
    /// The passphrase may also be given in the environment as P2P_PASSPHRASE.
    #[arg(long, global = true, env = "P2P_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,

    /// More log output on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors in the log output.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this node's identity (an ed25519 key) in the data directory.
    ///
    /// Refuses to replace an existing identity unless --force is given: the identity is
    /// who you are to your contacts, and replacing it cannot be undone.
    Init {
        /// Replace an existing identity (and, with --import, an existing history).
        #[arg(long)]
        force: bool,
        /// Take the identity, and the history if it was exported with it, from a file
        /// written by `p2p-node export` (give its passphrase as usual).
        #[arg(long, value_name = "FILE")]
        import: Option<PathBuf>,
    },
    /// Protect the identity with a new passphrase (or change it), and encrypt the history.
    ///
    /// The current passphrase, if any, is given as usual (--passphrase-file or
    /// P2P_PASSPHRASE); the new one with --new-passphrase-file or P2P_NEW_PASSPHRASE.
    /// Adding a passphrase encrypts the history already stored; changing it rewrites only
    /// the key file. Interrupted at any point, the data directory opens with the old
    /// passphrase or the new one. No node may run on the data directory meanwhile.
    Passphrase {
        /// File whose first line is the new passphrase.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Write this identity to FILE, protected by the passphrase, to move it to another
    /// machine (`p2p-node init --import FILE` there).
    ///
    /// The passphrase (--passphrase-file or P2P_PASSPHRASE) is required: it opens the
    /// identity if protected, and protects the file. No node may run on the data
    /// directory meanwhile.
    Export {
        /// The file to write; it must not exist.
        file: PathBuf,
        /// Include the history (messages, outbox, contacts), encrypted.
        #[arg(long)]
        history: bool,
    },
    /// Print this node's id (its public key) alone on one line.
    ///
    /// Creates the identity first if there is none.
    Id,
    /// Claim NAME on the discovery server for this node's key.
    ///
    /// Names are first come, first served: once claimed, only this key can use it.
    /// Claiming your own name again is harmless.
    Register {
        /// 1 to 32 characters: lowercase letters, digits, '-' and '_'.
        name: String,
    },
    /// List the nodes online on the discovery server (name, NodeId, addresses).
    Peers {
        /// One JSON object per peer, one per line (name, node_id, addrs, relay, path).
        #[arg(long)]
        json: bool,
    },
    /// Send TEXT to a peer, by name or NodeId.
    ///
    /// Prints `delivered` when the peer acknowledged it (`delivered via relay` when the
    /// connection went through the relay), or where the message waits when the peer
    /// cannot be reached: `queued in the recipient's mailbox` (sealed to the peer's key
    /// on the discovery server: it arrives when the peer next starts, whether this node
    /// runs or not) or `queued in your outbox only` (it travels only while a node runs on
    /// this data directory: the chat, listen, or `p2p-node daemon`).
    ///
    /// While a node runs on the data directory, the message goes through it.
    Send {
        /// The peer's name or NodeId.
        to: String,
        /// The message text (quote it).
        text: String,
        /// Print one JSON object: {"status": "delivered"|"queued", "queued":
        /// "mailbox"|"outbox"|null, "path": "direct"|"relay"|null, "id": ..., "to": ...}.
        #[arg(long)]
        json: bool,
    },
    /// Run a headless node: log in, receive, and print one line per event until SIGINT or
    /// SIGTERM, then log out.
    Listen {
        /// One JSON object per line (event, from, from_name, id, text, timestamps, ...).
        #[arg(long)]
        json: bool,
    },
    /// Show the conversation with a peer, oldest first.
    History {
        /// The peer's name or NodeId.
        peer: String,
        /// How many of the most recent messages to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per message, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Keep a node running in the background, so that messages queued in its outbox
    /// travel and others reach you while no chat or listen runs.
    ///
    /// It logs in as `listen` does, with no terminal (its log goes to daemon.log in the
    /// data directory), and answers the other commands on this data directory (send,
    /// history, peers, register, status) through its control socket. `p2p-node stop`
    /// stops it.
    Daemon {
        /// Run in this process instead of in the background (for a service manager).
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the background node (or `listen`) running on this data directory.
    Stop,
    /// Whether a node runs on this data directory, its discovery, connections and outbox.
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run a standalone discovery server, with its relay.
    ///
    /// The relay lets nodes that cannot reach each other directly (both behind NATs)
    /// talk in real time: it forwards their end-to-end encrypted QUIC packets and sees
    /// only ciphertext. It listens on UDP at the same address and port as the HTTP
    /// server (e.g. UDP 7117 beside TCP 7117), or at --relay-listen; --no-relay turns it
    /// off.
    ///
    /// With --store postgres://..., any number of servers on one database serve the same
    /// users at once (put them behind any HTTP load balancer); each runs its own relay,
    /// with its own key.
    Discovery {
        /// TCP address to serve HTTP on, e.g. 0.0.0.0:7117.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// redb database for names and mailboxes (kept across restarts).
        /// Default: discovery.redb in the data directory.
        #[arg(long, value_name = "PATH", conflicts_with = "store")]
        db: Option<PathBuf>,
        /// Where to keep names, mailboxes and presence: a PostgreSQL URL
        /// (postgres://USER:PASSWORD@HOST:PORT/DBNAME, shared by every instance on it), or
        /// the path of a redb file (as --db). Give a password in the environment
        /// (P2P_DISCOVERY_STORE) rather than on the command line.
        #[arg(long, env = "P2P_DISCOVERY_STORE", value_name = "URL|PATH")]
        store: Option<String>,
        /// UDP address of the relay. Default: the --listen address, on UDP.
        #[arg(long, value_name = "ADDR", conflicts_with = "no_relay")]
        relay_listen: Option<SocketAddr>,
        /// The relay's identity key (created on first start, mode 0600; one instance
        /// at a time may use it). Default: relay.key beside the redb database, or in the
        /// data directory with PostgreSQL.
        #[arg(long, value_name = "PATH")]
        relay_key: Option<PathBuf>,
        /// Sustained write requests per second allowed from one client address.
        #[arg(long, value_name = "N", default_value_t = 5.0)]
        write_rate: f64,
        /// Burst of write requests allowed from one client address.
        #[arg(long, value_name = "N", default_value_t = 60)]
        write_burst: u32,
        /// The UDP address nodes reach this server's relay at, when it is not this
        /// server's own address as nodes see it (an instance behind an HTTP load
        /// balancer: give its own public address and relay port).
        #[arg(long, value_name = "ADDR", conflicts_with = "no_relay")]
        relay_advertise: Option<SocketAddr>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Long-running commands log warnings; one-shot commands report their own outcome
    // (and a one-line error), so background retries stay quiet unless -v is given.
    let long_running = matches!(
        cli.command,
        None | Some(Command::Listen { .. })
            | Some(Command::Discovery { .. })
            | Some(Command::Daemon { .. })
    );
    // The full-screen chat shows the log on its screen; anything on stderr would land in
    // the middle of it.
    let full_screen = cli.command.is_none()
        && !cli.plain
        && std::io::stdin().is_terminal()
        && std::io::stdout().is_terminal();
    let logs = if full_screen {
        let (sink, logs) = tui::log_sink();
        init_logging(&cli.global, long_running, sink, false);
        Some(logs)
    } else {
        init_logging(
            &cli.global,
            long_running,
            std::io::stderr,
            colour_on_stderr(),
        );
        None
    };
    if long_running {
        raise_open_file_limit();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("p2p-node: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli, logs));
    // Do not wait for stuck blocking reads of stdin.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2p-node: error: {}", output::one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-file limit to the hard one where allowed, so a discovery server
/// (standalone or embedded) can hold more connections; says so in the log.
fn raise_open_file_limit() {
    match p2p_discovery::raise_nofile_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "raised the open-file limit");
        }
        Ok((_, limit)) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Whether the log on stderr may be coloured: only on a terminal, and never with a
/// non-empty `NO_COLOR`.
fn colour_on_stderr() -> bool {
    colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Colour on a terminal unless `NO_COLOR` is set and not empty (no-color.org).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs to `writer`; `escapes` allows terminal colour codes.
fn init_logging<W>(g: &Global, long_running: bool, writer: W, escapes: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let default = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 if long_running => "warn",
            0 => "error",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    // A data directory's one-time move to the current storage format is announced
    // unless --quiet: on a large history it takes seconds.
    let default = if g.quiet || g.verbose > 0 {
        default.to_owned()
    } else {
        format!("{default},{}=info", p2p_node::store::FORMAT_LOG_TARGET)
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = builder.with_ansi(escapes).try_init();
}

async fn run(cli: Cli, logs: Option<tokio::sync::mpsc::Receiver<String>>) -> Result<()> {
    let g = cli.global;
    let paths = identity::Paths::new(g.data_dir.clone())?;
    match cli.command {
        Some(Command::Init { force, import }) => {
            let pass = identity::passphrase(g.passphrase_file.as_deref())?;
            let pass = pass.as_ref().map(|p| p.as_slice());
            match import {
                Some(file) => identity::import(&paths, pass, &file, force),
                None => identity::init(&paths, pass, force),
            }
        }
        Some(Command::Passphrase {
            new_passphrase_file,
        }) => {
            let old = identity::passphrase(g.passphrase_file.as_deref())?;
            let new = identity::new_passphrase(new_passphrase_file.as_deref())?;
            identity::change_passphrase(&paths, old.as_ref().map(|p| p.as_slice()), &new)
        }
        Some(Command::Export { file, history }) => {
            let pass = identity::passphrase(g.passphrase_file.as_deref())?;
            identity::export(&paths, pass.as_ref().map(|p| p.as_slice()), &file, history)
        }
        Some(Command::Id) => {
            let pass = identity::passphrase(g.passphrase_file.as_deref())?;
            let (key, _) = identity::load_or_create(&paths, pass.as_ref().map(|p| p.as_slice()))?;
            println!("{}", key.public());
            Ok(())
        }
        Some(Command::Register { name }) => commands::register(&g, &paths, &name).await,
        Some(Command::Peers { json }) => commands::peers(&g, &paths, json).await,
        Some(Command::Send { to, text, json }) => {
            commands::send(&g, &paths, &to, &text, json).await
        }
        Some(Command::Listen { json }) => commands::listen(&g, &paths, json).await,
        Some(Command::Daemon { foreground: false }) => commands::daemon(&paths).await,
        Some(Command::Daemon { foreground: true }) => commands::daemon_foreground(&g, &paths).await,
        Some(Command::Stop) => commands::stop(&paths).await,
        Some(Command::Status { json }) => commands::status(&g, &paths, json).await,
        Some(Command::History { peer, limit, json }) => {
            commands::history(&g, &paths, &peer, limit, json).await
        }
        Some(Command::Discovery {
            listen,
            db,
            store,
            relay_listen,
            relay_key,
            write_rate,
            write_burst,
            relay_advertise,
        }) => {
            let relay = (!g.no_relay).then_some(commands::RelayOptions {
                listen: relay_listen.unwrap_or(listen),
                key: relay_key,
                advertise: relay_advertise,
            });
            let limits = commands::WriteLimits {
                per_sec: write_rate,
                burst: write_burst,
            };
            let store = match (store, db) {
                (Some(s), _) if p2p_discovery::is_postgres_url(&s) => {
                    commands::StoreChoice::Postgres(s)
                }
                (Some(path), _) => commands::StoreChoice::Redb(Some(PathBuf::from(path))),
                (None, db) => commands::StoreChoice::Redb(db),
            };
            commands::discovery(&paths, listen, store, relay, limits).await
        }
        None => match logs {
            Some(logs) => tui::run(&g, &paths, logs).await,
            None => chat::run(&g, &paths).await,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::colour;

    #[test]
    fn the_log_is_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR does not count"
        );
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None), "a file or a pipe");
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
