//! `p2p-node`: the command-line program of p2p-node. Thin: it parses arguments, sets up
//! logging and calls the libraries.

mod identity;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// A peer-to-peer chat node: QUIC between peers, identity = an ed25519 key.
#[derive(Debug, Parser)]
#[command(name = "p2p-node", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every command.
#[derive(Debug, Args)]
struct Global {
    /// Directory holding this node's identity key, history and outbox.
    /// Default: the platform's per-user data directory (e.g. ~/.local/share/p2p-node).
    #[arg(long, global = true, env = "P2P_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// File whose first line is the passphrase protecting the identity key.
    /// The passphrase may also be given in the environment as P2P_PASSPHRASE.
    #[arg(long, global = true, env = "P2P_PASSPHRASE_FILE", value_name = "FILE")]
    passphrase_file: Option<PathBuf>,

    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only errors in the log output.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this node's identity (an ed25519 key) in the data directory.
    ///
    /// Refuses to replace an existing identity unless --force is given: the identity is
    /// who you are to your contacts, and replacing it cannot be undone.
    Init {
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Print this node's id (its public key) alone on one line.
    ///
    /// Creates the identity first if there is none.
    Id,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.global);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2p-node: error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

fn init_logging(g: &Global) {
    let default = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    let paths = identity::Paths::new(cli.global.data_dir.clone())?;
    let passphrase = identity::passphrase(cli.global.passphrase_file.as_deref())?;
    match cli.command {
        Command::Init { force } => {
            identity::init(&paths, passphrase.as_ref().map(|p| p.as_slice()), force)
        }
        Command::Id => {
            let key = identity::load_or_create(&paths, passphrase.as_ref().map(|p| p.as_slice()))?;
            println!("{}", key.public());
            Ok(())
        }
    }
}
