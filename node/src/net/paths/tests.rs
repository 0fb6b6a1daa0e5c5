//! The path policy, driven with a virtual clock and no sockets.

use std::collections::HashSet;

use p2p_crypto::SecretKey;

use super::*;

fn key(seed: u8) -> SecretKey {
    SecretKey::from_bytes(&[seed; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn relay_ref() -> RelayRef {
    RelayRef {
        node_id: key(99).public(),
        addr: addr("198.18.0.1:7117"),
    }
}

struct Fixture {
    t0: Instant,
    me: SecretKey,
    peer: SecretKey,
    paths: Paths,
    index: u32,
}

/// A table for `me` that knows `peer` with the given candidates and the shared relay (up).
fn fixture(candidates: &[&str], relay_up: bool) -> Fixture {
    let t0 = Instant::now();
    let me = key(1);
    let peer = key(2);
    let mut paths = Paths::new(me.public(), PathConfig::default(), false);
    paths.set_home(Some(relay_ref()));
    paths.set_relay_up(relay_ref().node_id, relay_up);
    let mapped = paths.mapped_addr(peer.public(), t0).expect("room");
    let cands: Vec<SocketAddr> = candidates.iter().map(|c| addr(c)).collect();
    paths.set_peer_info(peer.public(), &cands, Some(relay_ref()), t0);
    let index = mapped::index(mapped).expect("mapped");
    Fixture {
        t0,
        me,
        peer,
        paths,
        index,
    }
}

fn pings(actions: &[Action]) -> Vec<(SocketAddr, TxId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendUdp {
                addr,
                probe:
                    Probe {
                        kind: ProbeKind::Ping,
                        tx,
                        ..
                    },
            } => Some((*addr, *tx)),
            _ => None,
        })
        .collect()
}

fn pong(f: &Fixture, tx: TxId) -> Probe {
    Probe {
        from: f.peer.public(),
        to: f.me.public(),
        tx,
        kind: ProbeKind::Pong {
            observed: addr("203.0.113.1:5000"),
        },
    }
}

#[test]
fn relay_first_then_a_punch_round_then_direct() {
    let mut f = fixture(&["198.18.0.12:4000", "192.168.1.2:4000"], true);
    let t = f.t0;
    // No proven direct path: packets go through the relay, and the driver is asked to
    // start a punch round.
    assert_eq!(
        f.paths.route(f.index, t),
        Route::Relay {
            relay: relay_ref().node_id,
            peer: *f.peer.public().as_bytes()
        }
    );
    assert!(f.paths.take_poll_request());
    let actions = f.paths.poll(t);
    // CallMeMaybe through the relay with our candidates, and a ping to every candidate.
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::SendRelay {
            probe: Probe {
                kind: ProbeKind::CallMeMaybe { .. },
                ..
            },
            ..
        }
    )));
    let sent = pings(&actions);
    assert_eq!(sent.len(), 2);
    assert_eq!(f.paths.take_stats().attempts, 1);
    // The public candidate answers 20 ms later.
    let (public, tx) = sent[0];
    let t1 = t + Duration::from_millis(20);
    let out = f.paths.on_probe(pong(&f, tx), ProbeSource::Udp(public), t1);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::PathChanged { path: Some(PathKind::Direct), addr: Some(a), rtt: Some(rtt), .. }
            if *a == public && *rtt == Duration::from_millis(20)
    )));
    assert_eq!(f.paths.route(f.index, t1), Route::Direct(public));
    assert_eq!(
        f.paths.path_of(&f.peer.public(), t1),
        Some(PathKind::Direct)
    );
    assert_eq!(f.paths.take_stats().successes, 1);
    // Datagrams from the proven address now carry the peer's label.
    let label = f.paths.label_udp(public, false, t1);
    assert_eq!(label, Some(mapped::addr(f.index, false)));
    assert_eq!(f.paths.recv_path(&f.peer.public()), Some(PathKind::Direct));
}

