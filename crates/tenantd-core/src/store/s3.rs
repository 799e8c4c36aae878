//! S3 (and Tigris) backend on aws-sdk-s3.
//!
//! - Endpoint, region and credentials come from the standard AWS
//!   environment (`AWS_ENDPOINT_URL_S3`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   ...).
//! - Addressing is virtual-hosted (`https://<bucket>.<endpoint host>/key`),
//!   which Tigris requires for buckets created since Feb 2025, except for a
//!   local endpoint (an IP address or `localhost`: moto, `tenantd dev`),
//!   which gets path-style. `TENANTD_S3_PATH_STYLE=true|false` overrides
//!   the choice ([`use_path_style`]).
//! - Each attempt has a time limit that grows with the body: 10 s plus the
//!   body's size at [`MIN_THROUGHPUT_BYTES_PER_SEC`] (5 MB/s), so a 200 MB
//!   upload gets 50 s, while a stalled small request is cut after 10 s. A
//!   download's body gets the same allowance from its `Content-Length`.
//! - Answers that are not a working S3 API's (no or malformed ETag header,
//!   an error body that is not S3's XML) are errors that name the key and
//!   what was wrong; they never read as "absent" or "written".
//! - Every request carries `X-Tigris-Consistent: true`. Tigris no longer
//!   documents it (Feb 2026) and sending it is harmless; what makes
//!   conditional writes consistent is the bucket's location type (Single-
//!   or Multi-region, not the default Global: see docs/deploy.md).
//! - The SDK's own retries are off: a blind retry of a conditional PUT whose
//!   response was lost is exactly what must not happen. The
//!   [`RetryingStore`](super::RetryingStore) above retries and resolves
//!   ambiguity by reading back.
//! - Errors are mapped once, here, to the kinds of [`StoreError`].
//! - A listing follows continuation tokens to the last page; each page is
//!   one attempt under the same time limit as a `HEAD`. A delete of a
//!   missing key succeeds, as on S3 (also where a store answers 404).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use bytes::Bytes;

use super::multipart;
use super::{
    ETag, Listed, MIN_THROUGHPUT_BYTES_PER_SEC, Metadata, Object, ObjectMeta, ObjectStore,
    Precondition, StoreError, StoreResult, stream, transfer_allowance,
};

pub(super) const CONSISTENT_HEADER: &str = "X-Tigris-Consistent";

/// Connecting may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One attempt of a request without a body may take this long; a body adds
/// its size at [`MIN_THROUGHPUT_BYTES_PER_SEC`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The env var that forces path-style (`true`) or virtual-hosted (`false`)
/// addressing.
pub const PATH_STYLE_ENV: &str = "TENANTD_S3_PATH_STYLE";

/// The time limit of one attempt that moves `body_len` bytes.
pub fn attempt_timeout(body_len: u64) -> Duration {
    attempt_timeout_from(ATTEMPT_TIMEOUT, body_len)
}

fn attempt_timeout_from(base: Duration, body_len: u64) -> Duration {
    base + transfer_allowance(body_len)
}

/// Path-style addressing or virtual-hosted? `setting` is
/// `TENANTD_S3_PATH_STYLE` (`true`/`false`, also `1`/`0`, `yes`/`no`);
/// unset or empty, path-style is used only for a local endpoint: a host
/// that is an IP address or `localhost` (Tigris and AWS want virtual-hosted
/// addressing; a local server usually has no DNS for `<bucket>.<host>`).
pub fn use_path_style(endpoint: Option<&str>, setting: Option<&str>) -> Result<bool, String> {
    if let Some(value) = setting.map(str::trim).filter(|v| !v.is_empty()) {
        return match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!(
                "{PATH_STYLE_ENV}={value:?} is not a boolean: set it to true (path-style URLs) or false (virtual-hosted URLs), or unset it"
            )),
        };
    }
    Ok(endpoint.and_then(endpoint_host).is_some_and(|host| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.parse::<std::net::IpAddr>().is_ok()
            || host.eq_ignore_ascii_case("localhost")
            || host.to_ascii_lowercase().ends_with(".localhost")
    }))
}

