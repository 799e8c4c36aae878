//! Readers and followers in the service simulation. Every machine keeps
//! the same `Followers` as `tenantd serve` (replicas, pushes, ReadIndex);
//! what serve sends over HTTP goes here through [`SimPeers`], in process
//! over the simulated network: a crashed or stopped machine neither sends
//! nor answers, a partitioned one is unreachable, a paused one's messages
//! arrive late.
//!
//! Writers record each write's op next to the count (`sim_ops`) and hand
//! the bookmark of their answer to a paired reader. Readers go to any
//! machine, as Fly Proxy would pick one, and are routed on the way the
//! SQL route does: a follower answers from its replica, or the request
//! goes to the holder. Each read returns the count with the op of the
//! last write it shows, which the read checker looks up in the durable
//! history.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value as Json, json};
use tokio::time::Instant;

use super::{ATTEMPT_TIMEOUT, AtHolder, Attempt, Incarnation, World, through_proxy};
use tenantd_chaos::read_checker::{Asked, Read, ReadOutcome};
use tenantd_core::TenantId;
use tenantd_core::lease::LockRecord;
use tenantd_core::tenant::actor::ConfirmedSlot;
use tenantd_core::tenant::follower::bookmark::Wanted;
use tenantd_core::tenant::follower::transport::Peers;
use tenantd_core::tenant::follower::{FollowError, ReadRoute};
use tenantd_core::tenant::sql::SqlRequest;
use tenantd_core::tenant::{Route, TenantError, TenantHandle};

/// How long a holder waits for a bookmark it has not confirmed yet (as
/// the SQL route does).
const BOOKMARK_WAIT: Duration = Duration::from_secs(2);

/// The machines' private network, from one incarnation's side.
pub(super) struct SimPeers {
    pub world: Weak<World>,
    pub index: usize,
    pub n: u64,
}

impl SimPeers {
    /// Carries a message from this incarnation to machine `to`: the
    /// receiving incarnation, once it arrived; an error when either end is
    /// down or cut off.
    async fn hop(&self, to: usize) -> Result<Incarnation, String> {
        let world = self.world.upgrade().ok_or("the simulation ended")?;
        let delay = self.reachable(&world, to)?;
        tokio::time::sleep(delay).await;
        self.reachable(&world, to)?;
        world
            .incarnation(to)
            .ok_or_else(|| format!("machine {to} is down"))
    }

    /// The one-way delay to `to` now, if both ends are up and connected.
    fn reachable(&self, world: &World, to: usize) -> Result<Duration, String> {
        let from = world
            .incarnation(self.index)
            .filter(|up| up.n == self.n)
            .ok_or("this machine is down")?;
        let to = world
            .incarnation(to)
            .ok_or_else(|| format!("machine {to} is down"))?;
        let (a, b) = (from.faults.get(), to.faults.get());
        if a.partitioned || b.partitioned {
            return Err("partitioned".into());
        }
        Ok(a.latency.max(b.latency))
    }

    /// Back from `to` after it answered.
    async fn back(&self, to: usize) -> Result<(), String> {
        let world = self.world.upgrade().ok_or("the simulation ended")?;
        let delay = self.reachable(&world, to)?;
        tokio::time::sleep(delay).await;
        self.reachable(&world, to).map(|_| ())
    }
}

#[async_trait]
impl Peers for SimPeers {
    async fn position(
        &self,
        id: &TenantId,
        holder: &LockRecord,
        follower: &str,
    ) -> Result<u64, String> {
        let world = self.world.upgrade().ok_or("the simulation ended")?;
        let to = world
            .index_of(&holder.holder)
            .ok_or_else(|| format!("no machine {}", holder.holder))?;
        let at = self.hop(to).await?;
        let handle = at
            .registry
            .local(id)
            .ok_or_else(|| format!("{} does not hold {id}", holder.holder))?;
        let (confirmed, _) = at
            .followers
            .answer_position(id, &handle, Some(follower))
            .await
            .map_err(|e| e.to_string())?;
        self.back(to).await?;
        Ok(confirmed)
    }

    fn pushes(&self) -> bool {
        true
    }

    async fn push(&self, id: &TenantId, addr: &str, slot: &ConfirmedSlot) -> Result<(), String> {
        let world = self.world.upgrade().ok_or("the simulation ended")?;
        let machine = addr.split(':').next().unwrap_or(addr);
        let to = world
            .index_of(machine)
            .ok_or_else(|| format!("no machine {addr}"))?;
        let at = self.hop(to).await?;
        at.followers
            .accept(id, &slot.metadata, slot.body.clone())
            .await
            .map(|_| ())
    }
}

fn request(body: Json) -> Arc<SqlRequest> {
    let bytes = serde_json::to_vec(&body).expect("JSON");
    Arc::new(SqlRequest::parse(&bytes, &Default::default()).expect("a valid SQL request"))
}

