//! Retries what is safe to retry, and never retries a conditional write
//! blindly.
//!
//! A conditional `put` that failed with a transient error may have happened
//! (the response was lost). This layer tags every write with a unique
//! [`WRITE_ID_KEY`] in its metadata; after an ambiguous failure it reads the
//! object's metadata back: if the tag is ours the write happened, if the
//! condition still holds the write is retried, otherwise the outcome is
//! unknown (`Ambiguous`): someone else wrote since, possibly on top of ours.
//!
//! 409 Conflict means the condition was evaluated against a racing write and
//! nothing was written, so it is retried as is. Retries are bounded in count
//! and in time (on tokio's clock, so paused-clock tests stay deterministic).

use std::time::Duration;

use async_trait::async_trait;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use bytes::Bytes;
use tokio::time::Instant;

use super::{
    DynStore, ETag, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError,
    StoreResult, WRITE_ID_KEY,
};

/// Bounds on retrying.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_elapsed: Duration,
    pub initial_interval: Duration,
    pub max_interval: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_elapsed: Duration::from_secs(10),
            initial_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(800),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBackoff {
            initial_interval: self.initial_interval,
            current_interval: self.initial_interval,
            max_interval: self.max_interval,
            // Bounded below by our own deadline on tokio's clock instead.
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        }
    }
}

#[derive(Debug)]
pub struct RetryingStore {
    inner: DynStore,
    policy: RetryPolicy,
}

/// Counts attempts and sleeps between them; says when to give up.
struct Attempts {
    policy: RetryPolicy,
    backoff: ExponentialBackoff,
    attempt: u32,
    deadline: Instant,
}

impl Attempts {
    fn new(policy: &RetryPolicy) -> Attempts {
        Attempts {
            policy: policy.clone(),
            backoff: policy.backoff(),
            attempt: 1,
            deadline: Instant::now() + policy.max_elapsed,
        }
    }

    /// Sleeps before the next attempt; false when the budget is spent.
    async fn wait(&mut self, error: &StoreError) -> bool {
        if !error.is_retryable() || self.attempt >= self.policy.max_attempts {
            return false;
        }
        let Some(delay) = self.backoff.next_backoff() else {
            return false;
        };
        if Instant::now() + delay > self.deadline {
            return false;
        }
        tracing::debug!(attempt = self.attempt, ?delay, error = %error, "retrying store request");
        tokio::time::sleep(delay).await;
        self.attempt += 1;
        true
    }
}

impl RetryingStore {
    pub fn new(inner: DynStore, policy: RetryPolicy) -> RetryingStore {
        RetryingStore { inner, policy }
    }

    /// After an ambiguous put: did ours land, may we try again, or did
    /// someone else win?
    async fn resolve(
        &self,
        key: &str,
        write_id: &str,
        condition: &Precondition,
        attempts: &mut Attempts,
    ) -> StoreResult<Resolution> {
        loop {
            match self.inner.head(key).await {
                Ok(current) => {
                    if let Some(meta) = &current
                        && meta.metadata.get(WRITE_ID_KEY).map(String::as_str) == Some(write_id)
                    {
                        return Ok(Resolution::Landed(meta.etag.clone()));
                    }
                    let still_holds = match condition {
                        Precondition::None => true,
                        Precondition::IfAbsent => current.is_none(),
                        Precondition::IfMatch(expected) => {
                            current.as_ref().map(|m| &m.etag) == Some(expected)
                        }
                    };
                    // Not ours now, and the condition no longer holds: our
                    // write may have landed and been overwritten since, so
                    // this is not a plain precondition failure.
                    return if still_holds {
                        Ok(Resolution::Retry)
                    } else {
                        Err(StoreError::Ambiguous {
                            key: key.to_string(),
                        })
                    };
                }
                Err(e) => {
                    if !attempts.wait(&e).await {
                        return Err(e);
                    }
                }
            }
        }
    }
}

enum Resolution {
    Landed(ETag),
    Retry,
}

#[async_trait]
impl ObjectStore for RetryingStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        let mut attempts = Attempts::new(&self.policy);
        loop {
            match self.inner.get(key).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let mut attempts = Attempts::new(&self.policy);
        loop {
            match self.inner.head(key).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        mut metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let write_id = uuid::Uuid::new_v4().simple().to_string();
        metadata.insert(WRITE_ID_KEY.to_string(), write_id.clone());
        let mut attempts = Attempts::new(&self.policy);
        loop {
            let error = match self
                .inner
                .put(key, body.clone(), metadata.clone(), condition.clone())
                .await
            {
                Ok(etag) => return Ok(etag),
                Err(e) => e,
            };
            match &error {
                StoreError::Conflict { .. } => {
                    if !attempts.wait(&error).await {
                        return Err(error);
                    }
                }
                StoreError::Transient { .. } => {
                    // The write may have landed: look before trying again.
                    if !attempts.wait(&error).await {
                        // Out of budget: one last look so that a landed
                        // write is not reported as failed when we can tell.
                        return match self.inner.head(key).await {
                            Ok(Some(meta))
                                if meta.metadata.get(WRITE_ID_KEY) == Some(&write_id) =>
                            {
                                Ok(meta.etag)
                            }
                            _ => Err(error),
                        };
                    }
                    match self
                        .resolve(key, &write_id, &condition, &mut attempts)
                        .await?
                    {
                        Resolution::Landed(etag) => return Ok(etag),
                        Resolution::Retry => continue,
                    }
                }
                _ => return Err(error),
            }
        }
    }

    async fn check(&self) -> StoreResult<()> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
