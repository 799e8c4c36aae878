//! Test harness: real `tenantd serve` processes on 127.0.0.1, real signals,
//! and a client that follows `fly-replay` the way Fly Proxy does.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tenantd");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `tenantd serve` process.
pub struct Machine {
    pub id: String,
    pub addr: SocketAddr,
    pub child: Option<Child>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    log: PathBuf,
}

/// What every machine of a test shares.
#[derive(Clone)]
pub struct Setup {
    pub store: String,
    pub root: PathBuf,
    pub ttl: String,
    pub env: Vec<(String, String)>,
    /// The S3 store the machines use, for reading objects back; `None` for
    /// the file store (read straight from disk).
    pub s3: Option<tenantd_core::store::DynStore>,
}

impl Setup {
    pub fn file_store(dir: &Path) -> Setup {
        Setup {
            store: format!("file://{}", dir.join("store").display()),
            root: dir.to_path_buf(),
            ttl: "1500ms".into(),
            env: vec![],
            s3: None,
        }
    }

    /// Machines on a fresh bucket of the moto S3 server.
    pub async fn s3(dir: &Path) -> Setup {
        let (store, bucket) = crate::support::s3_store().await;
        Setup {
            store: format!("s3://{bucket}"),
            root: dir.to_path_buf(),
            ttl: "1500ms".into(),
            env: crate::support::s3_env(),
            s3: Some(store),
        }
    }

