//! The dev cluster's stand-in for Fly's internal DNS server (`fdaa::3`):
//! UDP and TCP on one loopback port, answering for the started machines of
//! the app from a table the supervisor keeps current.
//!
//! Names served (case-insensitive), all with a 1 s TTL because machines come
//! and go:
//! - AAAA `<app>.internal`, `global.<app>.internal`, `<region>.<app>.internal`,
//!   `<id>.vm.<app>.internal`, `<group>.process.<app>.internal` (metadata
//!   `fly_process_group`), `<value>.<key>.kv._metadata.<app>.internal`;
//! - PTR of a machine's address (`*.ip6.arpa`, and `*.in-addr.arpa` for its
//!   IPv4 loopback address) → `<id>.vm.<app>.internal.` (Fly does not
//!   document these: [`DnsOptions::ptr`] turns them off);
//! - TXT `_instances.internal` (`instance=<id>,app=<app>,ip=<addr>,region=dev;`
//!   per machine, spread over several TXT records like a long list on Fly)
//!   and `vms.<app>.internal` (`<id> dev`, comma separated).
//!
//! Machines listen on IPv4 loopback addresses; their "6PN" addresses are the
//! IPv4-mapped IPv6 form `::ffff:127.x.y.z`, which Linux connects to.
//! Anything outside `.internal` and the reverse zones is refused: there is no
//! upstream to recurse to.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, PTR, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

pub const REGION: &str = "dev";
const TTL: u32 = 1;

/// One started machine as DNS shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsMachine {
    pub id: String,
    pub ip: Ipv6Addr,
    /// Metadata pairs (`customer_id` → `100`, `fly_process_group` → `app`).
    pub metadata: Vec<(String, String)>,
}

/// The records' source of truth, replaced as a whole by the supervisor.
pub type DnsTable = Arc<RwLock<Vec<DnsMachine>>>;

/// Which of the record kinds the server answers (tests turn some off to
/// check that a client does without them).
#[derive(Clone, Copy, Debug)]
pub struct DnsOptions {
    /// PTR records of machines' addresses (undocumented on Fly).
    pub ptr: bool,
    /// `_instances.internal` TXT.
    pub instances: bool,
}

impl Default for DnsOptions {
    fn default() -> DnsOptions {
        DnsOptions {
            ptr: true,
            instances: true,
        }
    }
}

/// A running DNS server; dropping it does not stop it, [`DnsServer::stop`] does.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<Handler>,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (port 0: a free port, the same for both).
    pub async fn start(addr: SocketAddr, app: &str, table: DnsTable) -> anyhow::Result<DnsServer> {
        DnsServer::start_with(addr, app, table, DnsOptions::default()).await
    }

    pub async fn start_with(
        addr: SocketAddr,
        app: &str,
        table: DnsTable,
        options: DnsOptions,
    ) -> anyhow::Result<DnsServer> {
        let (udp, tcp) = bind_pair(addr).await?;
        let addr = udp.local_addr()?;
        let mut server = Server::new(Handler {
            app: app.to_ascii_lowercase(),
            table,
            options,
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        Ok(DnsServer { addr, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn stop(mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.server.shutdown_gracefully()).await;
    }
}

/// UDP and TCP on the same port. With port 0 the UDP port is chosen first and
/// TCP may find it taken by someone else, so try a few times.
async fn bind_pair(
    addr: SocketAddr,
) -> anyhow::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("DNS server: bind UDP {addr}"))?;
        let bound = udp.local_addr()?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("DNS server: bind TCP {bound}")),
        }
    }
    Err(anyhow::anyhow!(
        "DNS server: no free UDP+TCP port pair: {last:?}"
    ))
}

