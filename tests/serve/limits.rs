//! What one tenant's requests may cost the machine (issue 20): memory,
//! answer bytes, time on the tenant's connection (tenantd's own statements
//! and the triggers they fire included), database size, failures of the
//! counter's statements, and shutdown while a statement runs. Each test
//! replays an attack on a real process of the built binary with small
//! limits, then checks that the request failed alone.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::cluster::{Machine, Setup};
use crate::routing::holder_of;

const TOKEN: &str = "limits-token";

async fn sql(m: &Machine, customer: &str, statements: &[&str]) -> (u16, Value) {
    let body =
        json!({"statements": statements.iter().map(|s| json!({"sql": s})).collect::<Vec<_>>()});
    sql_body(m, customer, &body, None).await
}

async fn sql_body(m: &Machine, customer: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .post(m.url(&format!("/customers/{customer}/sql")))
        .bearer_auth(TOKEN)
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    match request.send().await {
        Ok(reply) => {
            let status = reply.status().as_u16();
            let bytes = reply.bytes().await.unwrap_or_default();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        }
        Err(e) => (0, json!({"client_error": e.to_string()})),
    }
}

/// An anonymous increment; status 0 when no answer came within `within`.
async fn increment(m: &Machine, customer: &str, within: Duration) -> (u16, Value) {
    let client = reqwest::Client::builder().timeout(within).build().unwrap();
    match client
        .post(m.url(&format!("/customers/{customer}/increment")))
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(e) => (0, json!({"client_error": e.to_string()})),
    }
}

/// The process's peak resident memory (VmHWM), in bytes.
fn peak_rss(m: &Machine) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn alive(m: &mut Machine) -> bool {
    m.child.as_mut().unwrap().try_wait().unwrap().is_none()
}

async fn single(setup: &Setup, id: &str, customer: &str, extra: &[&str]) -> Machine {
    let mut args = vec!["--api-token", TOKEN];
    args.extend_from_slice(extra);
    let m = setup.machine(id, Some(customer), &args);
    holder_of(setup, customer).await;
    m
}

/// A reply cut short for an assertion's message.
fn short(reply: &Value) -> String {
    reply.to_string().chars().take(300).collect()
}

fn is_refused_limit(status: u16, reply: &Value) -> bool {
    matches!(status, 400 | 413) && reply["code"] == "limit"
}

/// Values that ask SQLite for gigabytes are refused without the machine
/// ever holding them: the heap limit turns SQLite's allocation into an
/// error, and the answer is measured before a value is copied or encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_values_are_refused_without_the_memory_they_ask_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::file_store(dir.path());
    setup
        .env
        .push(("TENANTD_SQLITE_HEAP_LIMIT".into(), "128MiB".into()));
    let mut m = single(&setup, "a0000000020201", "21", &[]).await;
    let attacks = [
        "SELECT printf('%.*c', 999999999, 'x')",
        "SELECT zeroblob(999999999)",
        "SELECT zeroblob(999999999), zeroblob(999999999), zeroblob(999999999)",
        "SELECT printf('%.*c', 300000000, 'x'), printf('%.*c', 300000000, 'y'), printf('%.*c', 300000000, 'z')",
    ];
    for attack in attacks {
        let (status, reply) = sql(&m, "21", &[attack]).await;
        assert!(alive(&mut m), "{attack}: the process died:\n{}", m.logs());
        assert!(
            is_refused_limit(status, &reply),
            "{attack}: {status} {}",
            short(&reply)
        );
        let (status, reply) = sql(&m, "21", &["SELECT 1"]).await;
        assert_eq!(status, 200, "after {attack}: {}", short(&reply));
    }
    let peak = peak_rss(&m);
    assert!(
        peak < 512 << 20,
        "peak RSS {} MiB: a request made the machine hold what it asked for",
        peak >> 20
    );
}