#[test]
fn a_lapsing_path_goes_both_ways_then_falls_back_to_the_relay() {
    let (mut f, a) = proven_direct();
    let t = f.t0;
    // Heartbeats go out while packets flow.
    let t2 = t + Duration::from_secs(2);
    f.paths.route(f.index, t2);
    assert_eq!(pings(&f.paths.poll(t2)), vec![(a, pings_tx(&f, a))]);
    // No pong for longer than the trust window: both paths carry every packet.
    let t6 = t + Duration::from_secs(6);
    assert_eq!(
        f.paths.route(f.index, t6),
        Route::Both {
            addr: a,
            relay: relay_ref().node_id,
            peer: *f.peer.public().as_bytes()
        }
    );
    // Dead after `dead` without a pong: back on the relay alone, and an event says so.
    let t13 = t + Duration::from_secs(13);
    let out = f.paths.poll(t13);
    assert!(out.contains(&Action::PathChanged {
        peer: f.peer.public(),
        path: Some(PathKind::Relay),
        addr: None,
        rtt: None
    }));
    assert!(matches!(f.paths.route(f.index, t13), Route::Relay { .. }));
}

#[test]
fn a_direct_path_that_stops_answering_gets_relay_copies_within_a_second() {
    let (mut f, a) = proven_direct();
    let t = f.t0;
    // Packets go direct and the peer's acks come back: direct alone.
    let mut now = t;
    for _ in 0..20 {
        now += Duration::from_millis(100);
        assert_eq!(f.paths.route(f.index, now), Route::Direct(a));
        f.paths.label_udp(a, false, now);
    }
    // The path goes silent: within a second of the first unanswered packet, copies go
    // through the relay too, and the reported path is the one that answers.
    let cut = now;
    let mut both_at = None;
    for _ in 0..15 {
        now += Duration::from_millis(100);
        if let Route::Both { .. } = f.paths.route(f.index, now) {
            both_at.get_or_insert(now - cut);
        }
    }
    let both_at = both_at.expect("relay copies");
    assert!(
        both_at <= SUSPECT + Duration::from_millis(100),
        "{both_at:?}"
    );
    let stranger_relay = relay_ref();
    f.paths.label_relay(f.peer.public(), stranger_relay, now);
    assert_eq!(
        f.paths.path_of(&f.peer.public(), now),
        Some(PathKind::Relay)
    );
    // It answers again: direct alone again.
    f.paths.label_udp(a, false, now);
    assert_eq!(f.paths.route(f.index, now), Route::Direct(a));
}

#[test]
fn a_path_moves_to_another_address_only_when_clearly_faster_and_says_nothing() {
    let mut f = fixture(&["198.18.0.12:4000", "192.168.1.2:4000"], true);
    let t = f.t0;
    f.paths.route(f.index, t);
    let sent = pings(&f.paths.poll(t));
    let (public, tx_pub) = sent[0];
    let (lan, tx_lan) = sent[1];
    // The public address answers first (20 ms): the path, with one event.
    let out = f.paths.on_probe(
        pong(&f, tx_pub),
        ProbeSource::Udp(public),
        t + Duration::from_millis(20),
    );
    assert_eq!(out.len(), 1);
    // The LAN address answers at 15 ms: not clearly faster, the path stays.
    let out = f.paths.on_probe(
        pong(&f, tx_lan),
        ProbeSource::Udp(lan),
        t + Duration::from_millis(15),
    );
    assert!(out.is_empty());
    assert_eq!(
        f.paths.route(f.index, t + Duration::from_millis(20)),
        Route::Direct(public)
    );
    // A later ping of the LAN address answered in 1 ms: clearly faster, the path moves,
    // and no event (the path is still direct).
    let t1 = t + Duration::from_millis(100);
    let mut out = Vec::new();
    f.paths.ping(*f.peer.public().as_bytes(), lan, t1, &mut out);
    let (_, tx) = pings(&out)[0];
    let out = f.paths.on_probe(
        pong(&f, tx),
        ProbeSource::Udp(lan),
        t1 + Duration::from_millis(1),
    );
    assert!(out.is_empty());
    assert_eq!(
        f.paths.route(f.index, t1 + Duration::from_millis(1)),
        Route::Direct(lan)
    );
}