/// Creates the table of ops in every tenant before any client starts.
pub(super) async fn set_up(world: &World, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e7);
    let create = request(json!({"statements": [
        {"sql": "CREATE TABLE IF NOT EXISTS sim_ops (op TEXT PRIMARY KEY, count INTEGER NOT NULL)"}
    ]}));
    for tenant in &world.tenants {
        for attempt in 0.. {
            let create = create.clone();
            let done = through_proxy(world, &mut rng, tenant, |handle| {
                let create = create.clone();
                async move {
                    match handle.sql(create, None).await {
                        Ok(_) => AtHolder::Done(Ok(())),
                        Err(TenantError::NotHolder) => AtHolder::NotHolder,
                        Err(e) => AtHolder::Done(Err(Attempt::Maybe(e.to_string()))),
                    }
                }
            });
            if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT_TIMEOUT, done).await {
                break;
            }
            assert!(attempt < 20, "customer {tenant}: sim_ops cannot be created");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One increment as a SQL write that records its op, with its
/// idempotency key; hands the answer's bookmark to writer `n`'s reader.
pub(super) async fn write(
    world: &World,
    rng: &mut StdRng,
    n: u64,
    tenant: &TenantId,
    key: &str,
) -> Result<(u64, u64, String), Attempt> {
    let statements = request(json!({"statements": [
        {"sql": "UPDATE welcome SET count = count + 1"},
        {"sql": format!("INSERT INTO sim_ops (op, count) SELECT '{key}', count FROM welcome")},
        {"sql": "SELECT count FROM welcome"},
    ]}));
    let ((count, epoch, bookmark), machine) = through_proxy(world, rng, tenant, |handle| {
        let statements = statements.clone();
        async move {
            match handle.sql(statements, Some(key.to_string())).await {
                Ok(answer) => match integer(&answer.results[2]["rows"][0][0]) {
                    Some(count) => AtHolder::Done(Ok((count, answer.epoch, handle.confirmed()))),
                    None => AtHolder::Done(Err(Attempt::Maybe(format!(
                        "no count in {}",
                        answer.results
                    )))),
                },
                Err(TenantError::NotHolder) => AtHolder::NotHolder,
                Err(TenantError::Sql(e)) => AtHolder::Done(Err(Attempt::NotApplied(e.message))),
                Err(TenantError::Unavailable(e) | TenantError::Corrupt(e)) => {
                    AtHolder::Done(Err(Attempt::Maybe(e)))
                }
            }
        }
    })
    .await?;
    world
        .handed
        .lock()
        .unwrap()
        .insert((n, tenant.clone()), (bookmark, count));
    Ok((count, epoch, machine))
}

fn integer(value: &Json) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|v| v.parse().ok()))
}

/// The op → count pairs in a materialized database (none without the
/// table: readers were off).
pub(super) fn recorded_ops(path: &Path) -> BTreeMap<String, u64> {
    let conn = rusqlite::Connection::open(path).expect("the stored database opens");
    let Ok(mut statement) = conn.prepare("SELECT op, count FROM sim_ops") else {
        return BTreeMap::new();
    };
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))
        .expect("sim_ops reads")
        .collect::<Result<_, _>>()
        .expect("sim_ops rows")
}

/// How reader `n` asks: with its writer's bookmark (and its own last),
/// with nothing, or with a staleness bound.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bookmark,
    Nothing,
    MaxStaleness,
    /// Both headers: at least its bookmark, and no older than the bound.
    BookmarkAndStaleness,
}

