//! Multipart upload of a file for the S3 backend: what a body above S3's
//! single-PUT limit (5 GiB) must use, streamed part by part from the file.
//!
//! # Conditions
//!
//! `CompleteMultipartUpload` carries the put's condition (`If-None-Match:
//! *` or `If-Match`), as S3 honours since 2024. Measured on moto 5.2.5
//! (tests/store_multipart.rs): `If-None-Match` is honoured, `If-Match` is
//! **ignored** (a stale or absent ETag completes). Tigris does not
//! document either (/work/shared/DELTAS.md). So for `If-Match` the upload
//! also reads the object's ETag just before completing and gives up on a
//! mismatch, which narrows the window to one round trip but does not close
//! it on a store that ignores the header. That is why multipart is used
//! only where it is mandatory ([`MULTIPART_ABOVE`]): below it a single PUT
//! streamed from the file carries the condition that every store honours,
//! and memory stays flat either way. What still fences a >5 GiB snapshot
//! on such a store is the log (docs/protocol.md): the snapshot names its
//! slot and token, a claim replays the log after it and fences, and a
//! deposed holder's stale snapshot covers only a prefix of the history
//! (point 6); the one hazard left is an old holder's upload completing over
//! a newer snapshot inside that round trip, which S3 itself rules out.
//!
//! # Incomplete uploads
//!
//! A failed upload is aborted at once. One left by a killed machine is
//! invisible to `GET`, `HEAD` and `LIST` of objects (it is never state) and
//! is aborted by [`S3Store::abort_uploads`], which a claim calls for the
//! tenant's snapshot key.

use std::path::Path;

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::s3::S3Store;
use super::{ETag, Metadata, ObjectStore, Precondition, StoreError, StoreResult, stream};

/// Files larger than this are uploaded in parts (S3 refuses a single PUT
/// above 5 GiB; a margin below it).
pub const MULTIPART_ABOVE: u64 = 4 << 30;

/// The usual part size; larger when the file needs more than S3's 10,000
/// parts.
pub const PART_SIZE: u64 = 64 << 20;

/// S3's smallest part (but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;

const MAX_PARTS: u64 = 10_000;

/// Marks a request to be served by Tigris' leader, as every request of the
/// S3 backend is (see s3.rs).
fn consistent(request: &mut aws_smithy_runtime_api::http::Request) {
    request
        .headers_mut()
        .insert(super::s3::CONSISTENT_HEADER, "true");
}

/// Attempts of one part before the whole upload gives up (a part is
/// idempotent: sending it again replaces it).
const PART_ATTEMPTS: u32 = 3;

/// The part size for a file of `len` bytes, at least `preferred`.
pub fn part_size(len: u64, preferred: u64) -> u64 {
    preferred.max(MIN_PART_SIZE).max(len.div_ceil(MAX_PARTS))
}

impl S3Store {
    /// Uploads the file at `path` (`len` bytes) in parts of `part` bytes
    /// and completes it under `condition`; aborts the upload on any error.
    pub(super) async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        part: u64,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let full = self.full_key(key);
        let created = self
            .client()
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(&full)
            .set_metadata(Some(metadata.into_iter().collect()))
            .customize()
            .mutate_request(consistent)
            .config_override(self.overrides(0))
            .send()
            .await
            .map_err(|e| self.map_error(key, e, false))?;
        let Some(upload_id) = created.upload_id().map(ToString::to_string) else {
            return Err(StoreError::transient(
                key,
                "CreateMultipartUpload answered without an upload id",
            ));
        };
        let result = self
            .upload_and_complete(key, path, len, part, &upload_id, &condition)
            .await;
        if result.is_err() {
            let _ = self
                .client()
                .abort_multipart_upload()
                .bucket(self.bucket())
                .key(&full)
                .upload_id(&upload_id)
                .customize()
                .mutate_request(consistent)
                .config_override(self.overrides(0))
                .send()
                .await;
        }
        result
    }

    async fn upload_and_complete(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        part: u64,
        upload_id: &str,
        condition: &Precondition,
    ) -> StoreResult<ETag> {
        let full = self.full_key(key);
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        while offset < len {
            let size = part.min(len - offset);
            let etag = self
                .upload_part(key, path, offset, size, upload_id, number)
                .await?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .e_tag(etag)
                    .build(),
            );
            offset += size;
            number += 1;
        }
        if let Precondition::IfMatch(expected) = condition {
            match self.head(key).await? {
                Some(current) if &current.etag == expected => {}
                _ => {
                    return Err(StoreError::PreconditionFailed {
                        key: key.to_string(),
                    });
                }
            }
        }
        let mut request = self
            .client()
            .complete_multipart_upload()
            .bucket(self.bucket())
            .key(&full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        request = match condition {
            Precondition::None => request,
            Precondition::IfAbsent => request.if_none_match("*"),
            Precondition::IfMatch(etag) => request.if_match(etag.to_header()),
        };
        // Completing assembles the parts server-side: give it the time of
        // the body.
        match request
            .customize()
            .mutate_request(consistent)
            .config_override(self.overrides(len))
            .send()
            .await
        {
            Ok(output) => self.etag_of(
                key,
                "a successful CompleteMultipartUpload (the write may have landed)",
                output.e_tag(),
            ),
            Err(e) => Err(self.map_error(key, e, !matches!(condition, Precondition::None))),
        }
    }

    async fn upload_part(
        &self,
        key: &str,
        path: &Path,
        offset: u64,
        size: u64,
        upload_id: &str,
        number: i32,
    ) -> StoreResult<String> {
        let mut attempt = 1;
        loop {
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(size))
                .buffer_size(stream::CHUNK)
                .build()
                .await
                .map_err(|e| {
                    stream::local_read_error(key, path, std::io::Error::other(e.to_string()))
                })?;
            let sent = self
                .client()
                .upload_part()
                .bucket(self.bucket())
                .key(self.full_key(key))
                .upload_id(upload_id)
                .part_number(number)
                .content_length(size as i64)
                .body(body)
                .customize()
                .mutate_request(consistent)
                .config_override(self.overrides(size))
                .send()
                .await;
            let error = match sent {
                Ok(output) => match output.e_tag() {
                    Some(etag) => return Ok(etag.to_string()),
                    None => StoreError::transient(
                        key,
                        format!("part {number} answered without an ETag"),
                    ),
                },
                Err(e) => self.map_error(key, e, false),
            };
            if !error.is_retryable() || attempt >= PART_ATTEMPTS {
                return Err(error);
            }
            attempt += 1;
        }
    }

    /// Aborts every incomplete multipart upload of `key` (a killed
    /// machine's): returns how many.
    pub async fn abort_uploads(&self, key: &str) -> StoreResult<usize> {
        let full = self.full_key(key);
        let listed = self
            .client()
            .list_multipart_uploads()
            .bucket(self.bucket())
            .prefix(&full)
            .customize()
            .mutate_request(consistent)
            .config_override(self.overrides(0))
            .send()
            .await
            .map_err(|e| self.map_error(key, e, false))?;
        let mut aborted = 0;
        for upload in listed.uploads() {
            let (Some(upload_key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            if upload_key != full {
                continue;
            }
            match self
                .client()
                .abort_multipart_upload()
                .bucket(self.bucket())
                .key(&full)
                .upload_id(id)
                .customize()
                .mutate_request(consistent)
                .config_override(self.overrides(0))
                .send()
                .await
            {
                Ok(_) => aborted += 1,
                // Completed or aborted meanwhile: nothing left to clean.
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_upload()) => {}
                Err(e) => return Err(self.map_error(key, e, false)),
            }
        }
        Ok(aborted)
    }
}