#[test]
fn a_peer_asking_to_punch_makes_a_proven_path_doubtful_until_proven_again() {
    let (mut f, old) = proven_direct();
    let t = f.t0;
    // The peer restarted elsewhere and asks to punch: our path may lead nowhere now.
    let t1 = t + Duration::from_millis(500);
    let ask = Probe {
        from: f.peer.public(),
        to: f.me.public(),
        tx: [0; 12],
        kind: ProbeKind::CallMeMaybe {
            candidates: vec![addr("198.18.0.12:4777")],
        },
    };
    let out = f
        .paths
        .on_probe(ask, ProbeSource::Relay(relay_ref().node_id), t1);
    let sent: Vec<SocketAddr> = pings(&out).into_iter().map(|(a, _)| a).collect();
    assert!(sent.contains(&addr("198.18.0.12:4777")), "{sent:?}");
    assert!(matches!(f.paths.route(f.index, t1), Route::Both { addr, .. } if addr == old));
    // The new address answers: it becomes the path, direct alone.
    let (_, tx) = pings(&out)
        .into_iter()
        .find(|(a, _)| *a == addr("198.18.0.12:4777"))
        .expect("pinged");
    f.paths
        .on_probe(pong(&f, tx), ProbeSource::Udp(addr("198.18.0.12:4777")), t1);
    assert_eq!(
        f.paths.route(f.index, t1),
        Route::Direct(addr("198.18.0.12:4777"))
    );
}

/// A fixture whose one candidate answered the first punch round: the direct path.
fn proven_direct() -> (Fixture, SocketAddr) {
    let mut f = fixture(&["198.18.0.12:4000"], true);
    let t = f.t0;
    f.paths.route(f.index, t);
    let (a, tx) = pings(&f.paths.poll(t))[0];
    f.paths.on_probe(pong(&f, tx), ProbeSource::Udp(a), t);
    assert_eq!(f.paths.route(f.index, t), Route::Direct(a));
    (f, a)
}

/// The tx of the last ping sent to `a`.
fn pings_tx(f: &Fixture, a: SocketAddr) -> TxId {
    let peer = f.paths.peers.get(f.peer.public().as_bytes()).expect("peer");
    peer.candidate(a)
        .and_then(|c| c.pings.back())
        .map(|(tx, _)| *tx)
        .expect("a ping")
}

#[test]
fn failed_rounds_back_off_up_to_the_maximum() {
    let mut f = fixture(&["198.18.0.12:4000"], true);
    let config = PathConfig::default();
    let mut t = f.t0;
    let mut starts = Vec::new();
    // Keep the peer active and tick every 100 ms for ten minutes of virtual time.
    for _ in 0..6000 {
        f.paths.route(f.index, t);
        let out = f.paths.poll(t);
        if out.iter().any(|a| matches!(a, Action::SendRelay { .. })) {
            starts.push(t);
        }
        t += Duration::from_millis(100);
    }
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // round + 5 s, round + 10 s, round + 20 s, round + 40 s, then round + 60 s each.
    let expect = |d: Duration| config.round + d;
    assert!(gaps.len() > 6, "{gaps:?}");
    for (gap, want) in gaps.iter().zip([5, 10, 20, 40, 60, 60]) {
        let want = expect(Duration::from_secs(want));
        assert!(
            gap.abs_diff(want) <= Duration::from_millis(200),
            "gap {gap:?}, want {want:?} ({gaps:?})"
        );
    }
    // Still on the relay the whole time.
    assert!(matches!(f.paths.route(f.index, t), Route::Relay { .. }));
}

#[test]
fn knowing_no_address_of_the_peer_the_call_me_maybe_alone_starts_punching() {
    let mut f = fixture(&[], true);
    f.paths.set_own_candidates(vec![addr("198.18.0.11:4000")]);
    let t = f.t0;
    assert!(matches!(f.paths.route(f.index, t), Route::Relay { .. }));
    let out = f.paths.poll(t);
    assert!(pings(&out).is_empty());
    assert!(out.iter().any(|a| matches!(
        a,
        Action::SendRelay { probe: Probe { kind: ProbeKind::CallMeMaybe { candidates }, .. }, .. }
            if candidates == &vec![addr("198.18.0.11:4000")]
    )));
}

#[test]
fn punching_waits_for_the_punch_delay() {
    let mut f = fixture(&["198.18.0.12:4000"], true);
    f.paths.config.punch_delay = Duration::from_secs(1);
    let mut t = f.t0;
    let mut first_round = None;
    for _ in 0..30 {
        f.paths.route(f.index, t);
        if !pings(&f.paths.poll(t)).is_empty() && first_round.is_none() {
            first_round = Some(t - f.t0);
        }
        t += Duration::from_millis(100);
    }
    assert_eq!(first_round, Some(Duration::from_secs(1)));
}

