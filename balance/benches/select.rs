//! Selection cost per new connection for every scheduler at 10, 100 and 1,000 backends.
//!
//! `cargo bench -p balance --bench select` (release profile). Each round opens a connection
//! from a fresh client to one of 1,000 destinations, marks it established, and closes the
//! oldest once 4 per backend are open, so least-connection schedulers see realistic, moving
//! loads and `lblc`/`lblcr` mostly hit their table. The figure is wall time per round
//! (schedule + established + closed), best of 5 batches, so it includes the flow bookkeeping
//! every scheduler pays; compare schedulers within a column. A plain harness (no criterion)
//! keeps the workspace's dependency list short.

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use balance::{BackendConfig, BackendId, ConnState, Decision, Pool, PoolConfig, SchedulerKind};

const SIZES: [usize; 3] = [10, 100, 1_000];
/// Rounds per batch: about 2 million backend visits for the O(n) schedulers.
fn rounds(n: usize) -> u32 {
    (2_000_000 / n as u32).max(20_000)
}
const BATCHES: usize = 5;

#[allow(clippy::disallowed_methods)] // a benchmark reads the clock; the library never does
fn clock() -> Instant {
    Instant::now()
}

fn pool(kind: SchedulerKind, n: usize) -> Pool {
    let backends = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i as u32);
            BackendConfig::new(SocketAddrV4::new(ip, 80), 1 + (i % 4) as u32)
        })
        .collect();
    Pool::new(PoolConfig {
        scheduler: kind,
        backends,
        ..PoolConfig::default()
    })
    .expect("a valid pool")
}

/// Nanoseconds per round over one batch of [`rounds`].
fn batch(
    p: &mut Pool,
    start: Instant,
    open: &mut VecDeque<(BackendId, Ipv4Addr)>,
    n: usize,
    seed: u32,
) -> f64 {
    let rounds = rounds(n);
    let began = clock();
    for r in 0..rounds {
        let k = seed.wrapping_mul(rounds).wrapping_add(r);
        let client = SocketAddrV4::new(
            Ipv4Addr::from(0xc612_0000 | (k & 0xffff)),
            1024 + (k % 60_000) as u16,
        );
        let dest = Ipv4Addr::from(0xcb00_7100 + k % 1_000);
        let now = start + Duration::from_micros(u64::from(k));
        if let Decision::Backend { id, .. } = black_box(p.schedule(now, client, dest)) {
            p.established(now, id, *client.ip());
            open.push_back((id, *client.ip()));
        }
        if open.len() > 4 * n
            && let Some((id, c)) = open.pop_front()
        {
            p.closed(now, id, ConnState::Active, c);
        }
    }
    began.elapsed().as_nanos() as f64 / f64::from(rounds)
}

fn main() {
    println!(
        "{:<6} {:>12} {:>12} {:>12}   (ns per new connection, best of {BATCHES})",
        "sched", "10", "100", "1000"
    );
    let start = clock();
    for kind in SchedulerKind::ALL {
        let mut row = format!("{:<6}", kind.as_str());
        for n in SIZES {
            let mut p = pool(kind, n);
            let mut open = VecDeque::new();
            let best = (0..BATCHES)
                .map(|b| batch(&mut p, start, &mut open, n, b as u32))
                .fold(f64::INFINITY, f64::min);
            row.push_str(&format!(" {best:>12.0}"));
        }
        println!("{row}{}", if kind.is_linear() { "   O(n)" } else { "" });
    }
}
