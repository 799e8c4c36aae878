//! A disk that fills during a download, made real with a file-size limit
//! on this process (RLIMIT_FSIZE: writes past it fail with EFBIG, as they
//! fail with ENOSPC on a full disk). Alone in its test binary: the limit
//! holds for the whole process.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigHandler, Signal, signal};
use tenantd_core::store::{DynStore, FileStore, MemoryStore, Metadata, Precondition, StoreError};

const LIMIT: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_mid_download_is_an_error_naming_the_path_and_no_file_stays() {
    let dir = tempfile::tempdir().unwrap();
    let body = Bytes::from(vec![7u8; 4 * LIMIT as usize]);
    let (s3, _bucket) = support::s3_store().await;
    let stores: Vec<(&str, DynStore)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "file",
            Arc::new(FileStore::new(dir.path().join("store")).unwrap()),
        ),
        ("s3", s3),
    ];
    for (_, store) in &stores {
        store
            .put("big", body.clone(), Metadata::new(), Precondition::IfAbsent)
            .await
            .unwrap();
    }
    // From here on this process cannot write a file past 1 MiB (moto, a
    // child started above, is not limited).
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.unwrap();
    setrlimit(Resource::RLIMIT_FSIZE, LIMIT, LIMIT).unwrap();
    for (name, store) in &stores {
        let path = dir.path().join(format!("{name}.download"));
        let error = store
            .get_to_file("big", &path)
            .await
            .expect_err("a download past the disk's room");
        assert!(
            matches!(error, StoreError::Fatal { .. }),
            "{name}: a full disk is not the store's to retry: {error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("big"),
            "{name}: the error names the path and the key: {text}"
        );
        assert!(!path.exists(), "{name}: a partial file stayed at {path:?}");
    }
}
