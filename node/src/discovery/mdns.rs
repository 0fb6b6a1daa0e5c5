//! Discovery servers on the LAN, advertised and found with DNS-SD over multicast DNS.
//!
//! A node that serves discovery registers an instance of [`SERVICE_TYPE`] on every
//! interface that is up, not loopback and multicast-capable. Its TXT record carries the
//! serving node's NodeId, when it started serving, and its signature (domain
//! [`Domain::LanAdvert`]) over both and the port. A browser checks the signature before it
//! uses what it found, and picks among the servers it sees by the lowest NodeId, so every
//! node of a LAN settles on the same one.
//!
//! What the signature proves is only that the advertiser holds the key it names: a rogue
//! machine on the LAN can still advertise a server of its own (with a key it made for
//! the purpose). It cannot forge anyone, because every discovery record is signed by the
//! node it describes and checked by the client; it can only hide people. The chat shows
//! the fingerprint of the server in use.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use p2p_crypto::{Domain, NodeId, SecretKey, Signature};
use serde::{Deserialize, Serialize};

/// The DNS-SD service type of a p2p-node discovery server (HTTP over TCP).
pub const SERVICE_TYPE: &str = "_p2p-discovery._tcp.local.";

/// The TXT record's format version.
const TXT_VERSION: &str = "1";

/// mDNS could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LanError {
    /// No interface is up, multicast-capable and not loopback.
    #[error("multicast is not available on any network interface (seen: {seen})")]
    NoMulticast {
        /// The interfaces seen, for the log line.
        seen: String,
    },
    /// The interfaces could not be listed.
    #[error("cannot list the network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
    /// The mDNS responder failed.
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// An address of this machine others on the LAN may reach it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAddr {
    /// The interface's name.
    pub interface: String,
    /// The address.
    pub ip: IpAddr,
    /// Whether the interface can send and receive multicast.
    pub multicast: bool,
}

/// The addresses of every interface that is up and not loopback, IPv4 first; IPv6
/// link-local addresses are left out (a URL cannot name their scope portably).
pub fn local_addrs() -> Result<Vec<LocalAddr>, LanError> {
    use nix::net::if_::InterfaceFlags as F;
    let mut out = Vec::new();
    let all = nix::ifaddrs::getifaddrs()
        .map_err(|e| LanError::Interfaces(std::io::Error::from_raw_os_error(e as i32)))?;
    for ifa in all {
        if !ifa.flags.contains(F::IFF_UP) || ifa.flags.contains(F::IFF_LOOPBACK) {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let ip = v6.ip();
            if ip.is_unicast_link_local() || ip.is_loopback() {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        out.push(LocalAddr {
            interface: ifa.interface_name,
            ip,
            multicast: ifa.flags.contains(F::IFF_MULTICAST),
        });
    }
    out.sort_by_key(|a| (a.ip.is_ipv6(), a.ip));
    out.dedup();
    Ok(out)
}

/// `http://IP:PORT` for every address in `addrs`.
pub fn urls(addrs: impl IntoIterator<Item = IpAddr>, port: u16) -> Vec<String> {
    addrs
        .into_iter()
        .map(|ip| format!("http://{}", SocketAddr::new(ip, port)))
        .collect()
}

/// What the TXT record signs.
#[derive(Serialize, Deserialize)]
pub(crate) struct AdvertBody {
    pub(crate) node_id: NodeId,
    pub(crate) port: u16,
    pub(crate) started_ms: u64,
}

impl AdvertBody {
    pub(crate) fn bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a fixed-size struct encodes")
    }
}

/// The TXT properties advertising a server on `port`, started at `started_ms`.
pub(crate) fn advert_txt(
    secret: &SecretKey,
    port: u16,
    started_ms: u64,
) -> Vec<(&'static str, String)> {
    let body = AdvertBody {
        node_id: secret.public(),
        port,
        started_ms,
    };
    let sig = secret.sign(Domain::LanAdvert, &body.bytes());
    vec![
        ("v", TXT_VERSION.to_owned()),
        ("id", body.node_id.to_string()),
        ("t", started_ms.to_string()),
        ("sig", sig.to_string()),
    ]
}

/// Why a found advertisement was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    /// Another TXT version, or none.
    #[error("unknown advertisement version {0:?}")]
    Version(Option<String>),
    /// A field is missing or does not parse.
    #[error("advertisement field {0:?} missing or malformed")]
    Field(&'static str),
    /// The signature does not verify for the NodeId it names.
    #[error("advertisement signature does not verify for {0}")]
    Signature(NodeId),
}

/// Checks a TXT record found for a server on `port`: the NodeId, the start time and the
/// signature over them.
fn verify_txt(
    get: impl Fn(&str) -> Option<String>,
    port: u16,
) -> Result<(NodeId, u64), AdvertError> {
    let version = get("v");
    if version.as_deref() != Some(TXT_VERSION) {
        return Err(AdvertError::Version(version));
    }
    let node_id: NodeId = get("id")
        .and_then(|s| s.parse().ok())
        .ok_or(AdvertError::Field("id"))?;
    let started_ms: u64 = get("t")
        .and_then(|s| s.parse().ok())
        .ok_or(AdvertError::Field("t"))?;
    let sig: Signature = get("sig")
        .and_then(|s| s.parse().ok())
        .ok_or(AdvertError::Field("sig"))?;
    let body = AdvertBody {
        node_id,
        port,
        started_ms,
    };
    node_id
        .verify(Domain::LanAdvert, &body.bytes(), &sig)
        .map_err(|_| AdvertError::Signature(node_id))?;
    Ok((node_id, started_ms))
}

/// A discovery server found on the LAN, its advertisement verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanServer {
    /// The NodeId of the node serving it (the key that signed the advertisement).
    pub node_id: NodeId,
    /// Its HTTP port.
    pub port: u16,
    /// When it started serving, by its clock (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// Its addresses, IPv4 first.
    pub addrs: Vec<IpAddr>,
}

