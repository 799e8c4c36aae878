//! Multipart uploads on a real S3 server (moto): a file above the
//! threshold goes up in parts under the same conditions as a single PUT,
//! an upload left incomplete by a killed machine is never read as state
//! and is aborted by the sweep a claim runs, and what moto does with the
//! conditions of CompleteMultipartUpload (store/multipart.rs builds on it).

mod support;

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tenantd_core::store::{Metadata, ObjectStore, Precondition, S3Store};

const MIB: u64 = 1 << 20;

fn bytes(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(131) ^ u64::from(seed) ^ (i >> 10)) as u8)
        .collect()
}

async fn client() -> aws_sdk_s3::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    )
}

async fn incomplete_uploads(client: &aws_sdk_s3::Client, bucket: &str) -> usize {
    client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .uploads()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_above_the_threshold_goes_up_in_parts_under_the_same_conditions() {
    let bucket = support::fresh_bucket().await;
    let store = S3Store::from_env(&bucket, "")
        .await
        .unwrap()
        .with_multipart(6 * MIB, 5 * MIB);
    let s3 = client().await;
    let dir = tempfile::tempdir().unwrap();
    let key = "customer/big/db.sqlite3";
    let file = dir.path().join("snapshot");
    let first = bytes(12 * MIB + 7, 1);
    std::fs::write(&file, &first).unwrap();
    let mut metadata = Metadata::new();
    metadata.insert("tenantd-seq".into(), "9".into());
    let etag = store
        .put_file(key, &file, metadata.clone(), Precondition::IfAbsent)
        .await
        .expect("multipart upload of a new key");
    assert!(
        etag.normalized().ends_with("-3"),
        "three parts, as S3 tags them: {etag}"
    );
    let refused = store
        .put_file(key, &file, metadata.clone(), Precondition::IfAbsent)
        .await
        .expect_err("If-None-Match on an existing key");
    assert!(refused.is_precondition(), "{refused:?}");

    let download = dir.path().join("download");
    let meta = store.get_to_file(key, &download).await.unwrap().unwrap();
    assert_eq!(meta.etag, etag);
    assert_eq!(meta.size, first.len() as u64);
    assert_eq!(
        meta.metadata.get("tenantd-seq").map(String::as_str),
        Some("9")
    );
    assert!(std::fs::read(&download).unwrap() == first);

    let second = bytes(7 * MIB, 2);
    std::fs::write(&file, &second).unwrap();
    let stale = store
        .put_file(
            key,
            &file,
            metadata.clone(),
            Precondition::IfMatch(tenantd_core::store::ETag("\"0123\"".into())),
        )
        .await
        .expect_err("If-Match a stale ETag");
    assert!(stale.is_precondition(), "{stale:?}");
    assert_eq!(store.head(key).await.unwrap().unwrap().etag, etag);
    let replaced = store
        .put_file(key, &file, metadata, Precondition::IfMatch(etag.clone()))
        .await
        .expect("If-Match the current ETag");
    assert_ne!(replaced, etag);
    let meta = store.get_to_file(key, &download).await.unwrap().unwrap();
    assert_eq!(meta.etag, replaced);
    assert!(std::fs::read(&download).unwrap() == second);
    assert_eq!(
        incomplete_uploads(&s3, &bucket).await,
        0,
        "refused uploads are aborted, not left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_machines_incomplete_upload_is_never_state_and_the_sweep_aborts_it() {
    let bucket = support::fresh_bucket().await;
    let store = S3Store::from_env(&bucket, "").await.unwrap();
    let s3 = client().await;
    let key = "customer/killed/db.sqlite3";
    store
        .put(key, "old".into(), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    // What a machine killed between its parts and the completion leaves.
    let upload = s3
        .create_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let id = upload.upload_id().unwrap();
    s3.upload_part()
        .bucket(&bucket)
        .key(key)
        .upload_id(id)
        .part_number(1)
        .body(bytes(5 * MIB, 3).into())
        .send()
        .await
        .unwrap();
    let object = store.get(key).await.unwrap().unwrap();
    assert_eq!(&object.body[..], b"old", "an incomplete upload is no state");
    assert_eq!(store.list("customer/killed/", None).await.unwrap().len(), 1);
    assert_eq!(incomplete_uploads(&s3, &bucket).await, 1);
    assert_eq!(store.abort_incomplete_uploads(key).await.unwrap(), 1);
    assert_eq!(incomplete_uploads(&s3, &bucket).await, 0);
    assert_eq!(
        store.abort_incomplete_uploads(key).await.unwrap(),
        0,
        "a second sweep finds nothing"
    );
    assert_eq!(&store.get(key).await.unwrap().unwrap().body[..], b"old");
}

/// What moto does with the conditions of CompleteMultipartUpload, sent
/// by hand: If-None-Match is honoured; If-Match is not (a stale ETag
/// completes). If a moto upgrade starts honouring If-Match this test fails
/// and store/multipart.rs's doc should be updated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_honours_if_none_match_but_not_if_match_on_complete() {
    let bucket = support::fresh_bucket().await;
    let s3 = client().await;
    let complete =
        |key: &'static str, if_none_match: Option<&'static str>, if_match: Option<&'static str>| {
            let (s3, bucket) = (s3.clone(), bucket.clone());
            async move {
                let id = s3
                    .create_multipart_upload()
                    .bucket(&bucket)
                    .key(key)
                    .send()
                    .await
                    .unwrap()
                    .upload_id()
                    .unwrap()
                    .to_string();
                let part = s3
                    .upload_part()
                    .bucket(&bucket)
                    .key(key)
                    .upload_id(&id)
                    .part_number(1)
                    .body(b"x".to_vec().into())
                    .send()
                    .await
                    .unwrap();
                s3.complete_multipart_upload()
                    .bucket(&bucket)
                    .key(key)
                    .upload_id(&id)
                    .set_if_none_match(if_none_match.map(str::to_string))
                    .set_if_match(if_match.map(str::to_string))
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .parts(
                                CompletedPart::builder()
                                    .part_number(1)
                                    .e_tag(part.e_tag().unwrap())
                                    .build(),
                            )
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.raw_response().map(|r| r.status().as_u16()))
            }
        };
    assert_eq!(complete("a", Some("*"), None).await, Ok(()));
    assert_eq!(complete("a", Some("*"), None).await, Err(Some(412)));
    assert_eq!(
        complete("a", None, Some("\"deadbeef\"")).await,
        Ok(()),
        "moto now honours If-Match on CompleteMultipartUpload"
    );
    assert_eq!(complete("b", None, Some("\"deadbeef\"")).await, Ok(()));
}
