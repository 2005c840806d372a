//! `job=hello`: the guest is alive; how much RAM and how many CPUs it was given.

use super::{Boot, JobFailed};
use crate::acpi;

const MIB: u64 = 1 << 20;

pub fn run(boot: &Boot) -> Result<(), JobFailed> {
    let ram_mib = (boot.start_info.ram_bytes() + MIB / 2) / MIB;
    println!("hello mem={ram_mib}");
    match acpi::enabled_cpus(boot.start_info.rsdp_paddr) {
        Some(cpus) => println!("cpus={cpus}"),
        None => println!("cpus=0 (no ACPI MADT)"),
    }
    Ok(())
}
