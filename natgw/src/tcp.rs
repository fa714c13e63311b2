//! TCP connection tracking of one flow, as Linux conntrack does it (`nf_conntrack_proto_tcp`):
//! a state per flow and a window per direction.
//!
//! Invariants:
//! - a flow is [`TcpState::Established`] only after the originator's final ACK of the
//!   three-way handshake (SYN, SYN-ACK, ACK), or when picked up in the middle from the inside
//!   (conntrack's `tcp_loose`, so flows survive a `nat clear`);
//! - a RST changes the state only when its sequence number lies in the window the receiver
//!   granted (`td_maxend`) and not below what the sender already sent minus the receiver's
//!   largest window (`td_end - td_maxwin`); an out-of-window RST is refused and changes
//!   nothing. While a direction's window is unknown (no packet seen yet from that side) any
//!   RST from it is in window, as in conntrack;
//! - a new SYN from the originator after the flow closed (CLOSE, TIME_WAIT) starts over; a SYN
//!   on a live flow changes nothing.
//!
//! A flow the gateway sees one direction of (a direct-routing virtual service: the backend
//! answers the client itself) is tracked by [`Tracker::track_input_only`] instead: LVS's
//! "input only" state table (`ip_vs_proto_tcp.c`), which moves on the client's flags alone and
//! checks no window (there is no reply to learn one from): a SYN opens it (SYN_RECV), the
//! client's first ACK makes it established, its FIN starts the close, a RST ends it — except
//! while only the SYN was seen, where a RST is ignored (a blind RST cannot tear down a
//! connection that never had an answer the director could see).
//!
//! The per-direction window follows conntrack's `td_end` (highest sequence number sent plus
//! one), `td_maxend` (highest sequence number the other side allowed: its ACK plus window),
//! `td_maxwin` (largest window advertised) and the window scale from the SYN options (used
//! only when both SYNs carried it, RFC 7323 §2.2).

/// The connection states of conntrack that matter for timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TcpState {
    /// No segment tracked yet.
    None,
    /// The originator's SYN was seen.
    SynSent,
    /// The responder's SYN-ACK was seen.
    SynRecv,
    /// The originator acknowledged the SYN-ACK.
    Established,
    /// One side sent a FIN.
    FinWait,
    /// The other side acknowledged that FIN without its own.
    CloseWait,
    /// Both sides sent a FIN.
    LastAck,
    /// The last FIN was acknowledged.
    TimeWait,
    /// An in-window RST was seen.
    Close,
}

impl TcpState {
    /// The name `ipvsadm -Lnc` gives the state.
    pub(crate) fn ipvsadm_name(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::Established => "ESTABLISHED",
            Self::FinWait => "FIN_WAIT",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
        }
    }
}

/// The fields of one TCP segment that tracking reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Segment {
    pub(crate) flags: u8,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    /// The window field as sent (not scaled).
    pub(crate) window: u16,
    /// Window-scale option of a SYN (RFC 7323), if present.
    pub(crate) wscale: Option<u8>,
    /// Payload bytes (of a whole super-packet).
    pub(crate) payload: u32,
}

pub(crate) const FIN: u8 = 0x01;
pub(crate) const SYN: u8 = 0x02;
pub(crate) const RST: u8 = 0x04;
pub(crate) const ACK: u8 = 0x10;

/// The largest window scale RFC 7323 allows.
const MAX_WSCALE: u8 = 14;
/// `Dir::scale` while the SYN of that side carried no window-scale option.
const NO_SCALE: u8 = 0xff;

/// One direction's window (conntrack's `ip_ct_tcp_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Dir {
    end: u32,
    maxend: u32,
    /// 0 while no segment from this side was seen (window unknown).
    maxwin: u32,
    scale: u8,
}

/// What a segment did to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Accepted; the state may have changed.
    Accepted,
    /// A RST outside the window: drop it, nothing changed.
    RstOutOfWindow,
}

