//! A discovery server at a URL, through the verifying [`p2p_discovery::Client`].

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{Announcement, Client, ClientError, MailboxBatch, PeerInfo, RelayRef};
use tokio::sync::{watch, Semaphore, SemaphorePermit};

use super::{
    Discovery, DiscoveryContext, DiscoveryError, DiscoveryStartError, DiscoveryStatus,
    IntoDiscovery, Source,
};

/// Lookups and mailbox requests a node has in flight to its discovery server at once;
/// more wait for one of them to finish. A burst of sends to offline peers makes a lookup
/// and a deposit each, and on as many connections the server would refuse those past its
/// limit per address (64 by default) with `503 too_many_connections`, this node's own
/// announce and online list among them. Announcing, withdrawing, claiming a name and the
/// online list do not wait here.
pub(crate) const MAX_REQUESTS: usize = 16;

/// A discovery server at a URL; errors name the server.
#[derive(Debug)]
pub struct HttpDiscovery {
    client: Client,
    url: String,
    status: watch::Sender<DiscoveryStatus>,
    /// Permits for lookups and mailbox requests ([`MAX_REQUESTS`]).
    requests: Semaphore,
}

impl HttpDiscovery {
    /// The server at `url` (`http://HOST:PORT`); each request may take `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, DiscoveryError> {
        Self::with_status(
            url,
            timeout,
            DiscoveryStatus::fixed(url, Source::Configured),
        )
    }

    pub(super) fn with_status(
        url: &str,
        timeout: Duration,
        status: DiscoveryStatus,
    ) -> Result<Self, DiscoveryError> {
        let client =
            Client::with_timeout(url, timeout).map_err(|source| DiscoveryError::Client {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self {
            client,
            url: url.to_owned(),
            status: watch::channel(status).0,
            requests: Semaphore::new(MAX_REQUESTS),
        })
    }

    /// Waits for a turn to make a lookup or mailbox request (see [`MAX_REQUESTS`]).
    async fn turn(&self) -> Option<SemaphorePermit<'_>> {
        // `None` only for a closed semaphore, and this one is never closed.
        self.requests.acquire().await.ok()
    }

    /// The verifying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err(&self, source: ClientError) -> DiscoveryError {
        DiscoveryError::Client {
            url: self.url.clone(),
            source,
        }
    }

    /// Checks that the server answers.
    pub async fn health(&self) -> Result<(), DiscoveryError> {
        self.client.health().await.map_err(|e| self.err(e))
    }
}

#[async_trait]
impl Discovery for HttpDiscovery {
    fn status(&self) -> watch::Receiver<DiscoveryStatus> {
        self.status.subscribe()
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn presence_resets(&self) -> Option<watch::Receiver<u64>> {
        Some(self.client.presence_resets())
    }

    async fn claim_name(&self, secret: &SecretKey, name: &str) -> Result<(), DiscoveryError> {
        self.client
            .claim_name(secret, name)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    async fn announce(
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

    async fn relay(&self) -> Result<Option<RelayRef>, DiscoveryError> {
        self.client.relay_ref().await.map_err(|e| self.err(e))
    }

    async fn withdraw(&self, secret: &SecretKey) -> Result<(), DiscoveryError> {
        self.client
            .withdraw(secret)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    async fn online(&self) -> Result<Vec<PeerInfo>, DiscoveryError> {
        self.client.online().await.map_err(|e| self.err(e))
    }

    async fn lookup_name(&self, name: &str) -> Result<Option<PeerInfo>, DiscoveryError> {
        let _turn = self.turn().await;
        self.client.lookup_name(name).await.map_err(|e| self.err(e))
    }

    async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError> {
        let _turn = self.turn().await;
        self.client.lookup_id(id).await.map_err(|e| self.err(e))
    }

    async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<(), DiscoveryError> {
        let _turn = self.turn().await;
        self.client
            .deposit(to, envelope)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, DiscoveryError> {
        let _turn = self.turn().await;
        self.client
            .fetch_mailbox(secret)
            .await
            .map_err(|e| self.err(e))
    }

    async fn delete_mailbox(&self, secret: &SecretKey, ids: &[u64]) -> Result<(), DiscoveryError> {
        let _turn = self.turn().await;
        self.client
            .delete_mailbox(secret, ids)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

/// A discovery server at a URL, as a node is built with it (`--discovery URL`).
#[derive(Debug, Clone)]
pub struct DiscoveryUrl(pub String);

impl IntoDiscovery for DiscoveryUrl {
    fn into_discovery(
        self: Box<Self>,
        ctx: DiscoveryContext,
    ) -> BoxFuture<'static, Result<Arc<dyn Discovery>, DiscoveryStartError>> {
        Box::pin(async move {
            let d: Arc<dyn Discovery> = Arc::new(HttpDiscovery::new(&self.0, ctx.timeout)?);
            Ok(d)
        })
    }
}
