//! Routing that steers traffic through `nat0`, installed and removed with rtnetlink.
//!
//! ```text
//! pref P+0..   iif OUTSIDE to PUB/32 ipproto tcp|udp|icmp lookup T   (PUB assigned locally)
//! pref P+10..  iif INSIDE to PUB/32 lookup T                          (hairpin to a local PUB)
//! pref P+50    lookup local                                           (moved from pref 0)
//! pref P+60    iif INSIDE lookup T suppress_prefixlength 0            (outside subnets)
//! pref P+61    iif INSIDE lookup main suppress_prefixlength 0         (other LANs, tunnels)
//! pref P+62    iif INSIDE lookup T                                    (the default route)
//! table T:     default dev nat0; each outside subnet dev nat0
//!              the same prefixes as blackholes, metric 2^32-1      (while nat0 is away)
//! main:        PUB/32 dev nat0 + proxy neighbour on OUTSIDE           (PUB not assigned)
//! ```
//! A public address assigned to an interface (the router's own address used for overload)
//! would be delivered locally before any routing, hence the rules for it and the move of the
//! `local` lookup behind them; packets nobody translates are passed back and reach the
//! kernel's own sockets. Traffic from the inside only goes to `nat0` where the main table
//! would have used the default route or an outside subnet, so routes to other LANs (a GRE
//! tunnel) stay untranslated.
//!
//! `nat0`'s routes go with `nat0`, which lives only as long as the daemon's process: between a
//! daemon that re-execs (`vipgate restart`) or is killed and the next run, which makes them
//! again, the blackholes under them drop what the rules steer into table T (new flows, and the
//! packets the kernel fast path leaves to the slow path) instead of letting the main table
//! forward it untranslated.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netsys::netlink::{NetlinkError, add_route_replace, addresses, del_route_idempotent, errno};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, IpProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::DriverError;

const MAIN: u32 = 254;
const LOCAL: u32 = 255;

/// What to install.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) tun: String,
    pub(crate) inside: Vec<String>,
    pub(crate) outside: String,
    pub(crate) table: u32,
    pub(crate) priority: u32,
    pub(crate) public: Vec<Ipv4Addr>,
}

/// Everything installed, so that [`Installed::remove`] can undo it in reverse order.
#[derive(Debug, Default)]
pub(crate) struct Installed {
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
    neighbours: Vec<NeighbourMessage>,
    moved_local: bool,
    priority: u32,
    tun: u32,
    outside: u32,
    outside_name: String,
    inside_names: Vec<String>,
    table: u32,
    /// Addresses assigned to interfaces of this namespace.
    local: Vec<Ipv4Addr>,
    /// Public addresses made live so far, in order.
    publics: Vec<Ipv4Addr>,
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, DriverError> {
    netsys::netlink::link_by_name(handle, name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| DriverError::NoInterface(name.to_owned()))
}

/// The steering rules use preferences `priority ..= priority + RULE_SPAN`.
const RULE_SPAN: u32 = 62;
/// The highest base priority whose rules all fit in a `u32` (checked at install).
pub(crate) const MAX_PRIORITY: u32 = u32::MAX - RULE_SPAN;

/// The preference `off` above `base`. `install` refuses a base above [`MAX_PRIORITY`], so
/// the sum never saturates in practice; saturating keeps it from wrapping if it did.
fn pref(base: u32, off: u32) -> u32 {
    base.saturating_add(off.min(RULE_SPAN))
}

fn rule(priority: u32, table: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    if table < 256 {
        m.header.table = table as u8;
    }
    m.attributes.push(RuleAttribute::Priority(priority));
    m.attributes.push(RuleAttribute::Table(table));
    m
}

impl Installed {
    /// Every address assigned to an interface of this host when the gateway started.
    pub(crate) fn local_addresses(&self) -> &[Ipv4Addr] {
        &self.local
    }

    async fn add_rule(
        &mut self,
        handle: &Handle,
        m: RuleMessage,
        what: &str,
    ) -> Result<(), DriverError> {
        let mut req = handle.rule().add();
        *req.message_mut() = m.clone();
        match req.execute().await {
            // The same rule left behind by a daemon that was killed (kill -9, host crash):
            // adopt it, so a restart starts cleanly and removes it on stop.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                tracing::info!(rule = what, "adopting a rule left by an earlier run");
            }
            Err(e) => {
                return Err(DriverError::from(NetlinkError::new(
                    format!("add rule {what}"),
                    e,
                )));
            }
            Ok(()) => {}
        }
        self.rules.push(m);
        Ok(())
    }

    async fn add_route(&mut self, handle: &Handle, m: RouteMessage) -> Result<(), DriverError> {
        add_route_replace(handle, m.clone()).await?;
        self.routes.push(m);
        Ok(())
    }

