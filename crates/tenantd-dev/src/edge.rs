//! The edge proxy, standing in for Fly Proxy: every request goes to a random
//! started machine of the app (all machines, whatever their customer: Fly
//! Proxy does not know process groups or metadata), and a `fly-replay`
//! answer makes the edge replay the original request (method, path, headers,
//! body up to 1 MB) where it says, with a `fly-replay-src` header.
//!
//! What it keeps:
//! - A request is sent to at most `max_hops + 1` machines; past that the
//!   client gets 508 with a body naming the chain.
//! - A request is retried only when no connection was made (like Fly: a
//!   replay that reached a machine counts as delivered), so a write is never
//!   applied twice by the edge.
//! - A replay to a stopped machine starts it first (auto-start); a replay to
//!   a machine that is restarting waits for it up to `replay_timeout`, then
//!   the client gets 502/503 with a clear body.
//!
//! A replay with `fallback=prefer_self` (or `force_self`) whose target
//! cannot be reached (destroyed, or not started within the replay's
//! `timeout=`) goes back to the machine that sent it, with a
//! `fly-replay-failed: instance=..;app=..;region=..;replay_source=..;reason=..;elapsed_ms=..`
//! header; such a fallback request may not replay again (502).
//!
//! A client may name the first machine with Fly's `fly-force-instance-id`
//! or `fly-prefer-instance-id` request headers.
//!
//! Responses carry `x-tenantd-edge-hops` (replays followed) and
//! `fly-machine-id` (the machine that answered).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Serialize;

use super::DevConfig;
use super::dns::REGION;
use super::supervisor::{MachineError, Supervisor};

/// Fly Proxy cannot replay bodies over 1 MB.
pub const MAX_REPLAY_BODY: usize = 1024 * 1024;

/// Counters, for `tenantd dev` users and the benchmark.
#[derive(Debug, Default, Serialize, Clone, PartialEq, Eq)]
pub struct EdgeStats {
    pub requests: u64,
    pub replays: u64,
    pub responses_5xx_from_edge: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    replays: AtomicU64,
    edge_errors: AtomicU64,
}

pub struct Edge {
    sup: Arc<Supervisor>,
    http: reqwest::Client,
    app: String,
    max_hops: usize,
    replay_timeout: Duration,
    counters: Counters,
}

/// Where a replay points.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    pub instance: Option<String>,
    pub prefer_instance: Option<String>,
    pub app: Option<String>,
    pub elsewhere: bool,
    pub state: Option<String>,
    /// How long to try the target (`timeout=10s`, `800ms`).
    pub timeout: Option<Duration>,
    /// `fallback=prefer_self|force_self`: when the target cannot be reached,
    /// the request goes back to the sender with `fly-replay-failed`.
    pub fallback: Option<String>,
}

/// Parses a `fly-replay` value: `key=value` fields separated by `;` (or `,`,
/// which some Fly docs use).
pub fn parse_fly_replay(value: &str) -> Replay {
    let mut replay = Replay::default();
    for field in value.split([';', ',']) {
        let Some((k, v)) = field.trim().split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "instance" => replay.instance = Some(v),
            "prefer_instance" => replay.prefer_instance = Some(v),
            "app" => replay.app = Some(v),
            "elsewhere" => replay.elsewhere = v == "true",
            "state" => replay.state = Some(v),
            "timeout" => replay.timeout = humantime::parse_duration(&v).ok(),
            "fallback" => replay.fallback = Some(v),
            _ => {}
        }
    }
    replay
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

impl Edge {
    pub fn new(sup: Arc<Supervisor>, cfg: &DevConfig) -> Arc<Edge> {
        Arc::new(Edge {
            sup,
            http: reqwest::Client::builder()
                .no_proxy()
                .pool_idle_timeout(Duration::from_secs(30))
                .timeout(cfg.request_timeout)
                .build()
                .expect("HTTP client builds"),
            app: cfg.app_name.clone(),
            max_hops: cfg.max_hops,
            replay_timeout: cfg.replay_timeout,
            counters: Counters::default(),
        })
    }

