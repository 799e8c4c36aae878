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
