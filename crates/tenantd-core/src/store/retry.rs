//! Retries what is safe to retry, and never retries a conditional write
//! blindly.
//!
//! # Conditional writes whose outcome is unknown
//!
//! A conditional `put` that failed with a transient error (timeout, lost
//! connection, 5xx) may have happened: the server may have applied it before
//! the response was lost, or may still apply it *later* — a request can sit
//! in the server's queue after the client gave up on it ("applied late").
//! So this layer tags every write with a unique [`WRITE_ID_KEY`] and, for a
//! conditional write, the condition it was made under ([`WRITE_BASE_KEY`]:
//! `absent`, or `etag:<the ETag it replaces>`), and after a transient
//! failure it reads the object's metadata back (`HEAD`):
//!
//! - the write id is ours: the write happened → `Ok` with the ETag it has;
//! - the condition still holds (the ETag we based the write on is still
//!   current, or the key is still absent): ours has not landed *yet* → the
//!   write is sent again (same write id, so whichever copy lands is ours);
//! - someone else's write is there and its base is *our* base: it replaced
//!   the very state ours needed, so ours cannot have landed before it (it
//!   would have changed that state, and their conditional write would have
//!   failed), nor after it (our condition no longer holds, and ETags do not
//!   repeat because every write changes the bytes) → a real
//!   `PreconditionFailed`;
//! - someone else's write is there on top of some other state: ours may have
//!   landed and been overwritten since, or never landed → `Ambiguous`.
//!
//! The subtle case is a **412 after a transient attempt**. Once any attempt
//! of this `put` may have reached the store, a later attempt's 412 no longer
//! means "not written": the first attempt may have landed late, between our
//! read-back and the resend, and *its* success is what made the resend's
//! condition fail. Such a 412 goes through the same read-back: ours → `Ok`;
//! provably someone else's (same base) → the 412; otherwise `Ambiguous`.
//! Only a 412 with no transient attempt before it is passed on as is.
//!
//! The "same base" proof assumes that every conditional write to the key goes
//! through this layer (writes by hand carry no base tag and read as
//! `Ambiguous`), that a key is not deleted while a conditional write to it
//! may be in flight (deletes are for garbage: log slots and snapshots no
//! longer needed; a delete after our `IfAbsent` landed would make the
//! read-back see "still absent" and resend), and that the store's `HEAD` is consistent with its
//! conditional writes (a Single- or Multi-region Tigris bucket, S3).
//!
//! # Retrying
//!
//! Reads, listings and deletes are idempotent and are simply sent again
//! (deleting a key that is already gone succeeds, so a delete whose
//! response was lost resolves itself). 409 Conflict means the condition was evaluated against a racing write and
//! nothing was written by *that* attempt, so it is retried as is. Transient
//! errors are retried with exponential backoff and jitter (`backoff`); a
//! store asking us to slow down (503 SlowDown, 429) gets a longer backoff of
//! its own. Retries are bounded in count and in time (on tokio's clock, so
//! paused-clock tests stay deterministic); the time budget grows with the
//! body's size ([`transfer_allowance`]), so that one slow attempt of a big
//! upload does not use up the budget of its retries.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use bytes::Bytes;
use tokio::time::Instant;

use super::{
    DynStore, ETag, Listed, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError,
    StoreResult, WRITE_BASE_KEY, WRITE_ID_KEY, stream, transfer_allowance,
};

