//! Prometheus metrics of one server, in its own registry (so that several
//! servers in one test process do not share counters).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and outcome (served, replayed, bad_request, ...).
    pub requests: IntCounterVec,
    /// Increments committed per upload.
    pub batch_size: HistogramVec,
    /// Seconds from the start of a database upload to its success.
    pub upload_seconds: HistogramVec,
    /// Uploads sent while earlier ones were still under way, by outcome
    /// (`ok`, `failed`).
    pub pipelined_uploads: IntCounterVec,
    /// Bytes written to the store by kind: `delta` (commits), `snapshot`
    /// (compactions, conversions, archives).
    pub upload_bytes: IntCounterVec,
    /// Compactions by outcome (`ok`, `failed`).
    pub compactions: IntCounterVec,
    /// Claims whose fences found the log ending elsewhere than the
    /// released lock they replaced said (`log_end`): slots lost by the
    /// store, or a release that misnamed its end.
    pub release_log_end_mismatches: IntCounter,
    /// Claims whose first fence round went out before their lock write
    /// (after a release naming `log_end`) and was their last.
    pub claims_fenced_before_lock_write: IntCounter,
    /// 1 when this machine holds the tenant's lease, else 0.
    pub lease_holder: IntGaugeVec,
    /// Epoch of the tenant's lease as last seen by this machine.
    pub lease_epoch: IntGaugeVec,
    /// Store requests by operation and outcome (as sent, after fault injection).
    pub store_requests: IntCounterVec,
    /// Store requests by operation and the kind of object named
    /// (`lock`, `heartbeat`, `log`, `snapshot`, `other`): which objects a
    /// machine's steady state costs.
    pub store_requests_by_object: IntCounterVec,
    /// Store request latency by operation.
    pub store_seconds: HistogramVec,
    /// Writes of this machine's session heartbeat by outcome: `started`
    /// (a new incarnation), `ok`, `error`, `timeout` (retried), `expired`,
    /// `lost` (every lease of the session ended).
    pub heartbeat_writes: IntCounterVec,
    /// Log slots applied to follower replicas, by `source`: `push` (sent
    /// by the holder) or `log` (read from the store).
    pub follower_slots: IntCounterVec,
    /// Reads of tenants' snapshot bodies (`customer/<id>/db.sqlite3`), by
    /// operation: what a takeover from a replica saves.
    pub snapshot_reads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tenantd_http_requests_total",
                "HTTP requests by route and outcome",
            ),
            &["route", "outcome"],
        )
        .unwrap();
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "tenantd_batch_size",
                "Increments committed per database upload",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
            &[],
        )
        .unwrap();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
        ];
        let upload_seconds = HistogramVec::new(
            HistogramOpts::new("tenantd_upload_seconds", "Database upload latency")
                .buckets(latency_buckets.clone()),
            &[],
        )
        .unwrap();
        let lease_holder = IntGaugeVec::new(
            Opts::new(
                "tenantd_lease_holder",
                "1 when this machine holds the tenant's lease",
            ),
            &["customer_id"],
        )
        .unwrap();
        let lease_epoch = IntGaugeVec::new(
            Opts::new(
                "tenantd_lease_epoch",
                "Epoch of the tenant's lease as last seen here",
            ),
            &["customer_id"],
        )
        .unwrap();
        let pipelined_uploads = IntCounterVec::new(
            Opts::new(
                "tenantd_pipelined_uploads_total",
                "Log uploads sent while earlier ones were under way, by outcome",
            ),
            &["outcome"],
        )
        .unwrap();
        let upload_bytes = IntCounterVec::new(
            Opts::new(
                "tenantd_upload_bytes_total",
                "Bytes written to the store by kind (delta, snapshot)",
            ),
            &["kind"],
        )
        .unwrap();
        let compactions = IntCounterVec::new(
            Opts::new("tenantd_compactions_total", "Compactions by outcome"),
            &["outcome"],
        )
        .unwrap();
        let store_requests = IntCounterVec::new(
            Opts::new(
                "tenantd_store_requests_total",
                "Object store requests by operation and outcome",
            ),
            &["op", "outcome"],
        )
        .unwrap();
        let store_requests_by_object = IntCounterVec::new(
            Opts::new(
                "tenantd_store_requests_by_object_total",
                "Object store requests by operation and kind of object",
            ),
            &["op", "object"],
        )
        .unwrap();
        let follower_slots = IntCounterVec::new(
            Opts::new(
                "tenantd_follower_slots_total",
                "Log slots applied to follower replicas by source (push, log)",
            ),
            &["source"],
        )
        .unwrap();
        let store_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tenantd_store_request_seconds",
                "Object store request latency",
            )
            .buckets(latency_buckets),
            &["op"],
        )
        .unwrap();
        let heartbeat_writes = IntCounterVec::new(
            Opts::new(
                "tenantd_heartbeat_writes_total",
                "Writes of this machine's session heartbeat by outcome",
            ),
            &["outcome"],
        )
        .unwrap();
        let snapshot_reads = IntCounterVec::new(
            Opts::new(
                "tenantd_store_snapshot_reads_total",
                "Reads of tenants' snapshot bodies (db.sqlite3) from the store",
            ),
            &["op"],
        )
        .unwrap();
        let release_log_end_mismatches = IntCounter::new(
            "tenantd_release_log_end_mismatches_total",
            "Claims that found the log ending elsewhere than the released lock's log_end said",
        )
        .unwrap();
        registry
            .register(Box::new(release_log_end_mismatches.clone()))
            .unwrap();
        let claims_fenced_before_lock_write = IntCounter::new(
            "tenantd_claims_fenced_before_lock_write_total",
            "Takeovers whose fences went out before their lock write (after a release naming log_end), with no fence round after",
        )
        .unwrap();
        registry
            .register(Box::new(claims_fenced_before_lock_write.clone()))
            .unwrap();
        for c in [
            &snapshot_reads,
            &requests,
            &store_requests,
            &store_requests_by_object,
            &pipelined_uploads,
            &heartbeat_writes,
            &upload_bytes,
            &compactions,
            &follower_slots,
        ] {
            registry.register(Box::new(c.clone())).unwrap();
        }
        for h in [&batch_size, &upload_seconds, &store_seconds] {
            registry.register(Box::new(h.clone())).unwrap();
        }
        for g in [&lease_holder, &lease_epoch] {
            registry.register(Box::new(g.clone())).unwrap();
        }
        Metrics {
            registry,
            requests,
            pipelined_uploads,
            upload_bytes,
            compactions,
            release_log_end_mismatches,
            claims_fenced_before_lock_write,
            batch_size,
            upload_seconds,
            lease_holder,
            lease_epoch,
            store_requests,
            store_requests_by_object,
            store_seconds,
            heartbeat_writes,
            follower_slots,
            snapshot_reads,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
