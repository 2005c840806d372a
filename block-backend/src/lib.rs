//! `ringvm-blk`: the vhost-user-blk backend of ringvm (see DESIGN.md).
//!
//! Module map, from the socket down to the image file:
//! - [`queue`]: one worker per virtqueue: chains in, I/O out, used ring.
//! - [`request`]: descriptor chain -> [`request::BlkRequest`] (pure).
//! - [`image`]: formats translate guest sectors into host file extents.
//! - [`engine`]: engines move bytes (io_uring, or synchronous syscalls).
//! - [`counters`]: what happened, as atomics, printed at exit.

pub mod counters;
pub mod engine;
pub mod image;
pub mod queue;
pub mod request;
