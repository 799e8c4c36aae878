//! Client side of Fly's internal DNS, as `tenantd serve`'s router uses it to
//! find the machines of another tenant.
//!
//! Only documented names come first (https://fly.io/docs/networking/private-networking/):
//! - AAAA `customer<ID>.process.<app>.internal` (the started machines of the
//!   tenant's process group, as fly.toml and `tenantd fly provision` make
//!   them: no per-machine step) and `<ID>.customer_id.kv._metadata.<app>.internal`
//!   (machines carrying `customer_id` metadata), together;
//! - their addresses mapped to machine ids through the TXT records of
//!   `_instances.internal` (`instance=<id>,app=<app>,ip=<addr>,region=<r>;`
//!   entries; several records are joined before parsing), else through
//!   `vms.<app>.internal` TXT (`<id> <region>` pairs) and the AAAA of each
//!   `<id>.vm.<app>.internal`;
//! - a PTR of a 6PN address is not documented: asked last, only for
//!   addresses nothing else mapped.
//!
//! DNS lists started machines only. Answers are cached briefly: the router
//! asks on the cross-tenant path, which is the common case on Fly.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};

/// How long an answer is reused. Short: machines start and stop, and a stale
/// answer only costs one extra replay hop.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// `(key, value)` of a metadata lookup.
type MetadataKey = (String, String);

/// Resolves Fly `.internal` names to machine ids.
#[derive(Clone)]
pub struct FlyDns {
    inner: Arc<Inner>,
}

struct Inner {
    app: String,
    resolver: Result<TokioResolver, String>,
    /// Bounded (least recently used out first): one entry per tenant id
    /// asked about, and anyone can ask about any id.
    cache: Mutex<lru::LruCache<MetadataKey, (Instant, Vec<String>)>>,
}

/// Entries of the answer cache unless [`FlyDns::with_cache_bound`] says.
const DEFAULT_CACHE_ENTRIES: usize = 10_000;

fn cache_of(entries: usize) -> Mutex<lru::LruCache<MetadataKey, (Instant, Vec<String>)>> {
    let entries = std::num::NonZeroUsize::new(entries.max(1)).expect("at least 1");
    Mutex::new(lru::LruCache::new(entries))
}

impl std::fmt::Debug for FlyDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyDns")
            .field("app", &self.inner.app)
            .finish_non_exhaustive()
    }
}