#[test]
fn new_candidates_restart_punching_at_once() {
    let mut f = fixture(&["198.18.0.12:4000"], true);
    let mut t = f.t0;
    for _ in 0..40 {
        f.paths.route(f.index, t);
        f.paths.poll(t);
        t += Duration::from_millis(100);
    }
    // A round ran and failed; the next is due in 5 s. New addresses arrive:
    f.paths.set_peer_info(
        f.peer.public(),
        &[addr("198.18.0.12:4001")],
        Some(relay_ref()),
        t,
    );
    f.paths.route(f.index, t);
    let sent = pings(&f.paths.poll(t));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, addr("198.18.0.12:4001"));
}

#[test]
fn without_a_relay_packets_spray_the_candidates_and_answers_are_labelled() {
    let mut f = fixture(&["192.168.1.2:4000", "10.0.0.2:4000"], false);
    let t = f.t0;
    assert_eq!(
        f.paths.route(f.index, t),
        Route::Spray(vec![addr("192.168.1.2:4000"), addr("10.0.0.2:4000")])
    );
    // The handshake answer comes back from one of them before any pong: it is the
    // peer's (we just sent there), so quinn sees it from the peer's mapped address.
    let label = f.paths.label_udp(addr("10.0.0.2:4000"), true, t);
    assert_eq!(label, Some(mapped::addr(f.index, false)));
    // Other addresses are not the peer's.
    assert_eq!(f.paths.label_udp(addr("10.0.0.9:4000"), true, t), None);
    // Nothing to reach the peer with: dropped.
    let mut lonely = fixture(&[], false);
    assert_eq!(lonely.paths.route(lonely.index, lonely.t0), Route::Drop);
}

/// A sprayed dial pings before its first packet leaves, and that is what lets the callee
/// know the caller: its verified ping claims the address, so the handshake behind it is
/// labelled as the caller's. A handshake that arrives first is passed unlabelled, and the
/// address cannot be claimed for [`HANDSHAKE_GUARD`] (a dial back to it would fail
/// meanwhile). Deferring these first pings (they cost up to 0.75 ms of a first message on
/// loopback, BENCHMARKS.md) broke exactly that.
#[test]
fn a_sprayed_dial_pings_ahead_of_its_handshake_so_the_callee_labels_it() {
    let mut caller = fixture(&["192.168.1.2:4000"], false);
    assert!(matches!(
        caller.paths.route(caller.index, caller.t0),
        Route::Spray(_)
    ));
    let first = pings(&caller.paths.take_actions());
    assert_eq!(first.len(), 1, "a ping goes ahead of the first packet");
    let (_, tx) = first[0];
    // The callee: the caller's ping arrives from the caller's address, then its
    // handshake from the same address.
    let from = addr("192.168.1.9:5000");
    let ping = Probe {
        from: caller.me.public(),
        to: caller.peer.public(),
        tx,
        kind: ProbeKind::Ping,
    };
    let mut callee = Paths::new(caller.peer.public(), PathConfig::default(), false);
    callee.on_probe(ping.clone(), ProbeSource::Udp(from), caller.t0);
    let label = callee.label_udp(from, true, caller.t0);
    assert!(label.is_some_and(|l| callee.node_of(l) == Some(caller.me.public())));
    // Without the ping first: unlabelled, and not claimable during the guard.
    let mut late = Paths::new(caller.peer.public(), PathConfig::default(), false);
    assert_eq!(late.label_udp(from, true, caller.t0), None);
    late.on_probe(ping, ProbeSource::Udp(from), caller.t0);
    assert_eq!(late.label_udp(from, false, caller.t0), None);
}

