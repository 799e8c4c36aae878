//! The heartbeat object `machines/<machine-id>/heartbeat.json`: its JSON
//! record, which the session writes and the observer reads. Its own module
//! so that neither of those imports the other.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The JSON content of `machines/<machine-id>/heartbeat.json` (contract).
/// Unknown fields are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    pub machine_id: String,
    pub incarnation: Uuid,
    pub addr: String,
    pub ttl_ms: u64,
    pub renewed_at: DateTime<Utc>,
    /// Bumped by every write, so that the bytes and the ETag change.
    pub seq: u64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl HeartbeatRecord {
    pub(super) fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).expect("heartbeat records serialize"))
    }
}
