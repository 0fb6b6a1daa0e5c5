//! How a node finds others: the [`Discovery`] trait and what plugs into it.
//!
//! A node is built with one discovery ([`crate::node::NodeBuilder::discovery`]):
//!
//! - [`HttpDiscovery`]: a discovery server at a URL (`--discovery URL`);
//! - [`EmbeddedDiscovery`]: a server this node runs itself, used over loopback
//!   (`--embedded-discovery ADDR`);
//! - [`LanDiscovery`]: the LAN's server, found with mDNS, or served and advertised by this
//!   node when there is none, following the LAN as servers come and go (the default with
//!   no discovery option);
//! - [`MemoryDiscovery`]: an in-process fake for tests.
//!
//! Each is given a [`DiscoveryContext`] when the node binds, and reports which server it
//! uses through [`Discovery::status`]; the node announces, claims its name, asks for
//! the relay and drains its mailbox again at once when that changes.

use std::{fmt, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{Announcement, ClientError, MailboxBatch, PeerInfo, RelayRef};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod embedded;
mod http;
mod lan;
pub mod mdns;
mod memory;

pub use embedded::{EmbeddedDiscovery, EmbeddedError};
pub use http::{DiscoveryUrl, HttpDiscovery};
pub use lan::{check_url, find_lan_server, FoundServer, LanConfig, LanDiscovery};
pub use memory::MemoryDiscovery;

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
    /// No server is in use at the moment (the LAN's server left and another is being
    /// found).
    #[error("no discovery server in use right now ({0})")]
    NoServer(&'static str),
}

impl DiscoveryError {
    pub(crate) fn timeout(url: impl Into<String>) -> Self {
        DiscoveryError::Timeout { url: url.into() }
    }

    fn source(&self) -> Option<&ClientError> {
        match self {
            DiscoveryError::Client { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether the server refused a name claim because another key holds the name.
    pub fn is_name_taken(&self) -> bool {
        matches!(self.source(), Some(ClientError::NameTaken))
    }

    /// Whether the server refused an announcement naming a name this key has not
    /// claimed there.
    pub fn is_name_not_claimed(&self) -> bool {
        matches!(self.source(), Some(ClientError::NameNotClaimed))
    }

    /// Whether the server already holds a record at least as new from this node (an
    /// announce that raced with another one).
    pub fn is_stale(&self) -> bool {
        matches!(self.source(), Some(ClientError::Server { code, .. }) if code == "stale_record")
    }

    /// Whether the server could not be reached at all, or cannot serve right now (as
    /// opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        match self {
            DiscoveryError::Timeout { .. } | DiscoveryError::NoServer(_) => true,
            DiscoveryError::Client { source, .. } => matches!(
                source,
                ClientError::Unreachable(_)
                    | ClientError::Timeout
                    | ClientError::Unavailable { .. }
            ),
        }
    }
}

/// How the server in use was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Given by URL.
    Configured,
    /// Found on the LAN with mDNS.
    Mdns,
    /// Served by this node.
    Serving,
    /// An in-process fake.
    Memory,
}

/// A discovery server this node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// Where its HTTP listens.
    pub addr: SocketAddr,
    /// Where its relay listens (UDP), if it runs one.
    pub relay: Option<SocketAddr>,
    /// URLs others can use for it: one per address of this machine that is up and not
    /// loopback when it listens on all of them.
    pub urls: Vec<String>,
    /// Whether it is advertised on the LAN with mDNS.
    pub advertised: bool,
}

/// Which server a node uses; changes when the LAN's server changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryStatus {
    /// Counts the changes of server, from 0.
    pub generation: u64,
    /// The URL of the server in use; `None` while there is none.
    pub url: Option<String>,
    /// The NodeId of the node serving it, when known (LAN servers sign their
    /// advertisement).
    pub server: Option<NodeId>,
    /// How it was chosen.
    pub source: Source,
    /// The server this node runs, if it runs one now.
    pub serving: Option<Serving>,
}

impl DiscoveryStatus {
    /// A status that never changes: `url`, chosen by `source`.
    pub fn fixed(url: &str, source: Source) -> Self {
        Self {
            generation: 0,
            url: Some(url.to_owned()),
            server: None,
            source,
            serving: None,
        }
    }
}

