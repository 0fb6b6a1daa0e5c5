//! Figure 10: discovery on PostgreSQL, one instance against two on the same database and
//! against redb, and presence on a local Mainline DHT (publish and resolve times).
//!
//! Every server is our discovery server on a runtime of its own (two worker threads);
//! PostgreSQL is a throwaway server with its durable defaults (fsync, synchronous
//! commit), like redb's durable commits. With two instances the load alternates between
//! them. Skipped (with a note) when PostgreSQL is not installed.

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Result};
use p2p_crypto::SecretKey;
use p2p_discovery::Client;
use tokio::task::JoinSet;

use crate::{
    discovery::{rate, wait_http, OwnServer},
    messaging::order,
    report::{median, Row, Target},
    Config,
};

/// Records announced before the lookups.
const POPULATION: usize = 1000;
const TTL: Duration = Duration::from_secs(600);

/// Lookups/s and announces/s with `conc` requests in flight, spread over `clients`.
async fn measure(
    cfg: &Config,
    clients: &[Client],
    keys: &Arc<Vec<SecretKey>>,
) -> Result<(f64, f64, u64)> {
    let clients: Arc<Vec<Client>> = Arc::new(clients.to_vec());
    let (lookups, f1) = rate(cfg.disc_conc, cfg.phase, {
        let (clients, keys) = (clients.clone(), keys.clone());
        move |i| {
            let (clients, keys) = (clients.clone(), keys.clone());
            async move {
                let client = &clients[i % clients.len()];
                match client.lookup_id(&keys[i % keys.len()].public()).await? {
                    Some(_) => Ok(()),
                    None => bail!("lookup found nothing"),
                }
            }
        }
    })
    .await?;
    let (announces, f2) = rate(cfg.disc_conc, cfg.phase, {
        let (clients, keys) = (clients.clone(), keys.clone());
        move |i| {
            let (clients, keys) = (clients.clone(), keys.clone());
            async move {
                let client = &clients[i % clients.len()];
                let addr = format!("192.0.2.{}:4433", 1 + i % 250).parse()?;
                client
                    .announce(&keys[i % keys.len()], None, &[addr], TTL)
                    .await?;
                Ok(())
            }
        }
    })
    .await?;
    Ok((lookups, announces, f1 + f2))
}

