//! A discovery server (and its relay) running inside the node, used over loopback.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{
    relay::{Relay, RelayConfig},
    Announcement, AppState, MailboxBatch, PeerInfo, RelayRef,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    mdns, Discovery, DiscoveryContext, DiscoveryError, DiscoveryStartError, DiscoveryStatus,
    HttpDiscovery, IntoDiscovery, Serving, Source,
};
use crate::node::{DISCOVERY_DB_FILE, RELAY_KEY_FILE};

/// How long a stopping server may take to finish its requests.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The embedded discovery server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the embedded discovery server on {addr}: {reason}")]
pub struct EmbeddedError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub reason: Box<dyn std::error::Error + Send + Sync>,
}

/// A discovery server running in this process.
pub(crate) struct Server {
    /// Where its HTTP listens.
    pub(crate) addr: SocketAddr,
    /// Where its relay listens, if it runs one.
    pub(crate) relay_addr: Option<SocketAddr>,
    /// Its state (the store it hands over when it stops for another server).
    pub(crate) state: AppState,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("relay_addr", &self.relay_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store in `dir`, binds `addr` (and a relay on the same UDP port, or any
    /// port if that one is taken, when `relay`), and serves until stopped.
    pub(crate) async fn start(
        addr: SocketAddr,
        dir: &Path,
        relay: bool,
    ) -> Result<Self, EmbeddedError> {
        let fail =
            |reason: Box<dyn std::error::Error + Send + Sync>| EmbeddedError { addr, reason };
        let config = p2p_discovery::ServerConfig {
            db_path: Some(dir.join(DISCOVERY_DB_FILE)),
            ..Default::default()
        };
        let state = tokio::task::spawn_blocking(move || AppState::open(config))
            .await
            .map_err(|e| fail(Box::new(e)))?
            .map_err(|e| fail(Box::new(e)))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| fail(Box::new(e)))?;
        let local = listener.local_addr().map_err(|e| fail(Box::new(e)))?;
        let relay = if relay {
            let relay = start_relay(local, &dir.join(RELAY_KEY_FILE)).map_err(fail)?;
            state.set_relay(&relay).map_err(|e| fail(Box::new(e)))?;
            Some(relay)
        } else {
            None
        };
        let relay_addr = relay.as_ref().and_then(|r| r.local_addr().ok());
        let cancel = CancellationToken::new();
        let (http_stop, relay_stop) = (cancel.clone(), cancel.clone());
        let serving = state.clone();
        let task = tokio::spawn(async move {
            let relay = async move {
                if let Some(relay) = relay {
                    relay.serve(relay_stop.cancelled_owned()).await;
                }
            };
            let http = async move {
                if let Err(e) =
                    p2p_discovery::serve(listener, serving, http_stop.cancelled_owned()).await
                {
                    tracing::warn!(error = %e, "embedded discovery server failed");
                }
            };
            tokio::join!(http, relay);
        });
        tracing::info!(%local, ?relay_addr, "embedded discovery server listening");
        Ok(Self {
            addr: local,
            relay_addr,
            state,
            cancel,
            task: Some(task),
        })
    }

    /// The URL this node uses for it.
    pub(crate) fn loopback_url(&self) -> String {
        format!("http://{}", loopback_for(self.addr))
    }

    /// What [`Serving`] says of it.
    pub(crate) fn serving(&self, advertised: bool) -> Serving {
        Serving {
            addr: self.addr,
            relay: self.relay_addr,
            urls: urls_for_others(self.addr),
            advertised,
        }
    }

    /// Stops serving; waits (briefly) until it has.
    pub(crate) async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(STOP_WAIT, task).await.is_err() {
                tracing::warn!("embedded discovery server did not stop in time");
            }
        }
    }
}

/// Binds the relay on the HTTP server's port number (UDP), or on any port when that one
/// is taken (nodes learn the relay's port from `GET /v1/relay`).
fn start_relay(
    http: SocketAddr,
    key: &Path,
) -> Result<Relay, Box<dyn std::error::Error + Send + Sync>> {
    let (secret, _) = p2p_crypto::keyfile::load_or_create(key, None)?;
    match Relay::bind(http, &secret, RelayConfig::default()) {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!(error = %e, "the relay takes another UDP port");
            Ok(Relay::bind(
                SocketAddr::new(http.ip(), 0),
                &secret,
                RelayConfig::default(),
            )?)
        }
    }
}

