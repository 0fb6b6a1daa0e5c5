//! The node's view of discovery: a thin adapter over the verifying
//! [`p2p_discovery`] client, and the embedded server.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{
    relay::{Relay, RelayConfig},
    Announcement, Client, ClientError, MailboxBatch, RelayRef,
};
use tokio_util::sync::CancellationToken;

use super::{loopback_for, BindError, PeerInfo};

/// A discovery request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The server did not answer in time.
    #[error("discovery server {url} did not answer in time")]
    Timeout {
        /// The server.
        url: String,
    },
    /// The client reported an error: unreachable, refused, or a record that does not
    /// verify.
    #[error("discovery server {url}: {source}")]
    Client {
        /// The server.
        url: String,
        /// What the client reported.
        #[source]
        source: ClientError,
    },
}

impl DiscoveryError {
    pub(crate) fn timeout(url: &str) -> Self {
        DiscoveryError::Timeout {
            url: url.to_owned(),
        }
    }

    /// Whether the server refused a name claim because another key holds the name.
    pub fn is_name_taken(&self) -> bool {
        matches!(
            self,
            DiscoveryError::Client {
                source: ClientError::NameTaken,
                ..
            }
        )
    }

    /// Whether the server refused an announcement naming a name this key has not
    /// claimed there.
    pub fn is_name_not_claimed(&self) -> bool {
        matches!(
            self,
            DiscoveryError::Client {
                source: ClientError::NameNotClaimed,
                ..
            }
        )
    }

    /// Whether the service could not answer at all (as opposed to refusing): the server
    /// is unreachable, timed out, or its database is down.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            DiscoveryError::Timeout { .. }
                | DiscoveryError::Client {
                    source: ClientError::Unreachable(_)
                        | ClientError::Timeout
                        | ClientError::Unavailable { .. },
                    ..
                }
        )
    }
}

/// The discovery client the node uses: the verifying [`Client`], with errors that name
/// the server.
#[derive(Debug)]
pub(crate) struct Disco {
    client: Client,
    url: String,
}

impl Disco {
    pub(crate) fn new(url: &str, timeout: Duration) -> Result<Self, DiscoveryError> {
        let client =
            Client::with_timeout(url, timeout).map_err(|source| DiscoveryError::Client {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self {
            client,
            url: url.to_owned(),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, source: ClientError) -> DiscoveryError {
        DiscoveryError::Client {
            url: self.url.clone(),
            source,
        }
    }

    /// The server's socket address, when the URL names one literally.
    pub(crate) fn server_addr(&self) -> Option<SocketAddr> {
        let rest = self.url.strip_prefix("http://")?;
        let host = rest.split('/').next()?;
        host.parse().ok()
    }

    pub(crate) async fn claim_name(
        &self,
        secret: &SecretKey,
        name: &str,
    ) -> Result<(), DiscoveryError> {
        self.client
            .claim_name(secret, name)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Announces; returns the server's hint of when to announce again.
    pub(crate) async fn announce(
        &self,
        secret: &SecretKey,
        announcement: &Announcement,
    ) -> Result<Duration, DiscoveryError> {
        self.client
            .announce_with(secret, announcement)
            .await
            .map(|o| o.reannounce_after)
            .map_err(|e| self.err(e))
    }

    /// The relay the server runs, if any.
    pub(crate) async fn relay(&self) -> Result<Option<RelayRef>, DiscoveryError> {
        self.client.relay_ref().await.map_err(|e| self.err(e))
    }

    pub(crate) async fn withdraw(&self, secret: &SecretKey) -> Result<(), DiscoveryError> {
        self.client
            .withdraw(secret)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub(crate) async fn online(&self) -> Result<Vec<PeerInfo>, DiscoveryError> {
        self.client.online().await.map_err(|e| self.err(e))
    }

    pub(crate) async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.client.lookup_name(name).await.map_err(|e| self.err(e))
    }

    pub(crate) async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.client.lookup_id(id).await.map_err(|e| self.err(e))
    }

    pub(crate) async fn deposit(
        &self,
        to: &NodeId,
        envelope: Vec<u8>,
    ) -> Result<(), DiscoveryError> {
        self.client
            .deposit(to, envelope)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub(crate) async fn fetch_mailbox(
        &self,
        secret: &SecretKey,
    ) -> Result<MailboxBatch, DiscoveryError> {
        self.client
            .fetch_mailbox(secret)
            .await
            .map_err(|e| self.err(e))
    }

    pub(crate) async fn delete_mailbox(
        &self,
        secret: &SecretKey,
        ids: &[u64],
    ) -> Result<(), DiscoveryError> {
        self.client
            .delete_mailbox(secret, ids)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

/// A discovery server running inside the node.
pub(crate) struct Embedded {
    pub(crate) addr: SocketAddr,
    pub(crate) url: String,
    /// The UDP address of its relay, if one runs.
    pub(crate) relay_addr: Option<SocketAddr>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// Opens the embedded server's database, binds `addr` (and its relay on the same UDP
/// port, or any port if that one is taken and `addr` asked for any), and serves until
/// `cancel`.
pub(crate) async fn start_embedded(
    addr: SocketAddr,
    db_path: PathBuf,
    relay_key: Option<PathBuf>,
    cancel: &CancellationToken,
) -> Result<Embedded, BindError> {
    let fail = |reason: Box<dyn std::error::Error + Send + Sync>| BindError::EmbeddedDiscovery {
        addr,
        reason,
    };
    let config = p2p_discovery::ServerConfig {
        db_path: Some(db_path),
        ..Default::default()
    };
    let state = tokio::task::spawn_blocking(move || p2p_discovery::AppState::open(config))
        .await?
        .map_err(|e| fail(Box::new(e)))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| fail(Box::new(e)))?;
    let local = listener.local_addr().map_err(|e| fail(Box::new(e)))?;
    let relay = match relay_key {
        Some(key) => {
            let relay = start_relay(local, &key).map_err(fail)?;
            state.set_relay(&relay).map_err(|e| fail(Box::new(e)))?;
            Some(relay)
        }
        None => None,
    };
    let relay_addr = relay.as_ref().and_then(|r| r.local_addr().ok());
    let url = format!("http://{}", loopback_for(local));
    let shutdown = cancel.clone().cancelled_owned();
    let relay_shutdown = cancel.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        let relay = async move {
            if let Some(relay) = relay {
                relay.serve(relay_shutdown).await;
            }
        };
        let http = async move {
            if let Err(e) = p2p_discovery::serve(listener, state, shutdown).await {
                tracing::warn!(error = %e, "embedded discovery server failed");
            }
        };
        tokio::join!(http, relay);
    });
    tracing::info!(%local, ?relay_addr, "embedded discovery server listening");
    Ok(Embedded {
        addr: local,
        url,
        relay_addr,
        task,
    })
}

/// Binds the embedded relay on the HTTP server's port number (UDP), or on any port when
/// that one is taken (nodes learn the relay's port from `GET /v1/relay`).
fn start_relay(
    http: SocketAddr,
    key: &std::path::Path,
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
