//! Token buckets: per-client-IP limits on write requests, and a single bucket for other
//! rates (the relay's per-node limits, a node's probe verification budget). State
//! machines taking `now`.

use std::{collections::HashMap, net::IpAddr, time::Duration};

/// Token buckets keyed by client IP, bounded in the number of clients tracked.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_sec: f64,
    burst: f64,
    max_clients: usize,
    buckets: HashMap<IpAddr, (f64, u64)>,
}

impl RateLimiter {
    pub fn new(per_sec: f64, burst: u32, max_clients: usize) -> Self {
        Self {
            per_sec: per_sec.max(0.001),
            burst: f64::from(burst.max(1)),
            max_clients,
            buckets: HashMap::new(),
        }
    }

    fn refill(&self, tokens: f64, last: u64, now: u64) -> f64 {
        let elapsed = now.saturating_sub(last) as f64 / 1000.0;
        (tokens + elapsed * self.per_sec).min(self.burst)
    }

    /// Takes a token for `ip`, or says how long until one is available.
    pub fn check(&mut self, ip: IpAddr, now: u64) -> Result<(), Duration> {
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_clients {
            // Forget clients whose bucket is full again: they lose nothing.
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.buckets.retain(|_, (tokens, last)| {
                let elapsed = now.saturating_sub(*last) as f64 / 1000.0;
                *tokens + elapsed * per_sec < burst
            });
            if self.buckets.len() >= self.max_clients {
                return Err(Duration::from_secs(1));
            }
        }
        let (tokens, last) = self.buckets.get(&ip).copied().unwrap_or((self.burst, now));
        let tokens = self.refill(tokens, last, now);
        if tokens >= 1.0 {
            self.buckets.insert(ip, (tokens - 1.0, now));
            Ok(())
        } else {
            self.buckets.insert(ip, (tokens, now));
            let wait = (1.0 - tokens) / self.per_sec;
            Err(Duration::from_secs_f64(wait.clamp(0.001, 86_400.0)))
        }
    }

    /// Number of clients tracked.
    pub fn clients(&self) -> usize {
        self.buckets.len()
    }
}

/// One token bucket: `rate` tokens per second up to `burst`, taking `now` as an argument.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: std::time::Instant) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: burst.max(0.0),
            tokens: burst.max(0.0),
            last: now,
        }
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: f64, now: std::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let t0 = std::time::Instant::now();
        let mut b = TokenBucket::new(100.0, 10.0, t0);
        for _ in 0..10 {
            assert!(b.take(1.0, t0));
        }
        assert!(!b.take(1.0, t0));
        // 50 ms later: 5 more.
        let t1 = t0 + Duration::from_millis(50);
        for _ in 0..5 {
            assert!(b.take(1.0, t1));
        }
        assert!(!b.take(1.0, t1));
        // Never more than the burst, however long it waited.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(b.take(10.0, t2));
        assert!(!b.take(1.0, t2));
        // A clock that goes back takes nothing away and adds nothing.
        assert!(!b.take(1.0, t0));
    }

    #[test]
    fn burst_then_refill() {
        let ip = IpAddr::from([10, 0, 0, 1]);
        let mut r = RateLimiter::new(1.0, 2, 10);
        assert!(r.check(ip, 0).is_ok());
        assert!(r.check(ip, 0).is_ok());
        let wait = r.check(ip, 0).expect_err("limited");
        assert!(wait <= Duration::from_secs(1));
        assert!(r.check(ip, 1000).is_ok());
        // Another client is independent.
        assert!(r.check(IpAddr::from([10, 0, 0, 2]), 0).is_ok());
    }
}
