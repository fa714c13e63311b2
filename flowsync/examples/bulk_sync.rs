//! Bulk sync time through the real UDP transport: how long a node that (re)starts takes to
//! pull a snapshot of N flows from its peer.
//!
//! Two [`flowsync::driver`] tasks on two UDP sockets (loopback, or the addresses given), in
//! one process: the master holds N TCP flows; a backup starts, discovers the master, asks for
//! its snapshot, and the clock stops at its `BulkComplete` with every record delivered. The
//! time runs from the backup's start to that event, so it includes discovery (the first
//! `Hello`), the request, the master encoding and signing every message, the socket, the
//! backup checking every HMAC and decoding every record, and every resend the sockets' drops
//! cause. Not included: the gateway exporting its flows (`export_state`) and installing them
//! as standby (`apply_standby`), which `vipgate run` adds around it.
//!
//! Usage: `cargo run --release -p flowsync --example bulk_sync -- [FLOWS] [RUNS]`
//! (defaults 100000 and 5). Prints one line per run: `bulk_sync_ms<TAB>FLOWS<TAB>MS`, then the
//! transport's counters of the last run on stderr.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use flowsync::driver::{self, Command, SyncHandle};
use flowsync::{Event, FlowKey, FlowProto, FlowState, SyncConfig, SyncKey, TcpPhase, Update};

/// `FLOWS` distinct established TCP flows of a PAT gateway.
fn flows(n: u32) -> Vec<Update> {
    (0..n)
        .map(|i| {
            let port = 10_000 + u16::try_from(i % 50_000).unwrap_or(0);
            let client = Ipv4Addr::from(0xC0A8_0000 + (i / 50_000) * 256 + 10);
            Update::Flow(FlowState {
                key: FlowKey {
                    proto: FlowProto::Tcp,
                    public: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), port),
                    outside: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 80), 443),
                },
                inside: SocketAddrV4::new(client, port),
                listener: None,
                tcp: TcpPhase::Established,
                first_fin_from_originator: false,
                from_inside: true,
                replied: true,
                assured: true,
                expires_in_secs: 7_200,
            })
        })
        .collect()
}

fn config(node: u32) -> SyncConfig {
    let key = SyncKey::new(b"a shared key for the two gateways").expect("a valid key");
    let node = NonZeroU32::new(node).expect("non-zero");
    SyncConfig::new(node, driver::incarnation_now(), key)
}

fn socket() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind on loopback");
    let a = s.local_addr().expect("bound");
    (s, a)
}

/// The master: answers every snapshot request with `snapshot` until its handle is dropped.
async fn serve(mut master: SyncHandle, snapshot: Vec<Update>) {
    while let Some(event) = master.events.recv().await {
        if let Event::SnapshotRequested { .. } = event {
            let updates = snapshot.clone();
            let sent = master
                .commands
                .send(Command::Snapshot {
                    updates,
                    owner: true,
                })
                .await;
            if sent.is_err() {
                return;
            }
        }
    }
}

/// One run: the time from the backup's start to its complete snapshot, and its counters.
async fn one_run(snapshot: &[Update]) -> (Duration, driver::SyncStatus) {
    let (ms, ma) = socket();
    let (bs, ba) = socket();
    let master = driver::spawn(ms, vec![ba], config(1)).expect("master transport");
    let server = tokio::spawn(serve(master, snapshot.to_vec()));
    #[allow(clippy::disallowed_methods)] // the example's one clock read
    let start = Instant::now();
    let mut backup = driver::spawn(bs, vec![ma], config(2)).expect("backup transport");
    let mut records = 0usize;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), backup.events.recv())
            .await
            .expect("the snapshot within 60 s")
            .expect("the backup's transport runs");
        match event {
            Event::Updates {
                bulk: true,
                updates,
                ..
            } => records += updates.len(),
            Event::BulkComplete {
                from: 1,
                records: n,
                ..
            } => {
                assert_eq!(records, snapshot.len(), "every record delivered");
                assert_eq!(n as usize, snapshot.len());
                break;
            }
            _ => {}
        }
    }
    let took = start.elapsed();
    let status = backup.status.borrow().clone();
    server.abort();
    (took, status)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().map_or(100_000, |a| a.parse().expect("FLOWS"));
    let runs: u32 = args.next().map_or(5, |a| a.parse().expect("RUNS"));
    let snapshot = flows(n);
    let mut last = None;
    for _ in 0..runs {
        let (took, status) = one_run(&snapshot).await;
        println!("bulk_sync_ms\t{n}\t{:.1}", took.as_secs_f64() * 1e3);
        last = Some(status);
    }
    if let Some(s) = last {
        eprintln!("backup's counters of the last run: {:?}", s.stats);
    }
}
