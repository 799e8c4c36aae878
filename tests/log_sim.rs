//! The commit-log protocol's model simulation in CI: 500 seeds of writers
//! racing for one tenant's log (takeovers with zombies, pauses, crashes,
//! reordered and late-applied PUTs, compactions abandoned midway) find no
//! lost acknowledged increment and one history; without fences, with a
//! compaction that deletes fences, with a window that counts only
//! unconfirmed uploads, or with a claim that does not check that the
//! snapshot stayed the same while it read the log, the same simulation
//! finds violations.
//! `TENANTD_LOG_SIM_SEED=N` replays one seed, `TENANTD_LOG_SIM_SEEDS=N`
//! runs the first N, `TENANTD_LOG_SIM_TRACE=1` prints a failing seed's
//! events.

use tenantd_sim::log_sim::{LogSimConfig, LogSimOutcome, Recheck, run_seed};

fn seeds() -> Vec<u64> {
    match std::env::var("TENANTD_LOG_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("TENANTD_LOG_SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("TENANTD_LOG_SIM_SEEDS").map_or(500, |n| {
                n.parse().expect("TENANTD_LOG_SIM_SEEDS is a number")
            });
            (0..count).collect()
        }
    }
}

#[test]
fn no_seed_loses_an_acknowledged_increment() {
    let started = std::time::Instant::now();
    let mut total = LogSimOutcome::default();
    let seeds = seeds();
    let config = LogSimConfig {
        trace: std::env::var("TENANTD_LOG_SIM_TRACE").is_ok(),
        ..LogSimConfig::default()
    };
    for &seed in &seeds {
        let outcome = run_seed(seed, config);
        if !outcome.violations.is_empty() {
            for event in &outcome.trace {
                eprintln!("{event}");
            }
        }
        assert!(
            outcome.violations.is_empty(),
            "seed {seed} (replay: TENANTD_LOG_SIM_SEED={seed} cargo test --test log_sim): {:#?}",
            outcome.violations
        );
        total.attempted += outcome.attempted;
        total.acked += outcome.acked;
        total.takeovers += outcome.takeovers;
        total.claims += outcome.claims;
        total.fenced += outcome.fenced;
        total.deposed += outcome.deposed;
        total.snapshots += outcome.snapshots;
        total.deleted += outcome.deleted;
        total.recreated += outcome.recreated;
        total.garbage_skipped += outcome.garbage_skipped;
        total.recovered += outcome.recovered;
    }
    eprintln!(
        "{} seeds in {:?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    if seeds.len() >= 500 {
        // The schedules reach the cases the protocol exists for.
        assert!(total.acked > 0 && total.claims > seeds.len(), "{total:?}");
        assert!(total.fenced > 0, "no writer was ever fenced: {total:?}");
        assert!(
            total.garbage_skipped > 0,
            "no deposed writer's object was skipped: {total:?}"
        );
        assert!(total.deleted > 0 && total.snapshots > 0, "{total:?}");
        assert!(
            total.recreated > 0,
            "no deleted slot was ever re-created: {total:?}"
        );
    }
}

/// The first seed whose run finds a violation, with its violations.
fn first_violation(config: LogSimConfig) -> (u64, Vec<String>) {
    (0..3000u64)
        .map(|seed| (seed, run_seed(seed, config).violations))
        .find(|(_, violations)| !violations.is_empty())
        .expect("the negative control must find a violation")
}

#[test]
fn without_fences_the_simulation_finds_a_violation() {
    let config = LogSimConfig {
        fences: false,
        ..LogSimConfig::default()
    };
    let (seed, violations) = first_violation(config);
    eprintln!("without fences, seed {seed}: {violations:#?}");
    // The same seed replays the same schedule.
    assert_eq!(run_seed(seed, config).violations, violations);
}

#[test]
fn a_compaction_that_deletes_fences_loses_acknowledged_increments() {
    let config = LogSimConfig {
        keep_fences: false,
        ..LogSimConfig::default()
    };
    let (seed, violations) = first_violation(config);
    eprintln!("deleting fences, seed {seed}: {violations:#?}");
    assert!(
        violations
            .iter()
            .any(|v| v.contains("without acknowledged increments")),
        "{violations:#?}"
    );
}

#[test]
fn a_window_counting_only_unconfirmed_uploads_outruns_the_fences() {
    let config = LogSimConfig {
        window_from_acked: false,
        ..LogSimConfig::default()
    };
    let (seed, violations) = first_violation(config);
    eprintln!("window of unconfirmed uploads, seed {seed}: {violations:#?}");
    assert!(
        violations
            .iter()
            .any(|v| v.contains("beyond the prefix end")),
        "{violations:#?}"
    );
}

#[test]
fn a_claim_that_does_not_recheck_the_snapshot_is_fooled_by_a_compaction() {
    let config = LogSimConfig {
        recheck: Recheck::Never,
        ..LogSimConfig::default()
    };
    let (seed, violations) = first_violation(config);
    eprintln!("no snapshot recheck, seed {seed}: {violations:#?}");
}

#[test]
fn a_seed_replays_exactly() {
    let config = LogSimConfig {
        trace: true,
        ..LogSimConfig::default()
    };
    for seed in [3, 17] {
        let first = run_seed(seed, config);
        assert!(first.trace.len() > 100, "{} events", first.trace.len());
        assert_eq!(first, run_seed(seed, config));
    }
}
