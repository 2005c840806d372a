//! The ringvm test guest: booted through PVH by ringvm or QEMU, it sets up
//! long mode at CPL0 (start.S, a few hundred instructions, which PVM emulates)
//! and runs everything else here at CPL3 (which PVM runs natively). It reads
//! `job=` and `exit=` from the command line, runs the job, and reports the
//! `exit=` code through the debug-exit port 0xf4. Everything it prints on COM1
//! starts with `testguest: `.
//!
//! Exit codes of its own: 124 = CPU exception (start.S), 125 = bad setup
//! (boot info, command line, panic), 1 = the job failed.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[macro_use]
mod serial;
mod acpi;
mod bootinfo;
mod heap;
mod jobs;
mod memfns;
mod mmio;
mod netproto;
mod pci;
mod phys;
mod port;
mod start;
mod tsc;
mod virtio;

use bootinfo::StartInfo;

/// The debug-exit port (QEMU's isa-debug-exit at iobase 0xf4, ringvm's own).
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Exit code for a bad boot info, a bad command line or a panic.
const EXIT_BAD_SETUP: u8 = 125;
/// Exit code when a job reports failure.
const EXIT_JOB_FAILED: u8 = 1;

/// Entered at CPL3 from start.S with the guest-physical address of
/// `hvm_start_info`.
#[no_mangle]
pub extern "C" fn guest_main(start_info_paddr: u64) -> ! {
    serial::init();
    let start_info = match StartInfo::read(start_info_paddr) {
        Ok(info) => info,
        Err(e) => {
            println!("{e}");
            exit(EXIT_BAD_SETUP);
        }
    };
    heap::init(&start_info);
    let cmdline = start_info.cmdline();
    if cmdline.truncated {
        println!(
            "command line too long, using its start: {}",
            cmdline.as_str()
        );
    }
    let exit_code = match cmdline.get("exit") {
        None => 0,
        Some(value) => match value.parse::<u8>() {
            Ok(code) => code,
            Err(_) => {
                println!("bad exit={value}");
                exit(EXIT_BAD_SETUP);
            }
        },
    };
    let Some(name) = cmdline.get("job") else {
        println!("no job= on the command line");
        exit(EXIT_BAD_SETUP);
    };
    let Some(job) = jobs::find(name) else {
        println!("unknown job '{name}'");
        exit(EXIT_BAD_SETUP);
    };
    let boot = jobs::Boot {
        start_info,
        cmdline,
    };
    match job(&boot) {
        Ok(()) => exit(exit_code),
        Err(jobs::JobFailed) => exit(EXIT_JOB_FAILED),
    }
}

/// Writes `code` to the debug-exit port, which ends the VM, and spins in case
/// it does not (no `hlt`: this is CPL3).
pub fn exit(code: u8) -> ! {
    // SAFETY: DEBUG_EXIT_PORT is the debug-exit device; the write stops the VM
    // and involves no guest memory.
    unsafe { port::outb(DEBUG_EXIT_PORT, code) };
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(at) => println!(
            "panic: {} at {}:{}:{}",
            info.message(),
            at.file(),
            at.line(),
            at.column()
        ),
        None => println!("panic: {}", info.message()),
    }
    exit(EXIT_BAD_SETUP)
}
