//! The VM-level KVM calls (with vcpu.rs, the only user of kvm-ioctls).

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::msix::MsiMessage;
use crate::memory::GuestRam;

/// GSIs 0-23 are the IOAPIC pins (0-15 also the PICs); MSI routes start above.
const IOAPIC_PINS: u32 = 24;
const PIC_IRQS: u32 = 16;
/// The in-kernel PIT raises GSI 0; the MADT overrides ISA IRQ 0 to GSI 2.
const PIT_GSI: u32 = 0;
const PIT_IOAPIC_PIN: u32 = 2;
/// The slave 8259 hangs off master pin 2.
const PIC_CASCADE: u32 = 2;
/// CPUID.1:ECX bit of the TSC-deadline timer.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// KVM's limit on routing entries.
const MAX_GSI: u32 = kvm_bindings::KVM_MAX_IRQ_ROUTES as u32 - 1;

/// Where KVM puts the three pages of the TSS it needs for real-mode
/// emulation on Intel hosts: just below the BIOS area at the top of 4 GiB,
/// inside the MMIO hole and away from anything ringvm maps.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The identity-map page KVM needs on Intel hosts, right below the TSS.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Capabilities ringvm cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
];

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "cannot open /dev/kvm (is KVM enabled on this host, and may this user open /dev/kvm?)"
    )]
    Open(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm speaks API version {0}, ringvm needs 12")]
    ApiVersion(i32),
    #[error("this host's KVM lacks {0}, which ringvm needs")]
    MissingCap(&'static str),
    #[error("this host's KVM supports at most {max} vCPUs, {requested} were asked for (--cpus)")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    SetMemoryRegion {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU for vCPU {id} failed")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD for GSI {gsi} failed")]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD deassign for GSI {gsi} failed")]
    UnregisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD at {addr:#x} failed")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("all {MAX_GSI} GSIs are in use")]
    OutOfGsis,
    #[error("KVM_SET_GSI_ROUTING failed")]
    SetGsiRouting(#[source] kvm_ioctls::Error),
}

/// The MSI routes ringvm added on top of the default IOAPIC/PIC ones.
#[derive(Default)]
struct GsiRoutes {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// The VM: shared (Arc) by everything that registers eventfds or routes
/// interrupts; all its methods take &self.
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    routes: Mutex<GsiRoutes>,
}

impl KvmVm {
    /// Opens /dev/kvm, checks what ringvm needs and creates an empty VM.
    pub fn new(num_vcpus: u8) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(api));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(num_vcpus) > max {
            return Err(KvmError::TooManyVcpus {
                requested: num_vcpus,
                max,
            });
        }
        let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
        Ok(Self {
            kvm,
            vm,
            routes: Mutex::new(GsiRoutes {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        })
    }

    /// The x86 platform pieces that live in KVM: TSS and identity-map pages,
    /// in-kernel PIC + IOAPIC + LAPICs, and the PIT.
    pub fn setup_platform(&self) -> Result<(), KvmError> {
        self.vm
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(KvmError::SetTssAddress)?;
        self.vm
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(KvmError::SetIdentityMap)?;
        self.vm.create_irq_chip().map_err(KvmError::CreateIrqchip)?;
        let routes = self.routes.lock().expect("GSI routes lock poisoned");
        self.vm
            .set_gsi_routing(&routing_table(&routes.msi))
            .map_err(KvmError::SetGsiRouting)?;
        drop(routes);
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm.create_pit2(pit).map_err(KvmError::CreatePit)
    }

    /// Maps every guest RAM range into the VM, one slot per range.
    pub fn set_memory(&self, ram: &GuestRam) -> Result<(), KvmError> {
        for (slot, region) in ram.memory().iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 lies inside every mapped region");
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `len` bytes owned by
            // `ram`, which the VM outlives only as an Arc-less reference:
            // Vm keeps GuestRam alive for as long as the VmFd exists (both
            // are fields of Vm and the VmFd is dropped with it).
            unsafe { self.vm.set_user_memory_region(r) }
                .map_err(|source| KvmError::SetMemoryRegion { slot, source })?;
        }
        Ok(())
    }

    /// What KVM can offer a guest. KVM_GET_SUPPORTED_CPUID leaves out the
    /// TSC-deadline timer, which KVM emulates when it has
    /// KVM_CAP_TSC_DEADLINE_TIMER: it is added here (as QEMU does), so a
    /// Linux guest uses the LAPIC in deadline mode rather than calibrating it.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        if self.kvm.check_extension(Cap::TscDeadlineTimer) {
            for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
                e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
            }
        }
        Ok(cpuid)
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, KvmError> {
        self.vm
            .create_vcpu(u64::from(id))
            .map_err(|source| KvmError::CreateVcpu { id, source })
    }

    /// Injects an interrupt on `gsi` whenever `fd` is signalled. If `fd`
    /// is already signalled, KVM injects at once.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|source| KvmError::RegisterIrqfd { gsi, source })
    }

    /// Stops `fd` from injecting; its signals accumulate in the eventfd.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|source| KvmError::UnregisterIrqfd { gsi, source })
    }

    /// Signals `fd` on any guest write to the MMIO address `addr` (of any
    /// length), without an exit to ringvm.
    pub fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| KvmError::Ioeventfd { addr, source })
    }

    pub fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| KvmError::Ioeventfd { addr, source })
    }

    /// A GSI for an MSI route of its own.
    pub fn allocate_gsi(&self) -> Result<u32, KvmError> {
        let mut r = self.routes.lock().expect("GSI routes lock poisoned");
        if r.next_gsi > MAX_GSI {
            return Err(KvmError::OutOfGsis);
        }
        r.next_gsi += 1;
        Ok(r.next_gsi - 1)
    }

    /// Routes `gsi` to the MSI `msg`.
    pub fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), KvmError> {
        let mut r = self.routes.lock().expect("GSI routes lock poisoned");
        if r.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        r.msi.insert(gsi, msg);
        let table = routing_table(&r.msi);
        self.vm
            .set_gsi_routing(&table)
            .map_err(KvmError::SetGsiRouting)
    }
}