/// The loopback address for a listener bound to `addr` (an unspecified IP becomes
/// loopback; anything else stays).
pub(crate) fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// URLs others can reach a server listening on `addr` at: for an unspecified IP, one per
/// address of this machine that is up and not loopback (of the same family, or both for
/// `[::]`); else `addr` itself. Never `0.0.0.0`.
pub fn urls_for_others(addr: SocketAddr) -> Vec<String> {
    if !addr.ip().is_unspecified() {
        return mdns::urls([addr.ip()], addr.port());
    }
    let local = mdns::local_addrs().unwrap_or_default();
    let ips = local
        .into_iter()
        .map(|a| a.ip)
        .filter(|ip| addr.is_ipv6() || ip.is_ipv4());
    mdns::urls(ips, addr.port())
}

/// A discovery server this node runs, used over loopback (`--embedded-discovery ADDR`).
#[derive(Debug)]
pub struct EmbeddedDiscovery {
    server: Mutex<Option<Server>>,
    http: HttpDiscovery,
}

impl EmbeddedDiscovery {
    /// How a node is built with a server of its own on `addr`.
    pub fn config(addr: SocketAddr) -> EmbeddedConfig {
        EmbeddedConfig { addr }
    }

    fn take_server(&self) -> Option<Server> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A node's own discovery server on `addr`; see [`EmbeddedDiscovery::config`].
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedConfig {
    addr: SocketAddr,
}

impl IntoDiscovery for EmbeddedConfig {
    fn into_discovery(
        self: Box<Self>,
        ctx: DiscoveryContext,
    ) -> BoxFuture<'static, Result<Arc<dyn Discovery>, DiscoveryStartError>> {
        Box::pin(async move {
            let server = Server::start(self.addr, &ctx.data_dir, ctx.relay).await?;
            let url = server.loopback_url();
            let status = DiscoveryStatus {
                serving: Some(server.serving(false)),
                ..DiscoveryStatus::fixed(&url, Source::Serving)
            };
            let http = match HttpDiscovery::with_status(&url, ctx.timeout, status) {
                Ok(h) => h,
                Err(e) => {
                    server.stop().await;
                    return Err(e.into());
                }
            };
            let d: Arc<dyn Discovery> = Arc::new(EmbeddedDiscovery {
                server: Mutex::new(Some(server)),
                http,
            });
            Ok(d)
        })
    }
}

#[async_trait]
impl Discovery for EmbeddedDiscovery {
    fn status(&self) -> watch::Receiver<DiscoveryStatus> {
        self.http.status()
    }

    fn url(&self) -> String {
        self.http.url()
    }

    async fn claim_name(&self, secret: &SecretKey, name: &str) -> Result<(), DiscoveryError> {
        self.http.claim_name(secret, name).await
    }

    async fn announce(
        &self,
        secret: &SecretKey,
        announcement: &Announcement,
    ) -> Result<Duration, DiscoveryError> {
        self.http.announce(secret, announcement).await
    }

    async fn relay(&self) -> Result<Option<RelayRef>, DiscoveryError> {
        self.http.relay().await
    }

    async fn withdraw(&self, secret: &SecretKey) -> Result<(), DiscoveryError> {
        self.http.withdraw(secret).await
    }

    async fn online(&self) -> Result<Vec<PeerInfo>, DiscoveryError> {
        self.http.online().await
    }

    async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.http.lookup_name(name).await
    }

    async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.http.lookup_id(id).await
    }

    async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<(), DiscoveryError> {
        self.http.deposit(to, envelope).await
    }

    async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, DiscoveryError> {
        self.http.fetch_mailbox(secret).await
    }

    async fn delete_mailbox(&self, secret: &SecretKey, ids: &[u64]) -> Result<(), DiscoveryError> {
        self.http.delete_mailbox(secret, ids).await
    }

    async fn close(&self) {
        if let Some(server) = self.take_server() {
            server.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_for_unspecified_addresses() {
        let v4: SocketAddr = "0.0.0.0:7117".parse().expect("addr");
        assert_eq!(loopback_for(v4), "127.0.0.1:7117".parse().expect("addr"));
        let v6: SocketAddr = "[::]:7117".parse().expect("addr");
        assert_eq!(loopback_for(v6), "[::1]:7117".parse().expect("addr"));
        let lan: SocketAddr = "192.168.1.2:7117".parse().expect("addr");
        assert_eq!(loopback_for(lan), lan);
    }

    #[test]
    fn urls_for_others_never_name_the_unspecified_address() {
        let any: SocketAddr = "0.0.0.0:7117".parse().expect("addr");
        for url in urls_for_others(any) {
            assert!(
                !url.contains("0.0.0.0") && !url.contains("127.0.0.1"),
                "{url}"
            );
        }
        let lan: SocketAddr = "192.168.1.2:7117".parse().expect("addr");
        assert_eq!(urls_for_others(lan), vec!["http://192.168.1.2:7117"]);
    }
}