    /// Installs the plan. On error, whatever was installed is removed again.
    pub(crate) async fn install(
        handle: &Handle,
        plan: &Plan,
    ) -> Result<(Installed, Vec<Ipv4Net>), DriverError> {
        if plan.priority > MAX_PRIORITY {
            return Err(DriverError::Setting(format!(
                "rule priority {} is above {MAX_PRIORITY}: the steering rules use up to +{RULE_SPAN}",
                plan.priority
            )));
        }
        let mut done = Installed {
            priority: plan.priority,
            ..Default::default()
        };
        match done.install_inner(handle, plan).await {
            Ok(inside_nets) => Ok((done, inside_nets)),
            Err(e) => {
                done.remove(handle).await;
                Err(e)
            }
        }
    }

    async fn install_inner(
        &mut self,
        handle: &Handle,
        plan: &Plan,
    ) -> Result<Vec<Ipv4Net>, DriverError> {
        let tun = link_index(handle, &plan.tun).await?;
        let outside = link_index(handle, &plan.outside).await?;
        let mut inside = Vec::new();
        for name in &plan.inside {
            inside.push(link_index(handle, name).await?);
        }
        let addrs = addresses(handle).await?;
        let inside_nets: Vec<Ipv4Net> = addrs
            .iter()
            .filter(|a| inside.contains(&a.ifindex))
            .map(|a| a.net.trunc())
            .collect();
        let outside_nets: Vec<Ipv4Net> = addrs
            .iter()
            .filter(|a| a.ifindex == outside)
            .map(|a| a.net.trunc())
            .collect();
        let local: Vec<Ipv4Addr> = addrs.iter().map(|a| a.net.addr()).collect();

        let t = plan.table;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(t)
            .output_interface(tun)
            .build();
        self.add_route(handle, default).await?;
        for net in &outside_nets {
            let r = RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(t)
                .destination_prefix(net.addr(), net.prefix_len())
                .output_interface(tun)
                .build();
            self.add_route(handle, r).await?;
        }
        // Under each route to nat0, for when nat0 is away (see the module docs).
        let hole = || {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(t)
                .kind(RouteType::BlackHole)
                .priority(u32::MAX)
        };
        self.add_route(handle, hole().build()).await?;
        for net in &outside_nets {
            let r = hole()
                .destination_prefix(net.addr(), net.prefix_len())
                .build();
            self.add_route(handle, r).await?;
        }

        self.tun = tun;
        self.outside = outside;
        self.outside_name = plan.outside.clone();
        self.inside_names = plan.inside.clone();
        self.table = plan.table;
        self.local = local;
        for addr in &plan.public {
            self.add_public(handle, *addr).await?;
        }
        let p = plan.priority;
        for name in &plan.inside {
            let mut a = rule(pref(p, 60), t);
            a.attributes.push(RuleAttribute::Iifname(name.clone()));
            a.attributes.push(RuleAttribute::SuppressPrefixLen(0));
            self.add_rule(handle, a, &format!("iif {name} outside subnets"))
                .await?;
            let mut b = rule(pref(p, 61), MAIN);
            b.attributes.push(RuleAttribute::Iifname(name.clone()));
            b.attributes.push(RuleAttribute::SuppressPrefixLen(0));
            self.add_rule(handle, b, &format!("iif {name} main routes"))
                .await?;
            let mut c = rule(pref(p, 62), t);
            c.attributes.push(RuleAttribute::Iifname(name.clone()));
            self.add_rule(handle, c, &format!("iif {name} default"))
                .await?;
        }
        Ok(inside_nets)
    }

    /// Makes one more public address live: rules steering it into the TUN when it is assigned
    /// to an interface here, otherwise a route into the TUN plus a proxy neighbour entry on the
    /// outside link.
    pub(crate) async fn add_public(
        &mut self,
        handle: &Handle,
        addr: Ipv4Addr,
    ) -> Result<(), DriverError> {
        if self.publics.contains(&addr) {
            return Ok(());
        }
        let i = self.publics.len() as u32;
        let (p, t) = (self.priority, self.table);
        if self.local.contains(&addr) {
            for proto in [IpProtocol::Tcp, IpProtocol::Udp, IpProtocol::Icmp] {
                let mut m = rule(pref(p, i.min(9)), t);
                m.header.dst_len = 32;
                m.attributes
                    .push(RuleAttribute::Destination(IpAddr::V4(addr)));
                m.attributes
                    .push(RuleAttribute::Iifname(self.outside_name.clone()));
                m.attributes.push(RuleAttribute::IpProtocol(proto));
                let what = format!("iif {} to {addr}", self.outside_name);
                self.add_rule(handle, m, &what).await?;
            }
            for name in self.inside_names.clone() {
                let mut m = rule(pref(p, 10 + i.min(9)), t);
                m.header.dst_len = 32;
                m.attributes
                    .push(RuleAttribute::Destination(IpAddr::V4(addr)));
                m.attributes.push(RuleAttribute::Iifname(name.clone()));
                self.add_rule(handle, m, &format!("iif {name} to {addr}"))
                    .await?;
            }
        } else {
            let r = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(addr, 32)
                .output_interface(self.tun)
                .build();
            self.add_route(handle, r).await?;
            let mut req = handle.neighbours().add(self.outside, IpAddr::V4(addr));
            req.message_mut().header.flags = NeighbourFlags::Proxy;
            let msg = req.message_mut().clone();
            req.replace().execute().await.map_err(|e| {
                NetlinkError::new(
                    format!("add proxy neighbour {addr} dev {}", self.outside_name),
                    e,
                )
            })?;
            self.neighbours.push(msg);
        }
        if self.local.contains(&addr) {
            self.move_local(handle).await?;
        }
        self.publics.push(addr);
        Ok(())
    }

