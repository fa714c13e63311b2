//! Gratuitous ARP announcements (RFC 5227 §3) for a new master's virtual addresses.
//!
//! keepalived sends, on every move to master, a burst of ARP requests whose sender and
//! target protocol addresses are both the VIP, from the interface's own MAC; switches and
//! clients update their tables at once instead of waiting for their ARP entries to expire.

use std::net::Ipv4Addr;

/// Length of an Ethernet/IPv4 ARP packet (without the Ethernet header).
pub const ARP_LEN: usize = 28;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// Builds the ARP request announcing `address` at `mac` (target hardware address zero).
pub fn gratuitous_arp(mac: [u8; 6], address: Ipv4Addr) -> [u8; ARP_LEN] {
    let mut p = [0u8; ARP_LEN];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&address.octets());
    p[24..28].copy_from_slice(&address.octets());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_layout() {
        let mac = [0x02, 0, 0, 0, 0, 0x11];
        let p = gratuitous_arp(mac, Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[14..18], &[198, 51, 100, 10]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[198, 51, 100, 10]);
    }
}