/// The tracking state of one TCP flow. `orig` is the direction of the originator (the side
/// that sent the first segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tracker {
    pub(crate) state: TcpState,
    /// Which side sent the first FIN (true: the originator).
    first_fin_orig: bool,
    dirs: [Dir; 2],
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: TcpState::None,
            first_fin_orig: false,
            dirs: [Dir::default(); 2],
        }
    }
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

impl Tracker {
    /// A flow picked up in `state` from a peer's state sync: the windows are unknown until
    /// each side sends again, and taken as scaled by the largest factor (the SYNs that said
    /// the real one were seen by the peer), so the window check errs on the liberal side,
    /// as conntrack's pickup of a flow in the middle does.
    pub(crate) fn resumed(state: TcpState, first_fin_orig: bool) -> Tracker {
        let dir = Dir {
            scale: MAX_WSCALE,
            ..Dir::default()
        };
        Tracker {
            state,
            first_fin_orig,
            dirs: [dir; 2],
        }
    }

    /// Which side sent the first FIN (true: the originator).
    pub(crate) fn first_fin_orig(&self) -> bool {
        self.first_fin_orig
    }

    /// Tracks one segment sent by the originator (`from_orig`) or the responder.
    pub(crate) fn track(&mut self, seg: &Segment, from_orig: bool) -> Outcome {
        let (si, ri) = if from_orig { (0, 1) } else { (1, 0) };
        let syn = seg.flags & SYN != 0;
        let fin = seg.flags & FIN != 0;
        let rst = seg.flags & RST != 0;
        let ack = seg.flags & ACK != 0;
        let end = seg
            .seq
            .wrapping_add(seg.payload)
            .wrapping_add(u32::from(syn))
            .wrapping_add(u32::from(fin));

        // A new connection on the 4-tuple of a finished one starts from scratch.
        if syn
            && !ack
            && from_orig
            && matches!(
                self.state,
                TcpState::None | TcpState::Close | TcpState::TimeWait
            )
        {
            *self = Tracker::default();
            self.dirs[0] = Dir {
                end,
                maxend: end,
                maxwin: u32::from(seg.window).max(1),
                scale: seg.wscale.map_or(NO_SCALE, |s| s.min(MAX_WSCALE)),
            };
            self.state = TcpState::SynSent;
            return Outcome::Accepted;
        }
        if syn && ack && !from_orig && self.state == TcpState::SynSent {
            let scale = seg.wscale.map_or(NO_SCALE, |s| s.min(MAX_WSCALE));
            self.dirs[1] = Dir {
                end,
                maxend: end,
                maxwin: u32::from(seg.window).max(1),
                scale,
            };
            // Scaling is on only when both SYNs asked for it.
            if scale == NO_SCALE || self.dirs[0].scale == NO_SCALE {
                self.dirs[0].scale = 0;
                self.dirs[1].scale = 0;
            }
            self.dirs[0].maxend = seg.ack.wrapping_add(u32::from(seg.window).max(1));
            self.state = TcpState::SynRecv;
            return Outcome::Accepted;
        }
        if !self.in_window(si, ri, seg.seq, end) {
            if rst {
                return Outcome::RstOutOfWindow;
            }
            // Forwarded (the endpoints judge it), but it moves neither state nor window.
            return Outcome::Accepted;
        }
        self.update_window(si, ri, seg, end, syn);
        self.state = self.next_state(seg.flags, from_orig);
        Outcome::Accepted
    }

    /// Tracks one segment of a flow seen in one direction only, by its flags (see the module
    /// docs): the state moves as LVS's input-only table says; windows are not tracked.
    pub(crate) fn track_input_only(&mut self, flags: u8) {
        use TcpState as S;
        let (syn, fin, rst, ack) = (
            flags & SYN != 0,
            flags & FIN != 0,
            flags & RST != 0,
            flags & ACK != 0,
        );
        self.state = match self.state {
            S::SynRecv if rst => S::SynRecv,
            _ if rst => S::Close,
            S::Established if syn => S::Established,
            _ if syn => S::SynRecv,
            S::Established if fin => {
                self.first_fin_orig = true;
                S::FinWait
            }
            S::SynRecv if fin => S::TimeWait,
            S::None if fin || ack => S::Close,
            S::SynRecv if ack => S::Established,
            s => s,
        };
    }

