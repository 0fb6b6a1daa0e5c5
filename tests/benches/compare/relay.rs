//! Figure 9: messaging through the relay against direct, and how soon hole punching
//! moves a new connection from the relay to a direct path.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use p2p_node::{NodeEvent, PathKind};

use crate::{
    load::{closed_loop, one_at_a_time, Load},
    messaging::{order, SMALL},
    nodes::{send_delivered, wait_event, BenchNode, Discovery, Opts},
    report::{median, ms, Row, Target},
    Config,
};

/// Longest wait for relay links and for a direct path.
const WAIT: Duration = Duration::from_secs(20);

/// Waits until `node` is announced and its link to its relay is up.
async fn relay_up(node: &BenchNode) -> Result<()> {
    if !node.node.wait_announced(WAIT).await {
        bail!("not announced within {WAIT:?}");
    }
    let deadline = Instant::now() + WAIT;
    while !node.node.home_relay().connected {
        if Instant::now() > deadline {
            bail!("no relay link within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A pair of nodes, started with `opts`, their relay links up and connected.
async fn pair(opts: Opts<'_>) -> Result<(BenchNode, BenchNode)> {
    let (a, b) = (BenchNode::start(opts).await?, BenchNode::start(opts).await?);
    relay_up(&a).await?;
    relay_up(&b).await?;
    send_delivered(&a.node, &b.to, "warm up").await?;
    Ok((a, b))
}

/// Round trips, one at a time, on the direct pair (phase 0) and the relayed pair.
async fn round_trips(
    run: usize,
    dur: Duration,
    direct: &(BenchNode, BenchNode),
    relayed: &(BenchNode, BenchNode),
    text: &str,
) -> Result<(Load, Load)> {
    let mut lat: [Option<Load>; 2] = [None, None];
    for phase in order(run, 2) {
        let (from, to) = if phase == 0 { direct } else { relayed };
        lat[phase] = Some(
            one_at_a_time(dur, usize::MAX, || send_delivered(&from.node, &to.to, text)).await?,
        );
    }
    match lat {
        [Some(d), Some(r)] => Ok((d, r)),
        _ => bail!("a latency phase did not run"),
    }
}

pub async fn run(cfg: &Config) -> Result<Vec<Row>> {
    let disco = Discovery::start_with_relay().await?;
    let url = disco.url.as_str();
    let direct = Opts {
        discovery: Some(url),
        ..Opts::default()
    };
    let relayed = Opts {
        relay_only: true,
        ..direct
    };
    let durable = (pair(direct).await?, pair(relayed).await?);
    let memory = (
        pair(Opts {
            in_memory: true,
            ..direct
        })
        .await?,
        pair(Opts {
            in_memory: true,
            ..relayed
        })
        .await?,
    );
    for (d, r) in [&durable, &memory] {
        anyhow::ensure!(
            r.0.node.path_of(&r.1.id) == Some(PathKind::Relay),
            "the relayed pair is not on the relay"
        );
        anyhow::ensure!(
            d.0.node.path_of(&d.1.id) == Some(PathKind::Direct),
            "the direct pair is not direct"
        );
    }
    let small: String = "m".repeat(SMALL);

    let mut p50 = Row::new(
        "9. relayed round trip p50, durable (baseline: direct)",
        "ms",
        Target::AtMost(2.0),
    );
    let mut p99 = Row::new(
        "9. relayed round trip p99, durable (baseline: direct)",
        "ms",
        Target::None,
    );
    let mut mem_p50 = Row::new(
        "9. relayed round trip p50, in-memory store (baseline: direct)",
        "ms",
        Target::AtMost(2.0),
    );
    let mut mem_p99 = Row::new(
        "9. relayed round trip p99, in-memory store (baseline: direct)",
        "ms",
        Target::None,
    );
    let k = cfg.in_flight;
    let mut rate = Row::new(
        format!("9. relayed small msgs/s, {k} in flight, in-memory store (baseline: direct)"),
        "msg/s",
        Target::None,
    );
    let mut to_direct = Row::new(
        "9. first relayed packet to direct path (baseline: relayed round trip p50, in-memory)",
        "ms",
        Target::None,
    );
    let dur = cfg.phase;
    for run in 0..cfg.runs {
        let (d, r) = round_trips(run, dur, &durable.0, &durable.1, &small).await?;
        p50.push(ms(r.p50()), Some(ms(d.p50())));
        p99.push(ms(r.p99()), Some(ms(d.p99())));
        let (d, r) = round_trips(run, dur, &memory.0, &memory.1, &small).await?;
        mem_p50.push(ms(r.p50()), Some(ms(d.p50())));
        mem_p99.push(ms(r.p99()), Some(ms(d.p99())));
        let mut rates = [0.0; 2];
        for phase in order(run, 2) {
            let pair = if phase == 0 { &memory.0 } else { &memory.1 };
            let node = pair.0.node.clone();
            let to = pair.1.to;
            let text: std::sync::Arc<str> = small.as_str().into();
            rates[phase] = closed_loop(k, dur, usize::MAX, move |_| {
                let (node, text) = (node.clone(), text.clone());
                async move { send_delivered(&node, &to, &text).await }
            })
            .await?
            .per_sec();
        }
        rate.push(rates[1], Some(rates[0]));
        // A new pair that publishes no direct address: the first packets can only go
        // through the relay; time until the sender has a direct path.
        let mut times = Vec::new();
        for _ in 0..cfg.setup_iters {
            times.push(ms(time_to_direct(url).await?));
        }
        to_direct.push(median(&times), Some(ms(r.p50())));
    }
    for (a, b) in [durable.0, durable.1, memory.0, memory.1] {
        a.stop().await?;
        b.stop().await?;
    }
    Ok(vec![p50, p99, mem_p50, mem_p99, rate, to_direct])
}

/// Two fresh nodes hiding their addresses; from the first message to the sender's
/// `PathChanged(Direct)`.
async fn time_to_direct(url: &str) -> Result<Duration> {
    let opts = Opts {
        discovery: Some(url),
        in_memory: true,
        hide_addrs: true,
        ..Opts::default()
    };
    let (a, b) = (BenchNode::start(opts).await?, BenchNode::start(opts).await?);
    relay_up(&a).await?;
    relay_up(&b).await?;
    let mut events = a.node.subscribe();
    let start = Instant::now();
    send_delivered(&a.node, &b.to, "x").await?;
    let peer = b.id;
    wait_event(&mut events, WAIT, |e| {
        matches!(e, NodeEvent::PathChanged { node_id, path: Some(PathKind::Direct), .. } if *node_id == peer)
    })
    .await
    .context("no direct path")?;
    let took = start.elapsed();
    a.stop().await?;
    b.stop().await?;
    Ok(took)
}
