//! `ringvm-blk`: the vhost-user-blk backend of ringvm (see DESIGN.md).
//!
//! Module map, from the socket down to the image file:
//! - [`request`]: descriptor chain -> [`request::BlkRequest`] (pure).

pub mod request;
