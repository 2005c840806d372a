//! Arbitrary kernel files through ringvm's loaders (ELF/PVH and bzImage):
//! they must never panic, and a kernel they accept lies inside guest RAM.

#![no_main]

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ringvm::boot::{load_kernel_image, EntryPoint};
use ringvm::memory::GuestRam;

/// Small enough to make "memory too small" reachable, large enough for
/// the loaders' fixed areas.
const RAM_BYTES: u64 = 16 << 20;

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(RAM_BYTES).expect("16 MiB of guest RAM"))
}

fuzz_target!(|data: &[u8]| {
    let ram = ram();
    let Ok(kernel) = load_kernel_image(ram, Path::new("fuzz-input"), &mut Cursor::new(data)) else {
        return;
    };
    assert!(
        kernel.kernel_end.0 <= ram.low_ram_end().0,
        "accepted kernel ends past RAM"
    );
    match kernel.entry {
        EntryPoint::Pvh { entry } => {
            assert!(entry.0 < u64::from(u32::MAX) && entry.0 < kernel.kernel_end.0)
        }
        EntryPoint::Linux64 { entry } => assert!(entry.0 < kernel.kernel_end.0),
    }
});