/// What a discovery is given when the node binds.
#[derive(Debug, Clone)]
pub struct DiscoveryContext {
    /// The node's key (a LAN server's advertisement is signed with it).
    pub secret: SecretKey,
    /// The node's data directory: an embedded server keeps its store and relay key here.
    pub data_dir: PathBuf,
    /// Whether a server this node runs also runs a relay.
    pub relay: bool,
    /// How long one request may take.
    pub timeout: Duration,
    /// Cancelled when the node's background tasks stop, before it withdraws its presence
    /// and closes the discovery ([`Discovery::close`]).
    pub cancel: CancellationToken,
}

/// The discovery service a node uses: names, presence, mailboxes and the relay's
/// address, wherever they come from.
#[async_trait]
pub trait Discovery: Send + Sync + fmt::Debug + 'static {
    /// Which server is in use, and its changes.
    fn status(&self) -> watch::Receiver<DiscoveryStatus>;

    /// The URL of the server in use, for messages (`"none"` while there is none).
    fn url(&self) -> String {
        self.status()
            .borrow()
            .url
            .clone()
            .unwrap_or_else(|| "none".to_owned())
    }

    /// The server's socket address, when its URL names one literally.
    fn server_addr(&self) -> Option<SocketAddr> {
        let url = self.status().borrow().url.clone()?;
        let rest = url.strip_prefix("http://")?;
        rest.split('/').next()?.parse().ok()
    }

    /// Counts the restarts of the server in use in which it forgot every presence record
    /// (seen on its responses, see [`p2p_discovery::api::HEADER_PRESENCE_EPOCH`]): the
    /// node announces itself again at once when it changes. `None` when this discovery
    /// cannot tell.
    fn presence_resets(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Claims `name` for the node of `secret`.
    async fn claim_name(&self, secret: &SecretKey, name: &str) -> Result<(), DiscoveryError>;

    /// Announces the node online; returns the server's hint of when to announce again.
    async fn announce(
        &self,
        secret: &SecretKey,
        announcement: &Announcement,
    ) -> Result<Duration, DiscoveryError>;

    /// The relay the server runs, if any.
    async fn relay(&self) -> Result<Option<RelayRef>, DiscoveryError>;

    /// Announces the node offline.
    async fn withdraw(&self, secret: &SecretKey) -> Result<(), DiscoveryError>;

    /// Everyone online.
    async fn online(&self) -> Result<Vec<PeerInfo>, DiscoveryError>;

    /// The node that claimed `name`.
    async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, DiscoveryError>;

    /// What is known of `id`.
    async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError>;

    /// Leaves a sealed envelope in the mailbox of `to`.
    async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<(), DiscoveryError>;

    /// A batch of the node's own mailbox.
    async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, DiscoveryError>;

    /// Deletes items of the node's own mailbox.
    async fn delete_mailbox(&self, secret: &SecretKey, ids: &[u64]) -> Result<(), DiscoveryError>;

    /// Stops what this discovery runs (a server, an advertisement), saying goodbye where
    /// that helps others; bounded in time.
    async fn close(&self) {}
}

/// Something a node can be built with, turned into its [`Discovery`] when it binds.
pub trait IntoDiscovery: Send + fmt::Debug + 'static {
    /// Starts the discovery for a node.
    fn into_discovery(
        self: Box<Self>,
        ctx: DiscoveryContext,
    ) -> BoxFuture<'static, Result<Arc<dyn Discovery>, DiscoveryStartError>>;
}

/// A discovery could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryStartError {
    /// The discovery URL is not usable.
    #[error(transparent)]
    Url(#[from] DiscoveryError),
    /// The embedded server could not start.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
}

/// An already started discovery, shared (for example by several nodes of a test).
impl IntoDiscovery for Arc<dyn Discovery> {
    fn into_discovery(
        self: Box<Self>,
        _ctx: DiscoveryContext,
    ) -> BoxFuture<'static, Result<Arc<dyn Discovery>, DiscoveryStartError>> {
        Box::pin(async move { Ok(*self) })
    }
}