impl FlyDns {
    /// `nameserver`: the DNS server to ask (the dev cluster's, or Fly's
    /// `[fdaa::3]:53`); `None` reads the system configuration
    /// (`/etc/resolv.conf`, which on Fly points at `fdaa::3`).
    pub fn new(app: &str, nameserver: Option<SocketAddr>) -> FlyDns {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        // Our own cache below decides freshness; keep hickory's short.
        opts.positive_max_ttl = Some(Duration::from_secs(1));
        opts.negative_max_ttl = Some(Duration::from_secs(1));
        opts.cache_size = 64;
        let resolver = match nameserver {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![server]),
                    TokioRuntimeProvider::default(),
                )
                .with_options(opts)
                .build()
                .map_err(|e| e.to_string())
            }
            None => TokioResolver::builder_tokio()
                .map(|b| b.with_options(opts))
                .and_then(|b| b.build())
                .map_err(|e| e.to_string()),
        };
        FlyDns {
            inner: Arc::new(Inner {
                app: app.to_string(),
                resolver,
                cache: cache_of(DEFAULT_CACHE_ENTRIES),
            }),
        }
    }

    /// Keeps at most `entries` answers (`--max-known-tenants`).
    pub fn with_cache_bound(self, entries: usize) -> FlyDns {
        let entries = std::num::NonZeroUsize::new(entries.max(1)).expect("at least 1");
        self.inner.cache.lock().unwrap().resize(entries);
        self
    }

    /// How many answers are cached.
    pub fn cached_entries(&self) -> usize {
        self.inner.cache.lock().unwrap().len()
    }

    pub fn app(&self) -> &str {
        &self.inner.app
    }

    /// Ids of the started machines whose metadata has `key=value`, sorted.
    /// Empty when there are none. `value` must be a validated tenant id
    /// (`TenantId::as_str()`): it becomes a DNS label.
    pub async fn machines_with_metadata(
        &self,
        key: &str,
        value: &str,
    ) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(
            is_label(key) && is_label(value),
            "metadata key {key:?} / value {value:?} is not a DNS label"
        );
        let cache_key = (key.to_string(), value.to_string());
        if let Some((at, ids)) = self.inner.cache.lock().unwrap().get(&cache_key)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(ids.clone());
        }
        let ids = self.lookup_metadata(key, value).await?;
        self.inner
            .cache
            .lock()
            .unwrap()
            .put(cache_key, (Instant::now(), ids.clone()));
        Ok(ids)
    }

    /// Ids of the started machines of tenant `id`, sorted: its process group
    /// `customer<ID>` and its `customer_id` metadata. `id` must be a
    /// validated tenant id (`TenantId::as_str()`).
    pub async fn machines_of_customer(&self, id: &str) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(is_label(id), "tenant id {id:?} is not a DNS label");
        let cache_key = ("customer".to_string(), id.to_string());
        if let Some((at, ids)) = self.inner.cache.lock().unwrap().get(&cache_key)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(ids.clone());
        }
        let app = &self.inner.app;
        let group = format!("customer{id}");
        let mut names = Vec::new();
        // A label has at most 63 bytes; a longer group name cannot exist.
        if is_label(&group) {
            names.push(format!("{group}.process.{app}.internal."));
        }
        names.push(format!("{id}.customer_id.kv._metadata.{app}.internal."));
        let mut addrs = Vec::new();
        for name in &names {
            addrs.extend(self.aaaa(name).await?);
        }
        addrs.sort();
        addrs.dedup();
        let ids = self.ids_of(addrs).await?;
        self.inner
            .cache
            .lock()
            .unwrap()
            .put(cache_key, (Instant::now(), ids.clone()));
        Ok(ids)
    }

    /// Machine id of the machine with `addr`, through `_instances.internal`,
    /// else `vms.<app>.internal`, else PTR. `None` when none knows it.
    pub async fn machine_id_of(&self, addr: IpAddr) -> anyhow::Result<Option<String>> {
        let v6 = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        Ok(self.ids_of(vec![v6]).await?.into_iter().next())
    }

    /// Every started machine of the organisation from `_instances.internal`.
    pub async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        let resolver = self.resolver()?;
        // from_ascii: the IDNA parsing of `&str` names rejects `_` labels.
        let name = Name::from_ascii("_instances.internal.")?;
        let lookup = match resolver.txt_lookup(name).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(e).context("TXT _instances.internal"),
        };
        // The list may span several TXT records (and strings): join them.
        let joined: String = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        Ok(parse_instances(&joined))
    }

    /// Ids of the started machines of this app from `vms.<app>.internal`.
    pub async fn vms(&self) -> anyhow::Result<Vec<String>> {
        let resolver = self.resolver()?;
        let name = format!("vms.{}.internal.", self.inner.app);
        let lookup = match resolver.txt_lookup(Name::from_ascii(&name)?).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("TXT {name}")),
        };
        let joined: Vec<String> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        Ok(parse_vms(&joined.join(",")))
    }

    /// AAAA addresses of `name`; empty when it does not exist.
    async fn aaaa(&self, name: &str) -> anyhow::Result<Vec<Ipv6Addr>> {
        let resolver = self.resolver()?;
        let lookup = match resolver.ipv6_lookup(Name::from_ascii(name)?).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("AAAA {name}")),
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// Machine ids of `addrs` (sorted, deduplicated): `_instances.internal`
    /// first, then `vms.<app>.internal` with `<id>.vm.<app>.internal`, and a
    /// PTR only for what neither mapped.
    async fn ids_of(&self, addrs: Vec<Ipv6Addr>) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut unmapped = Vec::new();
        if !addrs.is_empty() {
            let instances = self.instances().await?;
            for addr in addrs {
                match instances
                    .iter()
                    .find(|i| same_ip(i.ip, IpAddr::V6(addr)) && i.app == self.inner.app)
                {
                    Some(i) => ids.push(i.id.clone()),
                    None => unmapped.push(addr),
                }
            }
        }
        if !unmapped.is_empty() {
            for id in self.vms().await? {
                let name = format!("{id}.vm.{}.internal.", self.inner.app);
                if !is_label(&id) {
                    continue;
                }
                let of_vm = self.aaaa(&name).await?;
                let before = unmapped.len();
                unmapped.retain(|a| {
                    !of_vm
                        .iter()
                        .any(|v| same_ip(IpAddr::V6(*v), IpAddr::V6(*a)))
                });
                if unmapped.len() < before {
                    ids.push(id);
                }
                if unmapped.is_empty() {
                    break;
                }
            }
        }
        for addr in unmapped {
            if let Some(id) = self.ptr_machine_id(IpAddr::V6(addr)).await {
                ids.push(id);
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    async fn lookup_metadata(&self, key: &str, value: &str) -> anyhow::Result<Vec<String>> {
        let name = format!("{value}.{key}.kv._metadata.{}.internal.", self.inner.app);
        let addrs = self.aaaa(&name).await?;
        self.ids_of(addrs).await
    }

    async fn ptr_machine_id(&self, addr: IpAddr) -> Option<String> {
        let resolver = self.resolver().ok()?;
        let name: Name = match addr {
            IpAddr::V4(a) => a.into(),
            IpAddr::V6(a) => a.into(),
        };
        let lookup = resolver.reverse_lookup(name).await.ok()?;
        lookup.answers().iter().find_map(|r| match &r.data {
            RData::PTR(ptr) => machine_id_from_vm_name(&ptr.0.to_ascii(), &self.inner.app),
            _ => None,
        })
    }

    fn resolver(&self) -> anyhow::Result<&TokioResolver> {
        self.inner
            .resolver
            .as_ref()
            .map_err(|e| anyhow::anyhow!("DNS resolver could not be set up: {e}"))
    }
}

#[async_trait::async_trait]
impl crate::http::MachineFinder for FlyDns {
    async fn machines_of(&self, id: &crate::TenantId) -> anyhow::Result<Vec<String>> {
        self.machines_of_customer(id.as_str()).await
    }
}

/// One entry of `_instances.internal`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub app: String,
    pub ip: IpAddr,
    pub region: String,
}

