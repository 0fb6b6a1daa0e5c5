//! A closed-loop load generator: `workers` tasks, each doing one operation after the other
//! until the phase's time or operation budget is spent.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// Longest any one operation may take before the phase fails (nothing in the bench may
/// wait forever).
pub const OP_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn bounded<T, Fut: Future<Output = Result<T>>>(op: Fut) -> Result<T> {
    tokio::time::timeout(OP_TIMEOUT, op)
        .await
        .with_context(|| format!("an operation took longer than {OP_TIMEOUT:?}"))?
}
use tokio::task::JoinSet;

use crate::report::quantile;

/// What a phase did.
#[derive(Debug)]
pub struct Load {
    pub ops: usize,
    pub elapsed: Duration,
    /// Latency of every operation, sorted.
    pub lat: Vec<Duration>,
}

impl Load {
    pub fn from_latencies(mut lat: Vec<Duration>, elapsed: Duration) -> Self {
        lat.sort();
        Load {
            ops: lat.len(),
            elapsed,
            lat,
        }
    }

    pub fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn p50(&self) -> Duration {
        quantile(&self.lat, 0.5)
    }

    pub fn p99(&self) -> Duration {
        quantile(&self.lat, 0.99)
    }
}

/// Runs `op(worker)` in `workers` concurrent tasks until `dur` has passed or `max_ops`
/// operations were started, whichever comes first. The first error ends the phase.
pub async fn closed_loop<F, Fut>(
    workers: usize,
    dur: Duration,
    max_ops: usize,
    op: F,
) -> Result<Load>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let started = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for w in 0..workers.max(1) {
        let op = op.clone();
        let started = started.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            while start.elapsed() < dur && started.fetch_add(1, Ordering::Relaxed) < max_ops {
                let t = Instant::now();
                bounded(op(w)).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = Vec::new();
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(l)) => lat.extend(l),
            Ok(Err(e)) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
                set.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(Load::from_latencies(lat, start.elapsed()))
}

/// Runs `op` one at a time, `n` times at most and for `dur` at most.
pub async fn one_at_a_time<F, Fut>(dur: Duration, max_ops: usize, mut op: F) -> Result<Load>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    let mut lat = Vec::new();
    while start.elapsed() < dur && lat.len() < max_ops {
        let t = Instant::now();
        bounded(op()).await?;
        lat.push(t.elapsed());
    }
    Ok(Load::from_latencies(lat, start.elapsed()))
}
