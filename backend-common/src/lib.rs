//! `ringvm-backend`: what the two vhost-user backends of ringvm (`ringvm-blk`
//! and `ringvm-net`) share.
//!
//! - [`cli`]: the `--socket` and `--queue-size` parsers, the log subscriber.
//! - [`daemon`]: the listening socket, one frontend at a time, signals, and
//!   the vhost-user-backend workarounds, generic over the device.
//! - [`signals`]: SIGTERM, SIGINT and SIGUSR1 read from a signalfd.
//! - [`counters`]: counter increments, the daemon's own counters, and the
//!   `name=value` snapshot.
//! - [`vhost_user`]: what both `VhostUserBackend` impls answer alike.
//! - `test_support` (feature `test-support`): the vhost-user test frontend
//!   the backends' tests drive them with, and the backend process under test.

pub mod cli;
pub mod counters;
pub mod daemon;
pub mod signals;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod vhost_user;
