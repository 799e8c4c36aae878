//! What every tenant actor of a machine shares: the store, metrics, the
//! machine's identity and folder, and the limits it applies. Plain data,
//! so that the actor and the claim (which takes a tenant over for the
//! actor) both read it without importing each other.

use std::path::PathBuf;
use std::time::Duration;

use super::log::Retention;
use super::sql::SqlLimits;
use crate::metrics::Metrics;
use crate::store::DynStore;

/// Everything an actor needs besides its lease.
#[derive(Clone)]
pub struct ActorContext {
    pub store: DynStore,
    pub metrics: Metrics,
    pub machine_id: String,
    /// Folder for this machine's working copies.
    pub data_dir: PathBuf,
    /// Release the lease after this long without requests (pool mode).
    pub idle_timeout: Option<Duration>,
    /// Bounds on SQL requests.
    pub sql: SqlLimits,
    /// What the log keeps and when it is compacted.
    pub retention: Retention,
    /// Bench-only: answer before the upload, as the original app did. Not
    /// reachable from `tenantd serve` (no flag, no env var).
    pub ack_before_upload: bool,
    /// Simulation-only negative control: hand each slot to the followers'
    /// pushes when its upload starts, not once it is confirmed, so that a
    /// follower shows state that may be lost. Not reachable from `tenantd
    /// serve` (no flag, no env var).
    pub push_before_upload: bool,
    /// How long one log slot is tried before the holder steps down (plus
    /// the body's transfer time); `None`: twice the lease ttl. Tests only.
    pub upload_bound: Option<Duration>,
    /// How long a release may take from its stop: committing what is
    /// queued, the snapshot, the `released` lock write (`tenantd serve`
    /// derives it from `--drain-timeout`). `None`: unbounded.
    pub release_budget: Option<Duration>,
    /// Simulation-only negative control: a release with the log names the
    /// slot before its last confirmed one, so the next claim must report
    /// the mismatch. Not reachable from `tenantd serve`.
    pub release_log_end_behind: bool,
    /// How long a claim may go on reading again when the tenant's objects
    /// change under it (a late upload, a compaction), counted after the
    /// reads begun before the lease (a big snapshot's download) are in.
    pub claim_retries_for: Duration,
}

impl ActorContext {
    /// A context with the defaults of `tenantd serve`: no idle release,
    /// default SQL limits.
    pub fn new(store: DynStore, metrics: Metrics, machine_id: String, data_dir: PathBuf) -> Self {
        ActorContext {
            store,
            metrics,
            machine_id,
            data_dir,
            idle_timeout: None,
            sql: SqlLimits::default(),
            retention: Retention::default(),
            ack_before_upload: false,
            push_before_upload: false,
            upload_bound: None,
            release_budget: None,
            release_log_end_behind: false,
            claim_retries_for: Duration::from_secs(30),
        }
    }
}
