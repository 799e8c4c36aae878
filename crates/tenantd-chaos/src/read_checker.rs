//! The read checker: a pure function over the reads a run recorded, the
//! writes it recorded (the counter history of [`crate::history`]) and the
//! durable history read from the store once the cluster was quiet.
//!
//! Every write stores the op that made it next to the count (the workload
//! keeps a table of `(op, count)`), and every read returns the count with
//! the op of the last write it shows. That pair names one state, which
//! makes the checks exact even where counts repeat (a write lost by one
//! holder and the next holder's write reaching the same count):
//!
//! (a) no read shows a state never written or later lost: its op is in
//!     the durable history with that count (or it shows no op and 0);
//! (b) read-your-writes: a read never shows less than the floor it was
//!     sent with (its writer's acknowledged write, whose bookmark it
//!     carried, or its own last read);
//! (c) a read with no bookmark shows every write acknowledged before it
//!     started (what a follower's ReadIndex promises);
//! (d) a read with `tenantd-max-staleness: S` shows every write
//!     acknowledged more than S before it started;
//! (e) monotonic reads: a client that carries the bookmark of its last
//!     answer never sees the count go back, and no answer's bookmark is
//!     below the one the client sent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::history::Op;

/// What a read asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Asked {
    /// `tenantd-bookmark`, and the count the state at that bookmark has at
    /// least (the write it came from, or the client's last read); with
    /// `tenantd-max-staleness` too when `max_staleness_ms` is set.
    Bookmark {
        bookmark: u64,
        floor: u64,
        #[serde(default)]
        max_staleness_ms: Option<u64>,
    },
    /// Nothing: as the official libSQL clients send.
    Nothing,
    /// `tenantd-max-staleness`.
    MaxStaleness { ms: u64 },
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReadOutcome {
    Ok {
        count: u64,
        /// The op of the last write the state shows; `None` before any.
        op: Option<String>,
        bookmark: u64,
        machine: String,
        /// `holder` or `follower`.
        role: String,
    },
    Failed {
        error: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    pub client: usize,
    pub customer: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub asked: Asked,
    pub outcome: ReadOutcome,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReadReport {
    pub violations: Vec<String>,
    pub reads: usize,
    pub answered: usize,
    /// Answers given by followers.
    pub by_followers: usize,
}

/// `durable`: per customer, the op → count pairs the store holds at the
/// end. `writes`: the counter history (only acknowledged ones matter).
pub fn check(
    reads: &[Read],
    writes: &[Op],
    durable: &BTreeMap<String, BTreeMap<String, u64>>,
) -> ReadReport {
    let mut report = ReadReport {
        reads: reads.len(),
        ..ReadReport::default()
    };
    // Per customer, acknowledged (end_ms, count), by end.
    let mut acked: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for op in writes {
        if let Some((count, _)) = op.acked() {
            acked
                .entry(op.customer.as_str())
                .or_default()
                .push((op.end_ms, count));
        }
    }
    for list in acked.values_mut() {
        list.sort();
    }
    // The highest count acknowledged strictly before `ms`.
    let acked_before = |customer: &str, ms: u64| -> u64 {
        acked.get(customer).map_or(0, |list| {
            list.iter()
                .take_while(|(end, _)| *end < ms)
                .map(|(_, count)| *count)
                .max()
                .unwrap_or(0)
        })
    };
    let empty = BTreeMap::new();
    // Per (client, customer): the last count and bookmark a bookmark
    // carrying client saw.
    let mut last: BTreeMap<(usize, &str), (u64, u64)> = BTreeMap::new();
    let mut ordered: Vec<&Read> = reads.iter().collect();
    ordered.sort_by_key(|r| (r.client, r.start_ms, r.end_ms));
    for read in ordered {
        let ReadOutcome::Ok {
            count,
            op,
            bookmark,
            machine,
            role,
        } = &read.outcome
        else {
            continue;
        };
        report.answered += 1;
        if role == "follower" {
            report.by_followers += 1;
        }
        let (count, bookmark) = (*count, *bookmark);
        let what = format!(
            "customer {} client {} read at {}-{} ms ({:?}) answered by {machine} ({role}) count {count} op {op:?} bookmark {bookmark}",
            read.customer, read.client, read.start_ms, read.end_ms, read.asked
        );
        let history = durable.get(&read.customer).unwrap_or(&empty);
        let stale = |violations: &mut Vec<String>, ms: u64| {
            let floor = acked_before(&read.customer, read.start_ms.saturating_sub(ms));
            if read.start_ms > ms && count < floor {
                violations.push(format!(
                    "{what}: older than {ms} ms allow: misses count {floor}, acknowledged before {} ms",
                    read.start_ms - ms
                ));
            }
        };
        match op {
            None if count != 0 => report
                .violations
                .push(format!("{what}: a count without the write that made it")),
            None => {}
            Some(op) => match history.get(op) {
                None => report.violations.push(format!(
                    "{what}: a lost state: the write it shows is not in the durable history (never written, or later lost)"
                )),
                Some(&durable_count) if durable_count != count => {
                    report.violations.push(format!(
                        "{what}: a lost state: the durable history has count {durable_count} after that write"
                    ))
                }
                Some(_) => {}
            },
        }
        match read.asked {
            Asked::Bookmark {
                bookmark: sent,
                floor,
                max_staleness_ms,
            } => {
                if let Some(ms) = max_staleness_ms {
                    stale(&mut report.violations, ms);
                }
                if count < floor {
                    report.violations.push(format!(
                        "{what}: read-your-writes: less than the count {floor} its bookmark stands for"
                    ));
                }
                if bookmark < sent {
                    report.violations.push(format!(
                        "{what}: answered with a bookmark below the {sent} it sent"
                    ));
                }
                let key = (read.client, read.customer.as_str());
                if let Some(&(seen, seen_bookmark)) = last.get(&key)
                    && (count < seen || bookmark < seen_bookmark)
                {
                    report.violations.push(format!(
                        "{what}: monotonic reads: this client saw count {seen} at bookmark {seen_bookmark} before"
                    ));
                }
                last.insert(key, (count, bookmark));
            }
            Asked::Nothing => {
                let floor = acked_before(&read.customer, read.start_ms);
                if count < floor {
                    report.violations.push(format!(
                        "{what}: misses a write acknowledged before it started (count {floor})"
                    ));
                }
            }
            Asked::MaxStaleness { ms } => stale(&mut report.violations, ms),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    fn write(key: &str, end_ms: u64, count: u64) -> Op {
        Op {
            client: 0,
            customer: "c".into(),
            key: key.into(),
            start_ms: end_ms.saturating_sub(5),
            end_ms,
            outcome: Outcome::Ok {
                count,
                epoch: 1,
                machine: "m".into(),
            },
        }
    }

    fn read(client: usize, start_ms: u64, asked: Asked, count: u64, op: &str, bm: u64) -> Read {
        Read {
            client,
            customer: "c".into(),
            start_ms,
            end_ms: start_ms + 1,
            asked,
            outcome: ReadOutcome::Ok {
                count,
                op: (!op.is_empty()).then(|| op.to_string()),
                bookmark: bm,
                machine: "f".into(),
                role: "follower".into(),
            },
        }
    }

    fn durable() -> BTreeMap<String, BTreeMap<String, u64>> {
        let ops = [("w1", 1), ("w2", 2), ("w3", 3)];
        BTreeMap::from([(
            "c".to_string(),
            ops.iter().map(|(k, c)| (k.to_string(), *c)).collect(),
        )])
    }

    fn violations(reads: &[Read]) -> Vec<String> {
        let writes = [write("w1", 10, 1), write("w2", 20, 2), write("w3", 30, 3)];
        check(reads, &writes, &durable()).violations
    }

    #[test]
    fn a_history_that_keeps_every_promise_passes() {
        let reads = [
            read(1, 5, Asked::Nothing, 0, "", 1),
            read(1, 25, Asked::Nothing, 2, "w2", 4),
            read(
                2,
                21,
                Asked::Bookmark {
                    bookmark: 4,
                    floor: 2,
                    max_staleness_ms: None,
                },
                2,
                "w2",
                4,
            ),
            read(
                2,
                40,
                Asked::Bookmark {
                    bookmark: 4,
                    floor: 2,
                    max_staleness_ms: None,
                },
                3,
                "w3",
                5,
            ),
            read(3, 35, Asked::MaxStaleness { ms: 10 }, 2, "w2", 4),
        ];
        assert_eq!(violations(&reads), Vec::<String>::new());
    }

    #[test]
    fn a_lost_write_shown_to_a_reader_is_caught_even_with_a_count_that_was_reached_again() {
        // w2' reached count 2 and was lost; w2 reached it again later.
        let v = violations(&[read(1, 25, Asked::MaxStaleness { ms: 1000 }, 2, "w2'", 4)]);
        assert!(v[0].contains("a lost state: the write"), "{v:?}");
        let v = violations(&[read(1, 25, Asked::MaxStaleness { ms: 1000 }, 3, "w2", 4)]);
        assert!(
            v[0].contains("a lost state: the durable history has count 2"),
            "{v:?}"
        );
    }

    #[test]
    fn each_promise_broken_is_named() {
        let v = violations(&[read(1, 25, Asked::Nothing, 1, "w1", 2)]);
        assert!(v[0].contains("acknowledged before it started"), "{v:?}");
        let v = violations(&[read(1, 45, Asked::MaxStaleness { ms: 10 }, 2, "w2", 4)]);
        assert!(v[0].contains("older than 10 ms"), "{v:?}");
        let v = violations(&[read(
            2,
            21,
            Asked::Bookmark {
                bookmark: 4,
                floor: 2,
                max_staleness_ms: Some(0),
            },
            1,
            "w1",
            3,
        )]);
        assert!(v.iter().any(|v| v.contains("read-your-writes")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("bookmark below")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("older than 0 ms")), "{v:?}");
        let v = violations(&[
            read(
                2,
                40,
                Asked::Bookmark {
                    bookmark: 1,
                    floor: 0,
                    max_staleness_ms: None,
                },
                3,
                "w3",
                5,
            ),
            read(
                2,
                50,
                Asked::Bookmark {
                    bookmark: 1,
                    floor: 0,
                    max_staleness_ms: None,
                },
                2,
                "w2",
                4,
            ),
        ]);
        assert!(v[0].contains("monotonic reads"), "{v:?}");
    }
}
