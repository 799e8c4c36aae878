//! `tenantd bench` end to end at a small scale: every section runs, the JSON
//! carries the contract keys, and the figures that are facts rather than
//! timings hold (nothing acknowledged is lost, an idle tenant goes quiet
//! after its release, requests for tenants that do not exist write
//! nothing). Timings are printed by the bench, not asserted here.

use std::process::Command;

#[test]
fn bench_runs_every_section_and_reports_the_contract_keys() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let output = Command::new(env!("CARGO_BIN_EXE_tenantd"))
        .args([
            "bench",
            "--quick",
            "--concurrency",
            "1,8",
            "--duration",
            "1s",
            "--kills",
            "2",
            "--stops",
            "1",
            "--sizes-mb",
            "1",
            "--lease-ttl",
            "1s",
            "--store-latency",
            "5ms",
            "--scratch",
        ])
        .arg(dir.path().join("scratch"))
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .expect("tenantd bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown by the test harness when an assertion below fails.
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "bench failed (its output is above)"
    );
    assert!(stderr.contains("[10/10]"), "no progress lines:\n{stderr}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "durable_rps",
        "unsafe_rps",
        "durable_p50_ms",
        "durable_p99_ms",
        "store_put_p50_ms",
        "puts_per_1000_writes",
        "lease_ttl_ms",
        "failover_ms_p50",
        "failover_ms_max",
        "handoff_gap_ms",
        "sql_durable_rps",
        "sql_p50_ms",
        "hrana_durable_rps",
        "hrana_p50_ms",
        "rss_mb_per_held_tenant",
        "follower_read_share",
        "follower_lag_p99_ms",
        "follower_store_requests_per_1000_commits",
        "follower_read_availability_during_kill",
        "follower_read_longest_gap_ms",
    ] {
        assert!(report[key].is_number(), "{key} missing: {report:#}");
    }
    // Read availability during the kill: a share, of reads that were sent.
    let availability = report["follower_read_availability_during_kill"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&availability), "{availability}");
    assert!(report["follower_kill"]["reads"].as_u64().unwrap() > 0);
    assert!(report["durable_rps"].as_f64().unwrap() > 0.0);
    assert!(report["sql_durable_rps"].as_f64().unwrap() > 0.0);
    assert!(report["sql_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(report["hrana_durable_rps"].as_f64().unwrap() > 0.0);
    assert_eq!(report["sql_clients"], 8, "SQL at the headline level");
    assert!(report["cold_start_ms"]["1mb"].as_f64().unwrap() > 0.0);
    for key in [
        "commit_p50_ms_by_size_mb",
        "upload_bytes_per_commit_by_size_mb",
        "cold_start_ms_by_size_mb",
        "snapshot_download_ms_by_size_mb",
    ] {
        assert!(
            report[key]["1"].as_f64().unwrap() > 0.0,
            "{key}: {report:#}"
        );
    }
    // Growth may well be zero for a 1 MB tenant: a number, not a sign.
    assert!(
        report["claim_rss_growth_mb_by_size_mb"]["1"].is_number(),
        "{report:#}"
    );
    assert!(report["rss_mb"]["idle"].as_f64().unwrap() > 0.0);
    assert_eq!(report["headline_clients"], 8, "headline from the top level");
    assert_eq!(report["lease_ttl_ms"], 1000);
    assert_eq!(report["failover_ms"].as_array().unwrap().len(), 2);
    assert_eq!(report["durable"]["levels"].as_array().unwrap().len(), 2);
    for count in ["1", "100", "1000"] {
        let per_hour = &report["store_requests_per_held_tenant_hour_by_count"][count];
        assert!(
            per_hour.as_f64().unwrap() > 0.0,
            "{count} tenants: {per_hour}"
        );
    }
    assert_eq!(report["held_tenants"]["held_at_largest"], 1000);

    // Facts, not timings.
    let acked = report["durable"]["acked_total"].as_u64().unwrap();
    let last = report["durable"]["final_count"].as_u64().unwrap();
    assert!(acked > 0 && last >= acked, "acked {acked}, final {last}");
    let sql = &report["sql"];
    let (acked, stored) = (
        sql["acked_total"].as_u64().unwrap(),
        sql["transfers_stored"].as_u64().unwrap(),
    );
    assert!(
        acked > 0 && stored >= acked,
        "SQL: acked {acked}, stored {stored}"
    );
    assert_eq!(sql["sum_conserved"], true);
    assert_eq!(report["idle_store_requests_after_release"], 0);
    assert_eq!(
        report["unknown_tenant_store_writes"], 0,
        "{:#}",
        report["unknown_tenants"]
    );
    assert_eq!(report["unknown_tenants"]["not_found"], 1000);
    // The cold start replays the snapshot and every commit after it, and a
    // single increment uploads a few pages, not the database. An increment
    // sent again (the holder's session lost on a loaded machine) adds the
    // new holder's fences to the log.
    let cold = &report["cold_start"][0];
    let replayed = cold["deltas_replayed"].as_u64().unwrap();
    match cold["retries"].as_u64().unwrap() {
        0 => assert_eq!(replayed, 101, "{cold}"),
        _ => assert!(replayed >= 101, "{cold}"),
    }
    let per_commit = report["upload_bytes_per_commit_by_size_mb"]["1"]
        .as_f64()
        .unwrap();
    assert!(per_commit <= 65536.0, "{per_commit} bytes per commit");
    let object = report["cold_start"][0]["object_bytes"].as_u64().unwrap();
    assert!(object >= 1_000_000, "the 1 MB database is {object} bytes");

    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("polyline"));
}
