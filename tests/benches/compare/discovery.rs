//! Figure 6: the discovery server against syncthing's (`stdiscosrv`), both on loopback,
//! each in a process (or runtime) of its own, measured in the same run.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use p2p_crypto::SecretKey;
use p2p_discovery::{AppState, Client, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::{sync::oneshot, task::JoinSet};

use crate::{
    load::closed_loop,
    messaging::order,
    report::{Row, Target},
    Config,
};

/// Records (ours) and devices (syncthing's) announced before the lookups.
const POPULATION: usize = 1000;
const TTL: Duration = Duration::from_secs(600);

/// Our discovery server on a runtime (two worker threads) of its own, as if it were its
/// own process, with the per-IP write rate limit lifted: the load comes from one IP.
pub struct OwnServer {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OwnServer {
    fn start() -> Result<OwnServer> {
        Self::start_on(None)
    }

    /// A server on the store `spec` names (`p2p_discovery::open_store`: a PostgreSQL URL
    /// or a redb path), or in memory.
    pub fn start_on(spec: Option<String>) -> Result<OwnServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("discovery-server".into())
            .spawn(move || {
                let served = (|| -> Result<()> {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("discovery-worker")
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let config = ServerConfig {
                            write_rate_per_sec: 1e9,
                            write_burst: u32::MAX,
                            // Every client of the figure runs on this one address: the
                            // verifying client's pool and wrk's connections together
                            // pass the per-IP cap meant for one abusive peer.
                            max_connections_per_ip: 1024,
                            ..ServerConfig::default()
                        };
                        let state = match spec {
                            None => AppState::open(config)?,
                            Some(spec) => AppState::new(
                                config,
                                p2p_discovery::open_store(&spec).await?,
                                Arc::new(p2p_discovery::SystemClock),
                            ),
                        };
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        p2p_discovery::serve(listener, state, async move {
                            let _ = stopped.await;
                        })
                        .await?;
                        Ok(())
                    })
                })();
                if let Err(e) = served {
                    eprintln!("discovery server failed: {e:#}");
                }
            })?;
        Ok(OwnServer {
            url,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released) for a server that cannot bind
/// port 0 itself.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `stdiscosrv` on 127.0.0.1 in plain HTTP mode with a temporary database. Killed (by
/// its pid, through `Child`) when dropped.
struct Syncthing {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Syncthing {
    /// `Ok(None)` if `stdiscosrv` is not installed.
    fn start() -> Result<Option<Syncthing>> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let repl = free_port()?;
        let log = std::fs::File::create(dir.path().join("stdiscosrv.log"))?;
        let spawned = Command::new("stdiscosrv")
            .arg("-http")
            .arg("-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-replication-listen")
            .arg(format!("127.0.0.1:{repl}"))
            .arg("-db-dir")
            .arg(dir.path().join("db"))
            .arg("-cert")
            .arg(dir.path().join("cert.pem"))
            .arg("-key")
            .arg(dir.path().join("key.pem"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("starting stdiscosrv"),
        };
        Ok(Some(Syncthing {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }))
    }
}

impl Drop for Syncthing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A syncthing device: a self-signed certificate, its device ID, and the certificate as
/// a TLS-terminating proxy passes it in `X-SSL-Cert` (URL-escaped PEM).
struct Device {
    id: String,
    cert_header: String,
}

impl Device {
    fn generate() -> Result<Device> {
        let ck = rcgen::generate_simple_self_signed(vec!["syncthing".to_string()])?;
        Ok(Device {
            id: device_id(ck.cert.der()),
            cert_header: url_escape(&ck.cert.pem()),
        })
    }
}

/// Syncthing's device ID of a certificate: SHA-256 of the DER, base32 without padding,
/// a Luhn mod 32 check character after each 13 characters, in groups of 7 joined by '-'.
fn device_id(der: &[u8]) -> String {
    let b32 = data_encoding::BASE32_NOPAD.encode(&Sha256::digest(der));
    let mut luhnified = String::with_capacity(56);
    for part in b32.as_bytes().chunks(13) {
        luhnified.push_str(std::str::from_utf8(part).unwrap_or_default());
        luhnified.push(luhn32(part));
    }
    luhnified
        .as_bytes()
        .chunks(7)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("-")
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Syncthing's Luhn mod 32 check character.
fn luhn32(s: &[u8]) -> char {
    let n = 32;
    let mut factor = 1;
    let mut sum = 0;
    for c in s {
        let code = BASE32.iter().position(|b| b == c).unwrap_or(0);
        let addend = factor * code;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / n + addend % n;
    }
    BASE32[(n - sum % n) % n] as char
}

fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Polls `url` until the server answers at all (any HTTP status), for at most `timeout`.
pub async fn wait_http(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if http.get(url).send().await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{url} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn syncthing_announce(http: &reqwest::Client, url: &str, d: &Device, i: usize) -> Result<()> {
    let body = format!(r#"{{"addresses":["tcp://192.0.2.{}:22000"]}}"#, 1 + i % 250);
    let resp = http
        .post(format!("{url}/v2/"))
        .header("X-SSL-Cert", &d.cert_header)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("syncthing announce: HTTP {}", resp.status());
    }
    Ok(())
}

async fn syncthing_lookup(http: &reqwest::Client, url: &str, d: &Device) -> Result<()> {
    let resp = http
        .get(format!("{url}/v2/?device={}", d.id))
        .send()
        .await?;
    if resp.status() != reqwest::StatusCode::OK {
        bail!("syncthing lookup: HTTP {}", resp.status());
    }
    let v: serde_json::Value = resp.json().await?;
    if v.get("addresses").and_then(|a| a.as_array()).is_none() {
        bail!("syncthing lookup without addresses");
    }
    Ok(())
}

/// Runs `op(i)` (i counting up) with `conc` workers for `dur`; failed operations are
/// counted, not fatal. Returns (successes per second, failures).
pub async fn rate<F, Fut>(conc: usize, dur: Duration, op: F) -> Result<(f64, u64)>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = closed_loop(conc, dur, usize::MAX, {
        let failed = failed.clone();
        move |_| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let (op, failed) = (op.clone(), failed.clone());
            async move {
                if op(i).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    })
    .await?;
    let failed = failed.load(Ordering::Relaxed);
    let ok = (load.ops as u64).saturating_sub(failed);
    Ok((ok as f64 / load.elapsed.as_secs_f64(), failed))
}

/// Lookups of `ids` in turn through the verifying client: (per second, failed).
async fn lookup_rate(
    client: &Client,
    ids: Arc<Vec<p2p_crypto::NodeId>>,
    conc: usize,
    dur: Duration,
) -> Result<(f64, u64)> {
    let client = client.clone();
    rate(conc, dur, move |i| {
        let (client, ids) = (client.clone(), ids.clone());
        async move {
            match client.lookup_id(&ids[i % ids.len()]).await? {
                Some(_) => Ok(()),
                None => bail!("lookup found nothing"),
            }
        }
    })
    .await
}

/// What one wrk run measured.
pub struct Wrk {
    pub per_sec: f64,
    pub bad: u64,
}

pub fn wrk_installed() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `wrk -t1 -c{conc}` for `secs` seconds, GET on each of `paths` in turn.
pub async fn wrk(base: &str, paths: &[String], conc: usize, secs: u64, dir: &Path) -> Result<Wrk> {
    let script = dir.join(format!("paths-{}.lua", free_port()?));
    let mut lua = String::from("local paths = {\n");
    for p in paths {
        lua.push_str(&format!("  \"{p}\",\n"));
    }
    lua.push_str(
        "}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  if i > #paths then i = 1 end\n  \
         return wrk.format(\"GET\", paths[i])\nend\n",
    );
    std::fs::write(&script, lua)?;
    let mut cmd = Command::new("wrk");
    cmd.arg("-t1")
        .arg(format!("-c{conc}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(&script)
        .arg(format!("{base}/"))
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let per_sec = field("Requests/sec:").context("no Requests/sec in wrk's output")?;
    let mut bad = field("Non-2xx or 3xx responses:").unwrap_or(0.0) as u64;
    if let Some(line) = text
        .lines()
        .find(|l| l.trim().starts_with("Socket errors:"))
    {
        bad += line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(Wrk { per_sec, bad })
}

/// `BENCH_PROFILE=lookups`: figure 6's raw HTTP lookups on our server alone, wrk for
/// four phases; `lookups-client`: the same through the verifying client; `None` for
/// another workload.
pub async fn profile(cfg: &Config, what: &str) -> Result<Option<String>> {
    if what != "lookups" && what != "lookups-client" {
        return Ok(None);
    }
    if what == "lookups" && !wrk_installed() {
        bail!("BENCH_PROFILE=lookups needs wrk");
    }
    let tmp = tempfile::tempdir()?;
    let own = OwnServer::start()?;
    let client = Client::new(&own.url)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    wait_http(
        &http,
        &format!("{}/healthz", own.url),
        Duration::from_secs(10),
    )
    .await?;
    let keys: Vec<SecretKey> = (0..POPULATION).map(|_| SecretKey::generate()).collect();
    for (i, key) in keys.iter().enumerate() {
        let addr = format!("192.0.2.{}:4433", 1 + i % 250).parse()?;
        client.announce(key, None, &[addr], TTL).await?;
    }
    let paths: Vec<String> = keys
        .iter()
        .map(|k| format!("/v1/peers/{}", k.public()))
        .collect();
    let secs = (cfg.phase.as_secs_f64() * 4.0).ceil().max(1.0) as u64;
    eprintln!("profile: measuring");
    let (per_sec, bad, by) = if what == "lookups" {
        let w = wrk(&own.url, &paths, cfg.disc_conc, secs, tmp.path()).await?;
        (w.per_sec, w.bad, "wrk -t1")
    } else {
        let ids = Arc::new(keys.iter().map(|k| k.public()).collect());
        let secs = Duration::from_secs(secs);
        let (r, f) = lookup_rate(&client, ids, cfg.disc_conc, secs).await?;
        (r, f, "the verifying client")
    };
    eprintln!("profile: done");
    crate::profile_hold();
    drop((client, http));
    tokio::task::spawn_blocking(move || drop(own)).await?;
    Ok(Some(format!(
        "{what}: {per_sec:.0} req/s over {secs} s with {by}, {} at once, {bad} failed",
        cfg.disc_conc
    )))
}

/// Figure 6.
pub async fn run(cfg: &Config, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let conc = cfg.disc_conc;
    let dur = cfg.phase;
    let wrk_secs = cfg.phase.as_secs_f64().ceil().max(1.0) as u64;
    let tmp = tempfile::tempdir()?;
    let own = OwnServer::start()?;
    let client = Client::new(&own.url)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    wait_http(
        &http,
        &format!("{}/healthz", own.url),
        Duration::from_secs(10),
    )
    .await?;

    // Our population: POPULATION signed presence records.
    let keys: Arc<Vec<SecretKey>> =
        Arc::new((0..POPULATION).map(|_| SecretKey::generate()).collect());
    let mut set = JoinSet::new();
    for chunk in 0..conc {
        let (client, keys) = (client.clone(), keys.clone());
        set.spawn(async move {
            for i in (chunk..keys.len()).step_by(conc) {
                let addr = format!("192.0.2.{}:4433", 1 + i % 250).parse()?;
                client.announce(&keys[i], None, &[addr], TTL).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let ids: Arc<Vec<p2p_crypto::NodeId>> = Arc::new(keys.iter().map(|k| k.public()).collect());

    // Syncthing's population: POPULATION devices announced through the proxy header.
    let syncthing = Syncthing::start()?;
    let mut devices = Arc::new(Vec::new());
    if let Some(st) = &syncthing {
        let probe = Device::generate()?;
        wait_http(
            &http,
            &format!("{}/v2/?device={}", st.url, probe.id),
            Duration::from_secs(20),
        )
        .await?;
        let mut list = Vec::with_capacity(POPULATION);
        for _ in 0..POPULATION {
            list.push(Device::generate()?);
        }
        devices = Arc::new(list);
        let mut set = JoinSet::new();
        for chunk in 0..conc {
            let (http, url, devices) = (http.clone(), st.url.clone(), devices.clone());
            set.spawn(async move {
                for i in (chunk..devices.len()).step_by(conc) {
                    syncthing_announce(&http, &url, &devices[i], i).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        syncthing_lookup(&http, &st.url, &devices[0])
            .await
            .context("a device announced to stdiscosrv cannot be looked up")?;
    }
    let have_wrk = wrk_installed();
    let missing_st = "stdiscosrv not installed".to_string();

    let mut lookups = Row::new(
        format!("6. discovery lookups/s, verifying client, {conc} concurrent (syncthing: same reqwest loop)"),
        "req/s",
        Target::AtLeast(1.0),
    );
    let mut announces = Row::new(
        format!(
            "6. discovery announces/s, signed + verified, {conc} concurrent (syncthing: same loop)"
        ),
        "req/s",
        Target::None,
    );
    let mut raw = Row::new(
        format!("6. raw HTTP lookups/s, wrk -t1 -c{conc} (ours vs syncthing)"),
        "req/s",
        Target::AtLeast(2.0),
    );
    if syncthing.is_none() {
        lookups.missing = Some(missing_st.clone());
        announces.missing = Some(missing_st.clone());
        raw.missing = Some(missing_st);
    }
    if !have_wrk {
        raw.missing = Some("wrk not installed".into());
    }
    let our_paths: Vec<String> = ids.iter().map(|id| format!("/v1/peers/{id}")).collect();
    let st_paths: Vec<String> = devices
        .iter()
        .map(|d| format!("/v2/?device={}", d.id))
        .collect();
    let mut failures: [u64; 6] = [0; 6];
    for run in 0..cfg.runs {
        let mut v = [None::<f64>; 6];
        for phase in order(run, 6) {
            match phase {
                0 => {
                    let (r, f) = lookup_rate(&client, ids.clone(), conc, dur).await?;
                    v[0] = Some(r);
                    failures[0] += f;
                }
                1 => {
                    let (client, keys) = (client.clone(), keys.clone());
                    let (r, f) = rate(conc, dur, move |i| {
                        let (client, keys) = (client.clone(), keys.clone());
                        async move {
                            let addr = format!("192.0.2.{}:4433", 1 + i % 250).parse()?;
                            client
                                .announce(&keys[i % keys.len()], None, &[addr], TTL)
                                .await?;
                            Ok(())
                        }
                    })
                    .await?;
                    v[1] = Some(r);
                    failures[1] += f;
                }
                2 if have_wrk => {
                    let w = wrk(&own.url, &our_paths, conc, wrk_secs, tmp.path()).await?;
                    v[2] = Some(w.per_sec);
                    failures[2] += w.bad;
                }
                3 => {
                    if let Some(st) = &syncthing {
                        let (http, url, devices) = (http.clone(), st.url.clone(), devices.clone());
                        let (r, f) = rate(conc, dur, move |i| {
                            let (http, url, devices) = (http.clone(), url.clone(), devices.clone());
                            async move {
                                syncthing_lookup(&http, &url, &devices[i % devices.len()]).await
                            }
                        })
                        .await?;
                        v[3] = Some(r);
                        failures[3] += f;
                    }
                }
                4 => {
                    if let Some(st) = &syncthing {
                        let (http, url, devices) = (http.clone(), st.url.clone(), devices.clone());
                        let (r, f) = rate(conc, dur, move |i| {
                            let (http, url, devices) = (http.clone(), url.clone(), devices.clone());
                            async move {
                                let d = &devices[i % devices.len()];
                                syncthing_announce(&http, &url, d, i).await
                            }
                        })
                        .await?;
                        v[4] = Some(r);
                        failures[4] += f;
                    }
                }
                5 if have_wrk => {
                    if let Some(st) = &syncthing {
                        let w = wrk(&st.url, &st_paths, conc, wrk_secs, tmp.path()).await?;
                        v[5] = Some(w.per_sec);
                        failures[5] += w.bad;
                    }
                }
                _ => {}
            }
        }
        lookups.push(v[0].unwrap_or(0.0), v[3]);
        announces.push(v[1].unwrap_or(0.0), v[4]);
        if let Some(ours) = v[2] {
            raw.push(ours, v[5]);
        }
    }
    let names = [
        "our lookups",
        "our announces",
        "wrk on ours",
        "syncthing lookups",
        "syncthing announces",
        "wrk on syncthing",
    ];
    let failed: Vec<String> = names
        .iter()
        .zip(failures)
        .filter(|(_, f)| *f > 0)
        .map(|(n, f)| format!("{n}: {f}"))
        .collect();
    notes.push(format!(
        "Figure 6: {POPULATION} records/devices announced before the lookups; failed requests \
         (not counted in the rates): {}.",
        if failed.is_empty() {
            "none".to_string()
        } else {
            failed.join(", ")
        }
    ));
    drop(syncthing);
    drop(client);
    drop(http);
    // Joining the server's thread blocks.
    tokio::task::spawn_blocking(move || drop(own)).await?;
    Ok(vec![lookups, announces, raw])
}
