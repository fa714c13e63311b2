//! Backend selection for virtual services: rr, wrr (smooth), lc, wlc, sh, mh (Maglev), persistence. Pure: no I/O, no clock.
#![warn(missing_docs)]