    /// conntrack's sequence check (`tcp_in_window`), on the sender's sequence numbers only.
    fn in_window(&self, si: usize, ri: usize, seq: u32, end: u32) -> bool {
        let (s, r) = (self.dirs[si], self.dirs[ri]);
        if s.maxwin == 0 || r.maxwin == 0 {
            // One side never seen: nothing to check against (conntrack is liberal too).
            return true;
        }
        before(seq, s.maxend.wrapping_add(1))
            && after(end, s.end.wrapping_sub(r.maxwin).wrapping_sub(1))
    }

    fn update_window(&mut self, si: usize, ri: usize, seg: &Segment, end: u32, syn: bool) {
        let scale = match self.dirs[si].scale {
            NO_SCALE => 0,
            s => s,
        };
        // The window of a SYN is never scaled.
        let win = if syn {
            u32::from(seg.window)
        } else {
            u32::from(seg.window) << scale
        };
        let s = &mut self.dirs[si];
        if s.maxwin == 0 {
            // First segment from this side (picked up mid-stream).
            s.end = end;
            s.maxend = end;
            s.maxwin = win.max(1);
        }
        s.maxwin = s.maxwin.max(win);
        if after(end, s.end) {
            s.end = end;
        }
        if seg.flags & ACK != 0 {
            let r = &mut self.dirs[ri];
            let allowed = seg.ack.wrapping_add(win.max(1));
            if r.maxwin == 0 || after(allowed, r.maxend) {
                r.maxend = allowed;
            }
        }
    }

    fn next_state(&mut self, flags: u8, from_orig: bool) -> TcpState {
        use TcpState as S;
        if flags & RST != 0 {
            return S::Close;
        }
        let fin = flags & FIN != 0;
        let ack = flags & ACK != 0;
        match self.state {
            // Picked up in the middle (no SYN seen): conntrack's loose mode.
            S::None if fin => {
                self.first_fin_orig = from_orig;
                S::FinWait
            }
            S::None => S::Established,
            S::SynRecv if from_orig && ack && !fin => S::Established,
            S::SynRecv if from_orig && fin => {
                self.first_fin_orig = true;
                S::FinWait
            }
            S::Established if fin => {
                self.first_fin_orig = from_orig;
                S::FinWait
            }
            S::FinWait | S::CloseWait if fin && from_orig != self.first_fin_orig => S::LastAck,
            S::FinWait if ack && from_orig != self.first_fin_orig => S::CloseWait,
            S::LastAck if ack && from_orig == self.first_fin_orig => S::TimeWait,
            s => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(flags: u8, seq: u32, ack: u32) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            window: 64240,
            wscale: None,
            payload: 0,
        }
    }

    fn handshake() -> Tracker {
        let mut t = Tracker::default();
        assert_eq!(t.track(&seg(SYN, 1000, 0), true), Outcome::Accepted);
        assert_eq!(t.state, TcpState::SynSent);
        t.track(&seg(SYN | ACK, 5000, 1001), false);
        assert_eq!(t.state, TcpState::SynRecv);
        t.track(&seg(ACK, 1001, 5001), true);
        t
    }

    #[test]
    fn established_only_after_the_final_ack() {
        let t = handshake();
        assert_eq!(t.state, TcpState::Established);
        // SYN, SYN-ACK and a responder ACK do not make it established.
        let mut t = Tracker::default();
        t.track(&seg(SYN, 1000, 0), true);
        t.track(&seg(SYN | ACK, 5000, 1001), false);
        t.track(&seg(ACK, 5001, 1001), false);
        assert_eq!(t.state, TcpState::SynRecv);
    }

