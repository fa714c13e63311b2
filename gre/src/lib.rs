//! GRE (RFC 2784/2890) and GRE-in-UDP (RFC 8086) tunnels: sans-IO codec, tunnel core, Cisco-style keepalives, and a TUN/raw-socket driver.
#![warn(missing_docs)]
