//! Client side of Fly's internal DNS, as `tenantd serve`'s router uses it to
//! find the machines of another tenant.
//!
//! A lookup is `<value>.<key>.kv._metadata.<app>.internal` AAAA (the started
//! machines whose metadata has `key=value`), then for every address the PTR
//! `<machine id>.vm.<app>.internal.`. Fly does not document PTR records for
//! 6PN addresses, so when a PTR lookup fails the `_instances.internal` TXT
//! records (`instance=<id>,app=<app>,ip=<addr>,region=<r>`) map addresses to
//! machine ids instead. Answers are cached briefly: the router asks on the
//! cross-tenant path, which is the common case on Fly.

use std::collections::HashMap;
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
    cache: Mutex<HashMap<MetadataKey, (Instant, Vec<String>)>>,
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
                cache: Mutex::new(HashMap::new()),
            }),
        }
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
            .insert(cache_key, (Instant::now(), ids.clone()));
        Ok(ids)
    }

    /// Machine id of the machine with `addr`, through PTR, else
    /// `_instances.internal`. `None` when neither knows it.
    pub async fn machine_id_of(&self, addr: IpAddr) -> anyhow::Result<Option<String>> {
        if let Some(id) = self.ptr_machine_id(addr).await {
            return Ok(Some(id));
        }
        let instances = self.instances().await?;
        Ok(instances
            .into_iter()
            .find(|i| same_ip(i.ip, addr) && i.app == self.inner.app)
            .map(|i| i.id))
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
        let mut out = Vec::new();
        for record in lookup.answers() {
            if let RData::TXT(txt) = &record.data {
                let joined: String = txt
                    .txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect();
                out.extend(parse_instances(&joined));
            }
        }
        Ok(out)
    }

    async fn lookup_metadata(&self, key: &str, value: &str) -> anyhow::Result<Vec<String>> {
        let resolver = self.resolver()?;
        let name = format!("{value}.{key}.kv._metadata.{}.internal.", self.inner.app);
        let lookup = match resolver.ipv6_lookup(Name::from_ascii(&name)?).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("AAAA {name}")),
        };
        let addrs: Vec<Ipv6Addr> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect();
        let mut ids = Vec::new();
        let mut unresolved = Vec::new();
        for addr in addrs {
            match self.ptr_machine_id(IpAddr::V6(addr)).await {
                Some(id) => ids.push(id),
                None => unresolved.push(addr),
            }
        }
        if !unresolved.is_empty() {
            let instances = self.instances().await?;
            for addr in unresolved {
                if let Some(i) = instances
                    .iter()
                    .find(|i| same_ip(i.ip, IpAddr::V6(addr)) && i.app == self.inner.app)
                {
                    ids.push(i.id.clone());
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
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
        self.machines_with_metadata("customer_id", id.as_str())
            .await
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
