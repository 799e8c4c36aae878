//! In-process store for unit tests and the deterministic simulation.
//! Conditional writes are atomic under one mutex.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ETag, Listed, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult,
};

/// Ordered by key, so that a listing is a range scan in byte order (the
/// order of `String`'s `Ord`, as S3 lists).
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Stored>>,
}

#[derive(Debug)]
struct Stored {
    object: Object,
    last_modified: SystemTime,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Every key currently stored, sorted (for tests and the checker).
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
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
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(key)
            .map(|s| s.object.clone()))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(key)
            .map(|s| &s.object)
            .map(|o| ObjectMeta {
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
        // Hashing a big body takes a while: not on a runtime worker, which
        // lease renewals of other tenants need (the file store does the
        // same), and not under the lock.
        let etag = if body.len() > 1 << 20 {
            let copy = body.clone();
            tokio::task::spawn_blocking(move || ETag::of(&copy))
                .await
                .unwrap_or_else(|_| ETag::of(&body))
        } else {
            ETag::of(&body)
        };
        let mut objects = self.objects.lock().unwrap();
        check_condition(key, objects.get(key).map(|s| &s.object.etag), &condition)?;
        objects.insert(
            key.to_string(),
            Stored {
                object: Object {
                    body,
                    etag: etag.clone(),
                    metadata,
                },
                last_modified: SystemTime::now(),
            },
        );
        Ok(etag)
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        // Keys with the prefix are one contiguous run in byte order: start
        // at whichever of the prefix and `start_after` comes later, stop at
        // the first key without the prefix.
        let start = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, stored)| Listed {
                key: key.clone(),
                size: stored.object.body.len() as u64,
                last_modified: Some(stored.last_modified),
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }

    async fn check(&self) -> StoreResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "memory://".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{DynStore, conformance};

    /// The list and delete properties of the conformance suite (run for
    /// every backend by tests/store_conformance.rs), here without moto.
    #[tokio::test]
    async fn lists_and_deletes_conform() {
        let store: DynStore = Arc::new(MemoryStore::new());
        conformance::list_filters_and_orders(&store, "t").await;
        conformance::delete_removes(&store, "t").await;
        conformance::leading_slash_keys_list_apart(&store, "t").await;
        conformance::list_spans_pages(&store, "t", 10).await;
        conformance::files_round_trip(&store, "t").await;
    }
}
