//! PAT gateway (static and dynamic PAT, ACL) and LVS-NAT virtual services: sans-IO translation core and a TUN driver.
#![warn(missing_docs)]

pub mod health;
pub mod service;
