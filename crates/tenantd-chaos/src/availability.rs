//! Availability figures of a chaos run, from the recorded history alone:
//!
//! - `success_ratio`: acknowledged / sent, per customer and overall;
//! - `longest_gap_ms`: the longest stretch with no acknowledgement for a
//!   customer, *outside* the windows in which a nemesis legitimately stopped
//!   that customer's holder (killed until its restart, paused, partitioned
//!   from the store, stopped), and outside the times when no request of the
//!   customer was in flight (closed-loop clients pick customers at random:
//!   while another customer's holder is paused every client may be waiting
//!   on it, and a customer nobody asks cannot acknowledge anything). Store
//!   faults (errors, lost responses, late-applied writes, SlowDown, a
//!   bandwidth cap, latency) are not excluded: the service is expected to
//!   ride them out. Overall: the largest customer's figure;
//! - throughput (acknowledged per second) and the latency percentiles of
//!   acknowledged requests.

use serde::{Deserialize, Serialize};

use super::history::{NemesisEvent, Op};

/// Nemeses that stop a customer's holder on purpose: the time they are
/// active is not charged to availability.
pub const HOLDER_STOPPING: &[&str] = &[
    "kill_holder",
    "pause_holder",
    "partition_holder",
    "stop_holder",
];

/// A killed holder stays dead this long (the chaos cluster's restart
/// delay); its window ends when it is restarted.
pub const KILLED_FOR_MS: u64 = 1500;

/// acknowledged / sent (1.0 when nothing was sent).
pub fn ratio(acked: usize, sent: usize) -> f64 {
    if sent == 0 {
        1.0
    } else {
        acked as f64 / sent as f64
    }
}

/// The windows `[start, end]` (ms) in which `customer`'s holder was stopped
/// by a nemesis, sorted.
pub fn holder_down_windows(nemeses: &[NemesisEvent], customer: &str) -> Vec<(u64, u64)> {
    let mut windows: Vec<(u64, u64)> = nemeses
        .iter()
        .filter(|n| n.customer.as_deref() == Some(customer))
        .filter(|n| HOLDER_STOPPING.contains(&n.kind.as_str()))
        .map(|n| {
            let end = if n.kind == "kill_holder" {
                n.end_ms.max(n.start_ms + KILLED_FOR_MS)
            } else {
                n.end_ms
            };
            (n.start_ms, end.max(n.start_ms))
        })
        .collect();
    windows.sort();
    windows
}

/// The parts of `[0, run_ms]` in which none of the requests `[start, end]`
/// was in flight, sorted.
pub fn idle_windows(requests: &[(u64, u64)], run_ms: u64) -> Vec<(u64, u64)> {
    let mut requests = requests.to_vec();
    requests.sort();
    let mut idle = Vec::new();
    let mut busy_until = 0;
    for (start, end) in requests {
        if start > busy_until {
            idle.push((busy_until, start));
        }
        busy_until = busy_until.max(end);
    }
    if run_ms > busy_until {
        idle.push((busy_until, run_ms));
    }
    idle
}

/// The longest stretch of `[0, run_ms]` between consecutive
/// acknowledgements (`ack_ends`, ms, any order) once `excluded` windows are
/// cut out of it: a gap that a window splits counts as its pieces.
pub fn longest_gap_ms(ack_ends: &[u64], excluded: &[(u64, u64)], run_ms: u64) -> u64 {
    longest_gap(ack_ends, excluded, run_ms).1
}

/// Like [`longest_gap_ms`], with where the longest stretch starts:
/// `(start_ms, length_ms)`.
pub fn longest_gap(ack_ends: &[u64], excluded: &[(u64, u64)], run_ms: u64) -> (u64, u64) {
    let mut ends: Vec<u64> = ack_ends.to_vec();
    ends.sort_unstable();
    let mut longest = (0, 0);
    let mut previous = 0;
    for end in ends.into_iter().chain(std::iter::once(run_ms)) {
        let end = end.max(previous);
        let piece = longest_piece(previous, end, excluded);
        if piece.1 > longest.1 {
            longest = piece;
        }
        previous = end;
    }
    longest
}

/// The longest part of `[from, to]` outside every window, as
/// `(start, length)`.
fn longest_piece(from: u64, to: u64, excluded: &[(u64, u64)]) -> (u64, u64) {
    let mut longest = (from, 0);
    let mut cursor = from;
    let mut windows: Vec<(u64, u64)> = excluded
        .iter()
        .copied()
        .filter(|(s, e)| *e > from && *s < to)
        .collect();
    windows.sort();
    for (start, end) in windows {
        if start > cursor && start - cursor > longest.1 {
            longest = (cursor, start - cursor);
        }
        cursor = cursor.max(end);
        if cursor >= to {
            return longest;
        }
    }
    if to.saturating_sub(cursor) > longest.1 {
        longest = (cursor, to - cursor);
    }
    longest
}