/// Starts servers on `specs` and announces the population through them.
async fn servers(
    specs: &[Option<String>],
    keys: &Arc<Vec<SecretKey>>,
) -> Result<(Vec<OwnServer>, Vec<Client>)> {
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    let http = reqwest::Client::new();
    for spec in specs {
        let s = OwnServer::start_on(spec.clone())?;
        wait_http(
            &http,
            &format!("{}/healthz", s.url),
            Duration::from_secs(30),
        )
        .await?;
        clients.push(Client::new(&s.url)?);
        servers.push(s);
    }
    let mut set = JoinSet::new();
    for chunk in 0..32 {
        let (client, keys) = (clients[chunk % clients.len()].clone(), keys.clone());
        set.spawn(async move {
            for i in (chunk..keys.len()).step_by(32) {
                let addr = format!("192.0.2.{}:4433", 1 + i % 250).parse()?;
                client.announce(&keys[i], None, &[addr], TTL).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok((servers, clients))
}

async fn stop(servers: Vec<OwnServer>) -> Result<()> {
    // Joining a server's thread blocks.
    tokio::task::spawn_blocking(move || drop(servers)).await?;
    Ok(())
}

/// Figure 10.
pub async fn run(cfg: &Config, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let conc = cfg.disc_conc;
    let mut rows = vec![
        Row::new(
            format!("10. lookups/s, PostgreSQL: 2 instances vs 1, {conc} concurrent"),
            "req/s",
            Target::None,
        ),
        Row::new(
            format!("10. announces/s, PostgreSQL: 2 instances vs 1, {conc} concurrent"),
            "req/s",
            Target::None,
        ),
        Row::new(
            "10. lookups/s, PostgreSQL (1 instance) vs redb",
            "req/s",
            Target::None,
        ),
        Row::new(
            "10. announces/s, PostgreSQL (1 instance) vs redb",
            "req/s",
            Target::None,
        ),
    ];
    let pg = tokio::task::spawn_blocking(p2p_tests::postgres::PgServer::start_durable).await?;
    let keys: Arc<Vec<SecretKey>> =
        Arc::new((0..POPULATION).map(|_| SecretKey::generate()).collect());
    let mut failed = 0;
    match &pg {
        None => {
            for r in &mut rows {
                r.missing = Some("PostgreSQL not installed".into());
            }
        }
        Some(pg) => {
            let dir = tempfile::tempdir()?;
            for run in 0..cfg.runs {
                let mut v = [(0.0, 0.0); 3];
                for phase in order(run, 3) {
                    let spec = |db: &str| Some(pg.create_database(db));
                    let specs = match phase {
                        0 => vec![spec(&format!("one{run}"))],
                        1 => {
                            let url = spec(&format!("two{run}"));
                            vec![url.clone(), url]
                        }
                        _ => vec![Some(
                            dir.path()
                                .join(format!("run{run}.redb"))
                                .to_string_lossy()
                                .into_owned(),
                        )],
                    };
                    let (servers, clients) = servers(&specs, &keys).await?;
                    let (l, a, f) = measure(cfg, &clients, &keys).await?;
                    failed += f;
                    v[phase] = (l, a);
                    stop(servers).await?;
                }
                let [one, two, redb] = v;
                rows[0].push(two.0, Some(one.0));
                rows[1].push(two.1, Some(one.1));
                rows[2].push(one.0, Some(redb.0));
                rows[3].push(one.1, Some(redb.1));
            }
        }
    }
    notes.push(format!(
        "Figure 10: {POPULATION} records announced before each phase, PostgreSQL {} with fsync on; failed requests: {failed}.",
        if pg.is_some() { "started by the bench" } else { "absent" }
    ));
    drop(pg);
    rows.extend(dht(cfg).await?);
    Ok(rows)
}

/// DHT publish and resolve times on an 8-node testnet on loopback.
async fn dht(cfg: &Config) -> Result<Vec<Row>> {
    let testnet = p2p_tests::dht::Testnet::start(8).await;
    let mut publish = Row::new(
        "10. DHT publish, 8-node local testnet (median of 10)",
        "ms",
        Target::None,
    );
    let mut resolve = Row::new(
        "10. DHT resolve by NodeId, 8-node local testnet (median of 10)",
        "ms",
        Target::None,
    );
    publish.missing = Some("no baseline".into());
    resolve.missing = Some("no baseline".into());
    for _ in 0..cfg.runs {
        let (mut p, mut r) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let config = p2p_node::DhtConfig {
                bootstrap: Some(testnet.bootstrap.clone()),
                bind: Some(std::net::Ipv4Addr::LOCALHOST),
                publish: false,
                ..p2p_node::DhtConfig::default()
            };
            let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
            let node = |dir: &tempfile::TempDir| {
                p2p_node::Node::builder(SecretKey::generate())
                    .data_dir(dir.path().join("n"))
                    .listen("127.0.0.1:0".parse().expect("addr"))
                    .in_memory_store(true)
                    .dht(config.clone())
                    .bind()
            };
            let (pubr, finder) = (node(&a).await?, node(&b).await?);
            let t = std::time::Instant::now();
            pubr.dht_publish().await?;
            p.push(t.elapsed().as_secs_f64() * 1e3);
            let t = std::time::Instant::now();
            let found = finder.dht_lookup(&pubr.node_id()).await?;
            r.push(t.elapsed().as_secs_f64() * 1e3);
            if found.addrs.is_empty() {
                bail!("the DHT record holds no address");
            }
            pubr.shutdown().await;
            finder.shutdown().await;
        }
        publish.push(median(&p), None);
        resolve.push(median(&r), None);
    }
    Ok(vec![publish, resolve])
}