    pub fn stats(&self) -> EdgeStats {
        EdgeStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            replays: self.counters.replays.load(Ordering::Relaxed),
            responses_5xx_from_edge: self.counters.edge_errors.load(Ordering::Relaxed),
        }
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(self.clone())
    }

    fn error(&self, status: StatusCode, body: String) -> Response {
        self.counters.edge_errors.fetch_add(1, Ordering::Relaxed);
        let mut resp = (status, format!("tenantd dev edge: {body}\n")).into_response();
        resp.headers_mut()
            .insert("x-tenantd-edge-error", HeaderValue::from_static("1"));
        resp
    }

    async fn proxy(&self, client: SocketAddr, req: Request) -> Response {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let body = match axum::body::to_bytes(body, MAX_REPLAY_BODY).await {
            Ok(b) => b,
            Err(_) => {
                return self.error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request bodies over 1 MB cannot be replayed (Fly's fly-replay limit)".into(),
                );
            }
        };
        let mut headers = parts.headers.clone();
        for h in HOP_BY_HOP {
            headers.remove(h);
        }
        // Fly Proxy sets these; a client cannot forge the replay source.
        headers.remove("fly-replay-src");
        headers.remove("fly-replay-failed");
        let client_ip = client.ip().to_canonical().to_string();
        headers.insert("fly-client-ip", hv(&client_ip));
        headers.insert("x-forwarded-for", hv(&client_ip));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        headers.insert("fly-region", HeaderValue::from_static(REGION));
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());

        let mut chain: Vec<String> = Vec::new();
        let mut exclude: Vec<String> = Vec::new();
        // None: load balance; Some(id): the machine a replay named.
        // Fly's request headers that pick the first machine: forced (no
        // fallback) or preferred (any machine if that one is unavailable).
        let mut target: Option<(String, bool)> =
            header_str(&parts.headers, "fly-force-instance-id")
                .map(|id| (id, false))
                .or_else(|| {
                    header_str(&parts.headers, "fly-prefer-instance-id").map(|id| (id, true))
                });
        let mut replay_src: Option<String> = None;
        let mut connect_failures = 0usize;
        // How long to wait for the current replay target to be reachable.
        let mut target_wait = self.replay_timeout;
        // Set while following a replay that asked for a fallback: the
        // sender, and when the replay began.
        let mut fallback: Option<(String, std::time::Instant)> = None;
        // The request in flight is a fallback request: it may not replay.
        let mut fallback_sent = false;
        loop {
            let (id, addr) = match &target {
                None => match self.sup.pick(&exclude, self.replay_timeout).await {
                    Ok(m) => m,
                    Err(e) => return self.error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                },
                Some((id, preferred)) => match self.sup.reachable(id, target_wait).await {
                    Ok(addr) => (id.clone(), addr),
                    Err(_) if *preferred => {
                        target = None;
                        continue;
                    }
                    // No connection was made: back to the sender.
                    Err(e) if fallback.is_some() => {
                        let (sender, began) = fallback.take().expect("checked");
                        let reason = match e {
                            MachineError::NotFound(_) => "no_candidate",
                            _ => "timeout",
                        };
                        let failed = format!(
                            "instance={id};app={};region={REGION};replay_source={sender};reason={reason};elapsed_ms={}",
                            self.app,
                            began.elapsed().as_millis()
                        );
                        headers.insert("fly-replay-failed", hv(&failed));
                        replay_src = None;
                        fallback_sent = true;
                        target_wait = self.replay_timeout;
                        target = Some((sender, false));
                        continue;
                    }
                    Err(e @ MachineError::NotFound(_)) => {
                        return self.error(
                            StatusCode::BAD_GATEWAY,
                            format!("replay target gone: {e} (chain: {})", chain.join(" -> ")),
                        );
                    }
                    Err(e) => {
                        return self.error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "replay target unavailable: {e} (chain: {})",
                                chain.join(" -> ")
                            ),
                        );
                    }
                },
            };
            let mut h = headers.clone();
            if let Some(src) = &replay_src {
                h.insert("fly-replay-src", hv(src));
            }
            let url = format!("http://{addr}{path}");
            let guard = self.sup.begin_request(&id);
            let sent = self
                .http
                .request(parts.method.clone(), &url)
                .headers(h)
                .body(body.clone())
                .send()
                .await;
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) if e.is_connect() => {
                    // Nothing reached the machine: safe to try again, like
                    // Fly Proxy does, within the same bounds as replays.
                    drop(guard);
                    connect_failures += 1;
                    if connect_failures > 20 {
                        return self.error(
                            StatusCode::BAD_GATEWAY,
                            format!("could not connect to machine {id} at {addr}: {e}"),
                        );
                    }
                    if target.is_none() {
                        exclude.push(id);
                    }
                    tokio::time::sleep(Duration::from_millis(50 * connect_failures as u64)).await;
                    continue;
                }
                Err(e) => {
                    return self.error(
                        StatusCode::BAD_GATEWAY,
                        format!("machine {id} at {addr} failed mid-request: {e}"),
                    );
                }
            };
            chain.push(id.clone());
            let replay = resp
                .headers()
                .get("fly-replay")
                .and_then(|v| v.to_str().ok())
                .map(parse_fly_replay);
            let Some(replay) = replay else {
                let status = resp.status();
                let resp_headers = resp.headers().clone();
                let body = match resp.bytes().await {
                    Ok(b) => b,
                    Err(e) => {
                        return self.error(
                            StatusCode::BAD_GATEWAY,
                            format!("machine {id} failed while sending its response: {e}"),
                        );
                    }
                };
                drop(guard);
                return respond(status, resp_headers, body, &id, chain.len() - 1);
            };
            drop(guard);
            if fallback_sent {
                return self.error(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "machine {id} answered a fallback request (fly-replay-failed) with another fly-replay, which Fly Proxy does not follow (chain: {})",
                        chain.join(" -> ")
                    ),
                );
            }
            self.counters.replays.fetch_add(1, Ordering::Relaxed);
            if chain.len() > self.max_hops {
                return self.error(
                    StatusCode::LOOP_DETECTED,
                    format!(
                        "more than {} fly-replay hops (chain: {})",
                        self.max_hops,
                        chain.join(" -> ")
                    ),
                );
            }
            if let Some(app) = &replay.app
                && app != &self.app
            {
                return self.error(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "machine {id} replayed to app {app:?}; only {:?} runs here",
                        self.app
                    ),
                );
            }
            let micros = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros();
            let mut src = format!("instance={id};region={REGION};t={micros}");
            if let Some(state) = &replay.state {
                src.push_str(&format!(";state={state}"));
            }
            replay_src = Some(src);
            exclude.clear();
            if replay.elsewhere {
                exclude.push(id.clone());
            }
            target_wait = replay.timeout.unwrap_or(self.replay_timeout);
            fallback = replay
                .fallback
                .as_deref()
                .filter(|f| matches!(*f, "prefer_self" | "force_self"))
                .map(|_| (id.clone(), std::time::Instant::now()));
            target = match (replay.instance, replay.prefer_instance) {
                (Some(instance), _) => Some((instance, false)),
                (None, Some(preferred)) => Some((preferred, true)),
                (None, None) => None,
            };
        }
    }
}

async fn handle(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    edge.proxy(client, req).await
}

fn respond(status: StatusCode, headers: HeaderMap, body: Bytes, id: &str, hops: usize) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    for (name, value) in headers.iter() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp.headers_mut().insert(
        HeaderName::from_static("x-tenantd-edge-hops"),
        hv(&hops.to_string()),
    );
    resp.headers_mut()
        .insert(HeaderName::from_static("fly-machine-id"), hv(id));
    resp
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replay_headers_in_both_separators() {
        let r = parse_fly_replay("instance=3f8a0c2e1b7d44;state=abc");
        assert_eq!(r.instance.as_deref(), Some("3f8a0c2e1b7d44"));
        assert_eq!(r.state.as_deref(), Some("abc"));
        let r = parse_fly_replay("elsewhere=true, app=\"x\"");
        assert!(r.elsewhere);
        assert_eq!(r.app.as_deref(), Some("x"));
        assert_eq!(parse_fly_replay("garbage"), Replay::default());
    }
}
