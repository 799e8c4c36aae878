//! Downloads to files that go wrong: a body cut short by the server, and
//! a disk that fills mid-download (tests/store_disk_full.rs). The error
//! names what is wrong, and no partial file is left where the object
//! should be.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use tenantd_core::store::{DynStore, ObjectStore, RetryingStore, S3Store, StoreError};

/// A server that answers every request with a GET head promising
/// `promised` bytes and then sends `sent` bytes and hangs up: a connection
/// cut mid-body, from a real socket.
fn cutting_server(promised: usize, sent: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {promised}\r\nETag: \"0123456789abcdef0123456789abcdef\"\r\nx-amz-meta-tenantd-epoch: 1\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&vec![b'x'; sent]);
            let _ = stream.flush();
        }
    });
    endpoint
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_naming_the_key_and_leaves_no_file() {
    let endpoint = cutting_server(1_000_000, 400_000);
    let store = S3Store::with_endpoint("bucket", "", &endpoint, Some(true))
        .await
        .unwrap()
        .with_attempt_timeout(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite3");
    let error = store
        .get_to_file("customer/a/db.sqlite3", &path)
        .await
        .expect_err("a body shorter than its Content-Length");
    assert!(
        matches!(error, StoreError::Transient { .. }),
        "a cut body may heal on a retry: {error:?}"
    );
    assert!(
        error.to_string().contains("customer/a/db.sqlite3"),
        "the error names the key: {error}"
    );
    assert!(!path.exists(), "a partial download was left at {path:?}");

    // Through the retrying layer: retried, then the same error; still no
    // file.
    let retrying = RetryingStore::new(Arc::new(store) as DynStore, Default::default());
    let error = retrying
        .get_to_file("customer/a/db.sqlite3", &path)
        .await
        .expect_err("every attempt is cut short");
    assert!(
        error.to_string().contains("customer/a/db.sqlite3"),
        "{error}"
    );
    assert!(!path.exists(), "a partial download was left at {path:?}");
}