/// The callee of a sprayed dial pings the caller back once: the answer to the caller's
/// handshake, sent right after, starts no second round (its pings would be signed and
/// verified beside the handshake, on both sides).
#[test]
fn a_ping_back_is_the_first_wave_of_the_callees_round() {
    let f = fixture(&[], false);
    let mut callee = Paths::new(f.peer.public(), PathConfig::default(), false);
    let caller_at = addr("192.168.1.9:5000");
    // The callee knows the caller's published address too (from discovery).
    callee.set_peer_info(
        f.me.public(),
        &[caller_at, addr("10.0.0.9:5000")],
        None,
        f.t0,
    );
    let ping = Probe {
        from: f.me.public(),
        to: f.peer.public(),
        tx: [3; 12],
        kind: ProbeKind::Ping,
    };
    let answers = callee.on_probe(ping, ProbeSource::Udp(caller_at), f.t0);
    assert_eq!(pings(&answers), vec![(caller_at, pings(&answers)[0].1)]);
    let label = callee.label_udp(caller_at, true, f.t0).expect("labelled");
    let index = mapped::index(label).expect("mapped");
    assert!(matches!(callee.route(index, f.t0), Route::Spray(_)));
    assert!(pings(&callee.take_actions()).is_empty(), "no second round");
    // One round, counted once for the relay's punch report.
    assert_eq!(callee.take_stats().attempts, 1);
    // The round's next wave pings every candidate, as any round does.
    let later = callee.poll(f.t0 + Duration::from_millis(300));
    assert_eq!(pings(&later).len(), 2);
}

#[test]
fn relay_packets_are_labelled_with_their_sender() {
    let mut f = fixture(&[], true);
    let stranger = key(7).public();
    let label = f
        .paths
        .label_relay(stranger, relay_ref(), f.t0)
        .expect("label");
    assert_eq!(f.paths.node_of(label), Some(stranger));
    assert_eq!(f.paths.recv_path(&stranger), Some(PathKind::Relay));
    // We answer through that relay.
    let index = mapped::index(label).expect("mapped");
    assert!(matches!(
        f.paths.route(index, f.t0),
        Route::Relay { peer, .. } if peer == *stranger.as_bytes()
    ));
}

#[test]
fn a_ping_is_answered_to_its_source_and_validated_back() {
    let mut f = fixture(&[], true);
    let src = addr("198.18.0.12:4444");
    let ping = Probe {
        from: f.peer.public(),
        to: f.me.public(),
        tx: [5; 12],
        kind: ProbeKind::Ping,
    };
    let out = f.paths.on_probe(ping, ProbeSource::Udp(src), f.t0);
    assert_eq!(
        out[0],
        Action::SendUdp {
            addr: src,
            probe: Probe {
                from: f.me.public(),
                to: f.peer.public(),
                tx: [5; 12],
                kind: ProbeKind::Pong { observed: src }
            }
        }
    );
    // And a ping of our own to the same address, to prove our direction.
    assert_eq!(pings(&out).len(), 1);
    assert_eq!(pings(&out)[0].0, src);
    // The verified source is the peer's now.
    assert_eq!(
        f.paths.label_udp(src, false, f.t0),
        Some(mapped::addr(f.index, false))
    );
}

#[test]
fn probes_for_others_and_unsolicited_pongs_are_ignored() {
    let mut f = fixture(&["198.18.0.12:4000"], true);
    let other = key(3).public();
    let misdirected = Probe {
        from: f.peer.public(),
        to: other,
        tx: [1; 12],
        kind: ProbeKind::Ping,
    };
    assert!(f
        .paths
        .on_probe(
            misdirected,
            ProbeSource::Udp(addr("198.18.0.12:4000")),
            f.t0
        )
        .is_empty());
    // A pong for a ping we never sent changes nothing.
    let out = f.paths.on_probe(
        pong(&f, [9; 12]),
        ProbeSource::Udp(addr("198.18.0.12:4000")),
        f.t0,
    );
    assert!(out.is_empty());
    assert!(matches!(f.paths.route(f.index, f.t0), Route::Relay { .. }));
    // A pong from another address than the one pinged proves nothing either.
    f.paths.route(f.index, f.t0);
    let (_, tx) = pings(&f.paths.poll(f.t0))[0];
    let out = f.paths.on_probe(
        pong(&f, tx),
        ProbeSource::Udp(addr("198.18.0.66:4000")),
        f.t0,
    );
    assert!(out.is_empty());
    assert!(matches!(f.paths.route(f.index, f.t0), Route::Relay { .. }));
}

