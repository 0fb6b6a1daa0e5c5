//! Mapped addresses: the stable stand-in address quinn sees for a peer whose packets the
//! path layer routes (direct UDP, relay, or both).
//!
//! quinn addresses everything by `SocketAddr`. A connection to a peer reached through the
//! path layer is made to the peer's mapped address, `240.a.b.c:7` (`a.b.c` = the peer's
//! index); the socket chooses the real path for every packet sent there, and labels every
//! packet that arrives from the peer (over a validated direct path or a relay) with it. So
//! the path can change under a connection without quinn noticing: no migration, no new
//! handshake, nothing lost. 240.0.0.0/4 is reserved and never routed, so no real peer
//! can have such an address. On an IPv6 socket the same addresses appear IPv4-mapped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The port of every mapped address.
pub(crate) const MAPPED_PORT: u16 = 7;
/// Largest peer index a mapped address can carry (24 bits).
pub(crate) const MAX_INDEX: u32 = (1 << 24) - 1;

/// The mapped address of peer `index` (1..=[`MAX_INDEX`]) for a socket of the given family.
pub(crate) fn addr(index: u32, v6: bool) -> SocketAddr {
    let [_, a, b, c] = index.to_be_bytes();
    let ip = Ipv4Addr::new(240, a, b, c);
    if v6 {
        SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), MAPPED_PORT)
    } else {
        SocketAddr::new(IpAddr::V4(ip), MAPPED_PORT)
    }
}

/// The peer index of a mapped address; `None` for any real address.
pub(crate) fn index(addr: SocketAddr) -> Option<u32> {
    if addr.port() != MAPPED_PORT {
        return None;
    }
    let IpAddr::V4(ip) = addr.ip().to_canonical() else {
        return None;
    };
    let [first, a, b, c] = ip.octets();
    if first != 240 {
        return None;
    }
    let index = u32::from_be_bytes([0, a, b, c]);
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_families() {
        for index in [1, 2, 255, 256, 65_536, MAX_INDEX] {
            for v6 in [false, true] {
                let a = addr(index, v6);
                assert_eq!(a.is_ipv6(), v6);
                assert_eq!(super::index(a), Some(index), "{a}");
            }
        }
    }

    #[test]
    fn real_addresses_are_not_mapped() {
        for real in [
            "127.0.0.1:7",
            "240.0.0.1:443",
            "240.0.0.0:7",
            "241.0.0.1:7",
            "[::1]:7",
            "[2001:db8::1]:7",
            "0.0.0.0:7",
        ] {
            let a: SocketAddr = real.parse().expect("addr");
            assert_eq!(index(a), None, "{real}");
        }
    }
}
