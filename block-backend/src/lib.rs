//! `ringvm-blk`: the vhost-user-blk backend of ringvm (see DESIGN.md).
//!
//! Module map, from the socket down to the image file:
//! - [`daemon`]: the listening socket, one connection at a time, signals
//!   (the loop itself is shared with ringvm-net: [`ringvm_backend::daemon`]).
//! - [`backend`]: the `VhostUserBackend` (features, config space, events).
//! - [`queue`]: one worker per virtqueue: chains in, I/O out, used ring.
//! - [`request`]: descriptor chain -> [`request::BlkRequest`] (pure).
//! - [`image`]: formats translate guest sectors into host file extents.
//! - [`engine`]: engines move bytes (io_uring, or synchronous syscalls).
//! - [`counters`]: what happened, as atomics, printed at exit.

pub mod backend;
pub mod counters;
pub mod daemon;
pub mod engine;
pub mod image;
pub mod queue;
pub mod request;
