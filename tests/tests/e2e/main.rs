//! vipgate's end-to-end tests: one binary with a module per area (one link step instead of
//! one per file). Tests that build namespaces are declared with [`vipgate_tests::e2e!`], which
//! names the test's [`vipgate_tests::Topology`] after the test; the harness is
//! `tests/src/lib.rs`.
//!
//! Run one area with `cargo test -p vipgate-tests -- nat:: --test-threads=1` (as root).

/// The test `$body(topology, datapath)` once per data path, as `$kernel` and `$tun` (defined
/// before the modules, so every module sees it).
macro_rules! on_both_datapaths {
    ($body:ident: $kernel:ident, $tun:ident) => {
        #[test]
        fn $kernel() {
            $body(vipgate_tests::e2e!(), "kernel");
        }
        #[test]
        fn $tun() {
            $body(vipgate_tests::e2e!(), "tun");
        }
    };
}

mod config;
mod daemon;
mod gre;
mod gre_qemu;
mod http;
mod lab;
mod lb;
mod lb_checks;
mod lb_ops;
mod lb_ports;
mod lb_udp;
mod nat;
mod nat_attacks;
mod nat_pair;
mod ops;
mod ssh;
mod ssh_back;
mod ssh_unix;
mod sync;
mod vrrp;
