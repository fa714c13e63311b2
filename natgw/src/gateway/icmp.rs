//! ICMP errors through the gateway (RFC 5508): the quoted packet is rewritten back to what
//! its sender saw. Errors never create, refresh or delete flows (REQ-6).

use std::net::SocketAddrV4;

use super::Gateway;
use crate::error::DropReason;
use crate::flow::{Direction, Proto};
use crate::translate::{self, L4Checksum, Parsed, Side};

impl Gateway {
    /// ICMP errors: rewrite the quoted packet back to what its sender saw (RFC 5508 REQ-4/5).
    /// Errors never create, refresh or delete flows (REQ-6).
    ///
    /// An ICMP checksum covers no pseudo-header, so a partial one (`csum`) cannot be verified:
    /// the caller finishes it first (the driver does); an unfinished one fails validation.
    pub(super) fn icmp_error(
        &mut self,
        dir: Direction,
        buf: &mut [u8],
        p: &Parsed,
        csum: L4Checksum,
    ) -> Result<(), DropReason> {
        let q = translate::quoted(buf, p)?;
        // The quoted packet is ICMP payload: its checksums are complete, whatever the outer's.
        let quoted = L4Checksum::Full;
        match dir {
            Direction::Inbound => {
                // About a packet we sent out: quoted src is our public endpoint. One the
                // gateway does not translate goes to the host, if the address is the host's.
                let pass = |g: &mut Self| {
                    if g.local_addresses.contains(&p.dst) {
                        g.stats.passed_through += 1;
                        Ok(())
                    } else {
                        Err(DropReason::Unowned)
                    }
                };
                let Some(idx) = self.table.find_public(q.src) else {
                    return pass(self);
                };
                let remote =
                    SocketAddrV4::new(q.dst, if q.proto == Proto::Icmp { 0 } else { q.dport });
                let Some(s) = self.table.session(q.proto, idx, q.sport, remote) else {
                    if self.table.public_owner(q.proto, idx, q.sport).is_none() {
                        // About the gateway's own traffic: the kernel wants it.
                        return pass(self);
                    }
                    return Err(DropReason::NoSession);
                };
                let view = self.table.mapping(self.table.session_mapping(s));
                translate::set_ip(buf, q.ip, Side::Src, *view.inside.ip(), quoted);
                translate::set_port(buf, q.ip, Side::Src, view.inside.port(), quoted);
                translate::refresh_icmp_checksum(buf, p);
                translate::set_ip(buf, 0, Side::Dst, *view.inside.ip(), csum);
            }
            Direction::Outbound => {
                // About a packet an inside host received: quoted dst is the inside endpoint,
                // and only that host may report on it.
                if p.src != q.dst {
                    return Err(DropReason::IcmpErrorSpoofed);
                }
                let inside = SocketAddrV4::new(q.dst, q.dport);
                let remote =
                    SocketAddrV4::new(q.src, if q.proto == Proto::Icmp { 0 } else { q.sport });
                let Some(m) = self.table.mapping_of_inside(q.proto, inside) else {
                    return Err(DropReason::NoSession);
                };
                let view = self.table.mapping(m);
                if self
                    .table
                    .session(q.proto, view.public_idx, view.public_port, remote)
                    .is_none()
                {
                    return Err(DropReason::NoSession);
                }
                let public_ip = self.table.public_addr(view.public_idx);
                translate::set_ip(buf, q.ip, Side::Dst, public_ip, quoted);
                translate::set_port(buf, q.ip, Side::Dst, view.public_port, quoted);
                translate::refresh_icmp_checksum(buf, p);
                translate::set_ip(buf, 0, Side::Src, public_ip, csum);
            }
        }
        if self.compensate_ttl {
            translate::bump_ttl(buf);
        }
        self.stats.icmp_errors += 1;
        Ok(())
    }
}
