//! A minimal VRRP daemon for trying the driver without the CLI:
//! `vrrpd IFACE VRID PRIORITY INTERVAL_MS VIP/PREFIX [nopreempt]`; SIGINT/SIGTERM stop it
//! cleanly (priority 0, VIP removed).

use std::net::Ipv4Addr;
use std::time::Duration;

use vrrp::driver::{MemberSpec, VrrpDriver};
use vrrp::{InstanceConfig, VirtualAddress};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err("usage: vrrpd IFACE VRID PRIORITY INTERVAL_MS VIP/PREFIX [nopreempt]".into());
    }
    let (vip, prefix) = args[5].split_once('/').ok_or("VIP/PREFIX")?;
    let mut config = InstanceConfig::new("vip", args[2].parse()?, Ipv4Addr::UNSPECIFIED);
    config.priority = args[3].parse()?;
    config.advert_interval = Duration::from_millis(args[4].parse()?);
    config.preempt = args.get(6).map(String::as_str) != Some("nopreempt");
    config.addresses = vec![VirtualAddress {
        address: vip.parse()?,
        prefix_len: prefix.parse()?,
    }];
    let group = VrrpDriver::start(None, vec![MemberSpec::new(config, &args[1])]).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    group.stop().await;
    Ok(())
}
