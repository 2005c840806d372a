//! The VM-level KVM calls (with vcpu.rs, the only user of kvm-ioctls).

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;

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
}

pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
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
        Ok(Self { kvm, vm })
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

    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, KvmError> {
        self.vm
            .create_vcpu(u64::from(id))
            .map_err(|source| KvmError::CreateVcpu { id, source })
    }

    /// Injects an interrupt on `gsi` whenever `fd` is signalled.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|source| KvmError::RegisterIrqfd { gsi, source })
    }
}