impl LanServer {
    /// `http://IP:PORT` for each of its addresses.
    pub fn urls(&self) -> Vec<String> {
        urls(self.addrs.iter().copied(), self.port)
    }
}

impl fmt::Display for LanServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.node_id.fingerprint(),
            self.urls().join(", ")
        )
    }
}

/// What a browser saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LanEvent {
    /// A server was found, or its advertisement changed.
    Found(LanServer),
    /// A server said goodbye, or its records expired.
    Lost(NodeId),
}

/// The mDNS responder and browser of one node.
pub struct Mdns {
    daemon: ServiceDaemon,
    interfaces: Vec<String>,
}

impl fmt::Debug for Mdns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mdns")
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

impl Mdns {
    /// Starts mDNS on every interface that is up, multicast-capable and not loopback.
    pub fn start() -> Result<Self, LanError> {
        let addrs = local_addrs()?;
        let usable: BTreeSet<String> = addrs
            .iter()
            .filter(|a| a.multicast)
            .map(|a| a.interface.clone())
            .collect();
        if usable.is_empty() {
            let seen: BTreeSet<&str> = addrs.iter().map(|a| a.interface.as_str()).collect();
            let seen = if seen.is_empty() {
                "only loopback".to_owned()
            } else {
                seen.into_iter()
                    .map(|i| format!("{i} without multicast"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(LanError::NoMulticast { seen });
        }
        let daemon = ServiceDaemon::new()?;
        daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])?;
        let off: Vec<IfKind> = addrs
            .iter()
            .filter(|a| !a.multicast)
            .map(|a| IfKind::Name(a.interface.clone()))
            .collect();
        if !off.is_empty() {
            daemon.disable_interface(off)?;
        }
        Ok(Self {
            daemon,
            interfaces: usable.into_iter().collect(),
        })
    }

    /// The interfaces mDNS runs on.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// Advertises a discovery server on `port` of this machine, served by the node of
    /// `secret` since `started_ms`, until the returned value is dropped (or
    /// [`Advertisement::withdraw`]n, which also says goodbye on the network).
    pub fn advertise(
        &self,
        secret: &SecretKey,
        port: u16,
        started_ms: u64,
    ) -> Result<Advertisement, LanError> {
        let id = secret.public().to_string();
        let instance = format!("p2p-{}", &id[..16]);
        let host = format!("{instance}.local.");
        let txt = advert_txt(secret, port, started_ms);
        let mut info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, (), port, &txt[..])?
            .enable_addr_auto();
        // The instance name holds the NodeId, so nobody else uses it: no probing delay.
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_owned();
        self.daemon.register(info)?;
        Ok(Advertisement {
            daemon: self.daemon.clone(),
            fullname: Some(fullname),
        })
    }

    /// Starts browsing for discovery servers.
    pub fn browse(&self) -> Result<Browser, LanError> {
        Ok(Browser {
            rx: self.daemon.browse(SERVICE_TYPE)?,
            names: HashMap::new(),
        })
    }