    /// The bytes of an object, from whichever store the machines use.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        match &self.s3 {
            None => std::fs::read(self.root.join("store").join(key)).ok(),
            Some(store) => {
                let store = store.clone();
                let key = key.to_string();
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(async move {
                        store.get(&key).await.unwrap().map(|o| o.body.to_vec())
                    })
                })
            }
        }
    }

    pub fn machine(&self, id: &str, customer: Option<&str>, extra: &[&str]) -> Machine {
        let mut m = self.machine_starting(id, customer, extra);
        m.wait_healthy();
        m
    }

    /// A machine whose process is spawned but may not serve yet.
    pub fn machine_starting(&self, id: &str, customer: Option<&str>, extra: &[&str]) -> Machine {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--machine-id".into(),
            id.into(),
            "--store".into(),
            self.store.clone(),
            "--data-dir".into(),
            self.root.join("local").display().to_string(),
            "--lease-ttl".into(),
            self.ttl.clone(),
        ];
        if let Some(c) = customer {
            args.push("--customer-id".into());
            args.push(c.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut m = Machine {
            id: id.into(),
            addr,
            child: None,
            args,
            env: self.env.clone(),
            log: self.root.join(format!("{id}.log")),
        };
        m.spawn();
        m
    }

    /// Runs `tenantd tenants <args>` on this setup's store, as an operator
    /// would: (exit code, stdout, stderr).
    pub fn tenants(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(BIN)
            .arg("tenants")
            .args(args)
            .arg("--store")
            .arg(&self.store)
            .envs(self.env.iter().cloned())
            .env_remove("BUCKET_NAME")
            .env_remove("TENANTD_STORE")
            .output()
            .expect("run tenantd tenants");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Creates the tenants with `tenantd tenants create`.
    pub fn create_tenants(&self, ids: &[&str]) {
        let mut args = vec!["create"];
        args.extend_from_slice(ids);
        let (code, out, err) = self.tenants(&args);
        assert_eq!(code, 0, "tenants create failed:\n{out}\n{err}");
    }

    pub fn lock(&self, customer: &str) -> Option<Value> {
        self.object(&format!("customer/{customer}/machine.lock"))
            .map(|b| serde_json::from_slice(&b).expect("lock is JSON"))
    }

    pub fn db_path(&self, customer: &str) -> PathBuf {
        self.root
            .join("store/customer")
            .join(customer)
            .join("db.sqlite3")
    }

    /// The tenant's database as the store holds it (snapshot and log),
    /// rebuilt by `tenantd restore`: what a new holder would start from.
    pub fn stored_db(&self, customer: &str) -> PathBuf {
        let copy = self.root.join(format!(
            "restored-{customer}-{}.sqlite3",
            uuid::Uuid::new_v4().simple()
        ));
        let out = Command::new(BIN)
            .args([
                "restore",
                "--store",
                &self.store,
                "--customer-id",
                customer,
                "--output",
            ])
            .arg(&copy)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("tenantd restore runs");
        assert!(
            out.status.success(),
            "tenantd restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        copy
    }

    /// The count in the stored database, rebuilt and read with SQLite.
    pub fn stored_count(&self, customer: &str) -> i64 {
        let copy = self.stored_db(customer);
        let conn = rusqlite::Connection::open_with_flags(
            &copy,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.query_row("SELECT count FROM welcome", [], |r| r.get(0))
            .unwrap()
    }
}

impl Machine {
    pub fn start(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .env("RUST_LOG", "info,tenantd=debug")
            .env_remove("CUSTOMER_ID")
            .env_remove("BUCKET_NAME")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tenantd");
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "machine {} exited at start with {status}:\n{}",
                    self.id,
                    self.logs()
                );
            }
            if let Ok(r) = blocking_get(&self.url("/healthz"))
                && r.0 == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("machine {} not healthy in 20s:\n{}", self.id, self.logs());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "machine {} did not exit within {within:?}:\n{}",
            self.id,
            self.logs()
        );
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/_status`, with the machine's admin token if it has one.
    pub fn status(&self) -> Value {
        let token = self
            .args
            .iter()
            .position(|a| a == "--admin-token")
            .map(|i| self.args[i + 1].as_str());
        let (code, body) = blocking_get_as(&self.url("/_status"), token).unwrap();
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test shows what each machine was doing (its log file
        // goes with the test's temporary folder).
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- last lines of machine {}'s log ---\n{tail}", self.id);
        }
    }
}

fn blocking_get(url: &str) -> Result<(u16, String), String> {
    blocking_get_as(url, None)
}

fn blocking_get_as(url: &str, bearer: Option<&str>) -> Result<(u16, String), String> {
    // A tiny HTTP/1.0 GET over std, so the harness needs no runtime.
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap();
    let mut stream =
        std::net::TcpStream::connect_timeout(&host.parse().unwrap(), Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("bad response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// What a client saw for one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub json: Value,
    pub hops: u32,
}

/// Sends requests to a set of machines and follows `fly-replay` like Fly
/// Proxy: `instance=<id>` goes to that machine, `elsewhere=true` to another
/// one; a machine that refuses connections is skipped (Fly Proxy does not
/// route to a stopped machine).
#[derive(Clone)]
pub struct FlyClient {
    pub machines: Arc<Mutex<BTreeMap<String, SocketAddr>>>,
    pub http: reqwest::Client,
}

impl FlyClient {
    pub fn new(machines: &[&Machine]) -> FlyClient {
        let map = machines.iter().map(|m| (m.id.clone(), m.addr)).collect();
        FlyClient {
            machines: Arc::new(Mutex::new(map)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        }
    }

    pub fn remove(&self, id: &str) {
        self.machines.lock().unwrap().remove(id);
    }

    pub fn add(&self, m: &Machine) {
        self.machines.lock().unwrap().insert(m.id.clone(), m.addr);
    }

    fn ids(&self) -> Vec<String> {
        self.machines.lock().unwrap().keys().cloned().collect()
    }

    /// Sends `method path` first to machine `first`, following replays.
    pub async fn send(
        &self,
        first: &str,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        self.send_body(first, method, path, headers, Vec::new())
            .await
    }

    /// Like `send`, with a body (replayed with the request, as Fly Proxy does).
    pub async fn send_body(
        &self,
        first: &str,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        // Fly Proxy only routes to machines that exist: a first pick that
        // has gone is replaced by any other.
        let mut target = if self.machines.lock().unwrap().contains_key(first) {
            first.to_string()
        } else {
            self.ids().into_iter().next().ok_or("no machines")?
        };
        let mut source: Option<String> = None;
        let mut excluded: Vec<String> = vec![];
        for hop in 0..8u32 {
            let addr = self.machines.lock().unwrap().get(&target).copied();
            let Some(addr) = addr else {
                return Err(format!("replay names unknown machine {target}"));
            };
            let mut req = self
                .http
                .request(method.clone(), format!("http://{addr}{path}"))
                .header("accept", "application/json")
                .body(body.clone());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(src) = &source {
                req = req.header("fly-replay-src", src);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    excluded.push(target.clone());
                    match self.ids().into_iter().find(|id| !excluded.contains(id)) {
                        Some(next) => {
                            target = next;
                            continue;
                        }
                        None => return Err(format!("no machine accepts connections: {e}")),
                    }
                }
                Err(e) => return Err(e.to_string()),
            };
            if let Some(replay) = resp
                .headers()
                .get("fly-replay")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
            {
                let fields: BTreeMap<String, String> = replay
                    .split([';', ','])
                    .filter_map(|p| {
                        p.split_once('=')
                            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    })
                    .collect();
                let state = fields.get("state").cloned().unwrap_or_default();
                source = Some(format!("instance={target};region=test;t=0;state={state}"));
                if let Some(instance) = fields.get("instance") {
                    target = instance.clone();
                } else if fields.get("elsewhere").map(String::as_str) == Some("true") {
                    let from = target.clone();
                    target = self
                        .ids()
                        .into_iter()
                        .find(|id| *id != from && !excluded.contains(id))
                        .ok_or("no other machine")?;
                } else {
                    return Err(format!("unparsable fly-replay {replay:?}"));
                }
                continue;
            }
            let status = resp.status().as_u16();
            let json = resp.json::<Value>().await.unwrap_or(Value::Null);
            return Ok(Reply {
                status,
                json,
                hops: hop,
            });
        }
        Err("too many replays".into())
    }

    pub async fn increment(&self, first: &str, customer: &str) -> Result<Reply, String> {
        self.send(
            first,
            reqwest::Method::POST,
            &format!("/customers/{customer}/increment"),
            &[],
        )
        .await
    }
}

/// Waits until `f` returns Some, polling every 50 ms, or panics after `within`.
pub async fn eventually<T>(
    within: Duration,
    what: &str,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