/// Rates and latencies of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub sent: usize,
    pub acked: usize,
    /// Acknowledged increments per second of the run.
    pub acked_per_sec: f64,
    /// Latency of acknowledged requests (client-side, through the edge).
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

pub fn throughput(ops: &[Op], run_ms: u64) -> Throughput {
    let mut latencies: Vec<u64> = ops
        .iter()
        .filter(|o| o.acked().is_some())
        .map(|o| o.end_ms.saturating_sub(o.start_ms))
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1]
    };
    Throughput {
        sent: ops.len(),
        acked: latencies.len(),
        acked_per_sec: if run_ms == 0 {
            0.0
        } else {
            latencies.len() as f64 * 1000.0 / run_ms as f64
        },
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: latencies.last().copied().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    fn event(kind: &str, customer: &str, start_ms: u64, end_ms: u64) -> NemesisEvent {
        NemesisEvent {
            kind: kind.into(),
            customer: Some(customer.into()),
            machine: None,
            start_ms,
            end_ms,
        }
    }

    #[test]
    fn gaps_without_windows_are_plain_differences() {
        assert_eq!(longest_gap_ms(&[100, 400, 450], &[], 600), 300);
        assert_eq!(longest_gap_ms(&[], &[], 600), 600);
        assert_eq!(longest_gap_ms(&[500, 100], &[], 520), 400);
    }

    #[test]
    fn a_window_cuts_a_gap_into_pieces() {
        // Gap 100..1100 with the holder down 300..900: pieces of 200.
        assert_eq!(longest_gap_ms(&[100, 1100], &[(300, 900)], 1100), 200);
        // The window covers the gap's start: what is left after it counts.
        assert_eq!(longest_gap_ms(&[100, 1100], &[(50, 600)], 1100), 500);
        // Overlapping windows.
        assert_eq!(
            longest_gap_ms(&[0, 2000], &[(100, 900), (800, 1500)], 2000),
            500
        );
        // A window outside every gap changes nothing.
        assert_eq!(longest_gap_ms(&[0, 1000], &[(5000, 6000)], 1000), 1000);
        // Where: the piece after the window.
        assert_eq!(longest_gap(&[100, 1100], &[(50, 600)], 1100), (600, 500));
        assert_eq!(longest_gap(&[100, 400, 450], &[], 600), (100, 300));
    }

    #[test]
    fn idle_time_is_the_complement_of_requests_in_flight() {
        assert_eq!(
            idle_windows(&[(10, 50), (20, 40), (60, 70), (65, 90)], 100),
            vec![(0, 10), (50, 60), (90, 100)]
        );
        assert_eq!(idle_windows(&[], 100), vec![(0, 100)]);
        assert_eq!(idle_windows(&[(0, 100)], 100), vec![]);
    }

    #[test]
    fn only_holder_stopping_nemeses_of_that_customer_are_excluded() {
        let nemeses = vec![
            event("kill_holder", "1", 1000, 1000),
            event("pause_holder", "1", 5000, 7500),
            event("store_errors", "1", 8000, 11000),
            event("partition_holder", "2", 9000, 11000),
        ];
        assert_eq!(
            holder_down_windows(&nemeses, "1"),
            vec![(1000, 1000 + KILLED_FOR_MS), (5000, 7500)]
        );
        assert_eq!(holder_down_windows(&nemeses, "2"), vec![(9000, 11000)]);
    }

    #[test]
    fn ratio_and_throughput() {
        assert_eq!(ratio(0, 0), 1.0);
        assert_eq!(ratio(99, 100), 0.99);
        let op = |start: u64, end: u64, ok: bool| Op {
            client: 0,
            customer: "1".into(),
            key: format!("k{start}"),
            start_ms: start,
            end_ms: end,
            outcome: if ok {
                Outcome::Ok {
                    count: start,
                    epoch: 1,
                    machine: "m".into(),
                }
            } else {
                Outcome::Indeterminate {
                    error: "503".into(),
                }
            },
        };
        let mut ops: Vec<Op> = (0..100).map(|i| op(i * 10, i * 10 + 5, true)).collect();
        ops[50].end_ms += 95; // 100 ms
        ops.push(op(2000, 3000, false));
        let t = throughput(&ops, 2000);
        assert_eq!((t.sent, t.acked), (101, 100));
        assert_eq!(t.acked_per_sec, 50.0);
        assert_eq!((t.p50_ms, t.p99_ms, t.max_ms), (5, 5, 100));
    }
}
