//! The real service (registries, actors, SQLite, retrying and fault layers)
//! under a deterministic simulation: seeds of crashes, pauses, partitions,
//! lost responses, store errors and graceful stops, each checked like a
//! real chaos run against the counts in the stored databases.
//! `TENANTD_SERVICE_SIM_SEED=N` runs one seed, `TENANTD_SERVICE_SIM_SEEDS=N`
//! the first N of each mode. The defaults (40 single-tenant and 24 pool
//! seeds for the plain runs, fewer for the others) keep CI within its
//! budget; before a release run more, e.g. `TENANTD_SERVICE_SIM_SEEDS=200`.

use std::time::{Duration, Instant};

use tenantd_sim::service_sim::{
    Interactive, Mode, Paths, Reads, Rebirth, run_seed_misnaming_log_end, run_seed_with,
};

const SECONDS: u64 = 20;

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("TENANTD_SERVICE_SIM_SEED") {
        return vec![seed.parse().expect("TENANTD_SERVICE_SIM_SEED is a number")];
    }
    let count = std::env::var("TENANTD_SERVICE_SIM_SEEDS").map_or(default, |n| {
        n.parse().expect("TENANTD_SERVICE_SIM_SEEDS is a number")
    });
    (0..count).collect()
}

fn no_violation_in_any_seed(mode: Mode, default_seeds: u64, paths: Paths) {
    // RUST_LOG=tenantd=info shows what the machines did (with a failing seed).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    let (mut ops, mut acked, mut epochs) = (0, 0, 0);
    let (mut reads, mut answered, mut by_followers) = (0, 0, 0);
    let mut kinds = std::collections::BTreeSet::new();
    let mut customers = 0;
    let mut fenced_early = 0;
    let seeds = seeds(default_seeds);
    // What the whole set must show; one seed replayed need not.
    let whole_set = seeds.len() as u64 >= default_seeds;
    for seed in seeds {
        let dir = tempfile::tempdir().unwrap();
        let secs = Duration::from_secs(SECONDS);
        let outcome = run_seed_with(seed, secs, dir.path(), mode, false, paths);
        if !outcome.report.violations.is_empty() {
            for n in &outcome.nemeses {
                eprintln!("nemesis {n:?}");
            }
        }
        assert!(
            outcome.report.violations.is_empty(),
            "{mode:?} seed {seed} (replay: TENANTD_SERVICE_SIM_SEED={seed} cargo test --test service_sim): {:?}",
            outcome.report.violations
        );
        ops += outcome.ops;
        acked += outcome.acked;
        epochs += outcome.final_epoch;
        fenced_early += outcome.claims_fenced_early;
        reads += outcome.reads;
        answered += outcome.reads_answered;
        by_followers += outcome.follower_reads;
        kinds.extend(outcome.nemeses.iter().map(|n| n.kind.clone()));
        customers += outcome
            .report
            .customers
            .values()
            .filter(|c| c.acked > 0)
            .count();
    }
    eprintln!(
        "{mode:?}: {ops} operations, {acked} acknowledged, {customers} customers (or lives of one) with acknowledged writes, {epochs} holder epochs, {fenced_early} claims fenced before their lock write, nemeses {kinds:?}, in {:?}",
        started.elapsed()
    );
    if paths.reads != Reads::Off {
        eprintln!("{mode:?}: {reads} reads, {answered} answered, {by_followers} by followers");
        assert!(
            answered > reads / 2,
            "reads mostly answered: {answered} of {reads}"
        );
        assert!(
            by_followers > answered / 4,
            "followers answer reads: {by_followers} of {answered}"
        );
    }
    assert!(acked > ops / 2, "mostly available: {acked} of {ops}");
    if !whole_set {
        return;
    }
    if matches!(mode, Mode::Pool) && paths.reads == Reads::Off {
        // Machines meeting a released tenant for the first time (a fresh
        // process) fence before their lock write. (With followers, a
        // machine takes over from its replica, whose reads do not plan
        // fences: that path is not timed by the cold start.)
        assert!(fenced_early > 0, "no claim fenced before its lock write");
    }
    assert!(kinds.len() >= 6, "every kind of nemesis ran: {kinds:?}");
    if paths.rebirth == Rebirth::On {
        for kind in [
            "delete-and-create",
            "delete-and-import",
            "delete-and-fork",
            "restore-in-place",
        ] {
            assert!(kinds.contains(kind), "{kind} never ran: {kinds:?}");
        }
        for kind in [
            "stalled-delete-and-create",
            "stalled-delete-and-import",
            "stalled-delete-and-fork",
        ] {
            assert!(kinds.contains(kind), "{kind} never ran: {kinds:?}");
        }
    }
}

#[test]
fn single_tenant_machines_lose_nothing_under_simulated_chaos() {
    no_violation_in_any_seed(Mode::Single, 40, Paths::default());
}

#[test]
fn pool_machines_handing_tenants_back_and_forth_lose_nothing() {
    no_violation_in_any_seed(Mode::Pool, 24, Paths::default());
}

