//! The checker: a pure function over a recorded history and the final
//! counts read after the cluster was quiet.
//!
//! (a) no two acknowledged increments of a customer returned the same count;
//! (b) final ≥ acknowledged increments, every acknowledged count ≤ final,
//!     and final ≤ acknowledged + indeterminate (no phantom writes);
//! (c) each client's acknowledged counts (per customer) strictly increase;
//! (d) counts acknowledged under a higher epoch are above those under a
//!     lower one;
//! (e) availability (crates/tenantd-chaos/src/availability.rs): acknowledged / sent, the
//!     longest stretch without a successful write per customer outside the
//!     windows in which a nemesis stopped its holder or no request of the
//!     customer was in flight, and for each kill the time to the customer's
//!     next success.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::availability;
use super::history::{NemesisEvent, Op, Outcome};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CustomerReport {
    pub sent: usize,
    pub acked: usize,
    pub indeterminate: usize,
    pub failed: usize,
    pub final_count: u64,
    /// acknowledged / sent.
    pub success_ratio: f64,
    /// Longest stretch without an acknowledgement, outside the windows in
    /// which a nemesis stopped this customer's holder or none of its
    /// requests was in flight.
    pub longest_gap_ms: u64,
    /// When (ms into the run) that stretch began.
    pub longest_gap_from_ms: u64,
    /// For each kill of this customer's holder: ms to the next success.
    pub recovery_after_kill_ms: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub violations: Vec<String>,
    pub sent: usize,
    pub acked: usize,
    pub indeterminate: usize,
    /// acknowledged / sent, over all customers.
    pub success_ratio: f64,
    /// The largest customer's `longest_gap_ms`.
    pub longest_gap_ms: u64,
    pub customers: BTreeMap<String, CustomerReport>,
}

pub fn check(
    ops: &[Op],
    finals: &BTreeMap<String, u64>,
    nemeses: &[NemesisEvent],
    run_ms: u64,
) -> Report {
    let mut report = Report::default();
    let customers: BTreeSet<&str> = ops
        .iter()
        .map(|o| o.customer.as_str())
        .chain(finals.keys().map(String::as_str))
        .collect();
    for customer in customers {
        let mine: Vec<&Op> = ops.iter().filter(|o| o.customer == customer).collect();
        let mut r = CustomerReport::default();
        let mut acked: Vec<(u64, u64, &Op)> = Vec::new();
        for op in &mine {
            match &op.outcome {
                Outcome::Ok { count, epoch, .. } => acked.push((*count, *epoch, op)),
                Outcome::Indeterminate { .. } => r.indeterminate += 1,
                Outcome::Failed { .. } => r.failed += 1,
            }
        }
        r.acked = acked.len();
        r.sent = mine.len();
        r.success_ratio = availability::ratio(r.acked, r.sent);
        let Some(&final_count) = finals.get(customer) else {
            report
                .violations
                .push(format!("customer {customer}: no final count could be read"));
            report.customers.insert(customer.to_string(), r);
            continue;
        };
        r.final_count = final_count;

        // (a)
        let mut by_count: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for (count, _, op) in &acked {
            by_count.entry(*count).or_default().push(op);
        }
        for (count, ops) in &by_count {
            if ops.len() > 1 {
                let keys: Vec<&str> = ops.iter().map(|o| o.key.as_str()).collect();
                report.violations.push(format!(
                    "customer {customer}: count {count} acknowledged {} times (keys {keys:?})",
                    ops.len()
                ));
            }
        }
        // (b)
        if (final_count as usize) < r.acked {
            report.violations.push(format!("customer {customer}: lost writes: final count {final_count} < {} acknowledged increments", r.acked));
        }
        if let Some((max, _, op)) = acked.iter().max_by_key(|(c, _, _)| *c)
            && *max > final_count
        {
            report.violations.push(format!("customer {customer}: lost writes: count {max} was acknowledged (key {}) but the final count is {final_count}", op.key));
        }
        if final_count as usize > r.acked + r.indeterminate {
            report.violations.push(format!(
                "customer {customer}: phantom writes: final count {final_count} > {} acknowledged + {} indeterminate",
                r.acked, r.indeterminate
            ));
        }
        // (c)
        let mut per_client: BTreeMap<usize, Vec<&Op>> = BTreeMap::new();
        for (_, _, op) in &acked {
            per_client.entry(op.client).or_default().push(op);
        }
        for (client, mut ops) in per_client {
            ops.sort_by_key(|o| o.start_ms);
            for pair in ops.windows(2) {
                let (a, b) = (pair[0].acked().unwrap().0, pair[1].acked().unwrap().0);
                if b <= a {
                    report.violations.push(format!("customer {customer}: client {client} saw count {b} (key {}) after {a} (key {})", pair[1].key, pair[0].key));
                }
            }
        }
        // (d)
        let mut sorted = acked.clone();
        sorted.sort_by_key(|(count, _, _)| *count);
        let mut highest_epoch_below = 0;
        for (count, epoch, op) in &sorted {
            if *epoch < highest_epoch_below {
                report.violations.push(format!(
                    "customer {customer}: count {count} acknowledged under epoch {epoch} (key {}) above a count acknowledged under epoch {highest_epoch_below}",
                    op.key
                ));
            }
            highest_epoch_below = highest_epoch_below.max(*epoch);
        }
        // (e)
        let acked_spans: Vec<(u64, u64)> = acked
            .iter()
            .map(|(_, _, op)| (op.start_ms, op.end_ms))
            .collect();
        let requests: Vec<(u64, u64)> = mine.iter().map(|o| (o.start_ms, o.end_ms)).collect();
        let seen = availability(customer, &acked_spans, &requests, nemeses, run_ms);
        r.longest_gap_from_ms = seen.longest_gap_from_ms;
        r.longest_gap_ms = seen.longest_gap_ms;
        r.recovery_after_kill_ms = seen.recovery_after_kill_ms;
        report.sent += r.sent;
        report.acked += r.acked;
        report.indeterminate += r.indeterminate;
        report.longest_gap_ms = report.longest_gap_ms.max(r.longest_gap_ms);
        report.customers.insert(customer.to_string(), r);
    }
    report.success_ratio = availability::ratio(report.acked, report.sent);
    report
}