/// The host of an endpoint URL (`http://127.0.0.1:9000` → `127.0.0.1`).
fn endpoint_host(endpoint: &str) -> Option<String> {
    let uri: http::Uri = endpoint.trim().parse().ok()?;
    uri.host().map(str::to_string)
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
    bucket: String,
    prefix: String,
    endpoint: String,
    /// The time limit of an attempt without a body ([`ATTEMPT_TIMEOUT`]).
    attempt_base: Duration,
    /// Keys per listing page; `None`: the server's default (1000 on S3).
    page_size: Option<i32>,
    /// Files above this many bytes go up in parts of `part_size`.
    multipart_above: u64,
    part_size: u64,
}

/// Marks a request to be served by Tigris' leader (ignored by S3 and moto).
macro_rules! consistent {
    ($builder:expr) => {
        $builder.customize().mutate_request(|req| {
            req.headers_mut().insert(CONSISTENT_HEADER, "true");
        })
    };
}

impl S3Store {
    /// Builds a client from the standard AWS environment.
    pub async fn from_env(bucket: &str, prefix: &str) -> StoreResult<S3Store> {
        // Region from the environment, else "auto" (Tigris): the default
        // chain would also probe EC2 metadata, which only delays a start.
        let region = RegionProviderChain::first_try(
            aws_config::environment::EnvironmentVariableRegionProvider::new(),
        )
        .or_else("auto");
        let loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
        let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        let setting = std::env::var(PATH_STYLE_ENV).ok();
        Self::build(loader, bucket, prefix, endpoint, setting.as_deref()).await
    }