/// KVM_SET_GSI_ROUTING replaces the whole table, so it carries the irqchip
/// routes plus the MSI routes. The irqchip routes follow the MADT: ISA IRQ 0
/// (the PIT) is overridden to GSI 2, so the PIT's GSI 0 reaches IOAPIC pin
/// 2 and nothing else uses pin 2 (as QEMU routes it); ISA IRQ n reaches pin
/// n otherwise; GSIs 0-15 but the cascade (2) also reach the 8259s.
fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> KvmIrqRouting {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::with_capacity((IOAPIC_PINS + PIC_IRQS) as usize + msi.len());
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            PIT_GSI => entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, PIT_IOAPIC_PIN)),
            PIT_IOAPIC_PIN => {}
            _ => entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
        if gsi < PIC_IRQS && gsi != PIC_CASCADE {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address_lo;
        e.u.msi.address_hi = m.address_hi;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    KvmIrqRouting::from_entries(&entries)
        .expect("fewer entries than KVM_MAX_IRQ_ROUTES: GSIs are capped at MAX_GSI")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_keeps_irqchip_routes_and_adds_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address_lo: 0xfee0_0000,
                address_hi: 0,
                data: 0x41,
            },
        );
        let t = routing_table(&msi);
        let e = t.as_slice();
        assert_eq!(
            e.len(),
            23 + 15 + 1,
            "no IOAPIC route for GSI 2, no PIC route for the cascade"
        );
        let last = e.last().unwrap();
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI entry just above.
        assert_eq!(unsafe { last.u.msi.data }, 0x41);
        let gsi4: Vec<_> = e.iter().filter(|x| x.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2, "IOAPIC and PIC routes for an ISA IRQ");
        let pit: Vec<_> = e
            .iter()
            .filter(|x| x.gsi == 0 && x.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries, filtered on their type just above.
            .map(|x| unsafe { (x.u.irqchip.irqchip, x.u.irqchip.pin) })
            .collect();
        assert_eq!(
            pit,
            vec![(KVM_IRQCHIP_IOAPIC, 2), (KVM_IRQCHIP_PIC_MASTER, 0)],
            "the PIT reaches IOAPIC pin 2"
        );
    }
}
