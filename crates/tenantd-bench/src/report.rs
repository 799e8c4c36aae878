//! The bench's results: a table for people, JSON for tools, an SVG plot,
//! and the targets each figure is held to.

use std::fmt::Write;
use std::time::Duration;

use serde_json::{Value, json};

use super::cold_start::ColdStart;
use super::failover::FailoverResult;
use super::followers::FollowersResult;
use super::followers_kill::KillResult;
use super::held_tenants::HeldTenantsResult;
use super::idle::IdleResult;
use super::svg::{Series, chart};
use super::throughput::{Level, ModeResult, SqlResult};
use super::unknown::UnknownResult;
use super::{BenchArgs, HEADLINE_CLIENTS};

pub struct Report {
    store_latency_ms: f64,
    store_jitter_ms: f64,
    lease_ttl_ms: u64,
    level_duration_ms: u64,
    store_put_p50_ms: f64,
    durable: ModeResult,
    unsafe_: ModeResult,
    sql: SqlResult,
    idle: IdleResult,
    held: HeldTenantsResult,
    cold: Vec<ColdStart>,
    failover: FailoverResult,
    elapsed: Duration,
    unknown: Option<UnknownResult>,
    followers: Option<FollowersResult>,
    follower_kill: Option<KillResult>,
}

/// A target and whether this run met it.
struct Target {
    what: String,
    met: bool,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        args: &BenchArgs,
        level_duration: Duration,
        store_put_p50_ms: f64,
        durable: ModeResult,
        unsafe_: ModeResult,
        sql: SqlResult,
        idle: IdleResult,
        held: HeldTenantsResult,
        cold: Vec<ColdStart>,
        failover: FailoverResult,
        elapsed: Duration,
    ) -> Report {
        Report {
            store_latency_ms: args.store_latency.as_secs_f64() * 1000.0,
            store_jitter_ms: args.store_jitter.as_secs_f64() * 1000.0,
            lease_ttl_ms: args.lease_ttl.as_millis() as u64,
            level_duration_ms: level_duration.as_millis() as u64,
            store_put_p50_ms,
            durable,
            unsafe_,
            sql,
            idle,
            held,
            cold,
            failover,
            elapsed,
            unknown: None,
            followers: None,
            follower_kill: None,
        }
    }

    /// The requests for tenants that do not exist, and what they wrote.
    pub fn set_unknown_tenants(&mut self, unknown: UnknownResult) {
        self.unknown = Some(unknown);
    }

    /// Follower reads on three machines of one tenant.
    pub fn set_followers(&mut self, followers: FollowersResult) {
        self.followers = Some(followers);
    }

    pub fn set_follower_kill(&mut self, kill: KillResult) {
        self.follower_kill = Some(kill);
    }

    /// The level the headline figures come from: 256 clients, or the
    /// highest level run when 256 was not.
    fn headline(mode: &ModeResult) -> &Level {
        mode.levels
            .iter()
            .find(|l| l.clients == HEADLINE_CLIENTS)
            .or(mode.levels.iter().max_by_key(|l| l.clients))
            .expect("at least one level")
    }

    fn failover_p50(&self) -> u64 {
        median(&self.failover.failover_ms)
    }

    fn failover_max(&self) -> u64 {
        self.failover.failover_ms.iter().copied().max().unwrap_or(0)
    }

    fn handoff_max(&self) -> u64 {
        self.failover
            .handoff_gap_ms
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Commit p50 at the largest size measured ≤ 1.5 × at the smallest
    /// (the 100 MB against 1 MB).
    fn commit_cost_target(&self) -> Target {
        let smallest = self.cold.iter().min_by_key(|c| c.size_mb);
        let largest = self.cold.iter().max_by_key(|c| c.size_mb);
        match (smallest, largest) {
            (Some(s), Some(l)) => Target {
                what: format!(
                    "commit p50 at {} MB ≤ 1.5 × at {} MB: {:.1} ms ≤ {:.1} ms",
                    l.size_mb,
                    s.size_mb,
                    l.commit_p50_ms,
                    1.5 * s.commit_p50_ms
                ),
                met: l.commit_p50_ms <= 1.5 * s.commit_p50_ms,
            },
            _ => Target {
                what: "commit p50 by database size: no size measured".into(),
                met: false,
            },
        }
    }

    fn targets(&self) -> Vec<Target> {
        let durable = Self::headline(&self.durable);
        let upper = Self::headline(&self.unsafe_);
        let c = durable.clients;
        let unknown = self.unknown.iter().map(|u| Target {
            what: format!(
                "no store write for requests for tenants that do not exist: {} writes for {} requests ({} answered 404)",
                u.store_writes, u.requests, u.not_found
            ),
            met: u.store_writes == 0 && u.not_found == u.requests,
        });
        let mut targets = vec![
            Target {
                what: format!(
                    "durable throughput ≥ 50% of the upper bound at {c} clients: {:.0} / {:.0} = {:.0}%",
                    durable.rps,
                    upper.rps,
                    100.0 * durable.rps / upper.rps.max(1e-9)
                ),
                met: durable.rps >= 0.5 * upper.rps,
            },
            Target {
                what: format!(
                    "durable p50 ≤ 1.5 × store PUT p50 at {c} clients: {:.1} ms ≤ {:.1} ms",
                    durable.p50_ms,
                    1.5 * self.store_put_p50_ms
                ),
                met: durable.p50_ms <= 1.5 * self.store_put_p50_ms,
            },
            Target {
                what: match self.held.store_requests_per_held_tenant_hour_by_count.get("1000") {
                    Some(v) => format!("≤ 20 store requests per held tenant-hour at 1,000 idle tenants: {v:.1}"),
                    None => "≤ 20 store requests per held tenant-hour at 1,000 idle tenants: not measured".into(),
                },
                met: self
                    .held
                    .store_requests_per_held_tenant_hour_by_count
                    .get("1000")
                    .is_some_and(|v| *v <= 20.0),
            },
            Target {
                what: format!(
                    "≤ 20 store PUTs per 1,000 acknowledged writes at {c} clients: {:.1}",
                    durable.puts_per_1000_writes
                ),
                met: durable.puts_per_1000_writes <= 20.0,
            },
            Target {
                what: format!(
                    "failover ≤ lease ttl + 1 s: max {} ms ≤ {} ms over {} kills",
                    self.failover_max(),
                    self.lease_ttl_ms + 1000,
                    self.failover.failover_ms.len()
                ),
                met: !self.failover.failover_ms.is_empty()
                    && self.failover_max() <= self.lease_ttl_ms + 1000,
            },
            Target {
                what: format!(
                    "graceful handoff gap ≤ 300 ms: max {} ms over {} stops",
                    self.handoff_max(),
                    self.failover.handoff_gap_ms.len()
                ),
                met: !self.failover.handoff_gap_ms.is_empty() && self.handoff_max() <= 300,
            },
            Target {
                what: format!(
                    "no store request from an idle tenant after its release: {}",
                    self.idle.requests_after_release
                ),
                met: self.idle.requests_after_release == 0,
            },
            self.commit_cost_target(),
            Target {
                what: format!(
                    "≤ 64 KiB uploaded per single-increment commit at every size: max {:.0} B",
                    self.cold
                        .iter()
                        .map(|c| c.upload_bytes_per_commit)
                        .fold(0.0, f64::max)
                ),
                met: self
                    .cold
                    .iter()
                    .all(|c| c.upload_bytes_per_commit <= 64.0 * 1024.0),
            },
            Target {
                what: format!(
                    "cold start ≤ snapshot download × 1.2 + 50 ms at every size (issue 22): {}",
                    self.cold
                        .iter()
                        .map(|c| format!(
                            "{} MB {:.0} / {:.0} ms",
                            c.size_mb,
                            c.cold_start_ms,
                            cold_start_goal_ms(c.snapshot_download_ms)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                met: self
                    .cold
                    .iter()
                    .all(|c| c.cold_start_ms <= cold_start_goal_ms(c.snapshot_download_ms)),
            },
            Target {
                what: format!(
                    "no acknowledged write lost: {} acknowledged, final count {}",
                    self.durable.acked_total, self.durable.final_count
                ),
                met: self.durable.final_count >= self.durable.acked_total,
            },
            Target {
                what: format!(
                    "no acknowledged SQL transaction lost, sum of balances conserved: {} acknowledged, {} stored, sum {}",
                    self.sql.acked_total,
                    self.sql.transfers_stored,
                    if self.sql.sum_conserved {
                        "conserved"
                    } else {
                        "NOT conserved"
                    }
                ),
                met: self.sql.transfers_stored >= self.sql.acked_total && self.sql.sum_conserved,
            },
        ];
        targets.extend(unknown);
        targets.extend(self.follower_targets());
        targets
    }

    /// Issue 25's goals for follower reads, when they were measured.
    fn follower_targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        if let Some(f) = &self.followers {
            targets.push(Target {
                what: format!(
                    "≥ 60% of read-only answers by followers (3 machines, mixed load): {:.0}%",
                    100.0 * f.follower_read_share
                ),
                met: f.follower_read_share >= 0.6,
            });
            targets.push(Target {
                what: format!(
                    "≤ 10 store requests per follower per 1,000 commits: {:.1}",
                    f.follower_store_requests_per_1000_commits
                ),
                met: f.follower_store_requests_per_1000_commits <= 10.0,
            });
        }
        if let Some(k) = &self.follower_kill {
            targets.push(Target {
                what: format!(
                    "≥ 99% of read-only requests answered during a holder kill: {:.2}% of {} (longest gap {} ms; /sql {:.2}% of {}, Hrana {:.2}% of {}; follower share /sql {:.2}, Hrana {:.2})",
                    100.0 * k.follower_read_availability_during_kill,
                    k.reads,
                    k.follower_read_longest_gap_ms,
                    100.0 * k.sql.availability,
                    k.sql.reads,
                    100.0 * k.hrana.availability,
                    k.hrana.reads,
                    k.sql.follower_share,
                    k.hrana.follower_share,
                ),
                met: k.follower_read_availability_during_kill >= 0.99,
            });
        }
        targets
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ntenantd bench: store latency {} ms ± {} ms, lease ttl {} ms, {} ms per level, {:.0} s in all\n",
            self.store_latency_ms,
            self.store_jitter_ms,
            self.lease_ttl_ms,
            self.level_duration_ms,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "| clients | durable/s | p50 ms | p99 ms | PUTs/1000 | upper bound/s | p50 ms | p99 ms | durable/upper |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (d, u) in self.durable.levels.iter().zip(&self.unsafe_.levels) {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.0}% |",
                d.clients,
                d.rps,
                d.p50_ms,
                d.p99_ms,
                d.puts_per_1000_writes,
                u.rps,
                u.p50_ms,
                u.p99_ms,
                100.0 * d.rps / u.rps.max(1e-9)
            );
        }
        let _ = writeln!(out, "\n| figure | value |\n|---|---:|");
        let sql = &self.sql.level;
        let rows = [
            ("store PUT p50", format!("{:.1} ms", self.store_put_p50_ms)),
            (
                "durable SQL transaction (3 statements) at the headline level",
                format!(
                    "{:.0}/s, p50 {:.1} ms, p99 {:.1} ms at {} clients ({:.1} PUTs/1000, {} errors)",
                    sql.rps,
                    sql.p50_ms,
                    sql.p99_ms,
                    sql.clients,
                    sql.puts_per_1000_writes,
                    sql.errors
                ),
            ),
            (
                "failover after SIGKILL, holder gone for good (p50 / max)",
                format!(
                    "{} / {} ms over {} kills",
                    self.failover_p50(),
                    self.failover_max(),
                    self.failover.failover_ms.len()
                ),
            ),
            (
                "failover after SIGKILL, holder restarted in 500 ms (p50 / max)",
                format!(
                    "{} / {} ms over {} kills",
                    median(&self.failover.failover_restart_ms),
                    self.failover.failover_restart_ms.iter().max().unwrap_or(&0),
                    self.failover.failover_restart_ms.len()
                ),
            ),
            (
                "handoff gap after SIGTERM (max)",
                format!(
                    "{} ms over {} stops, {} failed requests",
                    self.handoff_max(),
                    self.failover.handoff_gap_ms.len(),
                    self.failover.handoff_failed_requests
                ),
            ),
            (
                "idle held tenant",
                format!(
                    "{:.0} store requests/hour",
                    self.idle.held_requests_per_hour
                ),
            ),
            (
                "store requests per held tenant-hour (1 / 100 / 1000 tenants)",
                self.held
                    .store_requests_per_held_tenant_hour_by_count
                    .values()
                    .map(|v| format!("{v:.1}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ),
            (
                "RSS per held tenant",
                format!(
                    "{:.3} MiB ({:.1} MiB empty, {:.1} MiB with {})",
                    self.held.rss_mb_per_held_tenant,
                    self.held.rss_mb_empty,
                    self.held.rss_mb_full,
                    self.held.held_at_largest
                ),
            ),
            (
                "idle tenant after release",
                format!(
                    "{} store requests in {} ms",
                    self.idle.requests_after_release, self.idle.after_release_window_ms
                ),
            ),
            (
                "RSS per machine (idle / under load)",
                format!(
                    "{:.1} / {:.1} MiB",
                    self.failover.rss_idle_mb, self.failover.rss_load_mb
                ),
            ),
        ];
        let unknown = self.unknown.as_ref().map(|u| {
            (
                "requests for tenants that do not exist",
                format!(
                    "{} store writes, {} reads for {} requests ({} answered 404)",
                    u.store_writes, u.store_reads, u.requests, u.not_found
                ),
            )
        });
        for (name, value) in rows.into_iter().chain(unknown) {
            let _ = writeln!(out, "| {name} | {value} |");
        }
        let _ = writeln!(
            out,
            "\n| database | commit p50 / p99 | delta bytes per commit | snapshot bytes (compaction) | cold start (snapshot + {} deltas) | snapshot download | conversion (first claim) | retries |\n|---:|---:|---:|---:|---:|---:|---:|---:|",
            super::cold_start::DELTAS_AFTER_SNAPSHOT + 1
        );
        for c in &self.cold {
            let _ = writeln!(
                out,
                "| {} MB | {:.1} / {:.1} ms | {:.0} B | {:.0} B | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
                c.size_mb,
                c.commit_p50_ms,
                c.commit_p99_ms,
                c.upload_bytes_per_commit,
                c.snapshot_upload_bytes,
                c.cold_start_ms,
                c.snapshot_download_ms,
                c.conversion_ms,
                c.retries
            );
        }
        let _ = writeln!(out, "\nTargets:");
        for target in self.targets() {
            let mark = if target.met { "met   " } else { "MISSED" };
            let _ = writeln!(out, "  {mark} {}", target.what);
        }
        out
    }

    pub fn json(&self) -> Value {
        let durable = Self::headline(&self.durable);
        let upper = Self::headline(&self.unsafe_);
        let cold_start_ms: serde_json::Map<String, Value> = self
            .cold
            .iter()
            .map(|c| (format!("{}mb", c.size_mb), json!(c.cold_start_ms)))
            .collect();
        let by_size = |f: fn(&ColdStart) -> f64| -> serde_json::Map<String, Value> {
            self.cold
                .iter()
                .map(|c| (c.size_mb.to_string(), json!(f(c))))
                .collect()
        };
        json!({
            "headline_clients": durable.clients,
            "durable_rps": durable.rps,
            "unsafe_rps": upper.rps,
            "durable_p50_ms": durable.p50_ms,
            "durable_p99_ms": durable.p99_ms,
            "unsafe_p50_ms": upper.p50_ms,
            "unsafe_p99_ms": upper.p99_ms,
            "store_latency_ms": self.store_latency_ms,
            "store_jitter_ms": self.store_jitter_ms,
            "store_put_p50_ms": self.store_put_p50_ms,
            "puts_per_1000_writes": durable.puts_per_1000_writes,
            "sql_durable_rps": self.sql.level.rps,
            "sql_p50_ms": self.sql.level.p50_ms,
            "sql_p99_ms": self.sql.level.p99_ms,
            "sql_clients": self.sql.level.clients,
            "hrana_durable_rps": self.sql.hrana.rps,
            "hrana_p50_ms": self.sql.hrana.p50_ms,
            "hrana_p99_ms": self.sql.hrana.p99_ms,
            "sql": self.sql,
            "lease_ttl_ms": self.lease_ttl_ms,
            "failover_ms_p50": self.failover_p50(),
            "failover_ms_max": self.failover_max(),
            "failover_ms": self.failover.failover_ms,
            "failover_restart_ms": self.failover.failover_restart_ms,
            "handoff_gap_ms": self.handoff_max(),
            "handoff_gaps_ms": self.failover.handoff_gap_ms,
            "handoff_failed_requests": self.failover.handoff_failed_requests,
            "cold_start_ms": cold_start_ms,
            "commit_p50_ms_by_size_mb": by_size(|c| c.commit_p50_ms),
            "upload_bytes_per_commit_by_size_mb": by_size(|c| c.upload_bytes_per_commit),
            "snapshot_upload_bytes_by_size_mb": by_size(|c| c.snapshot_upload_bytes),
            "cold_start_ms_by_size_mb": by_size(|c| c.cold_start_ms),
            "failover_after_kill_ms_by_size_mb": by_size(|c| c.failover_after_kill_ms),
            "snapshot_download_ms_by_size_mb": by_size(|c| c.snapshot_download_ms),
            "claim_rss_growth_mb_by_size_mb": by_size(|c| c.claim_rss_growth_mb),
            "cold_start": self.cold,
            "rss_mb": { "idle": self.failover.rss_idle_mb, "load": self.failover.rss_load_mb },
            "idle": self.idle,
            "idle_store_requests_after_release": self.idle.requests_after_release,
            "store_requests_per_held_tenant_hour_by_count": self.held.store_requests_per_held_tenant_hour_by_count,
            "rss_mb_per_held_tenant": self.held.rss_mb_per_held_tenant,
            "held_tenants": self.held,
            "unknown_tenant_store_writes": self.unknown.as_ref().map(|u| u.store_writes),
            "unknown_tenants": self.unknown,
            "follower_read_share": self.followers.as_ref().map(|f| f.follower_read_share),
            "follower_lag_p99_ms": self.followers.as_ref().map(|f| f.follower_lag_p99_ms),
            "followers": self.followers,
            "follower_store_requests_per_1000_commits": self.followers.as_ref().map(|f| f.follower_store_requests_per_1000_commits),
            "follower_read_availability_during_kill": self.follower_kill.as_ref().map(|k| k.follower_read_availability_during_kill),
            "follower_read_longest_gap_ms": self.follower_kill.as_ref().map(|k| k.follower_read_longest_gap_ms),
            "follower_kill": self.follower_kill,
            "durable": self.durable,
            "unsafe": self.unsafe_,
            "targets": self.targets().iter().map(|t| json!({ "target": t.what, "met": t.met })).collect::<Vec<_>>(),
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }

    pub fn commit_svg(&self) -> String {
        commit_chart(&self.cold)
    }

    pub fn svg(&self) -> String {
        let series = |mode: &ModeResult, name, color, f: fn(&Level) -> f64| Series {
            name,
            color,
            points: mode
                .levels
                .iter()
                .map(|l| (l.clients as f64, f(l)))
                .collect(),
        };
        chart(
            &[
                series(&self.durable, "durable", "#1f77b4", |l| l.rps),
                series(&self.unsafe_, "answer before upload", "#ff7f0e", |l| l.rps),
            ],
            &[
                series(&self.durable, "durable", "#1f77b4", |l| l.p99_ms),
                series(&self.unsafe_, "answer before upload", "#ff7f0e", |l| {
                    l.p99_ms
                }),
            ],
        )
    }
}

/// Commit cost against database size, before (the whole file uploaded per
/// commit, figures of issue 14) and now.
pub fn commit_chart(cold: &[ColdStart]) -> String {
    let now = Series {
        name: "commit log (delta per commit)",
        color: "#1f77b4",
        points: cold
            .iter()
            .map(|c| (c.size_mb as f64, c.commit_p50_ms))
            .collect(),
    };
    let before = Series {
        name: "before: whole file per commit",
        color: "#d62728",
        points: BEFORE_COMMIT_P50_MS.to_vec(),
    };
    let bytes = Series {
        name: "delta bytes per commit (KiB)",
        color: "#2ca02c",
        points: cold
            .iter()
            .map(|c| (c.size_mb as f64, c.upload_bytes_per_commit / 1024.0))
            .collect(),
    };
    super::svg::size_chart(&[before, now], &[bytes])
}

/// Single-client commit p50 by database size (MB, ms) before the commit
/// log, as measured by `tenantd bench --quick` in issue 14.
pub const BEFORE_COMMIT_P50_MS: [(f64, f64); 3] = [(1.0, 27.0), (10.0, 68.0), (100.0, 295.0)];

fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

/// Issue 22's bound on a cold start: the snapshot's download with a fifth
/// more, and 50 ms for the lease and the fences around it.
fn cold_start_goal_ms(download_ms: f64) -> f64 {
    1.2 * download_ms + 50.0
}