/// Reads until `until`; reader `n` is paired with writer `n`.
pub(super) async fn reader(world: Arc<World>, n: u64, seed: u64, until: Instant) -> Vec<Read> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(37).wrapping_add(n) ^ 0xbead);
    let kind = [
        Kind::Bookmark,
        Kind::Nothing,
        Kind::MaxStaleness,
        Kind::BookmarkAndStaleness,
    ][n as usize % 4];
    let mut seen: BTreeMap<TenantId, (u64, u64)> = BTreeMap::new();
    let mut reads = Vec::new();
    while Instant::now() < until {
        let tenant = world.tenants[rng.random_range(0..world.tenants.len())].clone();
        let (asked, wanted) = match kind {
            Kind::Bookmark | Kind::BookmarkAndStaleness => {
                let handed = world
                    .handed
                    .lock()
                    .unwrap()
                    .get(&(n, tenant.clone()))
                    .copied();
                let own = seen.get(&tenant).copied();
                let (bookmark, floor) = [handed, own]
                    .into_iter()
                    .flatten()
                    .fold((0, 0), |(b, c), (b2, c2)| (b.max(b2), c.max(c2)));
                let max_staleness_ms =
                    (kind == Kind::BookmarkAndStaleness).then(|| rng.random_range(100..2000));
                let wanted = Wanted {
                    bookmark: (bookmark > 0).then_some(bookmark),
                    max_staleness: max_staleness_ms.map(Duration::from_millis),
                };
                let asked = Asked::Bookmark {
                    bookmark,
                    floor,
                    max_staleness_ms,
                };
                (asked, wanted)
            }
            Kind::Nothing => (Asked::Nothing, Wanted::default()),
            Kind::MaxStaleness => {
                let ms = rng.random_range(100..2000);
                let wanted = Wanted {
                    bookmark: None,
                    max_staleness: Some(Duration::from_millis(ms)),
                };
                (Asked::MaxStaleness { ms }, wanted)
            }
        };
        let start_ms = world.now_ms();
        let outcome =
            match tokio::time::timeout(ATTEMPT_TIMEOUT, read(&world, &mut rng, &tenant, wanted))
                .await
            {
                Ok(Ok(answer)) => answer,
                Ok(Err(error)) => ReadOutcome::Failed { error },
                Err(_) => ReadOutcome::Failed {
                    error: "timed out".into(),
                },
            };
        if let (
            Kind::Bookmark | Kind::BookmarkAndStaleness,
            ReadOutcome::Ok {
                count, bookmark, ..
            },
        ) = (kind, &outcome)
        {
            seen.insert(tenant.clone(), (*bookmark, *count));
        }
        reads.push(Read {
            client: n as usize,
            customer: tenant.to_string(),
            start_ms,
            end_ms: world.now_ms(),
            asked,
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
    }
    reads
}

/// The count and the last write's op, read-only.
fn query() -> Arc<SqlRequest> {
    request(json!({"read_only": true, "statements": [
        {"sql": "SELECT (SELECT count FROM welcome), (SELECT op FROM sim_ops ORDER BY rowid DESC LIMIT 1)"}
    ]}))
}

/// One read through the proxy, routed as the SQL route routes a
/// read-only request: a follower's replica answers, or the holder.
async fn read(
    world: &World,
    rng: &mut StdRng,
    tenant: &TenantId,
    wanted: Wanted,
) -> Result<ReadOutcome, String> {
    let query = query();
    let mut target = world.pick(rng, None).ok_or("no machine is up")?;
    let mut fresh = false;
    for _hop in 0..6 {
        let index = world.index_of(&target).expect("a machine of the world");
        let at = world
            .incarnation(index)
            .ok_or_else(|| format!("machine {target} is down"))?;
        match at.registry.read_route(tenant).await {
            ReadRoute::Follow(holder) => {
                match at
                    .followers
                    .read(tenant, query.clone(), wanted, &holder)
                    .await
                {
                    Ok(answer) => {
                        return answered(&answer.results, answer.slot, &target, "follower");
                    }
                    Err(FollowError::Refused(e)) => return Err(e.message),
                    // The holder answers instead.
                    Err(FollowError::Behind(_)) => {}
                }
            }
            ReadRoute::Local(handle) => {
                if let Some(done) = at_holder(&handle, &query, wanted, &target).await {
                    return done;
                }
                fresh = true;
            }
            ReadRoute::Normal => {}
        }
        match at.registry.route(tenant, fresh).await {
            Route::Local(handle) => {
                if let Some(done) = at_holder(&handle, &query, wanted, &target).await {
                    return done;
                }
                fresh = true;
            }
            Route::Holder(record) => {
                target = record.holder;
                fresh = true;
            }
            Route::Elsewhere => {
                target = world.pick(rng, Some(&target)).ok_or("no machine is up")?;
                fresh = true;
            }
            Route::Lookup { .. } => return Err("lookup".into()),
            Route::Unavailable(e) | Route::Corrupt(e) | Route::NotFound(e) => return Err(e),
        }
    }
    Err("too many hops".into())
}

/// A read on the holder, after its bookmark is confirmed; `None` when
/// that machine no longer holds the tenant.
async fn at_holder(
    handle: &TenantHandle,
    query: &Arc<SqlRequest>,
    wanted: Wanted,
    machine: &str,
) -> Option<Result<ReadOutcome, String>> {
    if let Some(slot) = wanted.bookmark {
        match tokio::time::timeout(BOOKMARK_WAIT, handle.reach(slot)).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(_) => return Some(Err(format!("bookmark {slot} not confirmed in time"))),
        }
    }
    match handle.sql(query.clone(), None).await {
        Ok(answer) => Some(answered(
            &answer.results,
            handle.confirmed(),
            machine,
            "holder",
        )),
        Err(TenantError::NotHolder) => None,
        Err(e) => Some(Err(e.to_string())),
    }
}

fn answered(results: &Json, slot: u64, machine: &str, role: &str) -> Result<ReadOutcome, String> {
    let row = &results[0]["rows"][0];
    let count = integer(&row[0]).ok_or_else(|| format!("no count in {results}"))?;
    Ok(ReadOutcome::Ok {
        count,
        op: row[1].as_str().map(str::to_string),
        bookmark: slot,
        machine: machine.to_string(),
        role: role.to_string(),
    })
}
