//! Store URLs (`s3://bucket[/prefix]`, `file:///abs`, `file://rel`,
//! `memory://`) and opening the layered store they name.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use super::fault::FaultHandle;
use super::retry::RetryPolicy;
use super::{
    DynStore, FaultConfig, FaultStore, FileStore, InstrumentedStore, MemoryStore, RetryingStore,
    S3Store, StoreError,
};
use crate::metrics::Metrics;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    S3 { bucket: String, prefix: String },
    File(PathBuf),
    Memory,
}

impl StoreUrl {
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        let hint = "expected s3://bucket[/prefix], file:///abs/path, file://rel/path or memory://";
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(format!(
                    "invalid bucket name {bucket:?} in store URL {text:?}: S3 bucket names are 3-63 lower-case letters, digits, '.' or '-'"
                ));
            }
            Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            })
        } else if let Some(rest) = text.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(format!("store URL {text:?} has no path; {hint}"));
            }
            Ok(StoreUrl::File(PathBuf::from(rest)))
        } else if text == "memory://" {
            Ok(StoreUrl::Memory)
        } else {
            Err(format!("unsupported store URL {text:?}; {hint}"))
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::File(path) => write!(f, "file://{}", path.display()),
            StoreUrl::Memory => f.write_str("memory://"),
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreUrl::parse(s)
    }
}

fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Opens the store a URL names, layered as the service uses it:
/// backend → fault layer (inert unless configured) → metrics (when given)
/// → retrying layer. Metrics sit under the retries so that they count the
/// requests actually sent. Returns the fault handle so that the caller can
/// change faults at run time.
pub async fn open_store(
    url: &StoreUrl,
    faults: FaultConfig,
    policy: RetryPolicy,
    metrics: Option<&Metrics>,
) -> Result<(DynStore, FaultHandle), StoreError> {
    let backend: DynStore = match url {
        StoreUrl::S3 { bucket, prefix } => Arc::new(S3Store::from_env(bucket, prefix).await?),
        StoreUrl::File(path) => Arc::new(FileStore::new(path)?),
        StoreUrl::Memory => Arc::new(MemoryStore::new()),
    };
    let fault = FaultStore::new(backend, faults);
    let handle = fault.handle();
    let mut layered: DynStore = Arc::new(fault);
    if let Some(metrics) = metrics {
        layered = Arc::new(InstrumentedStore::new(layered, metrics.clone()));
    }
    let store: DynStore = Arc::new(RetryingStore::new(layered, policy));
    Ok((store, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(
            StoreUrl::parse("s3://tenantd-test/a/b/").unwrap(),
            StoreUrl::S3 {
                bucket: "tenantd-test".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("file:///abs/x").unwrap(),
            StoreUrl::File(PathBuf::from("/abs/x"))
        );
        assert_eq!(
            StoreUrl::parse("file://./data/store").unwrap(),
            StoreUrl::File(PathBuf::from("./data/store"))
        );
        for bad in ["s3://", "s3://A_B", "http://x", "file://", "bucket"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