#[test]
fn relay_only_never_goes_direct_and_answers_no_probes() {
    let t0 = Instant::now();
    let me = key(1);
    let peer = key(2);
    let config = PathConfig {
        direct: false,
        ..PathConfig::default()
    };
    let mut paths = Paths::new(me.public(), config, false);
    paths.set_relay_up(relay_ref().node_id, true);
    let index = mapped::index(paths.mapped_addr(peer.public(), t0).expect("room")).expect("i");
    paths.set_peer_info(
        peer.public(),
        &[addr("198.18.0.12:4000")],
        Some(relay_ref()),
        t0,
    );
    assert!(matches!(paths.route(index, t0), Route::Relay { .. }));
    assert!(paths.poll(t0).is_empty());
    let ping = Probe {
        from: peer.public(),
        to: me.public(),
        tx: [1; 12],
        kind: ProbeKind::Ping,
    };
    assert!(paths
        .on_probe(ping, ProbeSource::Udp(addr("198.18.0.12:4000")), t0)
        .is_empty());
    // Relay down: nothing to send on.
    paths.set_relay_up(relay_ref().node_id, false);
    assert_eq!(paths.route(index, t0), Route::Drop);
}

#[test]
fn a_relay_without_the_peer_is_avoided_for_a_while() {
    let mut f = fixture(&["192.168.1.2:4000"], true);
    assert!(matches!(f.paths.route(f.index, f.t0), Route::Relay { .. }));
    f.paths
        .peer_gone(f.peer.public(), relay_ref().node_id, f.t0);
    assert!(matches!(f.paths.route(f.index, f.t0), Route::Spray(_)));
    let later = f.t0 + Duration::from_secs(6);
    assert!(matches!(f.paths.route(f.index, later), Route::Relay { .. }));
}

#[test]
fn an_address_in_a_handshake_is_not_relabelled() {
    let mut f = fixture(&[], true);
    let caller = addr("198.18.0.12:4444");
    // A handshake arrives from an unknown address: quinn sees it as is...
    assert_eq!(f.paths.label_udp(caller, true, f.t0), None);
    // ...and a ping from there moments later does not relabel it mid-handshake.
    let ping = Probe {
        from: f.peer.public(),
        to: f.me.public(),
        tx: [5; 12],
        kind: ProbeKind::Ping,
    };
    f.paths.on_probe(ping, ProbeSource::Udp(caller), f.t0);
    assert_eq!(f.paths.label_udp(caller, false, f.t0), None);
    // Once the guard is over, it is.
    let later = f.t0 + HANDSHAKE_GUARD + Duration::from_secs(1);
    let ping = Probe {
        from: f.peer.public(),
        to: f.me.public(),
        tx: [6; 12],
        kind: ProbeKind::Ping,
    };
    f.paths.on_probe(ping, ProbeSource::Udp(caller), later);
    assert_eq!(
        f.paths.label_udp(caller, false, later),
        Some(mapped::addr(f.index, false))
    );
}

#[test]
fn the_table_is_bounded_and_forgets_idle_peers_first() {
    let t0 = Instant::now();
    let config = PathConfig {
        max_peers: 3,
        ..PathConfig::default()
    };
    let mut paths = Paths::new(key(1).public(), config, false);
    let a = paths.mapped_addr(key(2).public(), t0).expect("a");
    let b = paths.mapped_addr(key(3).public(), t0).expect("b");
    let c = paths.mapped_addr(key(4).public(), t0).expect("c");
    assert_eq!(
        HashSet::from([a, b, c]).len(),
        3,
        "distinct mapped addresses"
    );
    // Full of recently active peers: no room.
    assert_eq!(paths.mapped_addr(key(5).public(), t0), None);
    // Once one is idle, it makes room; its address no longer maps.
    let later = t0 + IDLE + Duration::from_secs(1);
    paths.mapped_addr(key(3).public(), later);
    paths.mapped_addr(key(4).public(), later);
    let e = paths.mapped_addr(key(5).public(), later).expect("room");
    assert_eq!(paths.node_of(a), None);
    assert_eq!(paths.node_of(e), Some(key(5).public()));
}

/// Two nodes behind NATs that filter by address and port (a packet gets in only from an
/// address the node behind it sent to): they find each other by punching at once.
#[test]
fn two_nats_punch_through_in_a_simulation() {
    let outcome = simulate(false);
    assert!(outcome.0.is_some() && outcome.1.is_some(), "{outcome:?}");
    let (a_at, b_at) = (outcome.0.expect("a"), outcome.1.expect("b"));
    assert!(a_at < Duration::from_secs(2) && b_at < Duration::from_secs(2));
}