/// Bounds on retrying.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// Time budget of one request and its retries (plus
    /// [`transfer_allowance`] of the body for a `put`).
    pub max_elapsed: Duration,
    pub initial_interval: Duration,
    pub max_interval: Duration,
    /// Backoff after a throttling answer (503 SlowDown, 429): starts here
    /// and doubles up to `throttle_max_interval`, with jitter.
    pub throttle_initial_interval: Duration,
    pub throttle_max_interval: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_elapsed: Duration::from_secs(10),
            initial_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(800),
            throttle_initial_interval: Duration::from_millis(100),
            throttle_max_interval: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    fn backoff(initial: Duration, max: Duration) -> ExponentialBackoff {
        ExponentialBackoff {
            initial_interval: initial,
            current_interval: initial,
            max_interval: max.max(initial),
            // Bounded below by our own deadline on tokio's clock instead.
            max_elapsed_time: None,
            // Jitter: each delay is drawn from [0.5, 1.5] × the interval.
            randomization_factor: 0.5,
            multiplier: 2.0,
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
    max_attempts: u32,
    backoff: ExponentialBackoff,
    throttle_backoff: ExponentialBackoff,
    attempt: u32,
    deadline: Instant,
}

impl Attempts {
    fn new(policy: &RetryPolicy, body_len: u64) -> Attempts {
        Attempts {
            max_attempts: policy.max_attempts,
            backoff: RetryPolicy::backoff(policy.initial_interval, policy.max_interval),
            throttle_backoff: RetryPolicy::backoff(
                policy.throttle_initial_interval,
                policy.throttle_max_interval,
            ),
            attempt: 1,
            deadline: Instant::now() + policy.max_elapsed + transfer_allowance(body_len),
        }
    }

    /// Sleeps before the next attempt; false when the budget is spent.
    async fn wait(&mut self, error: &StoreError) -> bool {
        if !error.is_retryable() || self.attempt >= self.max_attempts {
            return false;
        }
        let backoff = if error.is_throttle() {
            &mut self.throttle_backoff
        } else {
            &mut self.backoff
        };
        let Some(delay) = backoff.next_backoff() else {
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

/// What the object's current state says about our write.
enum Resolution {
    /// Our write is the current object.
    Landed(ETag),
    /// Our condition still holds: ours has not landed (yet); send it again.
    Retry,
}

/// The base tag of a conditional write; `None` for an unconditional one.
fn base_tag(condition: &Precondition) -> Option<String> {
    match condition {
        Precondition::None => None,
        Precondition::IfAbsent => Some("absent".to_string()),
        Precondition::IfMatch(etag) => Some(format!("etag:{}", etag.normalized())),
    }
}

/// Decides our write's fate from the object's current state (a `HEAD`).
fn judge(
    key: &str,
    current: Option<&ObjectMeta>,
    write_id: &str,
    condition: &Precondition,
) -> StoreResult<Resolution> {
    if let Some(meta) = current
        && meta.metadata.get(WRITE_ID_KEY).map(String::as_str) == Some(write_id)
    {
        return Ok(Resolution::Landed(meta.etag.clone()));
    }
    let still_holds = match condition {
        Precondition::None => true,
        Precondition::IfAbsent => current.is_none(),
        Precondition::IfMatch(expected) => current.map(|m| &m.etag) == Some(expected),
    };
    if still_holds {
        return Ok(Resolution::Retry);
    }
    // Someone else's write is there. If it replaced exactly the state ours
    // was based on, ours never landed and never will (module doc).
    let ours = base_tag(condition);
    let theirs = current.and_then(|m| m.metadata.get(WRITE_BASE_KEY));
    if ours.is_some() && theirs == ours.as_ref() {
        return Err(StoreError::PreconditionFailed {
            key: key.to_string(),
        });
    }
    Err(StoreError::Ambiguous {
        key: key.to_string(),
    })
}

impl RetryingStore {
    pub fn new(inner: DynStore, policy: RetryPolicy) -> RetryingStore {
        RetryingStore { inner, policy }
    }

    /// A conditional write of `body_len` bytes, each attempt made by
    /// `attempt` (a put of bytes or of a file), retried and resolved by
    /// reading back as the module doc says.
    async fn write<F, Fut>(
        &self,
        key: &str,
        body_len: u64,
        mut metadata: Metadata,
        condition: Precondition,
        attempt: F,
    ) -> StoreResult<ETag>
    where
        F: Fn(Metadata, Precondition) -> Fut + Send + Sync,
        Fut: std::future::Future<Output = StoreResult<ETag>> + Send,
    {
        let write_id = uuid::Uuid::new_v4().simple().to_string();
        metadata.insert(WRITE_ID_KEY.to_string(), write_id.clone());
        match base_tag(&condition) {
            Some(base) => metadata.insert(WRITE_BASE_KEY.to_string(), base),
            None => metadata.remove(WRITE_BASE_KEY),
        };
        let mut attempts = Attempts::new(&self.policy, body_len);
        // Whether an earlier attempt may have reached the store (and may
        // still land): from then on no failure means "not written" without
        // a read-back.
        let mut maybe_sent = false;
        loop {
            let error = match attempt(metadata.clone(), condition.clone()).await {
                Ok(etag) => return Ok(etag),
                Err(e) => e,
            };
            let resolution = match &error {
                StoreError::Conflict { .. } => {
                    if !attempts.wait(&error).await {
                        return if maybe_sent {
                            self.last_look(key, &write_id, &condition, error).await
                        } else {
                            Err(error)
                        };
                    }
                    continue;
                }
                StoreError::Transient { .. } => {
                    maybe_sent = true;
                    // The write may have landed: look before trying again.
                    if !attempts.wait(&error).await {
                        return self.last_look(key, &write_id, &condition, error).await;
                    }
                    self.resolve(key, &write_id, &condition, &mut attempts)
                        .await?
                }
                StoreError::PreconditionFailed { .. } if maybe_sent => {
                    // Possibly our own earlier attempt, landed late.
                    let resolution = self
                        .resolve(key, &write_id, &condition, &mut attempts)
                        .await?;
                    if matches!(resolution, Resolution::Retry) {
                        // The condition holds again after a 412: the state
                        // moved under us. Wait before resending.
                        let busy = StoreError::transient(
                            key,
                            "412 on a resend although the condition holds on reading back",
                        );
                        if !attempts.wait(&busy).await {
                            return self.last_look(key, &write_id, &condition, busy).await;
                        }
                    }
                    resolution
                }
                _ => return Err(error),
            };
            match resolution {
                Resolution::Landed(etag) => return Ok(etag),
                Resolution::Retry => continue,
            }
        }
    }

    /// After a put whose outcome is unknown: did ours land, may we try
    /// again, or did someone else win? Reads back, retrying the read.
    async fn resolve(
        &self,
        key: &str,
        write_id: &str,
        condition: &Precondition,
        attempts: &mut Attempts,
    ) -> StoreResult<Resolution> {
        loop {
            match self.inner.head(key).await {
                Ok(current) => return judge(key, current.as_ref(), write_id, condition),
                Err(e) => {
                    if !attempts.wait(&e).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Out of budget after an attempt that may have landed: one last look,
    /// so that a landed write is not reported as failed (nor a provably
    /// lost one as unknown) when we can tell; otherwise `error` (which, as
    /// a transient error on a put, means "may or may not have happened").
    async fn last_look(
        &self,
        key: &str,
        write_id: &str,
        condition: &Precondition,
        error: StoreError,
    ) -> StoreResult<ETag> {
        let error = match error {
            StoreError::Conflict { .. } => StoreError::transient(
                key,
                "409 Conflict on a resend, after an earlier attempt whose outcome is unknown: the write may still land",
            ),
            e => e,
        };
        match self.inner.head(key).await {
            Ok(current) => match judge(key, current.as_ref(), write_id, condition) {
                Ok(Resolution::Landed(etag)) => Ok(etag),
                Err(e @ StoreError::PreconditionFailed { .. }) => Err(e),
                _ => Err(error),
            },
            Err(_) => Err(error),
        }
    }
}

#[async_trait]
impl ObjectStore for RetryingStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        let mut attempts = Attempts::new(&self.policy, 0);
        loop {
            match self.inner.get(key).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let mut attempts = Attempts::new(&self.policy, 0);
        loop {
            match self.inner.head(key).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        let mut attempts = Attempts::new(&self.policy, 0);
        loop {
            match self.inner.list(prefix, start_after).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    /// Idempotent: a resend after a lost response finds the key gone,
    /// which is success too.
    async fn delete(&self, key: &str) -> StoreResult<()> {
        let mut attempts = Attempts::new(&self.policy, 0);
        loop {
            match self.inner.delete(key).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let len = body.len() as u64;
        self.write(key, len, metadata, condition, |metadata, condition| {
            self.inner.put(key, body.clone(), metadata, condition)
        })
        .await
    }

    /// As `put`: every attempt reads the file again.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let len = stream::file_len(key, path).await?;
        self.write(key, len, metadata, condition, |metadata, condition| {
            self.inner.put_file(key, path, metadata, condition)
        })
        .await
    }

    /// A download is a read: sent again after a transient failure (each
    /// attempt rewrites the file from the start).
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        let mut attempts = Attempts::new(&self.policy, 0);
        loop {
            match self.inner.get_to_file(key, path).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    /// Idempotent, as a delete.
    async fn abort_incomplete_uploads(&self, key: &str) -> StoreResult<usize> {
        let mut attempts = Attempts::new(&self.policy, 0);
        loop {
            match self.inner.abort_incomplete_uploads(key).await {
                Err(e) if attempts.wait(&e).await => continue,
                result => return result,
            }
        }
    }

    async fn check(&self) -> StoreResult<()> {
        // A store that errs now and then must not stop a machine at start
        // (it would crash-loop): a few retries of transient errors; a store
        // that keeps failing, or answers for good (credentials, bucket),
        // still fails at once with its own message.
        let mut attempts = Attempts::new(&self.policy, 0);
        let mut left = 4;
        loop {
            match self.inner.check().await {
                Err(e) if left > 1 && attempts.wait(&e).await => left -= 1,
                result => return result,
            }
        }
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{FaultConfig, FaultStore, MemoryStore};

    fn meta(write_id: &str, base: Option<&str>, etag: &str) -> ObjectMeta {
        let mut metadata = Metadata::new();
        metadata.insert(WRITE_ID_KEY.into(), write_id.into());
        if let Some(base) = base {
            metadata.insert(WRITE_BASE_KEY.into(), base.into());
        }
        ObjectMeta {
            etag: ETag(etag.into()),
            size: 1,
            metadata,
        }
    }

    #[test]
    fn judging_a_read_back() {
        let e1 = Precondition::IfMatch(ETag("\"e1\"".into()));
        // Ours, in whatever form the store quotes its ETag.
        let ours = meta("me", Some("etag:e1"), "W/\"e2\"");
        assert!(matches!(
            judge("k", Some(&ours), "me", &e1),
            Ok(Resolution::Landed(etag)) if etag == ETag("\"e2\"".into())
        ));
        // The state ours was based on is still there (unquoted this time).
        let base = meta("them", None, "e1");
        assert!(matches!(
            judge("k", Some(&base), "me", &e1),
            Ok(Resolution::Retry)
        ));
        assert!(matches!(
            judge("k", None, "me", &Precondition::IfAbsent),
            Ok(Resolution::Retry)
        ));
        // Someone else replaced exactly our base: ours cannot have landed.
        let theirs = meta("them", Some("etag:e1"), "\"e3\"");
        assert!(matches!(
            judge("k", Some(&theirs), "me", &e1),
            Err(StoreError::PreconditionFailed { .. })
        ));
        let created = meta("them", Some("absent"), "\"e3\"");
        assert!(matches!(
            judge("k", Some(&created), "me", &Precondition::IfAbsent),
            Err(StoreError::PreconditionFailed { .. })
        ));
        // Someone else wrote on top of some other state (maybe ours): unknown.
        let later = meta("them", Some("etag:e9"), "\"e3\"");
        assert!(matches!(
            judge("k", Some(&later), "me", &e1),
            Err(StoreError::Ambiguous { .. })
        ));
        let untagged = meta("them", None, "\"e3\"");
        assert!(matches!(
            judge("k", Some(&untagged), "me", &e1),
            Err(StoreError::Ambiguous { .. })
        ));
    }

    fn generous() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 60,
            max_elapsed: Duration::from_secs(600),
            ..RetryPolicy::default()
        }
    }

    /// One writer, so every 412 or "unknown" it is told is a wrong verdict:
    /// nobody else wrote. Some of its puts are applied only after it was told
    /// they failed ("late apply"), some of those between its read-back and
    /// its resend, whose 412 is then caused by its own first attempt. Before
    /// the read-back on a 412, those 412s were reported as "not written".
    #[tokio::test(start_paused = true)]
    async fn a_412_caused_by_our_own_late_write_is_reported_as_landed() {
        let memory = Arc::new(MemoryStore::new());
        let faults = FaultConfig {
            latency: Duration::from_millis(20),
            late_apply_rate: 0.3,
            late_apply_delay: Duration::from_millis(100),
            ..FaultConfig::default()
        };
        let store = RetryingStore::new(
            Arc::new(FaultStore::seeded(memory.clone(), faults, 7)),
            generous(),
        );
        let mut etag = store
            .put("k", "0".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .expect("create");
        for n in 1..=200u32 {
            let result = store
                .put(
                    "k",
                    Bytes::from(n.to_string()),
                    Metadata::new(),
                    Precondition::IfMatch(etag.clone()),
                )
                .await;
            etag = match result {
                Ok(etag) => etag,
                Err(e) => panic!("increment {n}: wrong verdict for a lone writer: {e}"),
            };
            let stored = memory.get("k").await.unwrap().unwrap();
            assert_eq!(
                stored.etag, etag,
                "increment {n}: the ETag returned is the object's"
            );
            assert_eq!(stored.body, Bytes::from(n.to_string()));
        }
    }

    /// Records the body of every write that landed; its check fails
    /// transiently `check_failures` times first.
    #[derive(Debug, Default)]
    struct Recording {
        inner: MemoryStore,
        landed: std::sync::Mutex<Vec<Bytes>>,
        check_failures: std::sync::atomic::AtomicU32,
    }

    #[async_trait]
    impl ObjectStore for Recording {
        async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
            self.inner.get(key).await
        }
        async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
            self.inner.list(prefix, start_after).await
        }
        async fn delete(&self, key: &str) -> StoreResult<()> {
            self.inner.delete(key).await
        }
        async fn put(
            &self,
            key: &str,
            body: Bytes,
            metadata: Metadata,
            condition: Precondition,
        ) -> StoreResult<ETag> {
            let result = self.inner.put(key, body.clone(), metadata, condition).await;
            if result.is_ok() {
                self.landed.lock().unwrap().push(body);
            }
            result
        }
        async fn check(&self) -> StoreResult<()> {
            use std::sync::atomic::Ordering;
            let left = self
                .check_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            match left {
                Ok(_) => Err(StoreError::transient("", "503 SlowDown at start")),
                Err(_) => Ok(()),
            }
        }
        fn describe(&self) -> String {
            "recording".into()
        }
    }

    /// A transient error in the check at start is retried (a machine must
    /// not refuse to start over one 503); one that persists is reported.
    #[tokio::test(start_paused = true)]
    async fn the_start_check_rides_out_transient_errors_but_not_persistent_ones() {
        let flaky = |failures: u32| {
            RetryingStore::new(
                Arc::new(Recording {
                    check_failures: failures.into(),
                    ..Recording::default()
                }),
                RetryPolicy::default(),
            )
        };
        flaky(2)
            .check()
            .await
            .expect("two transient errors are ridden out");
        let error = flaky(100)
            .check()
            .await
            .expect_err("a store that keeps failing");
        assert!(error.to_string().contains("SlowDown"), "{error}");
    }

    /// Three writers racing, with late-applied writes: every `Ok` landed,
    /// every 412 did not (checked against the log of what landed), and
    /// "unknown" is allowed.
    #[tokio::test(start_paused = true)]
    async fn racing_writers_with_late_writes_get_true_verdicts() {
        let recording = Arc::new(Recording::default());
        recording
            .put("k", "start".into(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
        let faults = FaultConfig {
            latency: Duration::from_millis(10),
            jitter: Duration::from_millis(20),
            late_apply_rate: 0.3,
            late_apply_delay: Duration::from_millis(80),
            ..FaultConfig::default()
        };
        let tasks: Vec<_> = (0..3)
            .map(|w| {
                let store = RetryingStore::new(
                    Arc::new(FaultStore::seeded(recording.clone(), faults.clone(), w)),
                    generous(),
                );
                tokio::spawn(async move {
                    let mut verdicts = Vec::new();
                    for i in 0..60 {
                        let current = store.head("k").await.unwrap().unwrap();
                        let body = Bytes::from(format!("w{w}-{i}"));
                        let result = store
                            .put(
                                "k",
                                body.clone(),
                                Metadata::new(),
                                Precondition::IfMatch(current.etag),
                            )
                            .await;
                        verdicts.push((body, result));
                    }
                    verdicts
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        // Let every late write land (or fail) before judging.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let landed = recording.landed.lock().unwrap().clone();
        let (mut ok, mut refused, mut unknown) = (0, 0, 0);
        for (body, result) in &all {
            match result {
                Ok(_) => {
                    ok += 1;
                    assert!(
                        landed.contains(body),
                        "{body:?} acknowledged but never landed"
                    );
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    refused += 1;
                    assert!(
                        !landed.contains(body),
                        "{body:?} reported as 412 but landed"
                    );
                }
                Err(StoreError::Ambiguous { .. }) => unknown += 1,
                Err(e) => panic!("{body:?}: {e}"),
            }
        }
        assert!(
            ok > 0 && refused > 0,
            "ok {ok}, 412 {refused}, unknown {unknown}"
        );
    }

    /// A burst of 503 SlowDown is waited out with the longer throttling
    /// backoff, and 500s are retried.
    #[tokio::test(start_paused = true)]
    async fn slowdown_bursts_and_internal_errors_are_retried() {
        let memory = Arc::new(MemoryStore::new());
        let fault = FaultStore::seeded(
            memory.clone(),
            FaultConfig {
                slowdown_rate: 1.0,
                error_burst: Duration::from_millis(1500),
                ..FaultConfig::default()
            },
            1,
        );
        let handle = fault.handle();
        let store = RetryingStore::new(Arc::new(fault), RetryPolicy::default());
        let started = Instant::now();
        // The first request starts the burst; stop new ones from starting.
        let put = store.put("k", "v".into(), Metadata::new(), Precondition::IfAbsent);
        let calm = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            handle.update(|c| c.slowdown_rate = 0.0);
        };
        let (result, ()) = tokio::join!(put, calm);
        result.expect("the burst is waited out");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert!(memory.head("k").await.unwrap().is_some());

        handle.update(|c| {
            c.internal_error_rate = 0.3;
            c.error_burst = Duration::ZERO;
        });
        let store = RetryingStore::new(
            Arc::new(FaultStore::seeded(memory.clone(), handle.get(), 2)),
            RetryPolicy {
                max_attempts: 30,
                ..RetryPolicy::default()
            },
        );
        for i in 0..20 {
            store
                .put(
                    &format!("k{i}"),
                    "v".into(),
                    Metadata::new(),
                    Precondition::IfAbsent,
                )
                .await
                .expect("500s are retried");
        }
    }

    /// A 200 MB upload through a 20 MB/s store takes 10 s per attempt; one
    /// failed attempt must leave time for another (the budget grows with
    /// the body), where a fixed 10 s budget gave up after the first.
    #[tokio::test(start_paused = true)]
    async fn a_big_upload_through_a_slow_store_gets_a_budget_for_its_size() {
        let memory = Arc::new(MemoryStore::new());
        let fault = FaultStore::seeded(
            memory.clone(),
            FaultConfig {
                bandwidth_bytes_per_sec: 20_000_000,
                error_rate: 1.0,
                ..FaultConfig::default()
            },
            3,
        );
        let handle = fault.handle();
        let store = RetryingStore::new(Arc::new(fault), RetryPolicy::default());
        let body = Bytes::from(vec![1u8; 200_000_000]);
        let started = Instant::now();
        let heal = async {
            // The first attempt has started (and will fail after its 10 s).
            tokio::time::sleep(Duration::from_secs(1)).await;
            handle.update(|c| c.error_rate = 0.0);
        };
        let (result, ()) = tokio::join!(
            store.put("db", body.clone(), Metadata::new(), Precondition::IfAbsent),
            heal
        );
        let etag = result.expect("the second attempt has time to finish");
        assert!(
            started.elapsed() >= Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(memory.head("db").await.unwrap().unwrap().etag, etag);
    }

    #[test]
    fn throttling_answers_are_told_apart() {
        for message in [
            "503 SlowDown Please reduce your request rate.",
            "429 TooManyRequests",
            "503 ServiceUnavailable",
        ] {
            assert!(
                StoreError::transient("k", message).is_throttle(),
                "{message}"
            );
        }
        for message in ["500 InternalError", "timed out", "injected error"] {
            assert!(
                !StoreError::transient("k", message).is_throttle(),
                "{message}"
            );
        }
    }

    /// The throttling backoff is longer than the normal one, and bounded.
    #[tokio::test(start_paused = true)]
    async fn throttled_waits_are_longer_and_bounded() {
        let policy = RetryPolicy::default();
        let mut attempts = Attempts::new(&policy, 0);
        let slow = StoreError::transient("k", "503 SlowDown");
        let started = Instant::now();
        let mut waits = 0;
        while attempts.wait(&slow).await {
            waits += 1;
        }
        assert!(waits >= 4, "{waits} throttled retries");
        assert!(started.elapsed() >= Duration::from_millis(100 * 15 / 2));
        assert!(started.elapsed() <= policy.max_elapsed);
    }
}
