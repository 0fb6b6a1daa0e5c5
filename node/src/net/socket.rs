//! The UDP socket quinn runs on: real UDP for real addresses, and the path layer for
//! mapped ones (see [`super::paths`]).

use std::{
    io::{self, IoSliceMut},
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{ready, Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use p2p_crypto::NodeId;
use quinn::{
    udp::{RecvMeta, Transmit},
    AsyncUdpSocket, UdpPoller,
};
use tokio::io::Interest;

use super::{
    lock, mapped,
    paths::{Action, ProbeSource, Route},
    probe::{self, Probe},
    Outgoing, Shared, DEFERRED_ACTIONS, DEFERRED_PROBES,
};

/// quinn's view of the node's socket. Cheap: all state is in [`Shared`].
#[derive(Debug)]
pub(crate) struct PathSocket {
    pub(crate) shared: Arc<Shared>,
}

impl Shared {
    /// Sends one transmit to a real address.
    pub(super) fn send_udp(&self, transmit: &Transmit<'_>, to: SocketAddr) -> io::Result<()> {
        let transmit = Transmit {
            destination: self.family_addr(to),
            ..transmit.clone()
        };
        self.io.try_io(Interest::WRITABLE, || {
            self.udp.send((&self.io).into(), &transmit)
        })
    }

    /// Sends a datagram of our own (a probe) to a real address; best effort.
    pub(super) fn send_datagram(&self, to: SocketAddr, bytes: &[u8]) {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: None,
        };
        if let Err(e) = self.send_udp(&transmit, to) {
            tracing::trace!(%to, error = %e, "probe not sent");
        }
    }

    /// Queues the datagrams of a transmit for `peer` on the link to `relay`; drops them
    /// when that link is full or down (QUIC recovers lost packets).
    pub(super) fn send_relay(&self, relay: &NodeId, peer: [u8; 32], transmit: &Transmit<'_>) {
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let links = self.relays.read().unwrap_or_else(|e| e.into_inner());
        let Some(link) = links.get(relay) else {
            return;
        };
        for datagram in transmit.contents.chunks(segment) {
            if link
                .try_send(Outgoing::Packet(peer, Bytes::copy_from_slice(datagram)))
                .is_err()
            {
                tracing::trace!("relay link full; packet dropped");
                return;
            }
        }
    }

    /// An address of the socket's own family (IPv4-mapped on an IPv6 socket).
    fn family_addr(&self, addr: SocketAddr) -> SocketAddr {
        match (self.v6, addr) {
            (true, SocketAddr::V4(a)) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            (false, SocketAddr::V6(a)) => match a.ip().to_ipv4_mapped() {
                Some(ip) => SocketAddr::new(ip.into(), a.port()),
                None => addr,
            },
            _ => addr,
        }
    }

    /// Handles a probe that arrived from `src`, keeping its signature work (an ed25519
    /// verification, and signing each answer: tens of microseconds apiece) off the path
    /// of the QUIC packets read with it, which wait for this call. A probe that can change
    /// how the datagrams after it are labelled (one from an address its sender holds no
    /// claim on: a dial's first ping goes just ahead of its handshake, which must arrive
    /// labelled) is verified here, and only its answers wait for the driver. Any other (its
    /// sender holds the claim already, or a relay delivered it) waits for the driver whole.
    /// Without a driver (a bare endpoint), everything is done here.
    pub(super) fn on_probe_datagram(&self, datagram: &[u8], src: ProbeSource) {
        if !self.driven.load(Ordering::Acquire) {
            let answers = self.verify_probe(datagram, src);
            self.execute(answers);
            return;
        }
        let labels_nothing_new = match src {
            ProbeSource::Relay(_) => true,
            ProbeSource::Udp(addr) => probe::named_sender(datagram)
                .is_some_and(|from| self.paths().claim_holder(addr, Instant::now()) == Some(from)),
        };
        if labels_nothing_new {
            let mut deferred = lock(&self.deferred);
            if deferred.probes.len() >= DEFERRED_PROBES {
                tracing::debug!(?src, "probe queue full; dropping a probe");
                return;
            }
            deferred.probes.push_back((datagram.to_vec(), src));
        } else {
            let actions = self.verify_probe(datagram, src);
            let mut deferred = lock(&self.deferred);
            let room = DEFERRED_ACTIONS.saturating_sub(deferred.actions.len());
            if actions.len() > room {
                tracing::debug!(?src, "probe answer queue full; dropping answers");
            }
            deferred.actions.extend(actions.into_iter().take(room));
        }
        self.wake.notify_one();
    }

    /// Verifies a probe (within the verification budget) and returns what the path table
    /// answers.
    fn verify_probe(&self, datagram: &[u8], src: ProbeSource) -> Vec<Action> {
        let now = Instant::now();
        if !lock(&self.probe_budget).take(1.0, now) {
            tracing::debug!("probe verification budget exhausted; dropping a probe");
            return Vec::new();
        }
        let probe = match Probe::decode(datagram) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(?src, error = %e, "invalid probe");
                return Vec::new();
            }
        };
        tracing::trace!(from = %probe.from, ?src, kind = ?probe.kind, "probe in");
        self.paths().on_probe(probe, src, now)
    }

    /// Runs the probe work left to the driver (see [`Shared::on_probe_datagram`]): what
    /// was decided first, in order, then the waiting probes.
    pub(super) fn run_deferred(&self) {
        let (probes, actions) = {
            let mut deferred = lock(&self.deferred);
            (
                std::mem::take(&mut deferred.probes),
                std::mem::take(&mut deferred.actions),
            )
        };
        self.execute(actions);
        for (datagram, src) in probes {
            let actions = self.verify_probe(&datagram, src);
            self.execute(actions);
        }
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            shared: self.shared.clone(),
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let shared = &self.shared;
        let Some(index) = mapped::index(transmit.destination) else {
            return shared.send_udp(transmit, transmit.destination);
        };
        let now = Instant::now();
        let (route, wake, probes) = {
            let mut paths = shared.paths();
            let route = paths.route(index, now);
            (route, paths.take_poll_request(), paths.take_actions())
        };
        if !probes.is_empty() {
            shared.execute(probes);
        }
        if wake {
            shared.wake.notify_one();
        }
        match route {
            Route::Direct(addr) => shared.send_udp(transmit, addr),
            Route::Relay { relay, peer } => {
                shared.send_relay(&relay, peer, transmit);
                Ok(())
            }
            Route::Both { addr, relay, peer } => {
                shared.send_udp(transmit, addr)?;
                shared.send_relay(&relay, peer, transmit);
                Ok(())
            }
            Route::Spray(addrs) => {
                for addr in addrs {
                    // Best effort per address: one full buffer must not stop the others.
                    let _ = shared.send_udp(transmit, addr);
                }
                Ok(())
            }
            Route::Drop => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let max = bufs.len().min(meta.len());
        let mut n = 0;
        // Relayed packets first (a bounded number per call, so UDP is not starved).
        n += shared.poll_relayed(cx, &mut bufs[..max], &mut meta[..max]);
        if n < max {
            if let Poll::Ready(Ok(got)) = shared.poll_udp(cx, &mut bufs[n..max], &mut meta[n..max])
            {
                n += got;
            }
        }
        if n > 0 {
            Poll::Ready(Ok(n))
        } else {
            Poll::Pending
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.shared.udp.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.shared.udp.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.shared.udp.may_fragment()
    }
}

impl Shared {
    /// Moves relayed packets into quinn's buffers, labelled with their senders' mapped
    /// addresses. Probes among them are handled here.
    fn poll_relayed(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut rx = lock(&self.inbound_rx);
        let mut n = 0;
        while n < bufs.len() {
            let item = match rx.poll_recv(cx) {
                Poll::Ready(Some(item)) => item,
                Poll::Ready(None) | Poll::Pending => break,
            };
            if probe::is_probe(&item.packet) {
                self.on_probe_datagram(&item.packet, ProbeSource::Relay(item.relay.node_id));
                continue;
            }
            let len = item.packet.len();
            if len > bufs[n].len() {
                continue;
            }
            let label = self
                .paths()
                .label_relay(item.src, item.relay, Instant::now());
            let Some(addr) = label else {
                continue;
            };
            bufs[n][..len].copy_from_slice(&item.packet);
            meta[n] = RecvMeta {
                addr,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        n
    }

    /// Receives UDP datagrams: probes are handled and removed, the rest are labelled.
    fn poll_udp(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let got = match self.io.try_io(Interest::READABLE, || {
                self.udp.recv((&self.io).into(), bufs, meta)
            }) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let kept = self.sort_udp(&mut bufs[..got], &mut meta[..got]);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    /// Handles probes among received datagrams and labels the rest; returns how many
    /// entries remain (compacted to the front).
    fn sort_udp(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let now = Instant::now();
        let mut kept = 0;
        for i in 0..meta.len() {
            let mut m = meta[i];
            let src = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
            let stride = m.stride.max(1);
            // Probes are handled here and cut out of the buffer (GRO may have coalesced
            // them with QUIC datagrams of the same size from the same source).
            let mut len = m.len.min(bufs[i].len());
            let mut start = 0;
            while start < len {
                let end = (start + stride).min(len);
                if probe::is_probe(&bufs[i][start..end]) {
                    let datagram = bufs[i][start..end].to_vec();
                    self.on_probe_datagram(&datagram, ProbeSource::Udp(src));
                    bufs[i].copy_within(end..len, start);
                    len -= end - start;
                } else {
                    start = end;
                }
            }
            if len == 0 {
                continue;
            }
            m.len = len;
            let long_header = bufs[i].first().is_some_and(|b| b & 0x80 != 0);
            if let Some(label) = self.paths().label_udp(src, long_header, now) {
                m.addr = label;
            }
            if kept != i {
                let (head, tail) = bufs.split_at_mut(i);
                head[kept][..len].copy_from_slice(&tail[0][..len]);
            }
            meta[kept] = m;
            kept += 1;
        }
        kept
    }
}

/// Waits until the UDP socket is writable (relay links never block quinn).
struct Poller {
    shared: Arc<Shared>,
    fut: Option<Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.fut.is_none() {
            let shared = this.shared.clone();
            this.fut = Some(Box::pin(async move { shared.io.writable().await }));
        }
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let result = fut.as_mut().poll(cx);
        if result.is_ready() {
            this.fut = None;
        }
        result
    }
}