    /// Browses for up to `wait`; once a server is found, waits `settle` more for
    /// others. Returns the servers found, lowest NodeId first.
    pub async fn find(&self, wait: Duration, settle: Duration) -> Result<Vec<LanServer>, LanError> {
        let mut browser = self.browse()?;
        let mut found: HashMap<NodeId, LanServer> = HashMap::new();
        let start = tokio::time::Instant::now();
        let mut deadline = start + wait;
        loop {
            let event = tokio::time::timeout_at(deadline, browser.next()).await;
            match event {
                Ok(Some(LanEvent::Found(server))) => {
                    if found.is_empty() {
                        deadline = deadline.min(tokio::time::Instant::now() + settle);
                    }
                    found.insert(server.node_id, server);
                }
                Ok(Some(LanEvent::Lost(id))) => {
                    found.remove(&id);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        let mut servers: Vec<LanServer> = found.into_values().collect();
        servers.sort_by_key(|s| s.node_id);
        Ok(servers)
    }
}

impl Drop for Mdns {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// A registered advertisement; withdrawn when dropped.
pub struct Advertisement {
    daemon: ServiceDaemon,
    fullname: Option<String>,
}

impl fmt::Debug for Advertisement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Advertisement")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl Advertisement {
    /// Withdraws the advertisement and waits (briefly) until the goodbye is sent.
    pub async fn withdraw(mut self) {
        if let Some(name) = self.fullname.take() {
            if let Ok(rx) = self.daemon.unregister(&name) {
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await;
            }
        }
    }
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        if let Some(name) = self.fullname.take() {
            let _ = self.daemon.unregister(&name);
        }
    }
}

/// A stream of discovery servers appearing and leaving.
pub struct Browser {
    rx: mdns_sd::Receiver<ServiceEvent>,
    /// Instance full names to the NodeId they advertised.
    names: HashMap<String, NodeId>,
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Browser")
            .field("servers", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// The next change; `None` when mDNS stopped.
    pub async fn next(&mut self) -> Option<LanEvent> {
        loop {
            match self.rx.recv_async().await.ok()? {
                ServiceEvent::ServiceResolved(service) => {
                    let port = service.get_port();
                    let get = |k: &str| service.get_property_val_str(k).map(str::to_owned);
                    match verify_txt(get, port) {
                        Ok((node_id, started_ms)) => {
                            let mut addrs: Vec<IpAddr> = service
                                .get_addresses()
                                .iter()
                                .map(|a| a.to_ip_addr())
                                .filter(|ip| match ip {
                                    IpAddr::V4(_) => true,
                                    IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                                })
                                .collect();
                            if addrs.is_empty() {
                                continue;
                            }
                            addrs.sort_by_key(|ip| (ip.is_ipv6(), *ip));
                            self.names
                                .insert(service.get_fullname().to_owned(), node_id);
                            return Some(LanEvent::Found(LanServer {
                                node_id,
                                port,
                                started_ms,
                                addrs,
                            }));
                        }
                        Err(e) => {
                            tracing::debug!(name = service.get_fullname(), error = %e,
                                "ignoring a LAN discovery advertisement");
                        }
                    }
                }
                ServiceEvent::ServiceRemoved(_, fullname) => {
                    if let Some(id) = self.names.remove(&fullname) {
                        return Some(LanEvent::Lost(id));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(txt: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            txt.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn advert_verifies_and_binds_its_fields() {
        let sk = SecretKey::generate();
        let txt = advert_txt(&sk, 7117, 1_700_000_000_000);
        assert_eq!(
            verify_txt(lookup(&txt), 7117),
            Ok((sk.public(), 1_700_000_000_000))
        );
        // Another port than the one signed.
        assert_eq!(
            verify_txt(lookup(&txt), 7118),
            Err(AdvertError::Signature(sk.public()))
        );
        // Another start time.
        let mut changed = txt.clone();
        changed[2].1 = "1".to_owned();
        assert_eq!(
            verify_txt(lookup(&changed), 7117),
            Err(AdvertError::Signature(sk.public()))
        );
        // Someone else's NodeId with this signature.
        let mut other = txt.clone();
        let other_id = SecretKey::generate().public();
        other[1].1 = other_id.to_string();
        assert_eq!(
            verify_txt(lookup(&other), 7117),
            Err(AdvertError::Signature(other_id))
        );
    }

    #[test]
    fn malformed_adverts_are_refused() {
        let sk = SecretKey::generate();
        let txt = advert_txt(&sk, 80, 5);
        for (i, field) in [(0usize, "v"), (1, "id"), (2, "t"), (3, "sig")] {
            let mut bad = txt.clone();
            bad[i].1 = "x".to_owned();
            let err = verify_txt(lookup(&bad), 80).expect_err(field);
            if field == "v" {
                assert_eq!(err, AdvertError::Version(Some("x".to_owned())));
            } else {
                assert_eq!(err, AdvertError::Field(field));
            }
            let missing: Vec<_> = txt.iter().filter(|(k, _)| *k != field).cloned().collect();
            assert!(verify_txt(lookup(&missing), 80).is_err(), "{field}");
        }
    }

    #[test]
    fn the_txt_record_fits_dns_limits() {
        let txt = advert_txt(&SecretKey::generate(), u16::MAX, u64::MAX);
        for (k, v) in &txt {
            assert!(k.len() + 1 + v.len() <= 255, "{k}");
        }
    }

    #[test]
    fn urls_bracket_ipv6() {
        let ips: Vec<IpAddr> = vec![
            "10.0.0.1".parse().expect("ip"),
            "fd00::1".parse().expect("ip"),
        ];
        assert_eq!(
            urls(ips, 7117),
            vec!["http://10.0.0.1:7117", "http://[fd00::1]:7117"]
        );
    }

    #[test]
    fn local_addrs_leave_out_loopback() {
        for a in local_addrs().expect("interfaces") {
            assert!(!a.ip.is_loopback(), "{a:?}");
        }
    }
}
