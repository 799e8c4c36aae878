//! S3 (and Tigris) backend on aws-sdk-s3. TODO(helper): implement.

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ETag, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult,
};

#[derive(Debug)]
pub struct S3Store {
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// Builds a client from the standard AWS environment.
    pub async fn from_env(bucket: &str, prefix: &str) -> StoreResult<S3Store> {
        Ok(S3Store {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, _key: &str) -> StoreResult<Option<Object>> {
        Err(StoreError::Fatal {
            message: "S3 not implemented yet".into(),
        })
    }
    async fn head(&self, _key: &str) -> StoreResult<Option<ObjectMeta>> {
        Err(StoreError::Fatal {
            message: "S3 not implemented yet".into(),
        })
    }
    async fn put(
        &self,
        _key: &str,
        _body: Bytes,
        _metadata: Metadata,
        _condition: Precondition,
    ) -> StoreResult<ETag> {
        Err(StoreError::Fatal {
            message: "S3 not implemented yet".into(),
        })
    }
    async fn check(&self) -> StoreResult<()> {
        Err(StoreError::Fatal {
            message: "S3 not implemented yet".into(),
        })
    }
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}
