//! Hrana streams on a real `tenantd serve`: batons, interactive
//! transactions holding other requests until they end, the transaction's
//! time bound, idle streams expiring, and batons that are not the
//! holder's (another tenant's, a replayed one) refused with nothing run.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::{Value, json};

use cluster::{Machine, Setup};

const API_TOKEN: &str = "hrana-streams-test-api-token";

fn execute(sql: &str) -> Value {
    json!({"type": "execute", "stmt": {"sql": sql}})
}

async fn pipeline(m: &Machine, customer: &str, baton: Value, requests: Value) -> (u16, Value) {
    let reply = reqwest::Client::new()
        .post(m.url(&format!("/customers/{customer}/v2/pipeline")))
        .bearer_auth(API_TOKEN)
        .json(&json!({"baton": baton, "requests": requests}))
        .send()
        .await
        .unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// A write through `/sql`, answered once durable.
async fn sql_write(m: &Machine, customer: &str, sql: &str) -> u16 {
    reqwest::Client::new()
        .post(m.url(&format!("/customers/{customer}/sql")))
        .bearer_auth(API_TOKEN)
        .json(&json!({"statements": [{"sql": sql}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn rows(m: &Machine, customer: &str, sql: &str) -> Value {
    let (status, answer) = pipeline(
        m,
        customer,
        Value::Null,
        json!([execute(sql), {"type": "close"}]),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    answer["results"][0]["response"]["result"]["rows"].clone()
}

fn values(rows: &Value) -> Vec<String> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| row[0]["value"].as_str().unwrap().to_string())
        .collect()
}

fn machine(setup: &Setup, name: &str, customer: &str) -> Machine {
    setup.machine(name, Some(customer), &["--api-token", API_TOKEN])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_holds_other_writes_until_its_commit_and_batons_are_the_holders_alone() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["31", "32"]);
    let m = machine(&setup, "a00000000031a1", "31");
    rows(&m, "31", "CREATE TABLE t (x TEXT)").await;

    let (status, begun) = pipeline(
        &m,
        "31",
        Value::Null,
        json!([execute("BEGIN"), execute("INSERT INTO t VALUES ('in-tx')")]),
    )
    .await;
    assert_eq!(status, 200, "{begun}");
    assert_eq!(begun["results"][1]["type"], "ok", "{begun}");
    let baton = begun["baton"].clone();
    assert!(
        baton.is_string(),
        "a stream kept open gets a baton: {begun}"
    );

    // Another client's write waits for the transaction: not lost, not failed.
    let other = {
        let m_url = m.url("/customers/31/sql");
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(m_url)
                .bearer_auth(API_TOKEN)
                .json(&json!({"statements": [{"sql": "INSERT INTO t VALUES ('queued')"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !other.is_finished(),
        "a write arriving during a transaction waits for its end"
    );

    // The stream's next pipeline sees its own write.
    let (status, inside) =
        pipeline(&m, "31", baton.clone(), json!([execute("SELECT x FROM t")])).await;
    assert_eq!(status, 200, "{inside}");
    assert_eq!(
        values(&inside["results"][0]["response"]["result"]["rows"]),
        ["in-tx"]
    );
    let next = inside["baton"].clone();

    // A baton is good for one pipeline: the earlier one is refused, nothing run.
    let (status, replayed) = pipeline(
        &m,
        "31",
        baton,
        json!([execute("INSERT INTO t VALUES ('replayed')")]),
    )
    .await;
    assert_eq!(status, 400, "{replayed}");
    assert_eq!(replayed["code"], "STREAM_EXPIRED", "{replayed}");
    // Another tenant's holder never gave it.
    let n = machine(&setup, "a00000000032a1", "32");
    rows(&n, "32", "CREATE TABLE t (x TEXT)").await;
    let (status, foreign) = pipeline(
        &n,
        "32",
        next.clone(),
        json!([execute("INSERT INTO t VALUES ('foreign')")]),
    )
    .await;
    assert_eq!(status, 400, "{foreign}");
    assert_eq!(foreign["code"], "STREAM_EXPIRED", "{foreign}");
    assert_eq!(rows(&n, "32", "SELECT x FROM t").await, json!([]));

    let (status, committed) = pipeline(
        &m,
        "31",
        next,
        json!([execute("COMMIT"), {"type": "close"}]),
    )
    .await;
    assert_eq!(status, 200, "{committed}");
    assert_eq!(committed["results"][0]["type"], "ok", "{committed}");
    assert_eq!(
        committed["baton"],
        Value::Null,
        "a closed stream has no baton"
    );
    assert_eq!(
        other.await.unwrap(),
        200,
        "the held write is answered after the COMMIT"
    );
    let mut got = values(&rows(&m, "31", "SELECT x FROM t").await);
    got.sort();
    assert_eq!(got, ["in-tx", "queued"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_transaction_is_rolled_back_at_its_bound_and_what_it_held_runs() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["33"]);
    let m = machine(&setup, "a00000000033a1", "33");
    rows(&m, "33", "CREATE TABLE t (x TEXT)").await;
    let (status, begun) = pipeline(
        &m,
        "33",
        Value::Null,
        json!([
            execute("BEGIN IMMEDIATE"),
            execute("INSERT INTO t VALUES ('abandoned')")
        ]),
    )
    .await;
    assert_eq!(status, 200, "{begun}");
    // Held behind the transaction, then run once it is rolled back.
    assert_eq!(
        sql_write(&m, "33", "INSERT INTO t VALUES ('waited')").await,
        200
    );
    let (status, late) =
        pipeline(&m, "33", begun["baton"].clone(), json!([execute("COMMIT")])).await;
    assert_eq!(status, 400, "{late}");
    assert_eq!(late["code"], "STREAM_EXPIRED", "{late}");
    assert!(
        late["message"].as_str().unwrap().contains("rolled back"),
        "{late}"
    );
    assert_eq!(values(&rows(&m, "33", "SELECT x FROM t").await), ["waited"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_stream_expires() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["34"]);
    let m = machine(&setup, "a00000000034a1", "34");
    let (status, opened) = pipeline(
        &m,
        "34",
        Value::Null,
        json!([{"type": "store_sql", "sql_id": 1, "sql": "SELECT 1"}]),
    )
    .await;
    assert_eq!(status, 200, "{opened}");
    let (status, again) = pipeline(
        &m,
        "34",
        opened["baton"].clone(),
        json!([{"type": "execute", "stmt": {"sql_id": 1}}]),
    )
    .await;
    assert_eq!(status, 200, "a live stream keeps its stored SQL: {again}");
    assert_eq!(again["results"][0]["type"], "ok", "{again}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (status, expired) = pipeline(
        &m,
        "34",
        again["baton"].clone(),
        json!([{"type": "execute", "stmt": {"sql_id": 1}}]),
    )
    .await;
    assert_eq!(status, 400, "{expired}");
    assert_eq!(expired["code"], "STREAM_EXPIRED", "{expired}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_holder_stopping_mid_transaction_rolls_it_back_and_the_next_holder_refuses_its_baton() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["35"]);
    let args = ["--api-token", API_TOKEN, "--replay-mode", "forward"];
    let mut a = setup.machine("a00000000035a1", Some("35"), &args);
    rows(&a, "35", "CREATE TABLE t (x TEXT)").await;
    assert_eq!(
        a.status()["tenants"][0]["customer_id"],
        "35",
        "a holds the tenant"
    );
    let (status, begun) = pipeline(
        &a,
        "35",
        Value::Null,
        json!([execute("BEGIN"), execute("INSERT INTO t VALUES ('half')")]),
    )
    .await;
    assert_eq!(status, 200, "{begun}");
    // A write held behind the transaction when the stop comes.
    let held = {
        let url = a.url("/customers/35/sql");
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(API_TOKEN)
                .json(&json!({"statements": [{"sql": "INSERT INTO t VALUES ('held')"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal(nix::sys::signal::Signal::SIGTERM);
    a.wait_exit(Duration::from_secs(20));
    let held = held.await.unwrap();

    let b = setup.machine("b00000000035b2", Some("35"), &args);
    let (status, after) =
        pipeline(&b, "35", begun["baton"].clone(), json!([execute("COMMIT")])).await;
    assert_eq!(status, 400, "{after}");
    assert_eq!(after["code"], "STREAM_EXPIRED", "{after}");
    let got = values(&rows(&b, "35", "SELECT x FROM t").await);
    assert!(
        !got.contains(&"half".to_string()),
        "never half a transaction: {got:?}"
    );
    // A clean stop runs what the transaction held before releasing.
    assert_eq!(held, 200, "the held write is answered, not lost");
    assert_eq!(got, ["held"], "an acknowledged write survives the stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_holder_hands_a_streams_pipelines_to_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    setup.create_tenants(&["36"]);
    let args = ["--api-token", API_TOKEN, "--replay-mode", "forward"];
    let a = setup.machine("a00000000036a1", Some("36"), &args);
    rows(&a, "36", "CREATE TABLE t (x TEXT)").await;
    assert_eq!(
        a.status()["tenants"][0]["customer_id"],
        "36",
        "a holds the tenant"
    );
    let b = setup.machine("b00000000036b2", None, &args);
    let (status, begun) = pipeline(
        &b,
        "36",
        Value::Null,
        json!([execute("BEGIN"), execute("INSERT INTO t VALUES ('via-b')")]),
    )
    .await;
    assert_eq!(status, 200, "{begun}");
    let (status, inside) = pipeline(
        &b,
        "36",
        begun["baton"].clone(),
        json!([execute("SELECT x FROM t")]),
    )
    .await;
    assert_eq!(status, 200, "{inside}");
    assert_eq!(
        values(&inside["results"][0]["response"]["result"]["rows"]),
        ["via-b"]
    );
    let (status, committed) = pipeline(
        &a,
        "36",
        inside["baton"].clone(),
        json!([execute("COMMIT"), {"type": "close"}]),
    )
    .await;
    assert_eq!(status, 200, "{committed}");
    assert_eq!(committed["results"][0]["type"], "ok", "{committed}");
    assert_eq!(values(&rows(&b, "36", "SELECT x FROM t").await), ["via-b"]);
}