/// Parses `_instances.internal` text: entries separated by `;`, fields
/// `key=value` separated by `,`. Entries without an id or a valid ip are
/// skipped.
pub fn parse_instances(text: &str) -> Vec<Instance> {
    text.split(';')
        .filter_map(|entry| {
            let mut id = None;
            let mut app = String::new();
            let mut ip = None;
            let mut region = String::new();
            for field in entry.split(',') {
                match field.trim().split_once('=') {
                    Some(("instance", v)) => id = Some(v.to_string()),
                    Some(("app", v)) => app = v.to_string(),
                    Some(("ip", v)) => ip = v.parse().ok(),
                    Some(("region", v)) => region = v.to_string(),
                    _ => {}
                }
            }
            Some(Instance {
                id: id?,
                app,
                ip: ip?,
                region,
            })
        })
        .collect()
}

/// Parses `vms.<app>.internal` text: `<id> <region>` pairs separated by `,`.
pub fn parse_vms(text: &str) -> Vec<String> {
    text.split(',')
        .filter_map(|pair| pair.split_whitespace().next())
        .filter(|id| is_label(id))
        .map(str::to_string)
        .collect()
}

/// `<id>.vm.<app>.internal.` → `<id>`.
pub fn machine_id_from_vm_name(name: &str, app: &str) -> Option<String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let suffix = format!(".vm.{}.internal", app.to_ascii_lowercase());
    let id = name.strip_suffix(&suffix)?;
    (is_label(id) && !id.contains('.')).then(|| id.to_string())
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Equal addresses, treating `::ffff:a.b.c.d` as `a.b.c.d`.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instances_in_both_layouts() {
        let one = "instance=3f8a0c2e1b7d44,app=tenantd-dev,ip=::ffff:127.0.0.2,region=dev;\
                   instance=0a1b2c3d4e5f60,app=other,ip=fdaa::1,region=ord";
        let parsed = parse_instances(one);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].id, "3f8a0c2e1b7d44");
        assert_eq!(parsed[0].app, "tenantd-dev");
        assert_eq!(parsed[1].ip, "fdaa::1".parse::<IpAddr>().unwrap());
        assert!(parse_instances("garbage;app=x,ip=::1").is_empty());
    }

    #[test]
    fn vm_names_give_machine_ids() {
        assert_eq!(
            machine_id_from_vm_name("3f8a0c2e1b7d44.vm.tenantd-dev.internal.", "tenantd-dev"),
            Some("3f8a0c2e1b7d44".to_string())
        );
        assert_eq!(
            machine_id_from_vm_name("x.vm.other.internal.", "tenantd-dev"),
            None
        );
        assert_eq!(machine_id_from_vm_name("a.b.vm.app.internal.", "app"), None);
    }

    #[test]
    fn mapped_and_plain_v4_are_the_same_machine() {
        assert!(same_ip(
            "::ffff:127.0.0.2".parse().unwrap(),
            "127.0.0.2".parse().unwrap()
        ));
    }
}
