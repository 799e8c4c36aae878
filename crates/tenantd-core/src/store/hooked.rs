//! A store that passes every request to another, calling hooks around
//! them: what a test's store does differently (a delay, an error, an
//! action on a key) is written once, and the passing on is not.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    DynStore, ETag, Listed, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreResult,
};

/// What a request does, as hooks see it (`get_to_file` is a `Get`,
/// `put_file` a `Put`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Head,
    Put,
    List,
    Delete,
}

/// Called around every request of a [`Hooked`] store; both do nothing by
/// default.
#[async_trait]
pub trait Hooks: Send + Sync + fmt::Debug + 'static {
    /// Before the request goes on: `key` is the object's key, or the prefix
    /// of a listing. An error answers the request instead.
    async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
        let _ = (op, key);
        Ok(())
    }

    /// After the request was answered without an error, before the answer
    /// is returned.
    async fn after(&self, op: Op, key: &str) {
        let _ = (op, key);
    }
}

/// Hooks shared with the test that watches or steers them.
#[async_trait]
impl<H: Hooks> Hooks for std::sync::Arc<H> {
    async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
        H::before(self, op, key).await
    }

    async fn after(&self, op: Op, key: &str) {
        H::after(self, op, key).await
    }
}

/// `inner`, with `hooks` around every request.
#[derive(Debug)]
pub struct Hooked<H> {
    pub inner: DynStore,
    pub hooks: H,
}

impl<H: Hooks> Hooked<H> {
    pub fn new(inner: DynStore, hooks: H) -> Hooked<H> {
        Hooked { inner, hooks }
    }

    async fn around<T>(
        &self,
        op: Op,
        key: &str,
        request: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.hooks.before(op, key).await?;
        let answer = request.await?;
        self.hooks.after(op, key).await;
        Ok(answer)
    }
}

#[async_trait]
impl<H: Hooks> ObjectStore for Hooked<H> {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        self.around(Op::Get, key, self.inner.get(key)).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.around(Op::Head, key, self.inner.head(key)).await
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let put = self.inner.put(key, body, metadata, condition);
        self.around(Op::Put, key, put).await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        self.around(Op::Get, key, self.inner.get_to_file(key, path))
            .await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let put = self.inner.put_file(key, path, metadata, condition);
        self.around(Op::Put, key, put).await
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        self.around(Op::List, prefix, self.inner.list(prefix, start_after))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.around(Op::Delete, key, self.inner.delete(key)).await
    }

    async fn check(&self) -> StoreResult<()> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::store::{MemoryStore, StoreError};

    /// Records what it sees; refuses every delete.
    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<(&'static str, Op, String)>>);

    #[async_trait]
    impl Hooks for Seen {
        async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
            self.0.lock().unwrap().push(("before", op, key.into()));
            match op {
                Op::Delete => Err(StoreError::transient(key, "refused by the hook")),
                _ => Ok(()),
            }
        }

        async fn after(&self, op: Op, key: &str) {
            self.0.lock().unwrap().push(("after", op, key.into()));
        }
    }

    #[tokio::test]
    async fn hooks_run_around_every_request_and_an_error_before_answers_it() {
        let inner: DynStore = Arc::new(MemoryStore::new());
        let seen = Arc::new(Seen::default());
        let store = Hooked::new(inner.clone(), seen.clone());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        store
            .put("k", "v".into(), Metadata::new(), Precondition::None)
            .await
            .unwrap();
        store.get_to_file("k", &file).await.unwrap().unwrap();
        store
            .put_file("j", &file, Metadata::new(), Precondition::None)
            .await
            .unwrap();
        store.list("", None).await.unwrap();
        assert!(store.delete("k").await.is_err());
        assert!(
            inner.head("k").await.unwrap().is_some(),
            "the delete never went on"
        );
        let seen = seen.0.lock().unwrap().clone();
        let expected: Vec<(&str, Op, String)> = vec![
            ("before", Op::Put, "k".into()),
            ("after", Op::Put, "k".into()),
            ("before", Op::Get, "k".into()),
            ("after", Op::Get, "k".into()),
            ("before", Op::Put, "j".into()),
            ("after", Op::Put, "j".into()),
            ("before", Op::List, "".into()),
            ("after", Op::List, "".into()),
            ("before", Op::Delete, "k".into()),
        ];
        assert_eq!(seen, expected);
    }
}