// Issue 26: the same, with the lock deleted by hand, a lagging LIST and
// claims that fail after their acquisition among the nemeses (graceful
// stops and idle releases run in every seed), and every tenant must
// answer again once the faults heal. Expected to fail until the fixes of
// issue 26 are merged (the lead watches these go green).

#[test]
fn issue_26_single_tenant_machines_lose_nothing_with_every_writing_path() {
    no_violation_in_any_seed(Mode::Single, 20, Paths::ALL);
}

#[test]
fn issue_26_pool_machines_lose_nothing_with_every_writing_path() {
    no_violation_in_any_seed(Mode::Pool, 12, Paths::ALL);
}

/// An operator deletes one of the pool's tenants every few seconds and
/// creates it again (empty, imported from a file, or forked from another
/// tenant), through `tenantd_core::tenant::lifecycle` as `tenants delete`
/// and `tenants create [--from-file | --from]` do, while the machines
/// serve it under every nemesis: each life of the tenant is checked on its
/// own.
#[test]
fn pool_machines_lose_nothing_while_a_tenant_is_deleted_and_created_again() {
    let paths = Paths {
        rebirth: Rebirth::On,
        ..Paths::ALL
    };
    no_violation_in_any_seed(Mode::Pool, 12, paths);
}

/// Its negative control: the new life's log starts at slot 0, whatever
/// the delete left (its fences, its tombstone); some seed must show it.
#[test]
fn a_tenant_created_again_over_the_deletes_fences_is_caught() {
    let paths = Paths {
        rebirth: Rebirth::FromSlotZero,
        ..Paths::ALL
    };
    reborn_tenant_is_caught(paths, "a creation over the delete's fences");
}

/// Runs seeds of a rebirth control until one reports the reborn tenant
/// (`simpool3`) broken.
fn reborn_tenant_is_caught(paths: Paths, what: &str) {
    let found = (0..10u64).find_map(|seed| {
        let dir = tempfile::tempdir().unwrap();
        let secs = Duration::from_secs(SECONDS);
        let report = run_seed_with(seed, secs, dir.path(), Mode::Pool, false, paths).report;
        (!report.violations.is_empty()).then_some((seed, report.violations))
    });
    let (seed, violations) = found.unwrap_or_else(|| panic!("some seed must catch {what}"));
    eprintln!("seed {seed}: {violations:?}");
    assert!(
        violations.iter().any(|v| v.contains("simpool3")),
        "{violations:?}"
    );
}

/// Its negative control for a delete stalled past its lease once the
/// snapshot is gone: every delete stalls while the next life begins and is
/// served, and then removes what it lists as it did before (everything
/// but its fences, its tombstone and the lock); some seed must show the
/// next life's writes lost.
#[test]
fn a_stalled_delete_removing_everything_it_lists_is_caught() {
    let paths = Paths {
        rebirth: Rebirth::UnboundedAfterStall,
        ..Paths::ALL
    };
    reborn_tenant_is_caught(paths, "a stalled delete removing the next life");
}

/// The negative control of releases with the log (issue 22): every
/// release names the slot before its last confirmed one as the log's end;
/// the next claim's check must report it.
#[test]
fn releases_misnaming_the_log_end_are_caught() {
    let found = (0..10u64).find_map(|seed| {
        let dir = tempfile::tempdir().unwrap();
        let secs = Duration::from_secs(SECONDS);
        let report = run_seed_misnaming_log_end(seed, secs, dir.path(), Mode::Pool).report;
        (!report.violations.is_empty()).then_some((seed, report.violations))
    });
    let (seed, violations) = found.expect("some seed must catch a misnamed log end");
    eprintln!("seed {seed}: {violations:?}");
    assert!(
        violations.iter().any(|v| v.contains("log_end")),
        "{violations:?}"
    );
}

/// The negative control of the interactive-transaction path (issue 23):
/// every client increments through Hrana transactions, and their COMMITs
/// are answered before the upload; the simulation must find one lost.
#[test]
fn interactive_commits_answered_before_their_upload_are_caught_as_lost_writes() {
    let paths = Paths {
        interactive: Interactive::Only,
        ..Paths::default()
    };
    let found = (0..20u64).find_map(|seed| {
        let dir = tempfile::tempdir().unwrap();
        let secs = Duration::from_secs(SECONDS);
        let report = run_seed_with(seed, secs, dir.path(), Mode::Single, true, paths).report;
        (!report.violations.is_empty()).then_some((seed, report.violations))
    });
    let (seed, violations) = found.expect("some seed must lose an acknowledged transaction");
    eprintln!("seed {seed}: {violations:?}");
    assert!(
        violations
            .iter()
            .any(|v| v.contains("lost writes") || v.contains("acknowledged 2 times")),
        "{violations:?}"
    );
}

/// Every increment an interactive transaction, answered only once durable:
/// nothing acknowledged is lost under the usual nemeses.
#[test]
fn interactive_transactions_lose_nothing_under_simulated_chaos() {
    let paths = Paths {
        interactive: Interactive::Only,
        ..Paths::default()
    };
    no_violation_in_any_seed(Mode::Single, 12, paths);
}