    #[test]
    fn rst_out_of_window_changes_nothing() {
        let mut t = handshake();
        let before = t;
        assert_eq!(
            t.track(&seg(RST, 5001 + 10_000_000, 0), false),
            Outcome::RstOutOfWindow
        );
        assert_eq!(t, before);
        assert_eq!(t.track(&seg(RST, 5001, 0), false), Outcome::Accepted);
        assert_eq!(t.state, TcpState::Close);
        // Not sticky: the originator's next SYN opens a new connection.
        t.track(&seg(SYN, 90_000, 0), true);
        assert_eq!(t.state, TcpState::SynSent);
    }

    #[test]
    fn syn_on_a_live_flow_changes_nothing() {
        let mut t = handshake();
        t.track(&seg(SYN, 777, 0), true);
        assert_eq!(t.state, TcpState::Established);
    }

    #[test]
    fn close_sequence_as_conntrack() {
        let mut t = handshake();
        t.track(&seg(FIN | ACK, 1001, 5001), true);
        assert_eq!(t.state, TcpState::FinWait);
        t.track(&seg(ACK, 5001, 1002), false);
        assert_eq!(t.state, TcpState::CloseWait);
        t.track(&seg(FIN | ACK, 5001, 1002), false);
        assert_eq!(t.state, TcpState::LastAck);
        t.track(&seg(ACK, 1002, 5002), true);
        assert_eq!(t.state, TcpState::TimeWait);
    }

    #[test]
    fn window_scaling_widens_the_window() {
        let mut t = Tracker::default();
        let mut s = seg(SYN, 1000, 0);
        s.wscale = Some(7);
        t.track(&s, true);
        let mut sa = seg(SYN | ACK, 5000, 1001);
        sa.wscale = Some(7);
        t.track(&sa, false);
        t.track(&seg(ACK, 1001, 5001), true);
        // The originator granted 64240 << 7 bytes: a RST far ahead but inside is accepted.
        assert_eq!(
            t.track(&seg(RST, 5001 + 64240 * 100, 0), false),
            Outcome::Accepted
        );
    }

    /// LVS's input-only table: SYN → SYN_RECV, ACK → ESTABLISHED, FIN → FIN_WAIT, a RST
    /// ignored before the handshake completed and closing after, a new SYN on a closed flow
    /// opening it again.
    #[test]
    fn input_only_follows_the_clients_flags() {
        let mut t = Tracker::default();
        t.track_input_only(SYN);
        assert_eq!(t.state, TcpState::SynRecv);
        t.track_input_only(RST);
        assert_eq!(t.state, TcpState::SynRecv, "a blind RST before the ACK");
        t.track_input_only(ACK);
        assert_eq!(t.state, TcpState::Established);
        t.track_input_only(SYN);
        assert_eq!(t.state, TcpState::Established, "a SYN on a live flow");
        t.track_input_only(ACK | FIN);
        assert_eq!(t.state, TcpState::FinWait);
        t.track_input_only(ACK);
        assert_eq!(t.state, TcpState::FinWait);
        t.track_input_only(RST);
        assert_eq!(t.state, TcpState::Close);
        t.track_input_only(SYN);
        assert_eq!(t.state, TcpState::SynRecv);
        let mut lone = Tracker::default();
        lone.track_input_only(ACK);
        assert_eq!(
            lone.state,
            TcpState::Close,
            "an ACK without a SYN opens nothing"
        );
    }

    proptest! {
        /// A blind RST (random sequence number) is accepted at most as often as the window
        /// allows, and an accepted or refused one never panics; the tracker never leaves the
        /// state space.
        #[test]
        fn arbitrary_segments_never_panic(segs in proptest::collection::vec(
            (any::<u8>(), any::<u32>(), any::<u32>(), any::<u16>(), any::<bool>(), 0u32..70_000),
            0..40,
        )) {
            let mut t = Tracker::default();
            for (flags, seq, ack, window, orig, payload) in segs {
                let s = Segment { flags, seq, ack, window, wscale: Some(flags & 0x1f), payload };
                let before = t;
                if t.track(&s, orig) == Outcome::RstOutOfWindow {
                    prop_assert_eq!(t, before);
                }
            }
        }
    }
}
