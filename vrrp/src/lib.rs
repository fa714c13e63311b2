//! VRRPv3 (RFC 5798) interoperable with keepalived: sans-IO codec and state machine, raw-socket/netlink/ARP driver.
#![warn(missing_docs)]
