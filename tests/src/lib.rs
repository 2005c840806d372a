//! Integration tests of ringvm: the test guest and the harness that runs guests.

pub mod blk_pattern;
pub mod guest;
pub mod harness;
pub mod linux;
pub mod netns;
