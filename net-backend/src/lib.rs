//! `ringvm-net`: the vhost-user-net backend of ringvm (see DESIGN.md).
//!
//! Module map, from the socket down to the tap:
//! - [`daemon`]: the listening socket, one connection, signals (the loop
//!   itself is shared with ringvm-blk: [`ringvm_backend::daemon`]).
//! - [`backend`]: the `VhostUserBackend` (features, config space, offloads,
//!   events).
//! - [`queue`]: one worker per RX/TX pair: kicks, tap wakeups, used ring,
//!   and the pair's enable state.
//! - [`vring`]: the vrings, which tell their pair's worker when the
//!   frontend enables or disables them.
//! - [`tx`]: TX chain -> checked frame iovecs (pure).
//! - [`rx`]: receive chains, merged buffers, num_buffers (pure).
//! - [`tap`]: the tap device and frame-preserving readv/writev.
//! - [`counters`]: what happened, as atomics, printed at exit.

pub mod backend;
pub mod counters;
pub mod daemon;
pub mod queue;
pub mod rx;
pub mod tap;
pub mod tx;
pub mod used;
pub mod vring;
