//! A short chaos run in CI: a real `tenantd dev` cluster, the workload and
//! every nemesis, then the checker. Zero violations, and work was done.

#[test]
fn a_short_chaos_run_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantd"))
        .args([
            "chaos",
            "--duration",
            "25s",
            "--seed",
            "7",
            "--clients",
            "6",
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    assert!(
        report["acked"].as_u64().unwrap() > 100,
        "too little work: {report}"
    );
    assert!(
        !report["nemeses"].as_array().unwrap().is_empty(),
        "no nemesis ran: {stderr}"
    );
}

/// The SQL workload, briefly: transfers between accounts through the SQL
/// API under the nemeses that fit in 14 s; the tables read back through the
/// API and from the store conserve the sum and hold every acknowledged
/// transfer exactly once. (The checker's own tests in
/// `crates/tenantd-chaos/src/sql_checker.rs` show it reports lost, doubled, partial,
/// refused-but-stored and phantom transfers.)
#[test]
fn a_short_sql_chaos_run_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantd"))
        .args([
            "chaos",
            "--workload",
            "sql",
            "--duration",
            "14s",
            "--seed",
            "11",
            "--clients",
            "6",
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "warn")
        .env_remove("TENANTD_API_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["workload"], "sql");
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    assert_eq!(report["sources"], serde_json::json!(["store", "api"]));
    assert!(
        report["acked"].as_u64().unwrap() > 50,
        "too little work: {report}"
    );
    for (customer, r) in report["customers"].as_object().unwrap() {
        assert_eq!(
            r["sum_of_balances"], r["expected_sum"],
            "customer {customer}"
        );
        assert!(
            r["transfers_stored"].as_u64().unwrap() > 0,
            "customer {customer}: {r}"
        );
    }
    assert!(
        !report["nemeses"].as_array().unwrap().is_empty(),
        "no nemesis ran: {stderr}"
    );
    assert!(stdout.contains("no violations"), "{stdout}");
}

/// A few seconds of store trouble (5% transient errors on the customer's
/// machines, over a baseline fault setting): nothing lost or doubled, and
/// the report carries the availability figures (no thresholds: timing
/// depends on the machine).
#[test]
fn a_store_error_burst_finds_no_violation_and_reports_availability() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantd"))
        .args([
            "chaos",
            "--duration",
            "8s",
            "--seed",
            "3",
            "--clients",
            "4",
            "--customers",
            "100",
            "--nemeses",
            "store_errors",
            "--faults",
            r#"{"latency":"5ms","jitter":"2ms"}"#,
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    let nemeses = report["nemeses"].as_array().unwrap();
    assert!(
        nemeses.iter().any(|n| n["kind"] == "store_errors"),
        "the store nemesis did not run: {stderr}"
    );
    assert!(report["acked"].as_u64().unwrap() > 0, "no work: {report}");
    let ratio = report["success_ratio"].as_f64().expect("success_ratio");
    assert!((0.0..=1.0).contains(&ratio), "{report}");
    assert!(report["longest_gap_ms"].is_u64(), "{report}");
    let customer = &report["customers"]["100"];
    assert!(customer["success_ratio"].is_f64(), "{report}");
    assert!(customer["longest_gap_ms"].is_u64(), "{report}");
    assert!(stdout.contains("success_ratio") && stdout.contains("longest_gap_ms"));
}
