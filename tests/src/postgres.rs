//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a temporary
//! directory, `postgres` listening on 127.0.0.1 on a free port (found by binding port 0
//! and releasing it; a clash is retried on another), run as an unprivileged user when
//! the tests run as root (postgres refuses root), and stopped by its pid when dropped,
//! also when a test fails.
//!
//! The binaries are looked up in `P2P_PG_BIN`, then beside `initdb` on `PATH`, then in
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package). Without them
//! [`PgServer::start`] returns `None` after saying why, unless `P2P_REQUIRE_POSTGRES=1`
//! (as CI sets it), where it panics.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long the server may take to start or stop.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running throwaway PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    child: Option<Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    owner: Option<(u32, u32)>,
    durable: bool,
}

/// Where the PostgreSQL binaries are, if anywhere.
pub fn pg_bin_dir() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("P2P_PG_BIN").map(PathBuf::from) {
        return has(&dir).then_some(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let initdb = d.join("initdb");
            if let Ok(real) = std::fs::canonicalize(&initdb) {
                if let Some(dir) = real.parent().filter(|d| has(d)) {
                    return Some(dir.to_path_buf());
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// Whether a missing PostgreSQL must fail the test rather than skip it.
pub fn postgres_required() -> bool {
    std::env::var("P2P_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The uid and gid of `nobody`, to run the server as when we are root.
fn unprivileged() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"nobody"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl PgServer {
    /// A server tuned for tests (no fsync: a crash of the machine loses it, which a
    /// throwaway server does not mind), or `None` when PostgreSQL is not installed.
    pub fn start() -> Option<PgServer> {
        Self::start_with(false)
    }

    /// A server with PostgreSQL's durable defaults (fsync, synchronous commit), for
    /// benchmarks that compare it with other durable stores.
    pub fn start_durable() -> Option<PgServer> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Option<PgServer> {
        let Some(bin) = pg_bin_dir() else {
            let why = "PostgreSQL binaries (initdb, postgres) not found in P2P_PG_BIN, on \
                       PATH or in /usr/lib/postgresql/*/bin; install the postgresql package";
            assert!(!postgres_required(), "P2P_REQUIRE_POSTGRES=1: {why}");
            eprintln!("skipping the PostgreSQL part of this test: {why}");
            return None;
        };
        let owner = unprivileged();
        let dir = tempfile::Builder::new()
            .prefix("p2p-pg-")
            .tempdir()
            .expect("temporary directory");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let mut server = PgServer {
            child: None,
            bin,
            dir,
            port: 0,
            owner,
            durable,
        };
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(server.data_dir()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
            // 1 MiB WAL segments instead of 16: a test server writes little, and the
            // disk of a CI machine is shared.
            "--wal-segsize=1",
        ]);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server.launch();
        Some(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command for one of the binaries, as the server's user.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.stdin(Stdio::null()).current_dir(self.dir.path());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// A client program (`createdb`, `pg_isready`) aimed at the server as `postgres`.
    fn client_command(&self, name: &str) -> Command {
        let mut cmd = self.command(name);
        let port = self.port.to_string();
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
        cmd
    }

    /// Starts `postgres` on a free port (another one if the port was taken meanwhile)
    /// and waits until it accepts connections.
    fn launch(&mut self) {
        for _ in 0..5 {
            let port = if self.port == 0 {
                free_port()
            } else {
                self.port
            };
            let log = std::fs::File::create(self.dir.path().join("postgres.log")).expect("log");
            if let Some((uid, gid)) = self.owner {
                let _ = std::os::unix::fs::chown(
                    self.dir.path().join("postgres.log"),
                    Some(uid),
                    Some(gid),
                );
            }
            let mut cmd = self.command("postgres");
            cmd.arg("-D")
                .arg(self.data_dir())
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-p", &port.to_string()])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "max_connections=200"])
                .args(["-c", "min_wal_size=4MB", "-c", "max_wal_size=32MB"])
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            if !self.durable {
                cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                    .args(["-c", "full_page_writes=off"]);
            }
            let child = cmd.spawn().expect("spawn postgres");
            self.child = Some(child);
            self.port = port;
            if self.wait_ready() {
                return;
            }
            // It exited (the port was taken meanwhile): try another port.
            self.child = None;
            self.port = 0;
        }
        panic!("postgres did not start; log:\n{}", self.log());
    }

    /// Waits until the server accepts connections (`true`) or exits (`false`).
    fn wait_ready(&mut self) -> bool {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            let ready = self
                .client_command("pg_isready")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres not ready within {DEADLINE:?}; log:\n{}",
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The TCP port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pid of the server (the postmaster), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The URL of database `db` as the superuser `postgres` (trusted on loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let out = self
            .client_command("createdb")
            .arg(name)
            .output()
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    /// Stops the server (a fast shutdown: SIGINT to its pid), waiting until it exited;
    /// SIGKILL if it does not within the deadline.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.launch();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
