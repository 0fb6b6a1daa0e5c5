//! The delivery tracker: which messages are being sent or settled right now, and which
//! peers' outbox entries are due at once. Keeps `send` and the outbox task from sending
//! the same message twice at the same time.

use std::collections::HashSet;

use p2p_crypto::NodeId;

use crate::wire::MessageId;

/// Messages in flight and outbox wake-ups.
#[derive(Debug, Default)]
pub(super) struct DeliveryTracker {
    /// Messages being delivered right now (by `send` or the outbox task).
    in_flight: HashSet<MessageId>,
    /// Messages whose answer is being written (see `deliver::settle`).
    settling: HashSet<MessageId>,
    /// Peers whose outbox entries are due at once.
    wake: HashSet<NodeId>,
}

impl DeliveryTracker {
    /// Marks `id` in flight for `send`, which owns it from its first write.
    pub(super) fn start_send(&mut self, id: MessageId) {
        self.in_flight.insert(id);
    }

    /// Claims `id` for one outbox attempt: `false` if someone is sending or settling it.
    pub(super) fn try_start(&mut self, id: MessageId) -> bool {
        !self.settling.contains(&id) && self.in_flight.insert(id)
    }

    /// Whether someone is sending or settling `id` right now.
    pub(super) fn is_busy(&self, id: &MessageId) -> bool {
        self.in_flight.contains(id) || self.settling.contains(id)
    }

    /// The attempt on `id` is over.
    pub(super) fn finish(&mut self, id: &MessageId) {
        self.in_flight.remove(id);
    }

    /// The answer for `id` is being written.
    pub(super) fn settling(&mut self, id: MessageId) {
        self.settling.insert(id);
    }

    /// The answer for `id` is written.
    pub(super) fn settled(&mut self, id: &MessageId) {
        self.settling.remove(id);
    }

    /// Makes `peer`'s entries due at the next outbox round.
    pub(super) fn wake(&mut self, peer: NodeId) {
        self.wake.insert(peer);
    }

    /// Starts an outbox round: the woken peers (cleared) and the messages busy now.
    pub(super) fn take_round(&mut self) -> (HashSet<NodeId>, HashSet<MessageId>) {
        let busy = self.in_flight.union(&self.settling).copied().collect();
        (std::mem::take(&mut self.wake), busy)
    }

    /// Keeps wake-ups for peers whose messages were busy during a round.
    pub(super) fn rewake(&mut self, peers: impl IntoIterator<Item = NodeId>) {
        self.wake.extend(peers);
    }

    /// Forgets wake-ups (the outbox is empty).
    pub(super) fn clear_wakes(&mut self) {
        self.wake.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_attempt_at_a_time() {
        let mut t = DeliveryTracker::default();
        let id = MessageId([1; 16]);
        t.start_send(id);
        assert!(!t.try_start(id), "send owns it");
        t.finish(&id);
        assert!(t.try_start(id));
        assert!(!t.try_start(id), "the outbox owns it");
        t.finish(&id);
        t.settling(id);
        assert!(!t.try_start(id), "being settled");
        t.settled(&id);
        assert!(t.try_start(id));
    }

    #[test]
    fn rounds_take_wakes_and_see_busy_messages() {
        let mut t = DeliveryTracker::default();
        let peer = p2p_crypto::SecretKey::from_bytes(&[3; 32]).public();
        let id = MessageId([2; 16]);
        t.wake(peer);
        t.start_send(id);
        let (woken, busy) = t.take_round();
        assert!(woken.contains(&peer) && busy.contains(&id));
        let (woken, _) = t.take_round();
        assert!(woken.is_empty(), "taken");
        t.rewake([peer]);
        assert!(t.take_round().0.contains(&peer));
        t.wake(peer);
        t.clear_wakes();
        assert!(t.take_round().0.is_empty());
    }
}