#[test]
fn answering_before_the_upload_is_caught_as_lost_writes() {
    // The bench's upper-bound mode acknowledges at commit, before the
    // upload: a crashed holder then loses acknowledged writes, and the
    // simulation must see it.
    let found = (0..20u64).find_map(|seed| {
        let dir = tempfile::tempdir().unwrap();
        let secs = Duration::from_secs(SECONDS);
        let report =
            run_seed_with(seed, secs, dir.path(), Mode::Single, true, Paths::default()).report;
        (!report.violations.is_empty()).then_some((seed, report.violations))
    });
    let (seed, violations) = found.expect("some seed must lose an acknowledged write");
    eprintln!("seed {seed}: {violations:?}");
    assert!(
        violations
            .iter()
            .any(|v| v.contains("lost writes") || v.contains("acknowledged 2 times")),
        "{violations:?}"
    );
}

// Issue 25: every machine keeps a follower replica and answers reads
// (bookmark readers paired with the writers, readers sending nothing,
// readers with a staleness bound); the read checker must find no read of
// a lost or never-written state, no read older than it asked for, and
// no read going back for a client that carries its bookmark.

const FOLLOWERS: Paths = Paths {
    lock_deleted: false,
    list_lag: false,
    claim_failure: false,
    interactive: Interactive::Off,
    reads: Reads::Followers,
    rebirth: Rebirth::Off,
};

#[test]
fn followers_answer_reads_without_lost_stale_or_backward_states() {
    no_violation_in_any_seed(Mode::Single, 6, FOLLOWERS);
}

#[test]
fn pool_followers_answer_reads_without_lost_stale_or_backward_states() {
    no_violation_in_any_seed(Mode::Pool, 4, FOLLOWERS);
}

/// The negative control of follower reads: holders push each slot when
/// its upload starts, before it is confirmed, so followers apply deltas
/// that a crash or a pause can lose; the read checker must catch a reader
/// shown such a state.
#[test]
fn followers_applying_unconfirmed_pushes_are_caught_showing_lost_state() {
    let paths = Paths {
        reads: Reads::UnconfirmedPushes,
        ..FOLLOWERS
    };
    let found = (0..20u64).find_map(|seed| {
        let dir = tempfile::tempdir().unwrap();
        let secs = Duration::from_secs(SECONDS);
        let report = run_seed_with(seed, secs, dir.path(), Mode::Single, false, paths).report;
        (!report.violations.is_empty()).then_some((seed, report.violations))
    });
    let (seed, violations) = found.expect("some seed must show a reader a lost state");
    eprintln!("seed {seed}: {violations:?}");
    // Caught where it was shown ("a lost state"), or by the client's next
    // read going back below it: when a retry of the lost write (same
    // idempotency key) committed it again with the very count the reader
    // was shown, that first read matches the durable history, and only the
    // bookmark it left the client shows the loss (CI, seed 1).
    assert!(
        violations.iter().any(|v| v.contains("a lost state")
            || v.contains("read-your-writes")
            || v.contains("monotonic reads")),
        "{violations:?}"
    );
}

/// Follower reads with issue 26's nemeses too: a lagging LIST and claims
/// that fail after their acquisition.
#[test]
fn issue_26_followers_answer_reads_without_lost_stale_or_backward_states() {
    let paths = Paths {
        lock_deleted: false,
        interactive: Interactive::Off,
        reads: Reads::Followers,
        ..Paths::ALL
    };
    no_violation_in_any_seed(Mode::Single, 4, paths);
}

/// Findings of the read checker. Seed 3 of 6 (failed before 7287e8b):
/// "answered by … (holder) count 311 … misses a write acknowledged before
/// it started (count 315)", 300 ms after the lock was deleted by hand: a
/// machine that acquires an absent lock acknowledges writes at once, while
/// the holder whose lock was deleted keeps its session's heartbeat, so its
/// lease stays valid, and it answered reads (and followers' position
/// queries) from a state without them. Writes were safe (fences). The fix:
/// a holder answers a batch that commits nothing only within half a ttl of
/// reading its lock, and an acquisition whose lock did not know the
/// tenant's history waits one ttl before it answers. Seeds 1 and 15 (one
/// run in about twenty: blocking threads make runs differ) still failed:
/// the successor had seen the lock, so it created the absent lock one
/// epoch above and had nothing to raise, and did not wait. Now any lease
/// that created the lock of a tenant with a history waits
/// (`holder_edges::a_holder_whose_lock_was_deleted_never_answers_a_read_missing_the_next_holders_write`).
#[test]
fn issue_26_followers_with_the_lock_deleted_by_hand_show_no_stale_state() {
    let paths = Paths {
        interactive: Interactive::Off,
        reads: Reads::Followers,
        ..Paths::ALL
    };
    no_violation_in_any_seed(Mode::Single, 6, paths);
}
