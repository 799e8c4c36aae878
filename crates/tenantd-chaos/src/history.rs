//! What the workload records: one entry per operation, with its outcome as
//! the client saw it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged: durable with this count.
    Ok {
        count: u64,
        epoch: u64,
        machine: String,
    },
    /// Definitely not applied (a 4xx answer).
    Failed { status: u16, error: String },
    /// May or may not have been applied (timeout, connection error, 5xx).
    Indeterminate { error: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: usize,
    pub customer: String,
    pub key: String,
    /// Milliseconds since the start of the run.
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
}

impl Op {
    pub fn acked(&self) -> Option<(u64, u64)> {
        match &self.outcome {
            Outcome::Ok { count, epoch, .. } => Some((*count, *epoch)),
            _ => None,
        }
    }
}

/// A fault the nemesis injected, with when it started and ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub kind: String,
    pub customer: Option<String>,
    pub machine: Option<String>,
    pub start_ms: u64,
    pub end_ms: u64,
}
