//! The kernel settings the gateway's data path depends on, checked (or, for `nat0` itself,
//! set) before anything is installed.

use std::path::PathBuf;

use super::DriverError;

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

fn read(key: &str) -> Result<String, DriverError> {
    std::fs::read_to_string(path(key))
        .map(|s| s.trim().to_owned())
        .map_err(|source| DriverError::Sysctl {
            key: key.to_owned(),
            source,
        })
}

fn write(key: &str, value: &str) -> Result<(), DriverError> {
    std::fs::write(path(key), value).map_err(|source| DriverError::Sysctl {
        key: key.to_owned(),
        source,
    })
}

/// Checks the namespace-wide settings. These belong to the operator, so they are only checked:
/// - forwarding must be on, or nothing is routed through `nat0`;
/// - strict reverse-path filtering (`all.rp_filter=1`) drops every translated packet coming
///   back out of `nat0` (its source is reachable through another interface).
pub(crate) fn check_namespace() -> Result<(), DriverError> {
    if read("net.ipv4.ip_forward")? != "1" {
        return Err(DriverError::Setting(
            "IPv4 forwarding is off: run `sysctl -w net.ipv4.ip_forward=1` (the gateway routes \
             every packet through nat0)"
                .into(),
        ));
    }
    if read("net.ipv4.conf.all.rp_filter")? == "1" {
        return Err(DriverError::Setting(
            "net.ipv4.conf.all.rp_filter=1 (strict) drops translated packets leaving nat0: \
             set it to 2 (loose) or 0"
                .into(),
        ));
    }
    Ok(())
}

/// Settings of the TUN the driver created (it owns them):
/// - no reverse-path filter: translated packets carry sources routed via other interfaces;
/// - accept_local: outbound packets come back with the public address, which may be local;
/// - no IPv6: the gateway is IPv4 only, and the kernel's own IPv6 chatter (router and
///   multicast listener solicitations) would only be counted as malformed.
pub(crate) fn configure_tun(name: &str) -> Result<(), DriverError> {
    write(&format!("net.ipv4.conf.{name}.rp_filter"), "0")?;
    write(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
    // Absent when IPv6 is disabled in the kernel; then there is nothing to silence.
    let _ = write(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1");
    Ok(())
}