struct Handler {
    app: String,
    table: DnsTable,
    options: DnsOptions,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let records = match request.request_info() {
            Ok(info) => {
                let name: Name = info.query.name().clone().into();
                self.answer(&name, info.query.query_type())
            }
            Err(_) => Err(ResponseCode::FormErr),
        };
        let sent = match records {
            Ok(records) => {
                response_handle
                    .send_response(builder.build(metadata, records.iter(), [], [], []))
                    .await
            }
            Err(code) => {
                metadata.response_code = code;
                response_handle
                    .send_response(builder.build(metadata, [], [], [], []))
                    .await
            }
        };
        match sent {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("dev DNS: could not send a response: {e}");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                hickory_proto::op::Header {
                    metadata,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

impl Handler {
    /// Records for `name`/`rtype`; `Err(NXDomain)` when the name does not
    /// exist, `Ok(empty)` when it exists without records of that type.
    fn answer(&self, name: &Name, rtype: RecordType) -> Result<Vec<Record>, ResponseCode> {
        let text = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let machines = self.table.read().unwrap().clone();
        let fqdn = Name::from_ascii(format!("{text}.")).map_err(|_| ResponseCode::FormErr)?;

        if text.ends_with(".arpa") {
            if !self.options.ptr {
                return Err(ResponseCode::NXDomain);
            }
            let ip = match name.parse_arpa_name() {
                Ok(net) => net.addr(),
                Err(_) => return Err(ResponseCode::NXDomain),
            };
            let found = machines
                .iter()
                .find(|m| IpAddr::V6(m.ip).to_canonical() == ip.to_canonical());
            return match found {
                Some(m) if rtype == RecordType::PTR || rtype == RecordType::ANY => {
                    let target = Name::from_ascii(format!("{}.vm.{}.internal.", m.id, self.app))
                        .map_err(|_| ResponseCode::ServFail)?;
                    Ok(vec![Record::from_rdata(fqdn, TTL, RData::PTR(PTR(target)))])
                }
                Some(_) => Ok(Vec::new()),
                None => Err(ResponseCode::NXDomain),
            };
        }
        if !text.ends_with(".internal") {
            return Err(ResponseCode::Refused);
        }

        if text == "_instances.internal" || text == "all._instances.internal" {
            if !self.options.instances {
                return Err(ResponseCode::NXDomain);
            }
            let entries: Vec<String> = machines
                .iter()
                .map(|m| {
                    format!(
                        "instance={},app={},ip={},region={REGION};",
                        m.id, self.app, m.ip
                    )
                })
                .collect();
            return Ok(txt_records(fqdn, rtype, entries));
        }
        let app_suffix = format!(".{}.internal", self.app);
        let Some(prefix) = text
            .strip_suffix(&app_suffix)
            .map(str::to_string)
            .or_else(|| (text == format!("{}.internal", self.app)).then(String::new))
        else {
            return Err(ResponseCode::NXDomain);
        };

        if prefix == "vms" || prefix == "all.vms" {
            let list = machines
                .iter()
                .map(|m| format!("{} {REGION}", m.id))
                .collect::<Vec<_>>()
                .join(",");
            return Ok(txt_or_empty(fqdn, rtype, vec![list]));
        }
        let selected: Vec<&DnsMachine> =
            if prefix.is_empty() || prefix == "global" || prefix == REGION {
                machines.iter().collect()
            } else if let Some(id) = prefix.strip_suffix(".vm") {
                machines.iter().filter(|m| m.id == id).collect()
            } else if let Some(group) = prefix.strip_suffix(".process") {
                machines
                    .iter()
                    .filter(|m| {
                        m.metadata
                            .iter()
                            .any(|(k, v)| k == "fly_process_group" && v.eq_ignore_ascii_case(group))
                    })
                    .collect()
            } else if let Some(kv) = prefix
                .strip_suffix("._metadata")
                .and_then(|p| p.strip_suffix(".kv"))
            {
                match kv.split_once('.') {
                    Some((value, key)) => machines
                        .iter()
                        .filter(|m| {
                            m.metadata.iter().any(|(k, v)| {
                                k.eq_ignore_ascii_case(key) && v.eq_ignore_ascii_case(value)
                            })
                        })
                        .collect(),
                    None => Vec::new(),
                }
            } else {
                Vec::new()
            };
        if selected.is_empty() {
            return Err(ResponseCode::NXDomain);
        }
        if rtype != RecordType::AAAA && rtype != RecordType::ANY {
            return Ok(Vec::new());
        }
        Ok(selected
            .into_iter()
            .map(|m| Record::from_rdata(fqdn.clone(), TTL, RData::AAAA(AAAA(m.ip))))
            .collect())
    }
}

fn txt_or_empty(name: Name, rtype: RecordType, strings: Vec<String>) -> Vec<Record> {
    if rtype != RecordType::TXT && rtype != RecordType::ANY {
        return Vec::new();
    }
    // A TXT character-string holds at most 255 bytes.
    let strings = strings
        .into_iter()
        .flat_map(|s| {
            s.as_bytes()
                .chunks(255)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    if strings.is_empty() {
        return Vec::new();
    }
    vec![Record::from_rdata(name, TTL, RData::TXT(TXT::new(strings)))]
}

/// Whole entries, two per TXT record (each record a few character-strings
/// of at most 255 bytes): a client must join every record of the answer.
fn txt_records(name: Name, rtype: RecordType, entries: Vec<String>) -> Vec<Record> {
    entries
        .chunks(2)
        .flat_map(|pair| txt_or_empty(name.clone(), rtype, vec![pair.concat()]))
        .collect()
}

/// The "6PN" address of a machine listening on an IPv4 loopback address.
pub fn mapped(ip: std::net::Ipv4Addr) -> Ipv6Addr {
    ip.to_ipv6_mapped()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenantd_core::fly_dns::FlyDns;

    fn machine(id: &str, last: u8, customer: &str) -> DnsMachine {
        DnsMachine {
            id: id.into(),
            ip: mapped(std::net::Ipv4Addr::new(127, 0, 0, last)),
            metadata: vec![("customer_id".into(), customer.into())],
        }
    }

    /// A machine of process group `customer<c>` without `customer_id`
    /// metadata, as `fly deploy` / `fly scale count` make them.
    fn grouped(id: &str, last: u8, customer: &str) -> DnsMachine {
        DnsMachine {
            id: id.into(),
            ip: mapped(std::net::Ipv4Addr::new(127, 0, 0, last)),
            metadata: vec![("fly_process_group".into(), format!("customer{customer}"))],
        }
    }

    #[tokio::test]
    async fn a_tenants_machines_are_found_through_documented_names_only() {
        let table: DnsTable = Arc::new(RwLock::new(vec![
            grouped("aaaaaaaaaaaaa1", 2, "100"),
            grouped("bbbbbbbbbbbbb2", 3, "100"),
            grouped("ccccccccccccc3", 4, "200"),
            machine("ddddddddddddd4", 5, "100"),
            grouped("eeeeeeeeeeeee5", 6, "300"),
            grouped("fffffffffffff6", 7, "300"),
        ]));
        for options in [
            // _instances.internal (over several TXT records), no PTR.
            DnsOptions {
                ptr: false,
                instances: true,
            },
            // vms.<app>.internal and <id>.vm.<app>.internal only.
            DnsOptions {
                ptr: false,
                instances: false,
            },
        ] {
            let server = DnsServer::start_with(
                "127.0.0.1:0".parse().unwrap(),
                "app",
                table.clone(),
                options,
            )
            .await
            .unwrap();
            let dns = FlyDns::new("app", Some(server.addr()));
            assert_eq!(
                dns.machines_of_customer("100").await.unwrap(),
                vec!["aaaaaaaaaaaaa1", "bbbbbbbbbbbbb2", "ddddddddddddd4"],
                "{options:?}"
            );
            assert_eq!(
                dns.machines_of_customer("300").await.unwrap(),
                vec!["eeeeeeeeeeeee5", "fffffffffffff6"],
                "{options:?}"
            );
            assert!(dns.machines_of_customer("999").await.unwrap().is_empty());
            if options.instances {
                assert_eq!(dns.instances().await.unwrap().len(), 6, "records joined");
            }
            server.stop().await;
        }
    }

    #[tokio::test]
    async fn answers_metadata_ptr_and_instances() {
        let table: DnsTable = Arc::new(RwLock::new(vec![
            machine("aaaaaaaaaaaaa1", 2, "100"),
            machine("bbbbbbbbbbbbb2", 3, "100"),
            machine("ccccccccccccc3", 4, "200"),
        ]));
        let server = DnsServer::start("127.0.0.1:0".parse().unwrap(), "app", table.clone())
            .await
            .unwrap();
        let dns = FlyDns::new("app", Some(server.addr()));
        assert_eq!(
            dns.machines_with_metadata("customer_id", "100")
                .await
                .unwrap(),
            vec!["aaaaaaaaaaaaa1", "bbbbbbbbbbbbb2"]
        );
        assert_eq!(
            dns.machines_with_metadata("customer_id", "200")
                .await
                .unwrap(),
            vec!["ccccccccccccc3"]
        );
        assert!(
            dns.machines_with_metadata("customer_id", "300")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(dns.instances().await.unwrap().len(), 3);
        table.write().unwrap().clear();
        let fresh = FlyDns::new("app", Some(server.addr()));
        assert!(
            fresh
                .machines_with_metadata("customer_id", "100")
                .await
                .unwrap()
                .is_empty()
        );
        server.stop().await;
    }

    /// Lookups of many distinct tenant ids (most of which have no
    /// machine) keep at most the configured number of cached answers.
    #[tokio::test]
    async fn the_answer_cache_is_bounded() {
        let table: DnsTable = Arc::new(RwLock::new(vec![grouped("aaaaaaaaaaaaa1", 2, "100")]));
        let server = DnsServer::start("127.0.0.1:0".parse().unwrap(), "app", table)
            .await
            .unwrap();
        let dns = FlyDns::new("app", Some(server.addr())).with_cache_bound(5);
        for n in 0..20 {
            assert!(
                dns.machines_of_customer(&format!("u{n}"))
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert!(dns.cached_entries() <= 5, "{} cached", dns.cached_entries());
        }
        assert_eq!(dns.cached_entries(), 5);
        assert_eq!(
            dns.machines_of_customer("100").await.unwrap(),
            vec!["aaaaaaaaaaaaa1"]
        );
        server.stop().await;
    }
}
