//! SSH -L / -R / -D forwarding client and a forwarding-only SSH server, on russh.
#![warn(missing_docs)]

pub mod spec;
