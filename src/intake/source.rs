//! Who a client is, for the per-source abuse limits: its IP address, with an
//! IPv6 address cut to its /64 prefix.
//!
//! Not address and port: a client picks its source port freely, so one that
//! wants more than its share would open more sockets, each with a share of
//! its own. Not a whole IPv6 address: a host is normally given a whole /64
//! (SLAAC, privacy addresses) and picks among its 2^64 addresses as easily as
//! among ports. An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, what a
//! dual-stack socket reports) is its IPv4 source. The price: the players
//! behind one NAT share one source's limits; the defaults in `limits.rs`
//! leave room for that.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;

/// One source: an IPv4 address (as its IPv4-mapped IPv6 form) or an IPv6 /64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey(u128);

impl SourceKey {
    pub fn of(address: IpAddr) -> SourceKey {
        const INTERFACE_BITS: u128 = u64::MAX as u128;
        match address {
            IpAddr::V4(v4) => SourceKey(u128::from(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(u128::from(v4.to_ipv6_mapped())),
                None => SourceKey(u128::from(v6) & !INTERFACE_BITS),
            },
        }
    }
}

/// Where a source lands in a table. Keyed with a random seed per table
/// (SipHash through `RandomState`, no allocation), so a client cannot pick
/// addresses that all collide in one place and push others out.
#[derive(Clone, Debug, Default)]
pub struct SourceHasher(RandomState);

impl SourceHasher {
    #[inline]
    pub fn hash(&self, key: SourceKey) -> u64 {
        self.0.hash_one(key.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> SourceKey {
        SourceKey::of(text.parse().unwrap())
    }

    /// IPv4 sources are whole addresses, IPv4-mapped IPv6 is the same source, and IPv6 is cut to its /64.
    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        assert_eq!(key("192.0.2.7"), key("::ffff:192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("::1"), key("127.0.0.1"));
        assert_ne!(key("0.0.0.0"), key("::"));
    }
}
