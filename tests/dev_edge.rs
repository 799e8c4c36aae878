//! The dev edge and supervisor against stand-in machines: a small Python
//! HTTP server (the child command is configurable) that answers
//! `/to/<id>/...` with `fly-replay: instance=<id>` unless it is `<id>`,
//! `/fallback/<id>/<timeout>[/again]` with a replay that asks for a
//! fallback (and, as the fallback request, with another replay when the
//! path ends in `again`), and `/loop` with `fly-replay: elsewhere=true`. This pins the edge's replay
//! semantics without depending on `tenantd serve`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tenantd_dev::{Cluster, DevConfig, LogSink, MachineState};

const STAND_IN: &str = r#"
import http.server, json, os
ID = os.environ["FLY_MACHINE_ID"]
HOST, PORT = os.environ["TENANTD_LISTEN"].rsplit(":", 1)

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def any(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        parts = self.path.strip("/").split("/")
        if self.path == "/healthz":
            return self.reply({})
        if parts[0] == "to" and parts[1] != ID:
            return self.reply({"replayed_by": ID}, {"fly-replay": "instance=%s;state=s1" % parts[1]})
        if parts[0] == "fallback":
            failed = self.headers.get("fly-replay-failed")
            if failed is None and parts[1] != ID:
                return self.reply({"replayed_by": ID}, {"fly-replay": "instance=%s;timeout=%s;fallback=prefer_self" % (parts[1], parts[2])})
            if failed is not None and parts[-1] == "again":
                return self.reply({}, {"fly-replay": "elsewhere=true"})
            return self.reply({"machine_id": ID, "failed": failed, "src": self.headers.get("fly-replay-src")})
        if parts[0] == "loop":
            return self.reply({}, {"fly-replay": "elsewhere=true"})
        self.reply({"machine_id": ID, "method": self.command, "body": body.decode(),
                    "src": self.headers.get("fly-replay-src"),
                    "customer": os.environ.get("CUSTOMER_ID")})
    do_GET = do_POST = do_PUT = any
    def reply(self, obj, headers={}):
        data = json.dumps(obj).encode()
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

http.server.ThreadingHTTPServer((HOST, int(PORT)), H).serve_forever()
"#;

fn config(dir: &Path, machines: usize) -> DevConfig {
    let script = dir.join("stand_in.py");
    std::fs::write(&script, STAND_IN).unwrap();
    let mut cfg = DevConfig::new("python3", dir);
    cfg.program_args = vec!["-u".into(), script.display().to_string()];
    cfg.customers = vec!["a".into()];
    cfg.machines_per_customer = machines;
    cfg.restart_delay = Some(Duration::from_millis(500));
    cfg.kill_timeout = Duration::from_secs(2);
    cfg.log_sink = LogSink::Stdout;
    cfg.ip_base = std::net::Ipv4Addr::new(
        127,
        rand::random_range(1..=250),
        rand::random_range(0..=250),
        2,
    );
    cfg
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn wait_state(cluster: &Cluster, id: &str, state: MachineState, restarts: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = cluster.machines().into_iter().find(|m| m.id == id).unwrap();
        if m.state == state && m.restarts >= restarts {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never {state:?}: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_edge_replays_auto_starts_and_bounds_hops() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(config(dir.path(), 3)).await.unwrap();
    let ids: Vec<String> = cluster.machines().into_iter().map(|m| m.id).collect();
    let base = cluster.edge_url();
    let http = client();
    let target = &ids[2];

    // The original request (method, body) is replayed to the named machine,
    // with fly-replay-src naming the sender and echoing the state.
    let mut replayed = 0;
    for _ in 0..20 {
        let resp = http
            .post(format!("{base}/to/{target}/x?q=1"))
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let hops = resp.headers()["x-tenantd-edge-hops"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(resp.headers()["fly-machine-id"], target.as_str());
        let json: Value = resp.json().await.unwrap();
        assert_eq!(json["machine_id"], target.as_str());
        assert_eq!(json["method"], "POST");
        assert_eq!(json["body"], "hello");
        assert_eq!(json["customer"], "a");
        if hops == "1" {
            replayed += 1;
            let src = json["src"].as_str().unwrap();
            let fields: Vec<&str> = src.split(';').collect();
            assert!(
                fields[0].starts_with("instance=") && fields[0] != format!("instance={target}"),
                "{src}"
            );
            assert_eq!(fields[1], "region=dev");
            assert!(
                fields[2].starts_with("t=") && fields[2][2..].parse::<u128>().is_ok(),
                "{src}"
            );
            assert_eq!(fields[3], "state=s1");
        } else {
            assert_eq!(hops, "0");
            assert!(
                json["src"].is_null(),
                "a first delivery carries no fly-replay-src"
            );
        }
    }
    assert!(replayed > 0, "the edge never picked another machine first");

    // Endless replays are cut off.
    let resp = http.get(format!("{base}/loop")).send().await.unwrap();
    assert_eq!(resp.status(), 508);
    assert!(resp.text().await.unwrap().contains("fly-replay hops"));

    // A replay to a machine that does not exist.
    let resp = http
        .get(format!("{base}/to/00000000000000/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("replay target gone"));

    // Bodies over 1 MB cannot be replayed.
    let resp = http
        .post(format!("{base}/to/{target}/x"))
        .body(vec![b'x'; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // A stopped machine is started by a replay that names it.
    cluster.stop(target).unwrap();
    wait_state(&cluster, target, MachineState::Stopped, 0).await;
    let resp = http
        .get(format!("{base}/to/{target}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["fly-machine-id"], target.as_str());
    wait_state(&cluster, target, MachineState::Started, 0).await;

    // Killed: restarting, then back (same id and address) after the delay.
    let before = cluster
        .machines()
        .into_iter()
        .find(|m| &m.id == target)
        .unwrap();
    cluster.kill(target).unwrap();
    wait_state(&cluster, target, MachineState::Restarting, 0).await;
    wait_state(&cluster, target, MachineState::Started, 1).await;
    let after = cluster
        .machines()
        .into_iter()
        .find(|m| &m.id == target)
        .unwrap();
    assert_eq!(after.address, before.address);
    assert_ne!(after.pid, before.pid);

    // Paused machines get no new load-balanced requests; resumed ones do.
    cluster.pause(&ids[0]).unwrap();
    assert_eq!(cluster.machines()[0].state, MachineState::Paused);
    for _ in 0..10 {
        let resp = http
            .get(format!("{base}/to/{}/x", ids[1]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["fly-machine-id"], ids[1].as_str());
    }
    cluster.resume(&ids[0]).unwrap();
    let resp = http
        .get(format!("{base}/to/{}/x", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["fly-machine-id"], ids[0].as_str());

    // Scaling creates and destroys machines.
    cluster.scale(Some("a"), 5).await.unwrap();
    assert_eq!(cluster.machines().len(), 5);
    assert!(
        cluster
            .machines()
            .iter()
            .all(|m| m.state == MachineState::Started)
    );
    cluster.scale(Some("a"), 1).await.unwrap();
    assert_eq!(cluster.machines().len(), 1);

    let pids: Vec<u32> = cluster.machines().iter().filter_map(|m| m.pid).collect();
    cluster.shutdown().await;
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
            "{pid} survived shutdown"
        );
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_edge_auto_stop_and_auto_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.auto_stop = Some(Duration::from_millis(500));
    let cluster = Cluster::start(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster
        .machines()
        .iter()
        .all(|m| m.state == MachineState::Stopped)
    {
        assert!(
            Instant::now() < deadline,
            "idle machines not stopped: {:?}",
            cluster.machines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With every machine stopped, a request starts one.
    let resp = client()
        .get(format!("{}/hello", cluster.edge_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: Value = resp.json().await.unwrap();
    let id = json["machine_id"].as_str().unwrap();
    let m = cluster.machines().into_iter().find(|m| m.id == id).unwrap();
    assert!(matches!(
        m.state,
        MachineState::Started | MachineState::Stopping | MachineState::Stopped
    ));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_edge_returns_a_failed_replay_to_its_sender_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(config(dir.path(), 3)).await.unwrap();
    let ids: Vec<String> = cluster.machines().into_iter().map(|m| m.id).collect();
    let base = cluster.edge_url();
    let http = client();

    // A destroyed target: the sender gets the request back.
    let gone = &ids[2];
    cluster.destroy(gone).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.machines().iter().any(|m| &m.id == gone) {
        assert!(Instant::now() < deadline, "{gone} not destroyed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = http
        .get(format!("{base}/fallback/{gone}/2s"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: Value = resp.json().await.unwrap();
    let sender = json["machine_id"].as_str().unwrap();
    let failed = json["failed"].as_str().unwrap_or_else(|| panic!("{json}"));
    for field in [
        format!("instance={gone}"),
        format!("replay_source={sender}"),
        "reason=no_candidate".to_string(),
        "app=".to_string(),
        "elapsed_ms=".to_string(),
    ] {
        assert!(failed.contains(&field), "{field} not in {failed}");
    }
    assert!(json["src"].is_null(), "{json}");

    // A fallback request may not replay again.
    let resp = http
        .get(format!("{base}/fallback/{gone}/2s/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("fallback request"));

    // A target that is not started within the replay's timeout (a stopped
    // machine takes far longer than 1 ms to start).
    let stopped = &ids[1];
    cluster.stop(stopped).unwrap();
    wait_state(&cluster, stopped, MachineState::Stopped, 0).await;
    let resp = http
        .get(format!("{base}/fallback/{stopped}/1ms"))
        .header("fly-force-instance-id", &ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["machine_id"], ids[0].as_str());
    let failed = json["failed"].as_str().unwrap_or_else(|| panic!("{json}"));
    assert!(failed.contains("reason=timeout"), "{failed}");

    // Clients cannot forge the header.
    let resp = http
        .get(format!("{base}/fallback/{}/2s", ids[0]))
        .header("fly-force-instance-id", &ids[0])
        .header("fly-replay-failed", "forged")
        .send()
        .await
        .unwrap();
    let json: Value = resp.json().await.unwrap();
    assert!(json["failed"].is_null(), "{json}");
    cluster.shutdown().await;
}
