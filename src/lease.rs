//! The `machine.lock` lease protocol. PLACEHOLDER with the agreed API; the
//! real implementation lands from the lease branch.
#![allow(unused)]

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::{DynStore, ETag, StoreResult};

pub trait WallClock: Send + Sync + Debug {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug)]
pub struct SystemWallClock;
impl WallClock for SystemWallClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub machine_id: String,
    pub addr: String,
    pub ttl: Duration,
    pub margin: Duration,
    pub skew_allowance: Duration,
    pub wall_clock: Arc<dyn WallClock>,
}

impl LeaseConfig {
    pub fn new(machine_id: impl Into<String>, addr: impl Into<String>, ttl: Duration) -> Self {
        LeaseConfig {
            machine_id: machine_id.into(),
            addr: addr.into(),
            ttl,
            margin: ttl / 5,
            skew_allowance: Duration::from_secs(30),
            wall_clock: Arc::new(SystemWallClock),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockRecord {
    pub holder: String,
    pub addr: String,
    pub epoch: u64,
    pub token: Uuid,
    pub ttl_ms: u64,
    pub renewed_at: DateTime<Utc>,
    pub released: bool,
}

#[derive(Clone, Debug)]
pub enum LockState {
    Absent,
    Held { record: LockRecord, etag: ETag },
    Released { record: LockRecord, etag: ETag },
    Unparsable { etag: ETag },
}

pub async fn read_lock(store: &DynStore, key: &str) -> StoreResult<LockState> {
    todo!()
}

pub struct Contender {}

impl Contender {
    pub fn new(store: DynStore, key: String, config: LeaseConfig) -> Contender {
        todo!()
    }
    pub async fn try_acquire(&mut self) -> StoreResult<Acquire> {
        todo!()
    }
    pub async fn acquire_until(&mut self, until: tokio::time::Instant) -> StoreResult<Acquire> {
        todo!()
    }
}

pub enum Acquire {
    Acquired(Lease),
    HeldBy {
        record: LockRecord,
        stale_in: Duration,
    },
    Unknown {
        stale_in: Duration,
    },
}

pub struct Lease {}

impl Lease {
    pub fn epoch(&self) -> u64 {
        todo!()
    }
    pub fn token(&self) -> Uuid {
        todo!()
    }
    pub fn record(&self) -> LockRecord {
        todo!()
    }
    pub fn previous(&self) -> Option<LockRecord> {
        todo!()
    }
    pub fn is_valid(&self) -> bool {
        todo!()
    }
    pub fn deadline(&self) -> tokio::time::Instant {
        todo!()
    }
    pub async fn lost(&self) {
        todo!()
    }
    pub async fn release(self) -> StoreResult<()> {
        todo!()
    }
}
