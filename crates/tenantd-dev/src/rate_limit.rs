//! The Machines API's rate limit, as Fly applies it: per action per app,
//! shared by every caller (every machine of the app, `tenantd fly`), a token
//! bucket of 1 request/s with a burst of 3 (shared/FACTS.md). Without it the
//! stand-in would be kinder than the real API, and a failover storm that
//! looks fine in `tenantd dev` would be answered 429 on Fly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    /// What Fly documents for the Machines API.
    pub const FLY: RateLimit = RateLimit {
        per_second: 1.0,
        burst: 3,
    };
}

/// One bucket per action; counts of what was answered and what was refused
/// (what the tests and `/v1/machines` read).
#[derive(Debug)]
pub struct RateLimiter {
    limit: Option<RateLimit>,
    state: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    allowed: u64,
    refused: u64,
}

/// Calls of one action so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    pub allowed: u64,
    pub refused: u64,
}

impl RateLimiter {
    /// `None`: every call is allowed (still counted).
    pub fn new(limit: Option<RateLimit>) -> RateLimiter {
        RateLimiter {
            limit,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `action`, or says how long until one is free.
    pub fn take(&self, action: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let burst = self.limit.map_or(f64::INFINITY, |l| f64::from(l.burst));
        let bucket = state.entry(action.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
            allowed: 0,
            refused: 0,
        });
        let Some(limit) = self.limit else {
            bucket.allowed += 1;
            return Ok(());
        };
        let refill = now.duration_since(bucket.at).as_secs_f64() * limit.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.allowed += 1;
            Ok(())
        } else {
            bucket.refused += 1;
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_second,
            ))
        }
    }

    pub fn calls(&self, action: &str) -> Calls {
        let state = self.state.lock().unwrap();
        state.get(action).map_or(Calls::default(), |b| Calls {
            allowed: b.allowed,
            refused: b.refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_second_per_action() {
        let limiter = RateLimiter::new(Some(RateLimit::FLY));
        for _ in 0..3 {
            limiter.take("list").expect("within the burst");
        }
        let wait = limiter.take("list").expect_err("the burst is spent");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        limiter
            .take("create")
            .expect("another action has its own bucket");
        assert_eq!(
            limiter.calls("list"),
            Calls {
                allowed: 3,
                refused: 1
            }
        );
    }

    #[test]
    fn without_a_limit_every_call_is_allowed_and_counted() {
        let limiter = RateLimiter::new(None);
        for _ in 0..100 {
            limiter.take("list").unwrap();
        }
        assert_eq!(limiter.calls("list").allowed, 100);
    }
}
