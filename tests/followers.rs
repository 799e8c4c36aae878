//! Follower reads on real `tenantd serve` processes (file store, real
//! sockets on 127.0.0.1): a machine that does not hold the tenant answers
//! read-only SQL from its replica of the log, with bookmarks; it never
//! shows a deposed holder's late delta; reads continue while the holder is
//! killed and another machine takes over.

#[path = "serve/cluster.rs"]
mod cluster;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tenantd_core::store::{FileStore, Precondition, keys};
use tenantd_core::tenant::delta::{self, Delta, Kind, PageSums};
use tenantd_core::tenant::log::{self, Until};

use cluster::{Machine, Setup};

const TOKEN: &str = "follower-test-token";
const CUSTOMER: &str = "7";

struct Reply {
    status: u16,
    bookmark: Option<u64>,
    role: Option<String>,
    served_by: Option<String>,
    fly_replay: Option<String>,
    json: Value,
}

async fn sql(m: &Machine, statements: Value, read_only: bool, headers: &[(&str, &str)]) -> Reply {
    let mut request = reqwest::Client::new()
        .post(m.url(&format!("/customers/{CUSTOMER}/sql")))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(20))
        .json(&json!({"statements": statements, "read_only": read_only}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let reply = request.send().await.expect("the machine answers");
    let header = |name: &str| {
        reply
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (bookmark, role, served_by, fly_replay) = (
        header("tenantd-bookmark").map(|b| b.parse().expect("a bookmark is a slot")),
        header("tenantd-role"),
        header("tenantd-served-by"),
        header("fly-replay"),
    );
    let status = reply.status().as_u16();
    Reply {
        status,
        bookmark,
        role,
        served_by,
        fly_replay,
        json: reply.json().await.unwrap_or(Value::Null),
    }
}

async fn insert(holder: &Machine, body: &str) -> Reply {
    let reply = sql(
        holder,
        json!([{"sql": "INSERT INTO notes(body) VALUES (?)", "params": [body]}]),
        false,
        &[],
    )
    .await;
    assert_eq!(reply.status, 200, "insert at the holder: {}", reply.json);
    reply
}

async fn bodies(m: &Machine, headers: &[(&str, &str)]) -> Reply {
    sql(
        m,
        json!([{"sql": "SELECT body FROM notes ORDER BY id"}]),
        true,
        headers,
    )
    .await
}

fn rows(reply: &Reply) -> Vec<String> {
    reply.json["results"][0]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows in {}", reply.json))
        .iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .collect()
}

/// A lease ttl that a loaded test machine does not starve: these tests
/// are about reads, not about lease expiry.
fn slow(mut setup: Setup) -> Setup {
    setup.ttl = "3s".into();
    setup
}

/// Machine `a` holds the tenant (it starts first and takes the lease on
/// the first write), `b` starts after it.
async fn two_machines(setup: &Setup) -> (Machine, Machine) {
    let a = setup.machine("a", Some(CUSTOMER), &["--api-token", TOKEN]);
    let created = sql(
        &a,
        json!([{"sql": "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"}]),
        false,
        &[],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.json);
    assert_eq!(setup.lock(CUSTOMER).unwrap()["holder"], "a");
    let b = setup.machine("b", Some(CUSTOMER), &["--api-token", TOKEN]);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_answers_reads_with_every_acknowledged_write_and_bookmarks() {
    let dir = tempfile::tempdir().unwrap();
    follower_answers(slow(Setup::file_store(dir.path()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_answers_reads_with_every_acknowledged_write_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    follower_answers(slow(Setup::s3(dir.path()).await)).await;
}

async fn follower_answers(setup: Setup) {
    let (a, b) = two_machines(&setup).await;

    let mut last = 0;
    for i in 1..=12 {
        let written = insert(&a, &format!("note {i}")).await;
        assert_eq!(written.role.as_deref(), Some("holder"));
        assert_eq!(written.served_by.as_deref(), Some("a"));
        let bookmark = written
            .bookmark
            .expect("a write's answer carries a bookmark");
        assert!(bookmark > last, "bookmarks grow: {bookmark} after {last}");
        last = bookmark;
        // No bookmark: the follower still shows every acknowledged write.
        let read = bodies(&b, &[]).await;
        assert_eq!(read.status, 200, "{}", read.json);
        assert_eq!(read.role.as_deref(), Some("follower"), "{}", read.json);
        assert_eq!(read.served_by.as_deref(), Some("b"));
        assert_eq!(
            rows(&read).len(),
            i,
            "read {i} misses an acknowledged write"
        );
        assert!(read.bookmark.unwrap() >= bookmark);
    }

    // With the bookmark of the last write, and with a generous staleness.
    let text = last.to_string();
    let read = bodies(&b, &[("tenantd-bookmark", &text)]).await;
    assert_eq!(read.role.as_deref(), Some("follower"));
    assert_eq!(rows(&read).len(), 12);
    assert!(read.bookmark.unwrap() >= last);
    let read = bodies(&b, &[("tenantd-max-staleness", "60000")]).await;
    assert_eq!(read.role.as_deref(), Some("follower"));
    assert_eq!(rows(&read).len(), 12);

    // A bookmark at the holder, and a read there, carry the same headers.
    let read = bodies(&a, &[("tenantd-bookmark", &text)]).await;
    assert_eq!(read.role.as_deref(), Some("holder"));
    assert!(read.bookmark.unwrap() >= last);

    // A bookmark tenantd never gave is refused, naming the header.
    let bad = bodies(&b, &[("tenantd-bookmark", "yesterday")]).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json["error"]
            .as_str()
            .unwrap()
            .contains("tenantd-bookmark")
    );

    // Writes still go to the holder.
    let write = sql(
        &b,
        json!([{"sql": "INSERT INTO notes(body) VALUES ('x')"}]),
        false,
        &[],
    )
    .await;
    assert_eq!(write.status, 307, "{}", write.json);
    assert!(write.fly_replay.unwrap().contains("instance=a"));

    // A statement that writes is refused by a follower as by the holder.
    let refused = sql(&b, json!([{"sql": "DELETE FROM notes"}]), true, &[]).await;
    assert_eq!(refused.status, 400, "{}", refused.json);

    // The counter's answers carry the headers too.
    let counted = reqwest::Client::new()
        .post(a.url(&format!("/customers/{CUSTOMER}/increment")))
        .send()
        .await
        .unwrap();
    assert_eq!(counted.headers()["tenantd-role"], "holder");
    let counted_at: u64 = counted.headers()["tenantd-bookmark"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(counted_at > last);
    let count_url = a.url(&format!("/customers/{CUSTOMER}/count"));
    let at_bookmark = reqwest::Client::new()
        .get(&count_url)
        .header("tenantd-bookmark", counted_at.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(at_bookmark.status(), 200);
    let bad = reqwest::Client::new()
        .get(&count_url)
        .header("tenantd-bookmark", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// The state after `slot` plus one row nobody acknowledged, as a delta
/// that a reader ignoring epochs would apply cleanly.
async fn ghost_delta(
    store: &tenantd_core::store::DynStore,
    dir: &std::path::Path,
    epoch: u64,
    seq: u64,
) -> Delta {
    let base = dir.join("ghost-base.sqlite3");
    let changed = dir.join("ghost-changed.sqlite3");
    log::materialize(store, CUSTOMER, &base, Until::End)
        .await
        .unwrap();
    std::fs::copy(&base, &changed).unwrap();
    {
        let conn = rusqlite::Connection::open(&changed).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; INSERT INTO notes(body) VALUES ('ghost'); PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
    }
    let before = PageSums::of_file(&base).unwrap();
    let after = PageSums::of_file(&changed).unwrap();
    let (db_pages, pages) = delta::diff_files(&base, &changed).unwrap();
    assert!(!pages.is_empty());
    let ghost = Delta {
        kind: Kind::Delta,
        epoch,
        seq,
        committed_at_ms: 0,
        page_size: 4096,
        db_pages,
        pre_checksum: before.checksum(),
        post_checksum: after.checksum(),
        pages,
    };
    // The ghost is a well-formed commit on that state: only its epoch
    // keeps a reader from showing it.
    delta::apply_to_file(&base, &ghost).unwrap();
    let shown: i64 = rusqlite::Connection::open(&base)
        .unwrap()
        .query_row("SELECT count(*) FROM notes WHERE body = 'ghost'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(shown, 1);
    ghost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_holders_late_delta_is_never_shown_by_a_follower() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let (mut a, b) = two_machines(&setup).await;
    for i in 1..=3 {
        insert(&a, &format!("note {i}")).await;
    }
    let epoch_a = setup.lock(CUSTOMER).unwrap()["epoch"].as_u64().unwrap();
    a.signal(Signal::SIGKILL);
    a.wait_exit(Duration::from_secs(5));

    // One of A's uploads lands late, past a hole: the state after its last
    // commit plus a row it never acknowledged.
    let store: tenantd_core::store::DynStore =
        std::sync::Arc::new(FileStore::new(dir.path().join("store")).unwrap());
    let end = log::list_slots(&store, CUSTOMER, 0)
        .await
        .unwrap()
        .last()
        .unwrap()
        .0;
    let ghost = ghost_delta(&store, dir.path(), epoch_a, end + 2).await;
    store
        .put(
            &keys::log_slot(CUSTOMER, end + 2),
            ghost.encode().unwrap(),
            log::slot_metadata(
                epoch_a,
                end + 2,
                &log::Writer {
                    holder: "a".into(),
                    token: "a's acquisition".into(),
                },
            ),
            Precondition::IfAbsent,
        )
        .await
        .unwrap();

    // B takes over (its fence at end + 1 comes before the ghost) and
    // writes; A comes back as a follower.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = insert_or_not(&b, "note 4").await;
        if reply == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(setup.lock(CUSTOMER).unwrap()["holder"], "b");
    a.start();
    for headers in [&[][..], &[("tenantd-max-staleness", "0")][..]] {
        let read = bodies(&a, headers).await;
        assert_eq!(read.status, 200, "{}", read.json);
        assert_eq!(read.role.as_deref(), Some("follower"));
        assert_eq!(
            rows(&read),
            ["note 1", "note 2", "note 3", "note 4"],
            "the follower shows exactly the acknowledged writes"
        );
    }
    // The bookmark of the ghost's slot names a state without it.
    let at_ghost = (end + 2).to_string();
    let read = bodies(&a, &[("tenantd-bookmark", &at_ghost)]).await;
    assert_eq!(read.status, 200, "{}", read.json);
    assert!(!rows(&read).contains(&"ghost".to_string()));
}

async fn insert_or_not(m: &Machine, body: &str) -> u16 {
    sql(
        m,
        json!([{"sql": "INSERT INTO notes(body) VALUES (?)", "params": [body]}]),
        false,
        &[],
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_continue_through_a_holder_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    reads_through_sigkill(slow(Setup::file_store(dir.path()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_continue_through_a_holder_sigkill_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    reads_through_sigkill(slow(Setup::s3(dir.path()).await)).await;
}

async fn reads_through_sigkill(setup: Setup) {
    let (a, b) = two_machines(&setup).await;
    for i in 1..=5 {
        insert(&a, &format!("note {i}")).await;
    }
    assert_eq!(bodies(&b, &[]).await.role.as_deref(), Some("follower"));
    a.signal(Signal::SIGKILL);

    // Right after the kill, before any takeover can happen (one ttl of an
    // unchanged heartbeat), the follower answers from the log.
    let first = bodies(&b, &[]).await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.role.as_deref(), Some("follower"));
    assert_eq!(rows(&first).len(), 5);

    // And every read until well after the takeover is answered, with
    // every acknowledged write.
    let until = Instant::now() + Duration::from_secs(4);
    let mut roles = std::collections::BTreeSet::new();
    while Instant::now() < until {
        let read = bodies(&b, &[]).await;
        assert_eq!(read.status, 200, "{}", read.json);
        assert_eq!(rows(&read).len(), 5);
        roles.insert(read.role.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Writes wait for the new holder, as before.
    insert(&b, "note 6").await;
    assert_eq!(rows(&bodies(&b, &[]).await).len(), 6);
    drop(a);
    eprintln!("roles seen during the failover: {roles:?}");
}

/// `tenantd_follower_slots_total{source}` on a machine.
async fn follower_slots(m: &Machine, source: &str) -> u64 {
    let text = reqwest::get(m.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("tenantd_follower_slots_total{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_steady_state_the_holder_pushes_commits_to_its_followers() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let (a, b) = two_machines(&setup).await;
    // The first read builds the replica and registers b with the holder.
    assert_eq!(bodies(&b, &[]).await.role.as_deref(), Some("follower"));
    let (pushed, read) = (
        follower_slots(&b, "push").await,
        follower_slots(&b, "log").await,
    );
    const WRITES: usize = 20;
    for i in 1..=WRITES {
        insert(&a, &format!("note {i}")).await;
        let reply = bodies(&b, &[]).await;
        assert_eq!(reply.role.as_deref(), Some("follower"));
        assert_eq!(rows(&reply).len(), i);
    }
    let pushed = follower_slots(&b, "push").await - pushed;
    let read = follower_slots(&b, "log").await - read;
    assert!(
        pushed as usize > WRITES / 2 && (read as usize) < WRITES / 2,
        "{pushed} slots pushed, {read} read from the store for {WRITES} commits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_answers_keep_the_consistency_headers() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let args = ["--api-token", TOKEN, "--replay-mode", "forward"];
    let a = setup.machine("a", Some(CUSTOMER), &args);
    let created = sql(
        &a,
        json!([{"sql": "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"}]),
        false,
        &[],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.json);
    let b = setup.machine("b", Some(CUSTOMER), &args);
    // A write sent to b is proxied to the holder: its answer says so.
    let written = insert(&b, "through b").await;
    assert_eq!(written.role.as_deref(), Some("holder"));
    assert_eq!(written.served_by.as_deref(), Some("a"));
    let bookmark = written
        .bookmark
        .expect("the forwarded answer keeps its bookmark");
    let read = bodies(&b, &[("tenantd-bookmark", &bookmark.to_string())]).await;
    assert_eq!(read.role.as_deref(), Some("follower"));
    assert_eq!(rows(&read), ["through b"]);
}

/// A Hrana request sent to one machine: its answer and headers.
async fn hrana(m: &Machine, path: &str, body: Value, headers: &[(&str, &str)]) -> (Reply, String) {
    let mut request = reqwest::Client::new()
        .post(m.url(&format!("/customers/{CUSTOMER}/{path}")))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(20))
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let reply = request.send().await.expect("the machine answers");
    let header = |name: &str| {
        reply
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (bookmark, role, served_by, fly_replay) = (
        header("tenantd-bookmark").map(|b| b.parse().expect("a bookmark is a slot")),
        header("tenantd-role"),
        header("tenantd-served-by"),
        header("fly-replay"),
    );
    let status = reply.status().as_u16();
    let text = reply.text().await.unwrap();
    let reply = Reply {
        status,
        bookmark,
        role,
        served_by,
        fly_replay,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
    };
    (reply, text)
}

fn execute(sql: &str) -> Value {
    json!({"type": "execute", "stmt": {"sql": sql}})
}

/// The count of `notes` in a pipeline's first result, and its
/// `replication_index`.
fn counted(reply: &Reply) -> (u64, u64) {
    let result = &reply.json["results"][0]["response"]["result"];
    let count = result["rows"][0][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no count in {}", reply.json))
        .parse()
        .unwrap();
    let index = result["replication_index"]
        .as_str()
        .unwrap_or_else(|| panic!("no replication_index in {}", reply.json))
        .parse()
        .unwrap();
    (count, index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hrana_reads_outside_a_transaction_are_answered_by_a_follower() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let (a, b) = two_machines(&setup).await;
    const COUNT: &str = "SELECT count(*) FROM notes";

    let mut last = 0;
    for i in 1..=5u64 {
        last = insert(&a, &format!("note {i}")).await.bookmark.unwrap();
        // What @libsql/client sends for `execute`: no bookmark, no baton.
        for version in ["v2", "v3"] {
            let body = json!({"baton": null, "requests": [execute(COUNT), {"type": "close"}]});
            let (read, _) = hrana(&b, &format!("{version}/pipeline"), body, &[]).await;
            assert_eq!(read.status, 200, "{}", read.json);
            assert_eq!(read.role.as_deref(), Some("follower"), "{}", read.json);
            assert_eq!(read.served_by.as_deref(), Some("b"));
            assert_eq!(
                read.json["baton"],
                Value::Null,
                "a follower keeps no stream"
            );
            let (count, index) = counted(&read);
            assert_eq!(
                count, i,
                "a follower's Hrana read misses an acknowledged write"
            );
            assert!(
                index >= last,
                "replication_index {index} before the write's {last}"
            );
            assert_eq!(Some(index), read.bookmark);
        }
    }

    // A bookmark, as the header or as Hrana's replication_index.
    let text = last.to_string();
    let body = json!({"baton": null, "requests": [execute(COUNT)]});
    let (read, _) = hrana(
        &b,
        "v3/pipeline",
        body.clone(),
        &[("tenantd-bookmark", &text)],
    )
    .await;
    assert_eq!(read.role.as_deref(), Some("follower"), "{}", read.json);
    assert_eq!(counted(&read).0, 5);
    let mut indexed = body.clone();
    indexed["replication_index"] = json!(text);
    let (read, _) = hrana(&b, "v3/pipeline", indexed, &[]).await;
    assert_eq!(read.role.as_deref(), Some("follower"), "{}", read.json);
    assert!(read.bookmark.unwrap() >= last);
    let mut bad = body.clone();
    bad["replication_index"] = json!("yesterday");
    let (refused, _) = hrana(&b, "v3/pipeline", bad, &[]).await;
    assert_eq!(refused.status, 400, "{}", refused.json);
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("replication_index")
    );

    // A batch of reads, a describe and a cursor.
    let body = json!({"baton": null, "requests": [
        {"type": "batch", "batch": {"steps": [{"stmt": {"sql": COUNT}}, {"stmt": {"sql": "SELECT max(id) FROM notes"}, "condition": {"type": "ok", "step": 0}}]}},
        {"type": "describe", "sql": COUNT},
        {"type": "close"}]});
    let (read, _) = hrana(&b, "v3/pipeline", body, &[]).await;
    assert_eq!(read.role.as_deref(), Some("follower"), "{}", read.json);
    let batch = &read.json["results"][0]["response"]["result"];
    assert_eq!(batch["step_results"][1]["rows"][0][0]["value"], "5");
    assert!(batch["replication_index"].is_string(), "{batch}");
    assert_eq!(
        read.json["results"][1]["response"]["result"]["is_readonly"],
        true
    );
    let body = json!({"baton": null, "batch": {"steps": [{"stmt": {"sql": COUNT}}]}});
    let (read, text) = hrana(&b, "v3/cursor", body, &[]).await;
    assert_eq!(read.status, 200, "{text}");
    assert_eq!(read.role.as_deref(), Some("follower"), "{text}");
    assert!(text.contains("\"row\""), "{text}");

    // Everything else goes to the holder: a write, a transaction, a
    // stream's next pipeline, stored SQL that outlives the pipeline.
    for body in [
        json!({"baton": null, "requests": [execute("INSERT INTO notes(body) VALUES ('x')"), {"type": "close"}]}),
        json!({"baton": null, "requests": [execute("BEGIN"), execute(COUNT), execute("COMMIT")]}),
        json!({"baton": null, "requests": [{"type": "sequence", "sql": "BEGIN; SELECT 1; COMMIT"}]}),
        json!({"baton": "some-baton", "requests": [execute(COUNT)]}),
        json!({"baton": null, "requests": [{"type": "store_sql", "sql_id": 1, "sql": COUNT}]}),
        json!({"baton": null, "batch": {"steps": [{"stmt": {"sql": "DELETE FROM notes"}}]}}),
    ] {
        let path = match body.get("batch") {
            Some(_) => "v3/cursor",
            None => "v3/pipeline",
        };
        let (reply, _) = hrana(&b, path, body.clone(), &[]).await;
        assert_eq!(reply.status, 307, "{body} answered by b: {}", reply.json);
        assert!(reply.fly_replay.unwrap().contains("instance=a"), "{body}");
    }
    // Nothing was written meanwhile.
    let (read, _) = hrana(
        &a,
        "v3/pipeline",
        json!({"baton": null, "requests": [execute(COUNT), {"type": "close"}]}),
        &[],
    )
    .await;
    assert_eq!(read.role.as_deref(), Some("holder"));
    let (count, index) = counted(&read);
    assert_eq!(count, 5);
    assert_eq!(
        Some(index),
        read.bookmark,
        "the holder's answers carry it too"
    );
}

/// `tenantd_store_snapshot_reads_total` on a machine (every operation).
async fn snapshot_reads(m: &Machine) -> u64 {
    let text = reqwest::get(m.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("tenantd_store_snapshot_reads_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Inserts at `m` until it answers (it takes the tenant over first).
async fn insert_when_held(m: &Machine, body: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = insert_or_not(m, body).await;
        if status == 200 {
            return;
        }
        assert!(Instant::now() < until, "{body} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A follower whose replica is current takes the tenant over from it when
/// the holder dies: no snapshot download, and every acknowledged write
/// (those it had, and those only in the log) is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_holder_takes_over_from_its_replica_without_downloading_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let (a, b) = two_machines(&setup).await;
    for i in 1..=5 {
        insert(&a, &format!("note {i}")).await;
    }
    // The replica is built (one snapshot read) and follows the holder.
    assert_eq!(rows(&bodies(&b, &[]).await).len(), 5);
    let before = snapshot_reads(&b).await;
    assert!(before >= 1, "building the replica reads the snapshot");
    let last = insert(&a, "note 6").await.bookmark.expect("a bookmark");
    // Applied at b before the kill: a push cut off by the kill may leave
    // the replica to be rebuilt, which is not the case under test.
    let seen = bodies(&b, &[("tenantd-bookmark", &last.to_string())]).await;
    assert_eq!(rows(&seen).len(), 6, "{}", seen.json);
    a.signal(Signal::SIGKILL);

    insert_when_held(&b, "note 7").await;
    let read = bodies(&b, &[]).await;
    assert_eq!(read.role.as_deref(), Some("holder"), "{}", read.json);
    assert_eq!(rows(&read).len(), 7, "{}", read.json);
    assert_eq!(setup.lock(CUSTOMER).unwrap()["holder"], "b");
    assert_eq!(
        snapshot_reads(&b).await,
        before,
        "the takeover downloaded the snapshot although the replica was current:\n{}",
        b.logs()
    );
    drop(a);
}

/// A replica behind a compaction (the deltas it lacks may be gone) is not
/// taken over from: the snapshot is downloaded, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_compaction_is_not_taken_over_from() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let mut a = setup.machine("a", Some(CUSTOMER), &["--api-token", TOKEN]);
    let created = sql(
        &a,
        json!([{"sql": "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"}]),
        false,
        &[],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.json);
    // b advertises an address nothing listens on, so the holder's pushes
    // never reach it: its replica follows only what its own reads fetch.
    // (A stopped process would still get them: the kernel buffers the
    // pushes and it applies them when it resumes.)
    let b = setup.machine(
        "b",
        Some(CUSTOMER),
        &["--api-token", TOKEN, "--advertise", "127.0.0.1:9"],
    );
    for i in 1..=3 {
        insert(&a, &format!("note {i}")).await;
    }
    assert_eq!(rows(&bodies(&b, &[]).await).len(), 3);
    // a commits more and releases, compacting the snapshot past b's
    // replica.
    for i in 4..=6 {
        insert(&a, &format!("note {i}")).await;
    }
    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(30)), Some(0));
    assert_eq!(setup.lock(CUSTOMER).unwrap()["released"], true);
    let before = snapshot_reads(&b).await;

    insert_when_held(&b, "note 7").await;
    let read = bodies(&b, &[]).await;
    assert_eq!(read.role.as_deref(), Some("holder"), "{}", read.json);
    assert_eq!(rows(&read).len(), 7, "{}", read.json);
    assert!(
        snapshot_reads(&b).await > before,
        "the snapshot was not downloaded although the replica was behind it"
    );
}

/// Store requests of `op` on objects of `object` (lock, heartbeat, log,
/// snapshot) a machine made.
async fn store_requests(m: &Machine, op: &str, object: &str) -> u64 {
    let text = reqwest::get(m.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix =
        format!("tenantd_store_requests_by_object_total{{object=\"{object}\",op=\"{op}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_holder_pushes_a_follower_reads_neither_the_lock_nor_the_holders_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let (a, b) = two_machines(&setup).await;
    assert_eq!(bodies(&b, &[]).await.role.as_deref(), Some("follower"));
    let lock_before = store_requests(&b, "get", "lock").await;
    let beat_before = store_requests(&b, "get", "heartbeat").await;
    // Two and a half lease ttls of commits, each read at the follower: a
    // lock cached for one ttl would be read twice, and a standby polling
    // the holder's heartbeat every ttl/3 would read it seven times.
    let until = Instant::now() + Duration::from_millis(7_500);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        insert(&a, &format!("note {n}")).await;
        let reply = bodies(&b, &[]).await;
        assert_eq!(reply.role.as_deref(), Some("follower"));
        assert_eq!(rows(&reply).len(), n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then a quiet lease ttl and more: no commit brings a renewal, the
    // holder pushes each renewal by itself.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    assert_eq!(bodies(&b, &[]).await.role.as_deref(), Some("follower"));
    let lock_reads = store_requests(&b, "get", "lock").await - lock_before;
    let beat_reads = store_requests(&b, "get", "heartbeat").await - beat_before;
    // The standby's own rereads (every 30 heartbeat polls, or when the
    // holder's heartbeat is late on a loaded machine) may add one or two;
    // routing that reads the lock once per ttl made five.
    assert!(
        lock_reads <= 2,
        "the follower read the lock {lock_reads} times in 7.5 s of pushes and 4 s without commits"
    );
    // Each push carries the holder's current heartbeat: a renewal is
    // known as soon as the next commit arrives. One or two reads remain
    // for a renewal no commit followed in time on a loaded machine.
    assert!(
        beat_reads <= 2,
        "the follower read the holder's heartbeat {beat_reads} times in 7.5 s of pushes and 4 s without commits"
    );
}

/// The ways of naming a file to ATTACH that the authorizer is given no
/// literal file name for, and the literal URI (as tests/serve/sandbox.rs
/// tries them on a holder).
fn attach_spellings(path: &std::path::Path) -> Vec<(&'static str, String, Value)> {
    let text = path.display().to_string();
    let (head, tail) = text.split_at(text.len() / 2);
    let codes: Vec<String> = text
        .chars()
        .collect::<Vec<_>>()
        .chunks(16)
        .map(|chunk| {
            let codes: Vec<String> = chunk.iter().map(|c| (*c as u32).to_string()).collect();
            format!("char({})", codes.join(","))
        })
        .collect();
    let uri = format!("file:{text}?mode=rwc");
    vec![
        ("parameter", "ATTACH ? AS e".into(), json!([text])),
        (
            "concatenation",
            format!("ATTACH '{head}' || '{tail}' AS e"),
            json!([]),
        ),
        (
            "char()",
            format!("ATTACH {} AS e", codes.join(" || ")),
            json!([]),
        ),
        ("URI parameter", "ATTACH ? AS e".into(), json!([uri])),
        ("URI literal", format!("ATTACH '{uri}' AS e"), json!([])),
        (
            "named parameter",
            "ATTACH :f AS e".into(),
            json!({":f": text}),
        ),
    ]
}

/// The database files under `dir`, recursively.
fn sqlite_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(sqlite_files(&path));
        } else if path.extension().is_some_and(|e| e == "sqlite3") {
            found.push(path);
        }
    }
    found
}

/// A follower's connection refuses ATTACH in every spelling, through
/// `/sql` read_only and through a Hrana pipeline, aimed at the holder's
/// working copy, at the follower's own replica and at a new file: no file
/// is created, nothing stays attached, and both keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_connection_refuses_attach_in_every_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let setup = slow(Setup::file_store(dir.path()));
    let (a, b) = two_machines(&setup).await;
    insert(&a, "mine").await;
    assert_eq!(bodies(&b, &[]).await.role.as_deref(), Some("follower"));
    let local = dir.path().join("local");
    let replica = sqlite_files(&local.join("b"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains("followers"))
        .expect("b keeps a replica");
    let working = sqlite_files(&local.join("a"))
        .into_iter()
        .next()
        .expect("a keeps a working copy");
    let fresh = dir.path().join("escape.sqlite3");
    for target in [&working, &replica, &fresh] {
        for (spelling, attach, params) in attach_spellings(target) {
            let what = format!("{spelling} at {}", target.display());
            let statements = json!([{"sql": attach, "params": params}, {"sql": "SELECT name FROM e.sqlite_master"}]);
            let reply = sql(&b, statements, true, &[]).await;
            assert_eq!(reply.status, 403, "/sql {what}: {}", reply.json);
            assert_eq!(reply.role.as_deref(), Some("follower"), "/sql {what}");
            assert_eq!(reply.json["statement"], 0, "/sql {what}: {}", reply.json);
            assert!(
                reply.json["error"].as_str().unwrap().contains("ATTACH"),
                "/sql {what}: {}",
                reply.json
            );
            // Hrana: an ATTACH alone does not look like a read and goes to
            // the holder; behind a read in a `sequence` it reaches the
            // follower's connection (literal spellings: a sequence has no
            // parameters).
            let attach_step = json!({"type": "execute", "stmt": {"sql": attach, "args": hrana_args(&params), "named_args": hrana_named(&params)}});
            let body = json!({"baton": null, "requests": [attach_step, {"type": "close"}]});
            let (reply, _) = hrana(&b, "v3/pipeline", body, &[]).await;
            assert!(
                reply.role.as_deref() != Some("follower")
                    || reply.json["results"][0]["type"] == "error",
                "Hrana execute {what}: {}",
                reply.json
            );
            if params.as_array().is_some_and(|p| p.is_empty()) {
                let body = json!({"baton": null, "requests": [
                    {"type": "sequence", "sql": format!("SELECT 1; {attach}")},
                    execute("SELECT name FROM e.sqlite_master"),
                    {"type": "close"}]});
                let (held, _) = hrana(&a, "v3/pipeline", body.clone(), &[]).await;
                let (reply, _) = hrana(&b, "v3/pipeline", body, &[]).await;
                assert_eq!(reply.status, 200, "Hrana {what}: {}", reply.json);
                assert_eq!(
                    reply.role.as_deref(),
                    Some("follower"),
                    "Hrana {what}: {}",
                    reply.json
                );
                for step in [0, 1] {
                    assert_eq!(
                        reply.json["results"][step]["type"], "error",
                        "Hrana sequence {what}, request {step}: {}",
                        reply.json
                    );
                }
                // Refused by the authorizer, in the holder's words.
                assert_eq!(
                    reply.json["results"][0]["error"]["code"], "SQLITE_AUTH",
                    "Hrana sequence {what}: {}",
                    reply.json
                );
                assert!(
                    reply.json["results"][0]["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("ATTACH")),
                    "Hrana sequence {what}: the refusal names its rule: {}",
                    reply.json
                );
                assert_eq!(
                    reply.json["results"][0], held.json["results"][0],
                    "Hrana sequence {what}: the holder answers otherwise"
                );
            }
            assert!(!fresh.exists(), "{what} created {}", fresh.display());
            // Nothing stays attached for the next read.
            let reply = sql(
                &b,
                json!([{"sql": "SELECT name FROM e.sqlite_master"}]),
                true,
                &[],
            )
            .await;
            assert_eq!(reply.status, 400, "{what}: still attached: {}", reply.json);
        }
    }
    assert_eq!(rows(&bodies(&b, &[]).await), ["mine"]);
    insert(&a, "more").await;
    assert_eq!(rows(&bodies(&b, &[]).await), ["mine", "more"]);
}

/// Hrana's positional `args` for a `/sql` params array.
fn hrana_args(params: &Value) -> Value {
    match params.as_array() {
        Some(list) => Value::Array(
            list.iter()
                .map(|p| json!({"type": "text", "value": p}))
                .collect(),
        ),
        None => json!([]),
    }
}

/// Hrana's `named_args` for a `/sql` params object.
fn hrana_named(params: &Value) -> Value {
    match params.as_object() {
        Some(map) => Value::Array(
            map.iter()
                .map(|(name, p)| json!({"name": name, "value": {"type": "text", "value": p}}))
                .collect(),
        ),
        None => json!([]),
    }
}
