//! A store that answers garbage: a tiny fake S3 endpoint on 127.0.0.1 that
//! answers every request with one canned response (no ETag header, an error
//! page that is not S3's XML, a malformed ETag, ...). The S3 backend must
//! turn each into a clear error naming the key and the problem, and never
//! into a verdict about a write ("absent", "written", "someone else wrote").
//! Also: slow answers, to check that an attempt's time limit grows with its
//! body.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Response;
use tenantd_core::store::retry::RetryPolicy;
use tenantd_core::store::{
    DynStore, ETag, Metadata, ObjectStore, Precondition, RetryingStore, S3Store, StoreError,
};

#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
    /// Answer this long after the request's body has arrived.
    delay: Duration,
}

struct Fake {
    answer: Arc<Mutex<Canned>>,
    store: S3Store,
}

impl Fake {
    async fn start() -> Fake {
        let answer = Arc::new(Mutex::new(Canned {
            status: 200,
            headers: vec![],
            body: "",
            delay: Duration::ZERO,
        }));
        let shared = answer.clone();
        let app = Router::new()
            .fallback(move |_body: axum::body::Bytes| {
                let canned = shared.lock().unwrap().clone();
                async move {
                    tokio::time::sleep(canned.delay).await;
                    let mut response = Response::builder().status(canned.status);
                    for (name, value) in canned.headers {
                        response = response.header(name, value);
                    }
                    response.body(Body::from(canned.body)).unwrap()
                }
            })
            .layer(axum::extract::DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let store = S3Store::with_endpoint("tenantd-test", "", &endpoint, None)
            .await
            .unwrap();
        Fake { answer, store }
    }

    fn answer(&self, status: u16, headers: &[(&'static str, &str)], body: &'static str) {
        *self.answer.lock().unwrap() = Canned {
            status,
            headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            body,
            delay: Duration::ZERO,
        };
    }
}

fn transient_naming(result: Result<impl std::fmt::Debug, StoreError>, what: &str) -> String {
    match result {
        Err(e @ StoreError::Transient { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("key=k"),
                "{what}: the key is not named: {text}"
            );
            text
        }
        other => panic!("{what}: expected a transient error, got {other:?}"),
    }
}

const HTML: &str = "<html><body><h1>502 Bad Gateway</h1></body></html>";

#[tokio::test]
async fn missing_etag_headers_are_errors_not_verdicts() {
    let fake = Fake::start().await;
    fake.answer(200, &[("content-length", "5")], "hello");
    let text = transient_naming(fake.store.get("k").await, "GET without an ETag");
    assert!(text.contains("no ETag header"), "{text}");
    let text = transient_naming(fake.store.head("k").await, "HEAD without an ETag");
    assert!(text.contains("no ETag header"), "{text}");
    let put = fake
        .store
        .put("k", "x".into(), Metadata::new(), Precondition::IfAbsent)
        .await;
    let text = transient_naming(put, "PUT without an ETag");
    assert!(
        text.contains("no ETag header") && text.contains("may have landed"),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_etags_are_errors() {
    let fake = Fake::start().await;
    for bad in ["\"\"", "\"ab\"c\"", "W/", "a b"] {
        fake.answer(200, &[("etag", bad)], "");
        let text = transient_naming(fake.store.head("k").await, bad);
        assert!(text.contains("ETag"), "{bad}: {text}");
    }
}

/// Through the retrying layer: a PUT answered without an ETag is read back;
/// when the read-back is garbage too, the write is reported as failed with
/// an unknown outcome, never as written or refused.
#[tokio::test]
async fn a_put_whose_answers_are_all_garbage_has_an_unknown_outcome() {
    let fake = Fake::start().await;
    fake.answer(200, &[], "");
    let store = RetryingStore::new(
        Arc::new(fake.store.clone()) as DynStore,
        RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_millis(1),
            ..RetryPolicy::default()
        },
    );
    let result = store
        .put(
            "k",
            "x".into(),
            Metadata::new(),
            Precondition::IfMatch(ETag("\"abc\"".into())),
        )
        .await;
    transient_naming(result, "PUT and HEAD without ETags");
}

#[tokio::test]
async fn error_pages_that_are_not_s3_xml_are_transient_with_their_status() {
    let fake = Fake::start().await;
    for status in [500, 502, 503] {
        fake.answer(status, &[("content-type", "text/html")], HTML);
        let get = transient_naming(fake.store.get("k").await, "GET error page");
        assert!(get.contains(&status.to_string()), "{get}");
        let put = fake
            .store
            .put("k", "x".into(), Metadata::new(), Precondition::IfAbsent)
            .await;
        transient_naming(put, "PUT error page");
    }
    // A 503 is throttling, whatever its body says.
    fake.answer(503, &[], "slow down please");
    assert!(fake.store.get("k").await.unwrap_err().is_throttle());
    // S3's own SlowDown and InternalError are transient, SlowDown throttling.
    fake.answer(
        503,
        &[("content-type", "application/xml")],
        "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    );
    let e = fake.store.get("k").await.unwrap_err();
    assert!(e.is_throttle() && e.to_string().contains("SlowDown"), "{e}");
    fake.answer(
        500,
        &[("content-type", "application/xml")],
        "<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
    );
    let e = fake.store.get("k").await.unwrap_err();
    assert!(
        e.is_retryable() && !e.is_throttle() && e.to_string().contains("InternalError"),
        "{e}"
    );
}

/// A 404 page that is not S3's is not "the key is absent" (nor, on a
/// conditional PUT, "the object we expected is gone").
#[tokio::test]
async fn a_404_that_is_not_s3s_is_not_absence() {
    let fake = Fake::start().await;
    fake.answer(
        404,
        &[("content-type", "text/html")],
        "<html>Not Found</html>",
    );
    let text = transient_naming(fake.store.get("k").await, "GET 404 page");
    assert!(text.contains("404"), "{text}");
    let put = fake
        .store
        .put(
            "k",
            "x".into(),
            Metadata::new(),
            Precondition::IfMatch(ETag("\"abc\"".into())),
        )
        .await;
    transient_naming(put, "conditional PUT 404 page");
}

/// A 412 is a 412 whatever its body.
#[tokio::test]
async fn a_412_with_a_garbage_body_is_still_a_failed_precondition() {
    let fake = Fake::start().await;
    fake.answer(412, &[], "nope");
    let put = fake
        .store
        .put("k", "x".into(), Metadata::new(), Precondition::IfAbsent)
        .await;
    assert!(
        matches!(put, Err(StoreError::PreconditionFailed { .. })),
        "{put:?}"
    );
}

/// The same ETag in another form (unquoted, weak) between a PUT and a HEAD
/// is the same ETag.
#[tokio::test]
async fn an_etag_that_changes_form_is_the_same_etag() {
    let fake = Fake::start().await;
    fake.answer(200, &[("etag", "\"0123abcd\"")], "");
    let put = fake
        .store
        .put("k", "x".into(), Metadata::new(), Precondition::IfAbsent)
        .await
        .unwrap();
    for form in ["0123abcd", "W/\"0123abcd\"", " \"0123abcd\" "] {
        fake.answer(200, &[("etag", form)], "");
        let head = fake.store.head("k").await.unwrap().unwrap();
        assert_eq!(head.etag, put, "{form}");
    }
    fake.answer(200, &[("etag", "\"ffff\"")], "");
    assert_ne!(fake.store.head("k").await.unwrap().unwrap().etag, put);
}

/// An attempt's time limit is a base plus the body's size at 5 MB/s: a slow
/// answer to a small request is cut at the base, the same wait for a big
/// upload is not.
#[tokio::test]
async fn attempt_time_limits_grow_with_the_body() {
    let fake = Fake::start().await;
    let store = fake
        .store
        .clone()
        .with_attempt_timeout(Duration::from_millis(300));
    fake.answer(200, &[("etag", "\"abc\"")], "");
    fake.answer.lock().unwrap().delay = Duration::from_millis(700);
    let small = store
        .put("k", "x".into(), Metadata::new(), Precondition::None)
        .await;
    let text = transient_naming(small, "a slow small PUT");
    assert!(text.contains("timed out"), "{text}");
    transient_naming(store.head("k").await, "a slow HEAD");
    // 25 MB: 300 ms + 5 s, ample for the 700 ms answer plus the client's
    // own work on the body in a debug build on a busy machine.
    store
        .put(
            "k",
            vec![7u8; 25_000_000].into(),
            Metadata::new(),
            Precondition::None,
        )
        .await
        .expect("a big upload gets the time its size needs");
}

/// Listings and deletes: garbage answers are errors naming the prefix or
/// key, never an empty listing or a done delete; a listing that claims more
/// pages without saying where they start is an error, not a short list.
#[tokio::test]
async fn garbage_listings_and_deletes_are_errors() {
    let fake = Fake::start().await;
    fake.answer(200, &[("content-type", "text/html")], HTML);
    let text = transient_naming(fake.store.list("k", None).await, "a listing page in HTML");
    assert!(text.contains("listing keys under prefix \"k\""), "{text}");
    fake.answer(502, &[("content-type", "text/html")], HTML);
    let text = transient_naming(fake.store.list("k", None).await, "a 502 listing");
    assert!(
        text.starts_with("transient") && text.contains("502"),
        "{text}"
    );
    fake.answer(
        200,
        &[("content-type", "application/xml")],
        "<?xml version=\"1.0\"?><ListBucketResult><Name>b</Name><Prefix>k</Prefix><KeyCount>1</KeyCount><MaxKeys>1</MaxKeys><IsTruncated>true</IsTruncated><Contents><Key>k1</Key><Size>1</Size></Contents></ListBucketResult>",
    );
    let text = transient_naming(
        fake.store.list("k", None).await,
        "a truncated page without a token",
    );
    assert!(text.contains("no continuation token"), "{text}");

    fake.answer(
        404,
        &[("content-type", "text/html")],
        "<html>Not Found</html>",
    );
    let text = transient_naming(fake.store.delete("k").await, "DELETE 404 page");
    assert!(text.contains("404"), "{text}");
    fake.answer(500, &[("content-type", "text/html")], HTML);
    transient_naming(fake.store.delete("k").await, "DELETE error page");
    // S3's own "no such key" is the success a delete of a missing key is.
    fake.answer(
        404,
        &[("content-type", "application/xml")],
        "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>",
    );
    fake.store
        .delete("k")
        .await
        .expect("NoSuchKey on a delete is success");
}

/// A listing page and a delete get the time limit of a request without a
/// body.
#[tokio::test]
async fn slow_listings_and_deletes_are_cut_at_the_attempt_limit() {
    let fake = Fake::start().await;
    let store = fake
        .store
        .clone()
        .with_attempt_timeout(Duration::from_millis(300));
    fake.answer(204, &[], "");
    fake.answer.lock().unwrap().delay = Duration::from_millis(1500);
    let text = transient_naming(store.list("k", None).await, "a slow listing");
    assert!(text.contains("timed out"), "{text}");
    let text = transient_naming(store.delete("k").await, "a slow DELETE");
    assert!(text.contains("timed out"), "{text}");
}
