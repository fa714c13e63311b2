//! Entry point of the `lb_pool` cargo-fuzz target (and of the corpus replay test).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::{
    BackendConfig, BackendId, ConnState, Decision, Health, Persistence, Pool, PoolConfig,
    SchedulerKind,
};

/// Interprets `data` as a pool configuration followed by two-byte operations, and panics if
/// the pool ever breaks an invariant: a new flow on a backend that is down, draining, removed
/// or overloaded; a refusal while a backend was available (except where LVS refuses too: the
/// hashed backend of `sh`/`mh` without fallback or of `dh` overloaded, every `ovf` backend
/// over its weight, the service at its limit); counters that differ from the flows held; more
/// connections than the service's limit.
///
/// # Panics
/// On an invariant violation (that is the point).
pub fn run_pool_ops(start: Instant, data: &[u8]) {
    let [kind, persist, n, rest @ ..] = data else {
        return;
    };
    let kind = SchedulerKind::ALL[usize::from(*kind) % SchedulerKind::ALL.len()];
    let fallback = n & 0x08 != 0;
    let service_max = u32::from((n >> 4) & 3) * 3;
    let slow_start = (n & 0x40 != 0).then(|| Duration::from_secs(2));
    let n = usize::from(n % 8) + 1;
    let Some((weights, ops)) = rest.split_at_checked(n) else {
        return;
    };
    let backend = |i: usize, w: u8| {
        let max = u32::from((w >> 3) % 4);
        BackendConfig {
            max_connections: max,
            min_connections: if max == 0 {
                0
            } else {
                u32::from(w >> 5) % (max + 1)
            },
            ..BackendConfig::new(
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, i as u8 + 1), 80),
                u32::from(w % 5),
            )
        }
    };
    let mut configs: Vec<BackendConfig> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| backend(i, w))
        .collect();
    let config = |backends: Vec<BackendConfig>| PoolConfig {
        scheduler: kind,
        persistence: (persist & 1 == 1).then(|| Persistence {
            timeout: Duration::from_secs(u64::from(persist >> 4) + 1),
            netmask: (persist >> 1) % 33,
        }),
        mh_table_size: 251,
        fallback,
        max_connections: service_max,
        slow_start,
        backends,
        ..PoolConfig::default()
    };
    // Where LVS itself refuses a flow although some backend is available.
    let may_refuse = match kind {
        SchedulerKind::Sh | SchedulerKind::Mh => !fallback,
        SchedulerKind::Dh | SchedulerKind::Ovf => true,
        _ => false,
    };
    let vip = Ipv4Addr::new(198, 51, 100, 10);
    let Ok(mut pool) = Pool::new(config(configs.clone())) else {
        return;
    };
    let mut now = start;
    let mut flows: Vec<(BackendId, ConnState, Ipv4Addr)> = Vec::new();
    for op in ops.chunks_exact(2) {
        let (code, arg) = (op[0] % 7, op[1]);
        match code {
            0 => {
                let client =
                    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, arg), 1000 + u16::from(arg));
                let available_any = pool.has_available();
                let full = service_max != 0 && pool.connections() >= u64::from(service_max);
                let available: Vec<BackendId> = pool
                    .backends()
                    .filter(|(_, b)| b.is_available())
                    .map(|(id, _)| id)
                    .collect();
                match pool.schedule(now, client, vip) {
                    Decision::Backend { id, addr } => {
                        let b = pool.backend(id).expect("a scheduled backend exists");
                        assert_eq!(b.addr(), addr);
                        assert!(
                            available.contains(&id),
                            "new flow on a {} backend (overloaded: {})",
                            b.state(),
                            b.is_overloaded()
                        );
                        flows.push((id, ConnState::Inactive, *client.ip()));
                    }
                    Decision::Sorry(_) => unreachable!("no sorry server configured"),
                    Decision::Refuse => assert!(
                        !available_any || full || may_refuse,
                        "{kind} refused with an available backend"
                    ),
                }
                if service_max != 0 {
                    assert!(pool.connections() <= u64::from(service_max));
                }
            }
            1 if !flows.is_empty() => {
                let len = flows.len();
                let f = &mut flows[usize::from(arg) % len];
                if f.1 == ConnState::Inactive {
                    pool.established(now, f.0, f.2);
                    f.1 = ConnState::Active;
                } else {
                    pool.transition(now, f.0, ConnState::Active, ConnState::Inactive, f.2);
                    f.1 = ConnState::Inactive;
                }
            }
            2 if !flows.is_empty() => {
                let (id, state, client) = flows.swap_remove(usize::from(arg) % flows.len());
                pool.closed(now, id, state, client);
            }
            3 => {
                let i = usize::from(arg) % configs.len();
                let _ = pool.set_weight(configs[i].addr, u32::from(arg >> 4));
            }
            4 => {
                if let Some(id) = pool.find(configs[usize::from(arg) % configs.len()].addr) {
                    pool.set_health(
                        id,
                        if arg & 0x80 == 0 {
                            Health::Up
                        } else {
                            Health::Down
                        },
                    );
                }
            }
            5 => {
                now += Duration::from_millis(u64::from(arg) * 50);
                pool.handle_timeout(now);
            }
            6 => {
                // Reload: drop one backend or add one back.
                let i = usize::from(arg) % 8;
                if let Some(pos) = configs
                    .iter()
                    .position(|c| c.addr.ip().octets()[3] == i as u8 + 1)
                {
                    if configs.len() > 1 {
                        configs.remove(pos);
                    }
                } else {
                    configs.push(backend(i, arg >> 3));
                }
                pool.reconfigure(config(configs.clone()))
                    .expect("a valid reload");
            }
            _ => {}
        }
        for (id, b) in pool.backends() {
            let held = |s| flows.iter().filter(|f| f.0 == id && f.1 == s).count() as u32;
            assert_eq!(
                b.active(),
                held(ConnState::Active),
                "active count of {}",
                b.addr()
            );
            assert_eq!(
                b.inactive(),
                held(ConnState::Inactive),
                "inactive count of {}",
                b.addr()
            );
        }
        assert!(
            flows.iter().all(|f| pool.backend(f.0).is_some()),
            "a held flow lost its backend"
        );
    }
}