/// Availability from the (start, end) of a customer's acknowledged
/// operations: the longest stretch without a success, and for each kill of
/// the customer's holder the time to the next success of a request sent
/// after it.
/// A customer's availability over a run.
pub struct Availability {
    /// Longest time without an acknowledgement, leaving out windows in
    /// which a nemesis stopped the customer's holder and windows in which
    /// none of its requests was in flight.
    pub longest_gap_ms: u64,
    pub longest_gap_from_ms: u64,
    /// For each kill of the customer's holder, how long until a request
    /// sent after it was acknowledged.
    pub recovery_after_kill_ms: Vec<u64>,
}

/// Availability from the spans (start, end) of a customer's acknowledged
/// requests and of all its requests; shared by both workloads.
pub fn availability(
    customer: &str,
    acked: &[(u64, u64)],
    requests: &[(u64, u64)],
    nemeses: &[NemesisEvent],
    run_ms: u64,
) -> Availability {
    let ends: Vec<u64> = acked.iter().map(|(_, end)| *end).collect();
    let mut excluded = availability::holder_down_windows(nemeses, customer);
    excluded.extend(availability::idle_windows(requests, run_ms));
    let (longest_gap_from_ms, longest_gap_ms) = availability::longest_gap(&ends, &excluded, run_ms);
    let mut recovery_after_kill_ms = Vec::new();
    for kill in nemeses
        .iter()
        .filter(|n| n.kind == "kill_holder" && n.customer.as_deref() == Some(customer))
    {
        // The first success of a request sent after the kill: one the
        // dying holder answered just before says nothing.
        let next = acked
            .iter()
            .filter(|(start, _)| *start >= kill.start_ms)
            .map(|(_, end)| *end)
            .min();
        if let Some(next) = next {
            recovery_after_kill_ms.push(next - kill.start_ms);
        }
    }
    Availability {
        longest_gap_ms,
        longest_gap_from_ms,
        recovery_after_kill_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, key: &str, start: u64, outcome: Outcome) -> Op {
        Op {
            client,
            customer: "1".into(),
            key: key.into(),
            start_ms: start,
            end_ms: start + 5,
            outcome,
        }
    }

    fn ok(count: u64, epoch: u64) -> Outcome {
        Outcome::Ok {
            count,
            epoch,
            machine: "m".into(),
        }
    }

    fn finals(n: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([("1".to_string(), n)])
    }

    fn clean() -> Vec<Op> {
        vec![
            op(0, "a", 0, ok(1, 1)),
            op(1, "b", 1, ok(2, 1)),
            op(
                0,
                "c",
                10,
                Outcome::Indeterminate {
                    error: "timeout".into(),
                },
            ),
            op(0, "d", 20, ok(4, 2)),
            op(
                1,
                "e",
                21,
                Outcome::Failed {
                    status: 400,
                    error: "bad".into(),
                },
            ),
        ]
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        // Count 3 went to the indeterminate write, which therefore landed.
        let report = check(&clean(), &finals(4), &[], 100);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!((report.acked, report.indeterminate), (3, 1));
        assert_eq!(report.sent, 5);
        assert_eq!(report.success_ratio, 0.6);
    }

    #[test]
    fn a_lost_write_is_reported() {
        let report = check(&clean(), &finals(2), &[], 100);
        assert!(
            report.violations.iter().any(|v| v.contains("lost writes")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_duplicate_count_is_reported() {
        let mut ops = clean();
        ops.push(op(2, "f", 30, ok(4, 2)));
        let report = check(&ops, &finals(5), &[], 100);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.contains("count 4 acknowledged 2 times")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_phantom_write_is_reported() {
        let report = check(&clean(), &finals(6), &[], 100);
        assert!(
            report.violations.iter().any(|v| v.contains("phantom")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_client_seeing_counts_go_back_is_reported() {
        let ops = vec![op(0, "a", 0, ok(2, 1)), op(0, "b", 10, ok(1, 1))];
        let report = check(&ops, &finals(2), &[], 100);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.contains("client 0 saw count 1")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn an_epoch_inversion_is_reported() {
        let ops = vec![op(0, "a", 0, ok(1, 2)), op(1, "b", 10, ok(2, 1))];
        let report = check(&ops, &finals(2), &[], 100);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.contains("under epoch 1")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn availability_gaps_and_recovery_after_kills() {
        let mut ops = vec![
            op(0, "a", 0, ok(1, 1)),
            op(1, "x", 95, ok(2, 1)),
            op(0, "b", 1000, ok(3, 2)),
            // In flight the whole time, never answered.
            op(
                2,
                "y",
                0,
                Outcome::Indeterminate {
                    error: "timeout".into(),
                },
            ),
        ];
        ops[3].end_ms = 1200;
        let kill = NemesisEvent {
            kind: "kill_holder".into(),
            customer: Some("1".into()),
            machine: None,
            start_ms: 100,
            end_ms: 100,
        };
        let report = check(&ops, &finals(3), std::slice::from_ref(&kill), 1200);
        let r = &report.customers["1"];
        // The gap from 100 to 1005 falls in the killed holder's window
        // (until its restart): not charged.
        assert_eq!(r.longest_gap_ms, 95);
        assert_eq!((report.sent, report.success_ratio), (4, 0.75));
        let without_kill = check(&ops, &finals(3), &[], 1200);
        assert_eq!(without_kill.customers["1"].longest_gap_ms, 905);
        assert_eq!(without_kill.longest_gap_ms, 905);
        assert_eq!(without_kill.customers["1"].longest_gap_from_ms, 100);
        // Nothing in flight between 5 and 95 and between 100 and 1000: no
        // gap is charged there.
        ops.pop();
        let idle = check(&ops, &finals(3), &[], 1200);
        assert_eq!(idle.customers["1"].longest_gap_ms, 5);
        assert_eq!(
            r.recovery_after_kill_ms,
            vec![905],
            "the request sent before the kill does not count"
        );
    }
}