    /// A client for `endpoint` with fixed credentials, nothing from the
    /// environment (tests against local servers).
    pub async fn with_endpoint(
        bucket: &str,
        prefix: &str,
        endpoint: &str,
        path_style: Option<bool>,
    ) -> StoreResult<S3Store> {
        let loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "static",
            ));
        let setting = path_style.map(|p| p.to_string());
        Self::build(
            loader,
            bucket,
            prefix,
            Some(endpoint.to_string()),
            setting.as_deref(),
        )
        .await
    }

    async fn build(
        loader: aws_config::ConfigLoader,
        bucket: &str,
        prefix: &str,
        endpoint: Option<String>,
        path_style_setting: Option<&str>,
    ) -> StoreResult<S3Store> {
        let path_style = use_path_style(endpoint.as_deref(), path_style_setting)
            .map_err(|message| StoreError::Fatal { message })?;
        let shared = loader
            .retry_config(RetryConfig::disabled())
            .timeout_config(Self::timeouts(ATTEMPT_TIMEOUT, 0))
            .load()
            .await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(path_style)
            .build();
        tracing::debug!(endpoint = ?endpoint, path_style, "S3 client");
        Ok(S3Store {
            credentials: shared.credentials_provider(),
            client: Client::from_conf(config),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: endpoint.unwrap_or_else(|| "the default AWS endpoint".to_string()),
            attempt_base: ATTEMPT_TIMEOUT,
            page_size: None,
            multipart_above: multipart::MULTIPART_ABOVE,
            part_size: multipart::PART_SIZE,
        })
    }

    /// With another time limit for an attempt without a body (tests; the
    /// body's allowance is added as usual).
    pub fn with_attempt_timeout(mut self, base: Duration) -> S3Store {
        self.attempt_base = base;
        self
    }

    /// At most `keys` keys per listing page (tests: many pages from a few
    /// keys).
    pub fn with_page_size(mut self, keys: u16) -> S3Store {
        self.page_size = Some(i32::from(keys.max(1)));
        self
    }

    /// Files above `above` bytes are uploaded in parts of `part` bytes
    /// (tests: multipart without gigabytes; S3's 5 MiB minimum part holds).
    pub fn with_multipart(mut self, above: u64, part: u64) -> S3Store {
        self.multipart_above = above;
        self.part_size = part;
        self
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    pub(super) fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Per-request timeouts for an attempt that moves `body_len` bytes.
    pub(super) fn overrides(&self, body_len: u64) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::new()
            .timeout_config(Self::timeouts(self.attempt_base, body_len))
    }

    /// Timeouts of one attempt that moves `body_len` bytes.
    fn timeouts(base: Duration, body_len: u64) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(base))
            .operation_attempt_timeout(attempt_timeout_from(base, body_len))
            .build()
    }

    /// An ETag header from an answer, checked (see [`ETag::parse_header`]).
    pub(super) fn etag_of(&self, key: &str, what: &str, header: Option<&str>) -> StoreResult<ETag> {
        let problem = match header {
            None => "no ETag header".to_string(),
            Some(text) => match ETag::parse_header(text) {
                Ok(etag) => return Ok(etag),
                Err(problem) => problem,
            },
        };
        Err(StoreError::transient(
            key,
            format!(
                "the store at {} answered {what} with {problem}; it does not behave like S3 (a proxy or gateway in the way?)",
                self.endpoint
            ),
        ))
    }

    pub(super) fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Maps an SDK error; `conditional_put` turns a 404 into a failed
    /// precondition (the object we expected is gone).
    pub(super) fn map_error<E: ProvideErrorMetadata + std::fmt::Debug>(
        &self,
        key: &str,
        error: SdkError<E, HttpResponse>,
        conditional_put: bool,
    ) -> StoreError {
        let transient = |message: String| StoreError::transient(key, message);
        match &error {
            SdkError::TimeoutError(_) => {
                transient(format!("timed out talking to {}", self.endpoint))
            }
            SdkError::DispatchFailure(e) => transient(format!(
                "cannot reach the store at {}: {e:?}",
                self.endpoint
            )),
            SdkError::ResponseError(e) => {
                transient(format!("unreadable response from {}: {e:?}", self.endpoint))
            }
            SdkError::ConstructionFailure(e) => StoreError::Fatal {
                message: format!(
                    "cannot build an S3 request for key={key}: {e:?}; check the AWS_* settings"
                ),
            },
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().unwrap_or("").to_string();
                let message = match service.err().message() {
                    Some(message) => message.to_string(),
                    None if code.is_empty() => {
                        format!(
                            "(no S3 error in the answer: {})",
                            body_excerpt(service.raw())
                        )
                    }
                    None => String::new(),
                };
                let answer = [status.to_string(), code.clone(), message.clone()]
                    .into_iter()
                    .filter(|part| !part.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                // Throttling and server errors by code too, whatever the
                // status a gateway put on them.
                if matches!(
                    code.as_str(),
                    "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"
                ) && status != 412
                {
                    return transient(answer.clone());
                }
                match status {
                    412 => StoreError::PreconditionFailed {
                        key: key.to_string(),
                    },
                    409 => StoreError::Conflict {
                        key: key.to_string(),
                    },
                    404 if code == "NoSuchBucket" => self.missing_bucket(),
                    // A 404 that is not S3's (no error code): never read it
                    // as "absent"; it is most likely the wrong host.
                    404 if code.is_empty() => transient(format!(
                        "404 from {} without an S3 error code {message}; check AWS_ENDPOINT_URL_S3 and {PATH_STYLE_ENV}",
                        self.endpoint
                    )),
                    404 if conditional_put => StoreError::PreconditionFailed {
                        key: key.to_string(),
                    },
                    401 | 403 => self.denied(status, &code),
                    301 => StoreError::Fatal {
                        message: format!(
                            "bucket {:?} is in another region ({status} {code}): set AWS_REGION to the bucket's region",
                            self.bucket
                        ),
                    },
                    408 | 429 | 500..=599 => transient(answer.clone()),
                    // A success whose body the client could not read as
                    // S3's (a listing page that is a proxy's HTML).
                    200..=299 => transient(format!(
                        "the store at {} answered {answer}, which is not an S3 answer; a proxy or gateway in the way?",
                        self.endpoint
                    )),
                    _ => StoreError::Fatal {
                        message: format!("the store refused a request on key={key}: {answer}"),
                    },
                }
            }
            _ => transient(format!("{error:?}")),
        }
    }

    /// A GET's answer up to its head: `None` for a missing key. The attempt
    /// timeout covers the head; the body is read under its own allowance.
    async fn get_output(
        &self,
        key: &str,
    ) -> StoreResult<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>> {
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        match consistent!(request)
            .config_override(self.overrides(0))
            .send()
            .await
        {
            Ok(output) => Ok(Some(output)),
            Err(e) => {
                if let SdkError::ServiceError(service) = &e
                    && service.err().is_no_such_key()
                {
                    return Ok(None);
                }
                Err(self.map_error(key, e, false))
            }
        }
    }

    /// A PUT of `body` (`len` bytes) under `condition`.
    async fn put_body(
        &self,
        key: &str,
        body: ByteStream,
        len: u64,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(body)
            .content_length(len as i64)
            .set_metadata(Some(metadata.into_iter().collect()));
        let conditional = match &condition {
            Precondition::None => false,
            Precondition::IfAbsent => {
                request = request.if_none_match("*");
                true
            }
            Precondition::IfMatch(etag) => {
                request = request.if_match(etag.to_header());
                true
            }
        };
        match consistent!(request)
            .config_override(self.overrides(len))
            .send()
            .await
        {
            // Without a usable ETag the write happened but cannot be built
            // on: a transient error, which the retrying layer resolves by
            // reading the object back.
            Ok(output) => self.etag_of(
                key,
                "a successful PUT (the write may have landed)",
                output.e_tag(),
            ),
            Err(e) => Err(self.map_error(key, e, conditional)),
        }
    }

    /// The store's key of a listed full key (without the store's prefix).
    fn key_of_listed(&self, full: &str) -> Option<String> {
        if self.prefix.is_empty() {
            Some(full.to_string())
        } else {
            full.strip_prefix(self.prefix.as_str())?
                .strip_prefix('/')
                .map(str::to_string)
        }
    }

    /// An error of a listing, saying which one; a transient message keeps
    /// its leading status (see [`StoreError::is_throttle`]).
    fn listing_error(&self, prefix: &str, error: StoreError) -> StoreError {
        let listing = format!(
            "listing keys under prefix {prefix:?} in {}",
            self.describe()
        );
        match error {
            StoreError::Transient { key, message } => StoreError::Transient {
                key,
                message: format!("{message} ({listing})"),
            },
            StoreError::Fatal { message } => StoreError::Fatal {
                message: format!("{message} ({listing})"),
            },
            other => other,
        }
    }

    fn missing_bucket(&self) -> StoreError {
        StoreError::Fatal {
            message: format!(
                "bucket {:?} does not exist at {}: create it (fly storage create) or fix BUCKET_NAME / --store",
                self.bucket, self.endpoint
            ),
        }
    }

    fn denied(&self, status: u16, code: &str) -> StoreError {
        StoreError::Fatal {
            message: format!(
                "the store rejected the credentials ({status} {code}) for bucket {:?}: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                self.bucket
            ),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str) -> StoreResult<Option<Object>> {
        let Some(output) = self.get_output(key).await? else {
            return Ok(None);
        };
        let etag = self.etag_of(key, "a GET", output.e_tag())?;
        let metadata: Metadata = output
            .metadata()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let length = output.content_length().unwrap_or(0).max(0) as u64;
        let allowance = attempt_timeout_from(self.attempt_base, length);
        let body = match tokio::time::timeout(allowance, output.body.collect()).await {
            Ok(Ok(body)) => body.into_bytes(),
            Ok(Err(e)) => {
                return Err(StoreError::transient(
                    key,
                    format!("reading the body failed: {e}"),
                ));
            }
            Err(_) => {
                return Err(StoreError::transient(
                    key,
                    format!(
                        "reading a {length}-byte body took longer than {allowance:?} (under {} MB/s)",
                        MIN_THROUGHPUT_BYTES_PER_SEC / 1_000_000
                    ),
                ));
            }
        };
        if output_length_mismatch(length, body.len()) {
            return Err(StoreError::transient(
                key,
                format!("the body ended after {} of {length} bytes", body.len()),
            ));
        }
        Ok(Some(Object {
            body,
            etag,
            metadata,
        }))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let request = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        match consistent!(request)
            .config_override(self.overrides(0))
            .send()
            .await
        {
            Ok(output) => Ok(Some(ObjectMeta {
                etag: self.etag_of(key, "a HEAD", output.e_tag())?,
                size: output.content_length().unwrap_or(0).max(0) as u64,
                metadata: output
                    .metadata()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            })),
            // HEAD has no body, so a missing key is a bare 404.
            Err(SdkError::ServiceError(service)) if service.raw().status().as_u16() == 404 => {
                Ok(None)
            }
            Err(e) => Err(self.map_error(key, e, false)),
        }
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let len = body.len() as u64;
        self.put_body(key, ByteStream::from(body), len, metadata, condition)
            .await
    }

    /// The body is read from the file as it is sent (never whole in
    /// memory); a resend reads it again.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        metadata: Metadata,
        condition: Precondition,
    ) -> StoreResult<ETag> {
        let len = stream::file_len(key, path).await?;
        if len > self.multipart_above {
            let part = multipart::part_size(len, self.part_size);
            return self
                .put_multipart(key, path, len, part, metadata, condition)
                .await;
        }
        let body = ByteStream::read_from()
            .path(path)
            .buffer_size(stream::CHUNK)
            .length(aws_sdk_s3::primitives::Length::Exact(len))
            .build()
            .await
            .map_err(|e| {
                stream::local_read_error(key, path, std::io::Error::other(e.to_string()))
            })?;
        self.put_body(key, body, len, metadata, condition).await
    }

    /// The body goes to the file chunk by chunk as it arrives, under the
    /// same allowance as `get`'s, and must be exactly `Content-Length`.
    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<Option<ObjectMeta>> {
        let Some(mut output) = self.get_output(key).await? else {
            return Ok(None);
        };
        let etag = self.etag_of(key, "a GET", output.e_tag())?;
        let metadata: Metadata = output
            .metadata()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let length = output.content_length().map(|l| l.max(0) as u64);
        let allowance = attempt_timeout_from(self.attempt_base, length.unwrap_or(0));
        let mut download = stream::Download::create(key, path, length).await?;
        let copy =
            async {
                while let Some(chunk) = output.body.try_next().await.map_err(|e| {
                    StoreError::transient(key, format!("reading the body failed: {e}"))
                })? {
                    download.write(&chunk).await?;
                }
                Ok::<_, StoreError>(())
            };
        match tokio::time::timeout(allowance, copy).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(StoreError::transient(
                    key,
                    format!(
                        "reading a {}-byte body took longer than {allowance:?} (under {} MB/s)",
                        length.unwrap_or(0),
                        MIN_THROUGHPUT_BYTES_PER_SEC / 1_000_000
                    ),
                ));
            }
        }
        let size = download.finish().await?;
        Ok(Some(ObjectMeta {
            etag,
            size,
            metadata,
        }))
    }

    async fn abort_incomplete_uploads(&self, key: &str) -> StoreResult<usize> {
        self.abort_uploads(key).await
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>) -> StoreResult<Vec<Listed>> {
        let mut listed = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let request = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_start_after(start_after.map(|after| self.full_key(after)))
                .set_continuation_token(token.take())
                .set_max_keys(self.page_size);
            let page = consistent!(request)
                .config_override(self.overrides(0))
                .send()
                .await
                .map_err(|e| self.listing_error(prefix, self.map_error(prefix, e, false)))?;
            for object in page.contents() {
                let full = object.key();
                let Some(key) = full
                    .and_then(|full| self.key_of_listed(full))
                    .filter(|key| key.starts_with(prefix))
                else {
                    return Err(self.listing_error(
                        prefix,
                        StoreError::transient(
                            prefix,
                            format!(
                                "the store at {} listed the key {full:?}, which is not under the prefix asked for; it does not behave like S3",
                                self.endpoint
                            ),
                        ),
                    ));
                };
                listed.push(Listed {
                    key,
                    size: object.size().unwrap_or(0).max(0) as u64,
                    last_modified: object
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
            if !page.is_truncated().unwrap_or(false) {
                break;
            }
            match page.next_continuation_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_string()),
                _ => {
                    return Err(self.listing_error(
                        prefix,
                        StoreError::transient(
                            prefix,
                            format!(
                                "the store at {} said a listing page was truncated but gave no continuation token; it does not behave like S3",
                                self.endpoint
                            ),
                        ),
                    ));
                }
            }
        }
        // S3 lists in byte order; a store that does not must not break the
        // contract (a caller may stop at the first key past what it wants).
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        listed.dedup_by(|a, b| a.key == b.key);
        Ok(listed)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let request = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        match consistent!(request)
            .config_override(self.overrides(0))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // S3 answers 204 for a missing key; some compatible stores 404
            // NoSuchKey (a 404 without S3's code is mapped as the wrong host).
            Err(SdkError::ServiceError(service))
                if service.raw().status().as_u16() == 404
                    && service.err().code() == Some("NoSuchKey") =>
            {
                Ok(())
            }
            Err(e) => Err(self.map_error(key, e, false)),
        }
    }

    async fn check(&self) -> StoreResult<()> {
        use aws_sdk_s3::config::ProvideCredentials;
        let no_credentials = |detail: String| StoreError::Fatal {
            message: format!(
                "no S3 credentials found ({detail}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (fly storage create sets them as secrets)"
            ),
        };
        match &self.credentials {
            None => return Err(no_credentials("no credentials provider".into())),
            Some(provider) => {
                if let Err(e) = provider.provide_credentials().await {
                    return Err(no_credentials(e.to_string()));
                }
            }
        }
        let request = self.client.head_bucket().bucket(&self.bucket);
        match consistent!(request).send().await {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(service)) => {
                let status = service.raw().status().as_u16();
                Err(match status {
                    404 => self.missing_bucket(),
                    401 | 403 => {
                        self.denied(status, service.err().code().unwrap_or("AccessDenied"))
                    }
                    301 => StoreError::Fatal {
                        message: format!(
                            "bucket {:?} is in another region: set AWS_REGION to the bucket's region",
                            self.bucket
                        ),
                    },
                    _ => StoreError::Fatal {
                        message: format!(
                            "the store at {} answered {status} for bucket {:?}",
                            self.endpoint, self.bucket
                        ),
                    },
                })
            }
            Err(SdkError::DispatchFailure(e)) => Err(StoreError::Fatal {
                message: format!(
                    "cannot reach the store at {} ({}): check AWS_ENDPOINT_URL_S3 and the network",
                    self.endpoint,
                    dispatch_cause(&e)
                ),
            }),
            Err(SdkError::TimeoutError(_)) => Err(StoreError::Fatal {
                message: format!(
                    "the store at {} did not answer in time: check AWS_ENDPOINT_URL_S3 and the network",
                    self.endpoint
                ),
            }),
            Err(e) => Err(StoreError::Fatal {
                message: format!(
                    "cannot use bucket {:?} at {}: {e:?}",
                    self.bucket, self.endpoint
                ),
            }),
        }
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A body shorter than its `Content-Length` (a cut connection that the
/// client did not notice).
fn output_length_mismatch(content_length: u64, received: usize) -> bool {
    content_length != 0 && content_length != received as u64
}

/// The start of an error answer's body, for a message about an answer that
/// is not S3's.
fn body_excerpt(response: &HttpResponse) -> String {
    match response.body().bytes() {
        Some(bytes) if !bytes.is_empty() => {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
            format!("body {:?}", text.trim())
        }
        _ => "empty body".to_string(),
    }
}

fn dispatch_cause(e: &aws_smithy_runtime_api::client::result::DispatchFailure) -> &'static str {
    if e.is_timeout() {
        "connection timed out"
    } else if e.is_io() {
        "connection refused or reset"
    } else if e.is_user() {
        "invalid request settings"
    } else {
        "connection failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_style_only_for_local_endpoints_unless_configured() {
        let cases = [
            (Some("http://127.0.0.1:9000"), None, true),
            (Some("http://localhost:4566"), None, true),
            (Some("http://[::1]:9000"), None, true),
            (Some("http://[fdaa::3]:9000"), None, true),
            (Some("http://10.0.0.5"), None, true),
            (Some("http://minio.localhost:9000"), None, true),
            (Some("https://fly.storage.tigris.dev"), None, false),
            (Some("https://t3.storage.dev"), None, false),
            (Some("https://s3.us-east-1.amazonaws.com"), None, false),
            (None, None, false),
            (Some("https://fly.storage.tigris.dev"), Some("true"), true),
            (Some("https://fly.storage.tigris.dev"), Some("1"), true),
            (Some("http://127.0.0.1:9000"), Some("false"), false),
            (Some("http://127.0.0.1:9000"), Some(" FALSE "), false),
            (Some("http://127.0.0.1:9000"), Some(""), true),
            (None, Some("true"), true),
        ];
        for (endpoint, setting, expected) in cases {
            assert_eq!(
                use_path_style(endpoint, setting),
                Ok(expected),
                "{endpoint:?} with {setting:?}"
            );
        }
        let error = use_path_style(None, Some("maybe")).unwrap_err();
        assert!(
            error.contains("TENANTD_S3_PATH_STYLE") && error.contains("maybe"),
            "{error}"
        );
    }

    #[test]
    fn attempt_timeouts_grow_with_the_body() {
        assert_eq!(attempt_timeout(0), Duration::from_secs(10));
        // 200 MB needs ~10 s at 20 MB/s: it gets 10 s + 40 s.
        assert_eq!(attempt_timeout(200_000_000), Duration::from_secs(50));
        assert!(attempt_timeout(1_000_000) < Duration::from_secs(11));
    }
}