/// The answer budget counts what goes on the wire: column names, JSON
/// escapes, base64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_budget_counts_encoded_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = single(&setup, "a0000000020202", "22", &[]).await;
    // 1,000,000 characters of \u0001: six bytes each once encoded.
    let escapes = "SELECT replace(hex(zeroblob(500000)), '0', char(1))";
    let (status, reply) = sql(&m, "22", &[escapes]).await;
    assert_eq!(status, 413, "{}", short(&reply));
    assert_eq!(reply["code"], "limit", "{}", short(&reply));
    assert!(
        reply["error"].as_str().unwrap().contains("bytes"),
        "{}",
        short(&reply)
    );
    // Column names: 80 columns of 60,000 characters are 4.8 MB of answer.
    let name = "n".repeat(60_000);
    let (status, reply) = sql(
        &m,
        "22",
        &[&format!("CREATE VIEW wide AS SELECT 1 AS \"{name}\"")],
    )
    .await;
    assert_eq!(status, 200, "{}", short(&reply));
    let join = (0..40)
        .map(|i| format!("wide w{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!("SELECT * FROM {join}");
    let (status, reply) = sql(&m, "22", &[&select, &select]).await;
    assert_eq!(status, 413, "{}", short(&reply));
    assert_eq!(reply["code"], "limit");
    // Within the budget, the same shapes still answer.
    let (status, reply) = sql(&m, "22", &["SELECT char(1, 34, 92)", "SELECT x'00ff'"]).await;
    assert_eq!(status, 200, "{}", short(&reply));
    assert_eq!(reply["results"][0]["rows"], json!([["\u{1}\"\\"]]));
    assert_eq!(reply["results"][1]["rows"], json!([[{"base64": "AP8="}]]));
}

/// The trap of the issue: a cascade from `welcome(count)` into a table
/// whose trigger runs for ever. tenantd's own UPDATE of the counter fires
/// it; the watchdog interrupts it at the request's deadline, the request
/// fails alone, and the holder keeps its lease and its queue.
async fn set_trigger_trap(m: &Machine, customer: &str, body: &str) {
    let (status, reply) = increment(m, customer, Duration::from_secs(20)).await;
    assert_eq!(status, 200, "{}", short(&reply));
    let (status, reply) = sql(
        m,
        customer,
        &[
            "CREATE TABLE big(x INTEGER)",
            "INSERT INTO big WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) SELECT x FROM c",
            "CREATE TABLE junk(b BLOB)",
            "CREATE UNIQUE INDEX welcome_count ON welcome(count)",
            "CREATE TABLE trap(c INTEGER REFERENCES welcome(count) ON UPDATE CASCADE)",
            "INSERT INTO trap SELECT count FROM welcome",
            &format!("CREATE TRIGGER spring AFTER UPDATE ON trap BEGIN {body}; END"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{}", short(&reply));
}

const RUNAWAY: &str = "SELECT count(*) FROM big a, big b, big c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_fired_by_an_increment_runs_no_longer_than_the_sql_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = single(&setup, "a0000000020203", "23", &["--sql-timeout", "1s"]).await;
    set_trigger_trap(&m, "23", RUNAWAY).await;
    let epoch = setup.lock("23").unwrap()["epoch"].clone();
    let started = Instant::now();
    let (status, reply) = increment(&m, "23", Duration::from_secs(30)).await;
    assert_eq!(
        status,
        400,
        "{} after {:?}",
        short(&reply),
        started.elapsed()
    );
    assert!(
        reply["error"].as_str().unwrap().contains("time limit"),
        "{}",
        short(&reply)
    );
    // The tenant keeps serving, on the same lease.
    let (status, reply) = sql(&m, "23", &["SELECT count FROM welcome"]).await;
    assert_eq!(status, 200, "{}", short(&reply));
    assert_eq!(reply["results"][0]["rows"], json!([[1]]), "nothing applied");
    assert_eq!(setup.lock("23").unwrap()["epoch"], epoch, "no re-claim");
}

/// A user change to `welcome` that breaks the counter's statements answers
/// 409 with the reason, and costs the holder nothing: same epoch, no
/// fences, the working copy kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_counter_answers_409_and_keeps_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let m = single(&setup, "a0000000020204", "24", &[]).await;
    let (status, _) = increment(&m, "24", Duration::from_secs(20)).await;
    assert_eq!(status, 200);
    let epoch = setup.lock("24").unwrap()["epoch"].clone();

    // Two rows and a unique index: UPDATE welcome SET count = n fails.
    let (status, reply) = sql(
        &m,
        "24",
        &[
            "INSERT INTO welcome (count) VALUES (100)",
            "CREATE UNIQUE INDEX welcome_unique ON welcome(count)",
        ],
    )
    .await;
    assert_eq!(status, 200, "{}", short(&reply));
    for _ in 0..3 {
        let (status, reply) = increment(&m, "24", Duration::from_secs(20)).await;
        assert_eq!(status, 409, "{}", short(&reply));
        let message = reply["error"].as_str().unwrap();
        assert!(
            message.contains("welcome") && message.contains("UNIQUE"),
            "{}",
            short(&reply)
        );
    }
    // A text count.
    let (status, reply) = sql(
        &m,
        "24",
        &[
            "DROP INDEX welcome_unique",
            "DELETE FROM welcome WHERE count = 100",
            "UPDATE welcome SET count = 'many'",
        ],
    )
    .await;
    assert_eq!(status, 200, "{}", short(&reply));
    for _ in 0..3 {
        let (status, reply) = increment(&m, "24", Duration::from_secs(20)).await;
        assert_eq!(status, 409, "{}", short(&reply));
        assert!(
            reply["error"].as_str().unwrap().contains("welcome"),
            "{}",
            short(&reply)
        );
    }
    assert_eq!(setup.lock("24").unwrap()["epoch"], epoch, "no re-claim");
    assert_eq!(
        m.logs().matches("holding tenant").count(),
        1,
        "the tenant was taken over once"
    );
    // Repaired by the user, the counter goes on from the repaired value.
    let (status, reply) = sql(&m, "24", &["UPDATE welcome SET count = 7"]).await;
    assert_eq!(status, 200, "{}", short(&reply));
    let (status, reply) = increment(&m, "24", Duration::from_secs(20)).await;
    assert_eq!(status, 200, "{}", short(&reply));
    assert_eq!(reply["count"], 8, "{}", short(&reply));
}

/// `PRAGMA page_count * page_size` of the tenant, through the API.
async fn db_bytes(m: &Machine, customer: &str) -> u64 {
    let (status, reply) = sql(
        m,
        customer,
        &["SELECT page_count * page_size FROM pragma_page_count, pragma_page_size"],
    )
    .await;
    assert_eq!(status, 200, "{}", short(&reply));
    reply["results"][0]["rows"][0][0].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_bytes_covers_stored_answers_and_counter_triggers() {
    const LIMIT: u64 = 2_000_000;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let limit = LIMIT.to_string();
    let m = single(&setup, "a0000000020205", "25", &["--max-db-bytes", &limit]).await;

    // Answers stored for idempotency keys: each about 800 kB.
    let body = json!({"statements": [
        {"sql": "CREATE TABLE IF NOT EXISTS t(x)"},
        {"sql": "INSERT INTO t VALUES (1)"},
        {"sql": "SELECT hex(randomblob(400000))"},
    ]});
    let mut refused = 0;
    for i in 0..6 {
        let (status, reply) = sql_body(&m, "25", &body, Some(&format!("answer-{i}"))).await;
        match status {
            200 => {}
            _ if is_refused_limit(status, &reply) => refused += 1,
            _ => panic!("{status} {}", short(&reply)),
        }
    }
    assert!(refused > 0, "some stored answers must be over the limit");
    let size = db_bytes(&m, "25").await;
    assert!(size <= LIMIT, "the database grew to {size} bytes");

    // Writes fired by tenantd's own UPDATE of the counter (another tenant:
    // this one is full).
    let m = single(&setup, "a0000000020207", "27", &["--max-db-bytes", &limit]).await;
    set_trigger_trap(&m, "27", "INSERT INTO junk VALUES (randomblob(300000))").await;
    let mut refused = 0;
    for _ in 0..10 {
        let (status, reply) = increment(&m, "27", Duration::from_secs(20)).await;
        match status {
            200 => {}
            _ if is_refused_limit(status, &reply) => refused += 1,
            _ => panic!("{status} {}", short(&reply)),
        }
    }
    assert!(refused > 0, "some increments must be over the limit");
    let size = db_bytes(&m, "27").await;
    assert!(size <= LIMIT, "the database grew to {size} bytes");
}

/// SIGTERM ends the process within --drain-timeout + 2 s even while a
/// statement runs that would take far longer (here: one allowed to run
/// for ten minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_while_a_statement_runs() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::file_store(dir.path());
    let mut m = single(
        &setup,
        "a0000000020206",
        "26",
        &["--sql-timeout", "600s", "--drain-timeout", "3s"],
    )
    .await;
    let (status, reply) = sql(
        &m,
        "26",
        &[
            "CREATE TABLE big(x INTEGER)",
            "INSERT INTO big WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) SELECT x FROM c",
        ],
    )
    .await;
    assert_eq!(status, 200, "{}", short(&reply));
    let url = m.url("/customers/26/sql");
    let runaway = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .bearer_auth(TOKEN)
            .json(&json!({"statements": [{"sql": RUNAWAY}]}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!runaway.is_finished(), "the statement is still running");
    m.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    let code = m.wait_exit(Duration::from_secs(3 + 2));
    assert_eq!(code, Some(0), "exited after {:?}", signalled.elapsed());
    // Its request was answered, or its connection closed: never left hanging.
    let _ = tokio::time::timeout(Duration::from_secs(5), runaway)
        .await
        .expect("the runaway request ended with the process");
}
