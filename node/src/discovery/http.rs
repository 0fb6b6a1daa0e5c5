//! A discovery server at a URL, through the verifying [`p2p_discovery::Client`].

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;
use p2p_crypto::{NodeId, SecretKey};
use p2p_discovery::{Announcement, Client, ClientError, MailboxBatch, PeerInfo, RelayRef};
use tokio::sync::watch;

use super::{
    Discovery, DiscoveryContext, DiscoveryError, DiscoveryStartError, DiscoveryStatus,
    IntoDiscovery, Source,
};

/// A discovery server at a URL; errors name the server.
#[derive(Debug)]
pub struct HttpDiscovery {
    client: Client,
    url: String,
    status: watch::Sender<DiscoveryStatus>,
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
        })
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
        self.client.lookup_name(name).await.map_err(|e| self.err(e))
    }

    async fn lookup_id(&self, id: &NodeId) -> Result<Option<PeerInfo>, DiscoveryError> {
        self.client.lookup_id(id).await.map_err(|e| self.err(e))
    }

    async fn deposit(&self, to: &NodeId, envelope: Vec<u8>) -> Result<(), DiscoveryError> {
        self.client
            .deposit(to, envelope)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    async fn fetch_mailbox(&self, secret: &SecretKey) -> Result<MailboxBatch, DiscoveryError> {
        self.client
            .fetch_mailbox(secret)
            .await
            .map_err(|e| self.err(e))
    }

    async fn delete_mailbox(&self, secret: &SecretKey, ids: &[u64]) -> Result<(), DiscoveryError> {
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
