//! A wrapper that makes any store misbehave on purpose: added latency with
//! jitter, a rate of transient errors, lost responses (the write happens but
//! the caller sees a transient error), and a partition switch. All settings
//! change at run time, so a running machine can be cut off from its store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{
    DynStore, ETag, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError,
    StoreResult,
};

/// What the fault layer does to each request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultConfig {
    /// Added to every request before it reaches the inner store.
    #[serde(with = "humantime_serde_opt")]
    pub latency: Duration,
    /// Uniform extra latency in `[0, jitter]`.
    #[serde(with = "humantime_serde_opt")]
    pub jitter: Duration,
    /// Probability in [0, 1] that a request fails with a transient error
    /// before reaching the store.
    pub error_rate: f64,
    /// Probability in [0, 1] that a `put` reaches the store and succeeds but
    /// the caller is told it failed (a lost response: the ambiguous case).
    pub lost_response_rate: f64,
    /// Probability in [0, 1] that a request fails with 409 Conflict.
    pub conflict_rate: f64,
    /// When true every request fails with a transient "partitioned" error.
    pub partitioned: bool,
}

/// Durations as humantime strings ("20ms") in JSON, for the admin endpoint.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A cheap handle to change a [`FaultStore`]'s behaviour while it runs.
#[derive(Clone, Debug, Default)]
pub struct FaultHandle(Arc<Mutex<FaultConfig>>);

impl FaultHandle {
    pub fn get(&self) -> FaultConfig {
        self.0.lock().unwrap().clone()
    }

    pub fn set(&self, config: FaultConfig) {
        *self.0.lock().unwrap() = config;
    }

    pub fn update(&self, f: impl FnOnce(&mut FaultConfig)) {
        f(&mut self.0.lock().unwrap());
    }

    pub fn partition(&self, partitioned: bool) {
        self.update(|c| c.partitioned = partitioned);
    }
}

#[derive(Debug)]
pub struct FaultStore {
    inner: DynStore,
    handle: FaultHandle,
    rng: Mutex<StdRng>,
}

enum Injected {
    Pass,
    Fail(StoreError),
    LoseResponse,
}

impl FaultStore {
    pub fn new(inner: DynStore, config: FaultConfig) -> FaultStore {
        Self::seeded(inner, config, rand::rng().random())
    }

    /// With its dice seeded: a simulation replays the same faults.
    pub fn seeded(inner: DynStore, config: FaultConfig, seed: u64) -> FaultStore {
        let handle = FaultHandle::default();
        handle.set(config);
        FaultStore {
            inner,
            handle,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    /// Sleeps the configured latency, then decides this request's fate.
    async fn before(&self, key: &str, is_put: bool) -> Injected {
        let config = self.handle.get();
        let (delay, roll_error, roll_conflict, roll_lost) = {
            let mut rng = self.rng.lock().unwrap();
            let jitter = if config.jitter.is_zero() {
                Duration::ZERO
            } else {
                config.jitter.mul_f64(rng.random::<f64>())
            };
            (
                config.latency + jitter,
                rng.random::<f64>(),
                rng.random::<f64>(),
                rng.random::<f64>(),
            )
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // Read the switch again after the delay: a partition that starts
        // while a request is in flight cuts that request off too.
        if self.handle.get().partitioned {
            return Injected::Fail(StoreError::transient(
                key,
                "partitioned from the store (fault injection)",
            ));
        }
        if roll_error < config.error_rate {
            return Injected::Fail(StoreError::transient(
                key,
                "injected error (fault injection)",
            ));
        }
        if roll_conflict < config.conflict_rate {
            return Injected::Fail(StoreError::Conflict {
                key: key.to_string(),
            });
        }
        if is_put && roll_lost < config.lost_response_rate {
            return Injected::LoseResponse;
        }
        Injected::Pass
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        match self.before(key, false).await {
            Injected::Fail(e) => Err(e),
            _ => self.inner.get(key).await,
        }
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        match self.before(key, false).await {
            Injected::Fail(e) => Err(e),
            _ => self.inner.head(key).await,
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        match self.before(key, true).await {
            Injected::Fail(e) => Err(e),
            Injected::Pass => self.inner.put(key, body, metadata, condition).await,
            Injected::LoseResponse => {
                let _ = self.inner.put(key, body, metadata, condition).await;
                Err(StoreError::transient(
                    key,
                    "response lost (fault injection)",
                ))
            }
        }
    }

    async fn check(&self) -> StoreResult<()> {
        match self.before("", false).await {
            Injected::Fail(e) => Err(e),
            _ => self.inner.check().await,
        }
    }

    fn describe(&self) -> String {
        format!("fault({})", self.inner.describe())
    }
}
