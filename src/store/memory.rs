//! In-process store for unit tests and the deterministic simulation.
//! Conditional writes are atomic under one mutex.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ETag, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult,
};

#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<HashMap<String, Object>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Every key currently stored, sorted (for tests and the checker).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.objects.lock().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }
}

/// Applies `condition` against the current ETag (if any); shared by the
/// memory and file stores so both decide identically.
pub(crate) fn check_condition(
    key: &str,
    current: Option<&ETag>,
    condition: &Precondition,
) -> StoreResult<()> {
    let ok = match (condition, current) {
        (Precondition::None, _) => true,
        (Precondition::IfAbsent, current) => current.is_none(),
        (Precondition::IfMatch(expected), Some(current)) => expected == current,
        (Precondition::IfMatch(_), None) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::PreconditionFailed {
            key: key.to_string(),
        })
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        Ok(self.objects.lock().unwrap().get(key).cloned())
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        Ok(self.objects.lock().unwrap().get(key).map(|o| ObjectMeta {
            etag: o.etag.clone(),
            size: o.body.len() as u64,
            metadata: o.metadata.clone(),
        }))
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let mut objects = self.objects.lock().unwrap();
        check_condition(key, objects.get(key).map(|o| &o.etag), &condition)?;
        let etag = ETag::of(&body);
        objects.insert(
            key.to_string(),
            Object {
                body,
                etag: etag.clone(),
                metadata,
            },
        );
        Ok(etag)
    }

    async fn check(&self) -> StoreResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "memory://".to_string()
    }
}