    /// Undoes [`Installed::add_public`] for one address: its steering rules (an address
    /// assigned here) or its TUN route and proxy neighbour (an address vipgate owns).
    pub(crate) async fn remove_public(
        &mut self,
        handle: &Handle,
        addr: Ipv4Addr,
    ) -> Result<(), DriverError> {
        let Some(at) = self.publics.iter().position(|a| *a == addr) else {
            return Ok(());
        };
        let target = IpAddr::V4(addr);
        let (rules, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.rules)
            .into_iter()
            .partition(|m| m.attributes.contains(&RuleAttribute::Destination(target)));
        self.rules = keep;
        for m in rules {
            handle
                .rule()
                .del(m)
                .execute()
                .await
                .map_err(|e| NetlinkError::new(format!("remove rule to {addr}"), e))?;
        }
        let (neighbours, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.neighbours)
            .into_iter()
            .partition(|m| {
                m.attributes
                    .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        addr,
                    )))
            });
        self.neighbours = keep;
        for m in neighbours {
            handle
                .neighbours()
                .del(m)
                .execute()
                .await
                .map_err(|e| NetlinkError::new(format!("remove proxy neighbour {addr}"), e))?;
        }
        let (routes, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.routes).into_iter().partition(|m| {
                m.header.destination_prefix_length == 32
                    && m.attributes
                        .contains(&RouteAttribute::Destination(RouteAddress::Inet(addr)))
            });
        self.routes = keep;
        for m in routes {
            del_route_idempotent(handle, m).await?;
        }
        self.publics.remove(at);
        Ok(())
    }

    /// Moves `lookup local` from pref 0 behind the steering rules (once). The moved rule is
    /// added before the original is deleted, so local delivery never disappears.
    async fn move_local(&mut self, handle: &Handle) -> Result<(), DriverError> {
        if self.moved_local {
            return Ok(());
        }
        let mut req = handle.rule().add();
        *req.message_mut() = rule(pref(self.priority, 50), LOCAL);
        // EEXIST / ENOENT: an earlier run was killed after moving the rule; finish the move.
        match req.execute().await {
            Err(e) if errno(&e) != Some(libc::EEXIST) => {
                return Err(DriverError::from(NetlinkError::new("move lookup local", e)));
            }
            _ => {}
        }
        self.moved_local = true;
        match handle.rule().del(rule(0, LOCAL)).execute().await {
            Err(e) if errno(&e) != Some(libc::ENOENT) => {
                Err(DriverError::from(NetlinkError::new("move lookup local", e)))
            }
            _ => Ok(()),
        }
    }

    /// Removes everything, in reverse order, logging (not failing on) what is already gone.
    pub(crate) async fn remove(&mut self, handle: &Handle) {
        if self.moved_local {
            let mut req = handle.rule().add();
            *req.message_mut() = rule(0, LOCAL);
            if let Err(e) = req.execute().await {
                tracing::warn!(error = %e, "restoring `lookup local` at pref 0");
            }
            if let Err(e) = handle
                .rule()
                .del(rule(pref(self.priority, 50), LOCAL))
                .execute()
                .await
            {
                tracing::warn!(error = %e, "removing moved `lookup local`");
            }
            self.moved_local = false;
        }
        for m in self.rules.drain(..).rev() {
            if let Err(e) = handle.rule().del(m).execute().await {
                tracing::warn!(error = %e, "removing rule");
            }
        }
        for m in self.neighbours.drain(..).rev() {
            if let Err(e) = handle.neighbours().del(m).execute().await {
                tracing::warn!(error = %e, "removing proxy neighbour");
            }
        }
        for m in self.routes.drain(..).rev() {
            // Routes through the TUN went with it when the packet loop closed it: fine.
            if let Err(e) = del_route_idempotent(handle, m).await {
                tracing::warn!(error = %e, "removing route");
            }
        }
    }
}
