//! The SQL workload's checker: a pure function over the recorded transfers,
//! the reads made during the run, and the final state of each customer's
//! `chaos_accounts` and `chaos_transfers` tables, read once through the API
//! and once from the database object in the store after the cluster
//! stopped.
//!
//! For each customer and each place the final state was read from:
//! (a) the sum of balances is the sum the run started with, over exactly
//!     the accounts it started with;
//! (b) every acknowledged transfer is stored, exactly once, with the
//!     accounts and amount it was sent with (no lost acknowledged write);
//! (c) no transfer id is stored twice (no transfer applied twice);
//! (d) no transfer the API refused is stored, and no stored transfer is
//!     one this run never sent;
//! (e) each account's balance is what the stored transfers imply: a
//!     transfer whose statements were applied in part (a debit without its
//!     credit or its row) shows up here, so an unacknowledged transfer was
//!     applied either fully or not at all;
//! (f) the places agree with each other.
//!
//! Besides: every acknowledged answer reports one row affected by each of
//! its three statements, and every read made during the run saw the
//! conserved sum (a transaction is never seen in part). Availability is
//! reported like the counter's.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::checker::availability;
use super::history::NemesisEvent;

/// How the run started each customer's accounts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Accounts {
    pub count: i64,
    pub initial_balance: i64,
}

impl Accounts {
    pub fn total(&self) -> i64 {
        self.count * self.initial_balance
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TransferOutcome {
    /// Acknowledged: durable. `replayed` when the answer came from an
    /// earlier attempt's `Idempotency-Key` (`idempotent-replayed: true`).
    Ok {
        epoch: u64,
        machine: String,
        replayed: bool,
        rows_affected: Vec<i64>,
    },
    /// Refused by the SQL API (400/403 with a `code`) on the first attempt:
    /// definitely not applied.
    Refused { status: u16, error: String },
    /// May or may not have been applied.
    Indeterminate { error: String },
}

/// One transfer as the client sent it, with the outcome of its last
/// attempt (all attempts carry the same `Idempotency-Key`, which is also
/// the transfer's id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferOp {
    pub client: usize,
    pub customer: String,
    pub id: String,
    pub from: i64,
    pub to: i64,
    pub amount: i64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub attempts: u32,
    pub outcome: TransferOutcome,
}

/// A read-only `SELECT count(*), sum(balance)` made during the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOp {
    pub customer: String,
    #[serde(default)]
    pub client: usize,
    pub start_ms: u64,
    pub end_ms: u64,
    /// (accounts, sum of balances); None when the read failed.
    pub seen: Option<(i64, i64)>,
    /// The client's last acknowledged transfer to this customer before
    /// the read, and whether the read saw it stored.
    #[serde(default)]
    pub must_see: Option<String>,
    #[serde(default)]
    pub saw_own: Option<bool>,
    /// The `tenantd-bookmark` sent (that transfer's) and answered.
    #[serde(default)]
    pub bookmark_sent: Option<u64>,
    #[serde(default)]
    pub bookmark: Option<u64>,
    /// `tenantd-role` of the answer: "holder" or "follower".
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRow {
    pub id: String,
    pub src: i64,
    pub dst: i64,
    pub amount: i64,
}

/// A customer's tables after the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    pub balances: BTreeMap<i64, i64>,
    pub transfers: Vec<TransferRow>,
}

