//! Host run of the test guest's protocol code (tests/guest/src/netproto.rs,
//! plain `core` code): the guest crate is `no_std` without a test harness, so
//! its unit tests run here.

#[path = "../guest/src/netproto.rs"]
#[allow(dead_code)]
mod netproto;
