//! Every guest-physical address ringvm uses lives here.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  GDT used for the initial vCPU state
//! 0x0000_6000  PVH hvm_start_info (then its memory map and module list)
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_9000  identity page tables for 64-bit Linux entry (PML4, PDPT, PDs)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_BYTES)
//! 0x0008_F000  initial stack top for a 64-bit Linux entry
//! 0x000A_0000  .. 0x0010_0000 reserved (VGA hole / BIOS area)
//! 0x000E_0000  ACPI tables (RSDP first, so a scan of the BIOS area finds it)
//! 0x0010_0000  kernel load address (HIMEM_START)
//! 0xC000_0000  .. 0xFFFF_FFFF 32-bit MMIO hole (PCI BARs, IOAPIC, LAPIC)
//! 0x1_0000_0000 RAM above the hole, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Descriptor table loaded into GDTR for the initial vCPU state.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Interrupt descriptor table placeholder (empty) for the initial vCPU state.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);

/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (`hvm_modlist_entry` array), right after the start info.
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6100);
/// Maximum number of memory map entries the PVH area has room for.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6100) / 24;

/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);

/// Page tables for the 64-bit Linux entry: PML4, then PDPT, then 4 PDs
/// (identity map of the first 4 GiB with 2 MiB pages).
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);

/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Room for the command line, terminating NUL included.
pub const CMDLINE_MAX_BYTES: usize = 0x10000;

/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff00);

/// End of the low RAM that the memory map reports as usable (640 KiB).
pub const EBDA_START: GuestAddress = GuestAddress(0xa0000);

/// ACPI tables; the RSDP is the first thing here.
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
/// End (exclusive) of the area reserved for ACPI tables.
pub const ACPI_END: GuestAddress = GuestAddress(0x100000);

/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: GuestAddress = GuestAddress(0x100000);

/// The 32-bit MMIO hole: RAM below 4 GiB stops here.
pub const MMIO_HOLE_START: GuestAddress = GuestAddress(0xc000_0000);
/// First address above the hole, where the rest of a large guest's RAM goes.
pub const RAM_ABOVE_HOLE_START: GuestAddress = GuestAddress(0x1_0000_0000);

/// IOAPIC MMIO base.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
/// Local APIC MMIO base.
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);

/// Legacy I/O ports ringvm emulates.
pub mod ports {
    /// 8250 UART (COM1).
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// IRQ line of COM1.
    pub const SERIAL_COM1_IRQ: u32 = 4;
    /// i8042 data port / command-status port.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    /// CMOS RTC index and data ports.
    pub const RTC: u16 = 0x70;
    /// PCI configuration mechanism #1: CONFIG_ADDRESS (0xcf8) and CONFIG_DATA (0xcfc).
    pub const PCI_CONFIG: u16 = 0xcf8;
    pub const PCI_CONFIG_LEN: u16 = 8;
    /// pvpanic: the guest reports a kernel panic (QEMU's default port).
    pub const PVPANIC: u16 = 0x505;
    /// Debug-exit port: the guest writes n, ringvm exits with status n
    /// (same place as QEMU's isa-debug-exit iobase=0xf4).
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// ACPI PM1a event block (status + enable, 4 bytes) and control block (2 bytes).
    pub const ACPI_PM1A_EVT: u16 = 0x600;
    pub const ACPI_PM1A_EVT_LEN: u8 = 4;
    pub const ACPI_PM1A_CNT: u16 = 0x604;
    pub const ACPI_PM1A_CNT_LEN: u8 = 2;
    /// SCI interrupt line announced in the FADT.
    pub const ACPI_SCI_IRQ: u16 = 9;
}