/// The final states read from one place ("api" or "store"); a customer
/// missing here could not be read from it.
#[derive(Clone, Debug, Default)]
pub struct Finals {
    pub source: String,
    pub states: BTreeMap<String, FinalState>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SqlCustomerReport {
    pub acked: usize,
    pub indeterminate: usize,
    /// Of the indeterminate transfers, how many the final state holds.
    pub indeterminate_applied: usize,
    pub refused: usize,
    /// Transfers sent more than once (same key) after an unclear attempt.
    pub retried: usize,
    /// Acknowledgements that were an earlier attempt's answer replayed.
    pub replayed: usize,
    pub reads: usize,
    /// Of the reads, those answered by a follower.
    pub follower_reads: usize,
    pub transfers_stored: usize,
    pub sum_of_balances: i64,
    pub expected_sum: i64,
    pub longest_gap_ms: u64,
    pub recovery_after_kill_ms: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SqlReport {
    pub violations: Vec<String>,
    pub acked: usize,
    pub indeterminate: usize,
    pub refused: usize,
    pub reads: usize,
    pub follower_reads: usize,
    /// Where the final states were read from.
    pub sources: Vec<String>,
    pub customers: BTreeMap<String, SqlCustomerReport>,
}

impl SqlReport {
    /// Acknowledged transfers over those with an answer the service owed:
    /// an overdraft refused with a 400 is a correct answer, not a failure.
    pub fn success_ratio(&self) -> f64 {
        let all = self.acked + self.indeterminate;
        if all == 0 {
            0.0
        } else {
            self.acked as f64 / all as f64
        }
    }

    /// Reads answered by followers over all answered reads.
    pub fn follower_read_share(&self) -> f64 {
        self.follower_reads as f64 / self.reads.max(1) as f64
    }

    pub fn longest_gap_ms(&self) -> u64 {
        self.customers
            .values()
            .map(|c| c.longest_gap_ms)
            .max()
            .unwrap_or(0)
    }
}

pub fn check(
    accounts: Accounts,
    customers: &[String],
    ops: &[TransferOp],
    reads: &[ReadOp],
    finals: &[Finals],
    nemeses: &[NemesisEvent],
    run_ms: u64,
) -> SqlReport {
    let mut report = SqlReport {
        sources: finals.iter().map(|f| f.source.clone()).collect(),
        ..SqlReport::default()
    };
    let all: BTreeSet<&str> = customers
        .iter()
        .map(String::as_str)
        .chain(ops.iter().map(|o| o.customer.as_str()))
        .collect();
    for customer in all {
        let violations = &mut report.violations;
        let mine: Vec<&TransferOp> = ops.iter().filter(|o| o.customer == customer).collect();
        let mut r = SqlCustomerReport {
            expected_sum: accounts.total(),
            ..SqlCustomerReport::default()
        };
        let mut sent: BTreeMap<&str, &TransferOp> = BTreeMap::new();
        for op in &mine {
            if sent.insert(op.id.as_str(), op).is_some() {
                violations.push(format!(
                    "customer {customer}: the workload sent transfer id {} twice (a bug in the workload)",
                    op.id
                ));
            }
            if op.attempts > 1 {
                r.retried += 1;
            }
            match &op.outcome {
                TransferOutcome::Ok {
                    replayed,
                    rows_affected,
                    epoch,
                    ..
                } => {
                    r.acked += 1;
                    r.replayed += usize::from(*replayed);
                    if rows_affected != &[1, 1, 1] {
                        violations.push(format!(
                            "customer {customer}: transfer {} acknowledged (epoch {epoch}) with rows_affected {rows_affected:?}, expected [1, 1, 1]",
                            op.id
                        ));
                    }
                }
                TransferOutcome::Refused { .. } => r.refused += 1,
                TransferOutcome::Indeterminate { .. } => r.indeterminate += 1,
            }
        }
        for read in reads.iter().filter(|r| r.customer == customer) {
            let Some((count, sum)) = read.seen else {
                continue;
            };
            r.reads += 1;
            let by = read.role.as_deref().unwrap_or("an unnamed machine");
            if read.role.as_deref() == Some("follower") {
                r.follower_reads += 1;
            }
            if count != accounts.count || sum != accounts.total() {
                violations.push(format!(
                    "customer {customer}: a read at {}–{} ms (answered by the {by}) saw a sum of {sum} over {count} accounts, expected {} over {}",
                    read.start_ms,
                    read.end_ms,
                    accounts.total(),
                    accounts.count
                ));
            }
            if let (Some(id), Some(false)) = (&read.must_see, read.saw_own) {
                violations.push(format!(
                    "customer {customer}: a read at {}–{} ms by client {} (answered by the {by}, bookmark sent {:?}) did not see the client's own acknowledged transfer {id}: a read older than the client's last acknowledged write",
                    read.start_ms, read.end_ms, read.client, read.bookmark_sent
                ));
            }
            if let (Some(sent), Some(answered)) = (read.bookmark_sent, read.bookmark)
                && answered < sent
            {
                violations.push(format!(
                    "customer {customer}: a read at {}–{} ms (answered by the {by}) sent bookmark {sent} and was answered from {answered}, an older state",
                    read.start_ms, read.end_ms
                ));
            }
        }

        let mut first: Option<&FinalState> = None;
        for finals in finals {
            let source = finals.source.as_str();
            let Some(state) = finals.states.get(customer) else {
                violations.push(format!(
                    "customer {customer}: the final state could not be read from the {source}"
                ));
                continue;
            };
            check_state(customer, source, accounts, &sent, state, violations);
            match first {
                None => {
                    first = Some(state);
                    r.transfers_stored = state.transfers.len();
                    r.sum_of_balances = state.balances.values().sum();
                    let stored: BTreeSet<&str> =
                        state.transfers.iter().map(|t| t.id.as_str()).collect();
                    r.indeterminate_applied = mine
                        .iter()
                        .filter(|o| matches!(o.outcome, TransferOutcome::Indeterminate { .. }))
                        .filter(|o| stored.contains(o.id.as_str()))
                        .count();
                }
                Some(earlier) => {
                    if !same_state(earlier, state) {
                        violations.push(format!(
                            "customer {customer}: the {source} disagrees with the {}: {} transfers and balances {:?} against {} and {:?}",
                            report.sources[0],
                            state.transfers.len(),
                            state.balances,
                            earlier.transfers.len(),
                            earlier.balances
                        ));
                    }
                }
            }
        }

        let acked: Vec<(u64, u64)> = mine
            .iter()
            .filter(|o| matches!(o.outcome, TransferOutcome::Ok { .. }))
            .map(|o| (o.start_ms, o.end_ms))
            .collect();
        let requests: Vec<(u64, u64)> = mine.iter().map(|o| (o.start_ms, o.end_ms)).collect();
        let seen = availability(customer, &acked, &requests, nemeses, run_ms);
        r.longest_gap_ms = seen.longest_gap_ms;
        r.recovery_after_kill_ms = seen.recovery_after_kill_ms;
        report.acked += r.acked;
        report.indeterminate += r.indeterminate;
        report.refused += r.refused;
        report.reads += r.reads;
        report.follower_reads += r.follower_reads;
        report.customers.insert(customer.to_string(), r);
    }
    report
}

fn same_state(a: &FinalState, b: &FinalState) -> bool {
    let sorted = |s: &FinalState| {
        let mut t = s.transfers.clone();
        t.sort_by(|x, y| x.id.cmp(&y.id));
        t
    };
    a.balances == b.balances && sorted(a) == sorted(b)
}

fn check_state(
    customer: &str,
    source: &str,
    accounts: Accounts,
    sent: &BTreeMap<&str, &TransferOp>,
    state: &FinalState,
    violations: &mut Vec<String>,
) {
    let at = format!("customer {customer} ({source})");
    // (a)
    let expected: BTreeSet<i64> = (0..accounts.count).collect();
    let present: BTreeSet<i64> = state.balances.keys().copied().collect();
    if present != expected {
        violations.push(format!(
            "{at}: accounts {present:?} stored, expected {expected:?}"
        ));
    }
    let sum: i64 = state.balances.values().sum();
    if sum != accounts.total() {
        violations.push(format!(
            "{at}: the sum of balances is {sum}, expected {} (not conserved)",
            accounts.total()
        ));
    }
    // (c), (d)
    let mut stored: BTreeMap<&str, Vec<&TransferRow>> = BTreeMap::new();
    for row in &state.transfers {
        stored.entry(row.id.as_str()).or_default().push(row);
    }
    for (id, rows) in &stored {
        if rows.len() > 1 {
            violations.push(format!("{at}: transfer {id} applied {} times", rows.len()));
        }
        let Some(op) = sent.get(id) else {
            violations.push(format!(
                "{at}: transfer {id} is stored but this run never sent it (phantom write)"
            ));
            continue;
        };
        for row in rows {
            if (row.src, row.dst, row.amount) != (op.from, op.to, op.amount) {
                violations.push(format!(
                    "{at}: transfer {id} stored as {} → {} amount {}, sent as {} → {} amount {}",
                    row.src, row.dst, row.amount, op.from, op.to, op.amount
                ));
            }
        }
        if let TransferOutcome::Refused { status, .. } = &op.outcome {
            violations.push(format!(
                "{at}: transfer {id} was refused ({status}) but is stored"
            ));
        }
    }
    // (b)
    let lost: Vec<&str> = sent
        .values()
        .filter(|op| matches!(op.outcome, TransferOutcome::Ok { .. }))
        .filter(|op| !stored.contains_key(op.id.as_str()))
        .map(|op| op.id.as_str())
        .collect();
    if !lost.is_empty() {
        violations.push(format!(
            "{at}: lost writes: {} acknowledged transfer(s) not stored, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    // (e)
    let mut implied: BTreeMap<i64, i64> = expected
        .iter()
        .map(|a| (*a, accounts.initial_balance))
        .collect();
    for row in &state.transfers {
        *implied.entry(row.src).or_default() -= row.amount;
        *implied.entry(row.dst).or_default() += row.amount;
    }
    for (account, balance) in &state.balances {
        let wanted = implied.get(account).copied().unwrap_or_default();
        if *balance != wanted {
            violations.push(format!(
                "{at}: account {account} holds {balance}, but the stored transfers make it {wanted} (a transfer applied in part)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNTS: Accounts = Accounts {
        count: 3,
        initial_balance: 100,
    };

    fn op(id: &str, from: i64, to: i64, amount: i64, outcome: TransferOutcome) -> TransferOp {
        TransferOp {
            client: 0,
            customer: "1".into(),
            id: id.into(),
            from,
            to,
            amount,
            start_ms: 10,
            end_ms: 20,
            attempts: 1,
            outcome,
        }
    }

    fn ok() -> TransferOutcome {
        TransferOutcome::Ok {
            epoch: 1,
            machine: "m".into(),
            replayed: false,
            rows_affected: vec![1, 1, 1],
        }
    }

    fn unclear() -> TransferOutcome {
        TransferOutcome::Indeterminate {
            error: "timeout".into(),
        }
    }

    fn refused() -> TransferOutcome {
        TransferOutcome::Refused {
            status: 400,
            error: "CHECK constraint failed".into(),
        }
    }

    fn row(id: &str, src: i64, dst: i64, amount: i64) -> TransferRow {
        TransferRow {
            id: id.into(),
            src,
            dst,
            amount,
        }
    }

    /// a: 0 → 1 (10), acked; b: 1 → 2 (5), unclear and applied; c: 2 → 0
    /// (7), unclear and not applied; d: 0 → 2 (500), refused.
    fn history() -> Vec<TransferOp> {
        vec![
            op("a", 0, 1, 10, ok()),
            op("b", 1, 2, 5, unclear()),
            op("c", 2, 0, 7, unclear()),
            op("d", 0, 2, 500, refused()),
        ]
    }

    fn state() -> FinalState {
        FinalState {
            balances: BTreeMap::from([(0, 90), (1, 105), (2, 105)]),
            transfers: vec![row("a", 0, 1, 10), row("b", 1, 2, 5)],
        }
    }

    fn finals(states: &[(&str, FinalState)]) -> Vec<Finals> {
        states
            .iter()
            .map(|(source, state)| Finals {
                source: source.to_string(),
                states: BTreeMap::from([("1".to_string(), state.clone())]),
            })
            .collect()
    }

    fn run(ops: &[TransferOp], reads: &[ReadOp], states: &[(&str, FinalState)]) -> SqlReport {
        check(
            ACCOUNTS,
            &["1".to_string()],
            ops,
            reads,
            &finals(states),
            &[],
            100,
        )
    }

    fn assert_reported(report: &SqlReport, needle: &str) {
        assert!(
            report.violations.iter().any(|v| v.contains(needle)),
            "no violation containing {needle:?}: {:?}",
            report.violations
        );
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let reads = [ReadOp {
            customer: "1".into(),
            start_ms: 0,
            end_ms: 1,
            seen: Some((3, 300)),
            ..ReadOp::default()
        }];
        let report = run(&history(), &reads, &[("store", state()), ("api", state())]);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        let r = &report.customers["1"];
        assert_eq!(
            (r.acked, r.indeterminate, r.indeterminate_applied, r.refused),
            (1, 2, 1, 1)
        );
        assert_eq!(
            (r.sum_of_balances, r.transfers_stored, r.reads),
            (300, 2, 1)
        );
        assert_eq!(report.success_ratio(), 1.0 / 3.0);
    }

    #[test]
    fn a_lost_acknowledged_transfer_is_reported() {
        let mut lost = state();
        lost.transfers.remove(0);
        lost.balances = BTreeMap::from([(0, 100), (1, 95), (2, 105)]);
        assert_reported(&run(&history(), &[], &[("store", lost)]), "lost writes");
    }

    #[test]
    fn a_transfer_applied_twice_is_reported() {
        let mut twice = state();
        twice.transfers.push(row("a", 0, 1, 10));
        twice.balances = BTreeMap::from([(0, 80), (1, 115), (2, 105)]);
        assert_reported(
            &run(&history(), &[], &[("store", twice)]),
            "transfer a applied 2 times",
        );
    }

    #[test]
    fn a_transfer_applied_in_part_is_reported() {
        // c's debit landed without its credit and its row.
        let mut part = state();
        part.balances.insert(2, 98);
        let report = run(&history(), &[], &[("store", part)]);
        assert_reported(&report, "not conserved");
        assert_reported(&report, "account 2 holds 98");
        // Its debit and credit without its row: the sum holds, (e) sees it.
        let mut no_row = state();
        no_row.balances = BTreeMap::from([(0, 97), (1, 105), (2, 98)]);
        let report = run(&history(), &[], &[("store", no_row)]);
        assert!(
            !report
                .violations
                .iter()
                .any(|v| v.contains("not conserved"))
        );
        assert_reported(&report, "applied in part");
    }

    #[test]
    fn a_refused_transfer_that_was_stored_is_reported() {
        let mut applied = state();
        applied.transfers.push(row("d", 0, 2, 500));
        applied.balances = BTreeMap::from([(0, -410), (1, 105), (2, 605)]);
        assert_reported(
            &run(&history(), &[], &[("store", applied)]),
            "transfer d was refused (400) but is stored",
        );
    }

    #[test]
    fn a_phantom_or_altered_transfer_is_reported() {
        let mut phantom = state();
        phantom.transfers.push(row("zz", 0, 1, 0));
        assert_reported(&run(&history(), &[], &[("store", phantom)]), "phantom");
        let mut altered = state();
        altered.transfers[0] = row("a", 0, 2, 10);
        altered.balances = BTreeMap::from([(0, 90), (1, 95), (2, 115)]);
        assert_reported(
            &run(&history(), &[], &[("store", altered)]),
            "transfer a stored as 0 → 2 amount 10, sent as 0 → 1 amount 10",
        );
    }

    #[test]
    fn a_follower_read_older_than_the_clients_own_write_is_reported() {
        let read = |saw_own, bookmark| ReadOp {
            customer: "1".into(),
            client: 0,
            start_ms: 5,
            end_ms: 6,
            seen: Some((3, 300)),
            must_see: Some("a".into()),
            saw_own: Some(saw_own),
            bookmark_sent: Some(9),
            bookmark: Some(bookmark),
            role: Some("follower".into()),
        };
        let states = [("store", state()), ("api", state())];
        let report = run(&history(), &[read(true, 9), read(true, 12)], &states);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.follower_reads, 2);
        assert_eq!(report.follower_read_share(), 1.0);
        let report = run(&history(), &[read(false, 9)], &states);
        assert_reported(
            &report,
            "did not see the client's own acknowledged transfer a",
        );
        let report = run(&history(), &[read(true, 8)], &states);
        assert_reported(&report, "sent bookmark 9 and was answered from 8");
    }

    #[test]
    fn a_bad_answer_a_bad_read_and_disagreeing_sources_are_reported() {
        let mut ops = history();
        ops[0].outcome = TransferOutcome::Ok {
            epoch: 1,
            machine: "m".into(),
            replayed: false,
            rows_affected: vec![1, 0, 1],
        };
        let reads = [ReadOp {
            customer: "1".into(),
            start_ms: 0,
            end_ms: 1,
            seen: Some((3, 290)),
            ..ReadOp::default()
        }];
        let mut other = state();
        other.transfers.pop();
        other.balances = BTreeMap::from([(0, 90), (1, 110), (2, 100)]);
        let report = run(&ops, &reads, &[("store", state()), ("api", other)]);
        assert_reported(&report, "rows_affected [1, 0, 1]");
        assert_reported(&report, "saw a sum of 290");
        assert_reported(&report, "the api disagrees with the store");
    }

    #[test]
    fn a_final_state_that_cannot_be_read_is_reported() {
        let report = check(
            ACCOUNTS,
            &["1".to_string()],
            &history(),
            &[],
            &[Finals {
                source: "store".into(),
                states: BTreeMap::new(),
            }],
            &[],
            100,
        );
        assert_reported(&report, "could not be read from the store");
    }
}
