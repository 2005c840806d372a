//! The ringvm VMM as a library: the `ringvm` binary (main.rs) is its CLI,
//! and the fuzz targets drive the same code (boot loaders, device models).

pub mod boot;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod event_loop;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