/// The same with one NAT symmetric (a new port per destination): the published
/// candidate is wrong, no direct path is found, and the relay carries everything.
#[test]
fn a_symmetric_nat_stays_on_the_relay_in_a_simulation() {
    let outcome = simulate(true);
    assert_eq!(outcome, (None, None));
}

/// Runs alice and bob for 30 s of virtual time; returns when each found a direct path.
fn simulate(symmetric: bool) -> (Option<Duration>, Option<Duration>) {
    let t0 = Instant::now();
    let (ka, kb) = (key(1), key(2));
    // Public (reflexive) addresses as the relay sees them.
    let a_pub = addr("198.18.0.11:4000");
    let b_pub = addr("198.18.0.12:5000");
    // With a symmetric NAT, bob's packets to alice leave from another port.
    let b_to_a = if symmetric {
        addr("198.18.0.12:6123")
    } else {
        b_pub
    };
    let mut a = Paths::new(ka.public(), PathConfig::default(), false);
    let mut b = Paths::new(kb.public(), PathConfig::default(), false);
    for (p, own) in [(&mut a, a_pub), (&mut b, b_pub)] {
        p.set_home(Some(relay_ref()));
        p.set_relay_up(relay_ref().node_id, true);
        p.set_own_candidates(vec![own]);
    }
    let ia = mapped::index(a.mapped_addr(kb.public(), t0).expect("room")).expect("i");
    a.set_peer_info(kb.public(), &[b_pub], Some(relay_ref()), t0);
    // Bob learns of alice from her relayed packets.
    let ib = mapped::index(b.label_relay(ka.public(), relay_ref(), t0).expect("label")).expect("i");
    // NAT filters: the remote addresses each side has sent to.
    let mut a_sent: HashSet<SocketAddr> = HashSet::new();
    let mut b_sent: HashSet<SocketAddr> = HashSet::new();
    let (mut a_done, mut b_done) = (None, None);
    let mut t = t0;
    // Packets in flight: (deliver to alice?, probe, source as seen by the receiver).
    let mut wire: Vec<(bool, Probe, ProbeSource)> = Vec::new();
    for _ in 0..300 {
        a.route(ia, t);
        b.route(ib, t);
        let mut actions = vec![];
        actions.extend(a.poll(t).into_iter().map(|x| (true, x)));
        actions.extend(b.poll(t).into_iter().map(|x| (false, x)));
        // Deliver everything sent in this step (and what answers produce), in order.
        let mut steps = 0;
        while !actions.is_empty() && steps < 100 {
            steps += 1;
            for (from_alice, action) in std::mem::take(&mut actions) {
                match action {
                    Action::SendUdp { addr: to, probe } => {
                        if from_alice {
                            a_sent.insert(to);
                            // Reaches bob only at his public address, only if he sent
                            // to alice's public address before (his NAT's filter).
                            if to == b_pub && b_sent.contains(&a_pub) {
                                wire.push((false, probe, ProbeSource::Udp(a_pub)));
                            }
                        } else {
                            b_sent.insert(to);
                            if to == a_pub && a_sent.contains(&b_to_a) {
                                wire.push((true, probe, ProbeSource::Udp(b_to_a)));
                            }
                        }
                    }
                    Action::SendRelay { probe, .. } => {
                        let src = ProbeSource::Relay(relay_ref().node_id);
                        wire.push((!from_alice, probe, src));
                    }
                    Action::PathChanged {
                        path: Some(PathKind::Direct),
                        ..
                    } => {
                        let at = Some(t - t0);
                        if from_alice {
                            a_done = a_done.or(at);
                        } else {
                            b_done = b_done.or(at);
                        }
                    }
                    _ => {}
                }
            }
            for (to_alice, probe, src) in std::mem::take(&mut wire) {
                let out = if to_alice {
                    a.on_probe(probe, src, t)
                } else {
                    b.on_probe(probe, src, t)
                };
                actions.extend(out.into_iter().map(|x| (to_alice, x)));
            }
        }
        t += Duration::from_millis(100);
    }
    (a_done, b_done)
}
