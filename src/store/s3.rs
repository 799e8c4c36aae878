//! S3 (and Tigris) backend on aws-sdk-s3.
//!
//! - Endpoint, region and credentials come from the standard AWS
//!   environment (`AWS_ENDPOINT_URL_S3`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   ...); with an explicit endpoint, path-style addressing is used (local
//!   servers and Tigris accept it).
//! - Every request carries `X-Tigris-Consistent: true`, so Tigris answers
//!   lock and database requests from the leader, not a stale replica.
//! - The SDK's own retries are off: a blind retry of a conditional PUT whose
//!   response was lost is exactly what must not happen. The
//!   [`RetryingStore`](super::RetryingStore) above retries and resolves
//!   ambiguity by reading back.
//! - Errors are mapped once, here, to the kinds of [`StoreError`].

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

use super::{
    ETag, Metadata, Object, ObjectMeta, ObjectStore, Precondition, StoreError, StoreResult,
};

const CONSISTENT_HEADER: &str = "X-Tigris-Consistent";

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
    bucket: String,
    prefix: String,
    endpoint: String,
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
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            )
            .load()
            .await;
        let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(endpoint.is_some())
            .build();
        Ok(S3Store {
            credentials: shared.credentials_provider(),
            client: Client::from_conf(config),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: endpoint.unwrap_or_else(|| "the default AWS endpoint".to_string()),
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Maps an SDK error; `conditional_put` turns a 404 into a failed
    /// precondition (the object we expected is gone).
    fn map_error<E: ProvideErrorMetadata + std::fmt::Debug>(
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
                let message = service.err().message().unwrap_or("").to_string();
                match status {
                    412 => StoreError::PreconditionFailed {
                        key: key.to_string(),
                    },
                    409 => StoreError::Conflict {
                        key: key.to_string(),
                    },
                    404 if code == "NoSuchBucket" => self.missing_bucket(),
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
                    408 | 429 | 500..=599 => transient(format!("{status} {code} {message}")),
                    _ => StoreError::Fatal {
                        message: format!(
                            "the store refused a request on key={key}: {status} {code} {message}"
                        ),
                    },
                }
            }
            _ => transient(format!("{error:?}")),
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
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        let output = match consistent!(request).send().await {
            Ok(output) => output,
            Err(e) => {
                if let SdkError::ServiceError(service) = &e
                    && service.err().is_no_such_key()
                {
                    return Ok(None);
                }
                return Err(self.map_error(key, e, false));
            }
        };
        let etag = ETag(output.e_tag().unwrap_or_default().to_string());
        let metadata: Metadata = output
            .metadata()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let body = output
            .body
            .collect()
            .await
            .map_err(|e| StoreError::transient(key, format!("reading the body failed: {e}")))?
            .into_bytes();
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
        match consistent!(request).send().await {
            Ok(output) => Ok(Some(ObjectMeta {
                etag: ETag(output.e_tag().unwrap_or_default().to_string()),
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
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(body))
            .set_metadata(Some(metadata.into_iter().collect()));
        let conditional = match &condition {
            Precondition::None => false,
            Precondition::IfAbsent => {
                request = request.if_none_match("*");
                true
            }
            Precondition::IfMatch(etag) => {
                request = request.if_match(etag.as_str());
                true
            }
        };
        match consistent!(request).send().await {
            Ok(output) => Ok(ETag(output.e_tag().unwrap_or_default().to_string())),
            Err(e) => Err(self.map_error(key, e, conditional)),
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
