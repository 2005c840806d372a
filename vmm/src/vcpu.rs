//! vCPU threads: initial CPU state (CPUID, MSRs, FPU, LAPIC, registers for
//! the boot protocol), the KVM_RUN loop, and dispatch of exits to the buses.
//!
//! Stopping: the VM sets `stop`, then sends KICK_SIGNAL to every vCPU thread.
//! The handler sets `immediate_exit` in that thread's kvm_run, so a KVM_RUN
//! that is running returns EINTR and one about to start returns at once; the
//! loop then sees `stop` and ends. There is no window in which a kick is lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs, Msrs,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};
use crate::boot::EntryPoint;
use crate::cpuid::{vcpu_cpuid, CpuTopology};
use crate::devices::pci::PciBus;
use crate::devices::{ExitReason, ExitSignal, PioBus};

/// Where a vCPU sends its port and MMIO exits.
pub struct Buses {
    pub pio: PioBus,
    /// MMIO is PCI BARs only (the LAPIC and IOAPIC are KVM's).
    pub pci: Arc<PciBus>,
}

/// Real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// GDT for the initial state: null, 64-bit code, data, TSS, 32-bit code.
const BOOT_GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
];
const CODE64_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
const CODE32_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: without it a guest that
/// trusts MTRRs would map all of RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("configuring vCPU {id}: {what} failed")]
    Setup {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("writing the boot GDT failed")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    #[error("spawning the thread of vCPU {id} failed")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the boot GDT the initial segment state refers to.
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START.0 + 8 * i as u64))
            .map_err(VcpuError::WriteGdt)?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(VcpuError::WriteGdt)
}

/// The kvm_segment a GDT entry describes.
fn segment(selector: u16) -> kvm_segment {
    let e = BOOT_GDT[usize::from(selector >> 3)];
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | (((e >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// What the boot vCPU needs to start a kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootState {
    pub entry: EntryPoint,
    /// PVH: hvm_start_info (EBX); Linux: boot_params (RSI).
    pub boot_info: GuestAddress,
    /// Linux: the identity page tables (CR3).
    pub page_tables: Option<GuestAddress>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Sets up CPUID, MSRs, FPU and LAPIC; the boot vCPU also gets `boot`.
    pub fn new(
        id: u8,
        fd: VcpuFd,
        base_cpuid: &kvm_bindings::CpuId,
        num_vcpus: u8,
        boot: Option<BootState>,
    ) -> Result<Self, VcpuError> {
        let err = |what| move |source| VcpuError::Setup { id, what, source };
        let tsc_khz = fd.get_tsc_khz();
        tracing::debug!(vcpu = id, ?tsc_khz, "KVM_GET_TSC_KHZ");
        let topo = CpuTopology {
            num_vcpus,
            tsc_khz: tsc_khz.ok().filter(|k| *k > 0),
        };
        fd.set_cpuid2(&vcpu_cpuid(base_cpuid, id, topo))
            .map_err(err("KVM_SET_CPUID2"))?;
        let msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: MISC_ENABLE_FAST_STRING,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: MTRR_ENABLE_WRITEBACK,
                ..Default::default()
            },
        ])
        .expect("two MSR entries fit");
        fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        if let Some(boot) = boot {
            let (regs, sregs) = boot_registers(fd.get_sregs().map_err(err("KVM_GET_SREGS"))?, boot);
            fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
        }
        Ok(Self { id, fd })
    }

    /// Runs the vCPU on its own thread until `stop` or a VM exit request.
    pub fn spawn(
        self,
        buses: Arc<Buses>,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(&buses, &exit, &stop))
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self, buses: &Buses, exit: &ExitSignal, stop: &AtomicBool) {
        let pio = &buses.pio;
        let pci = &buses.pci;
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut unhandled = RateLimit::default();
        while !stop.load(Ordering::Acquire) && !exit.is_requested() {
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(port, data) && unhandled.allow() {
                        tracing::debug!(vcpu = self.id, port, ?data, "OUT to an unclaimed port");
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(port, data) && unhandled.allow() {
                        tracing::debug!(vcpu = self.id, port, "IN from an unclaimed port");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !pci.mmio_read(addr, data) {
                        data.fill(0xff);
                        if unhandled.allow() {
                            tracing::debug!(vcpu = self.id, addr, "MMIO read of an unclaimed address");
                        }
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !pci.mmio_write(addr, data) && unhandled.allow() {
                        tracing::debug!(vcpu = self.id, addr, "MMIO write to an unclaimed address");
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    tracing::warn!(vcpu = self.id, "guest triple-faulted (KVM_EXIT_SHUTDOWN); treated as a reset");
                    self.log_state();
                    exit.request(ExitReason::Reset);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => exit.request(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => exit.request(ExitReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => self.fault("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into(), exit),
                    other => self.fault(format!("unknown KVM system event {other}"), exit),
                },
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel LAPIC, HLT only reaches userspace if
                    // KVM cannot wait; go round again.
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => self.fault(
                    format!("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"),
                    exit,
                ),
                Ok(VcpuExit::InternalError) => {
                    let suberror = self.internal_suberror();
                    self.fault(
                        format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror} (1 = KVM could not emulate an instruction)"),
                        exit,
                    )
                }
                Ok(other) => {
                    let what = format!("unexpected VM exit {other:?}");
                    self.fault(what, exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => self.fault(format!("KVM_RUN failed: {e}"), exit),
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // kvm_run exit union is the one KVM filled in.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    fn fault(&self, what: String, exit: &ExitSignal) {
        tracing::error!(vcpu = self.id, "VM fault: {what}");
        self.log_state();
        exit.request(ExitReason::Fault(format!("vCPU {}: {what}", self.id)));
    }

    fn log_state(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => tracing::error!(
                vcpu = self.id,
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
                 cs={:#x} (cpl {}) cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi,
                s.cs.selector, s.cs.dpl, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => tracing::error!(vcpu = self.id, "cannot read registers: {e}"),
        }
    }
}

/// Logs the first few occurrences of a guest-triggerable event, then one in
/// a thousand, so a guest cannot flood the log.
#[derive(Default)]
struct RateLimit {
    count: u64,
}

impl RateLimit {
    const FIRST: u64 = 16;

    fn allow(&mut self) -> bool {
        self.count += 1;
        self.count <= Self::FIRST || self.count % 1000 == 0
    }
}

thread_local! {
    /// This thread's kvm_run, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal handler for kick_signal(): makes this thread's KVM_RUN return.
pub extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, set by Vcpu::run
            // before its loop and cleared after; the VcpuFd that owns the
            // mapping lives for the whole loop. Writing one byte is
            // async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut v = [0u8; 4];
    for (i, b) in v.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// Registers for entering the kernel through its boot protocol.
fn boot_registers(mut sregs: kvm_sregs, boot: BootState) -> (kvm_regs, kvm_sregs) {
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match boot.entry {
        EntryPoint::Pvh { entry } => {
            sregs.cs = segment(CODE32_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = boot.boot_info.0;
        }
        EntryPoint::Linux64 { entry } => {
            sregs.cs = segment(CODE64_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = boot
                .page_tables
                .expect("64-bit entry comes with page tables")
                .0;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry.0;
            regs.rsi = boot.boot_info.0;
            regs.rsp = BOOT_STACK_POINTER.0;
            regs.rbp = BOOT_STACK_POINTER.0;
        }
    }
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_the_gdt() {
        let cs64 = segment(CODE64_SELECTOR);
        assert_eq!(
            (cs64.l, cs64.db, cs64.type_, cs64.limit, cs64.g),
            (1, 0, 0xb, 0xffff_ffff, 1)
        );
        let cs32 = segment(CODE32_SELECTOR);
        assert_eq!((cs32.l, cs32.db, cs32.type_), (0, 1, 0xb));
        let ds = segment(DATA_SELECTOR);
        assert_eq!((ds.type_, ds.s, ds.present), (3, 1, 1));
        let tr = segment(TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn pvh_entry_is_32bit_protected_mode() {
        let boot = BootState {
            entry: EntryPoint::Pvh {
                entry: GuestAddress(0x10_0000),
            },
            boot_info: GuestAddress(0x6000),
            page_tables: None,
        };
        let (r, s) = boot_registers(kvm_sregs::default(), boot);
        assert_eq!((r.rip, r.rbx), (0x10_0000, 0x6000));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!(s.cs.selector, CODE32_SELECTOR);
    }

    #[test]
    fn linux_entry_is_long_mode() {
        let boot = BootState {
            entry: EntryPoint::Linux64 {
                entry: GuestAddress(0x10_0200),
            },
            boot_info: GuestAddress(0x7000),
            page_tables: Some(GuestAddress(0x9000)),
        };
        let (r, s) = boot_registers(kvm_sregs::default(), boot);
        assert_eq!((r.rip, r.rsi), (0x10_0200, 0x7000));
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn lvt_mode_is_replaced() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 2] = 1; // masked bit 16 survives
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2], 1);
    }
}
