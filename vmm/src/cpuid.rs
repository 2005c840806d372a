//! The CPUID a vCPU sees: the host's supported CPUID, with the topology of
//! this VM (APIC ids, logical processor counts, cache sharing) and the KVM
//! timing leaf 0x40000010 (TSC and LAPIC timer frequencies) filled in.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaves 0xb/0x1f.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The LAPIC timer frequency KVM emulates (a 1 GHz bus clock), in kHz.
const LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// What the guest is told about its processor.
#[derive(Clone, Copy, Debug)]
pub struct CpuTopology {
    pub num_vcpus: u8,
    /// The host TSC frequency in kHz (the guest TSC runs at the same rate).
    pub tsc_khz: Option<u32>,
}

/// Bits needed to number `n` items: ceil(log2(n)).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Returns `base` adapted for the vCPU whose APIC id is `apic_id`.
pub fn vcpu_cpuid(base: &CpuId, apic_id: u8, topo: CpuTopology) -> CpuId {
    let n = u32::from(topo.num_vcpus);
    let apic_id = u32::from(apic_id);
    let mut entries: Vec<kvm_cpuid_entry2> = base
        .as_slice()
        .iter()
        .copied()
        // 0x1f describes dies and modules the VM does not have; leaf 0xb says it all.
        .filter(|e| e.function != LEAF_V2_EXT_TOPOLOGY && e.function != LEAF_HYPERVISOR_TIMING)
        .collect();

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (n.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: logical
                // processors sharing this cache - 1 (L3 is shared by all).
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            LEAF_EXT_TOPOLOGY => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(n);
                        e.ebx = n;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR_BASE if topo.tsc_khz.is_some() => {
                e.eax = e.eax.max(LEAF_HYPERVISOR_TIMING);
            }
            LEAF_AMD_SIZE_IDS => {
                // ECX[7:0]: threads in the package - 1; ECX[15:12]: APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | ((n - 1) & 0xff) | (id_bits(n) << 12);
            }
            _ => {}
        }
    }

    // Make sure leaf 0xb reports both levels even if the host lists fewer subleaves.
    if entries.iter().any(|e| e.function == LEAF_EXT_TOPOLOGY) {
        for index in 0..2 {
            if !entries
                .iter()
                .any(|e| e.function == LEAF_EXT_TOPOLOGY && e.index == index)
            {
                let level = if index == 0 {
                    LEVEL_TYPE_SMT
                } else {
                    LEVEL_TYPE_CORE
                };
                entries.push(kvm_cpuid_entry2 {
                    function: LEAF_EXT_TOPOLOGY,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    eax: if index == 0 { 0 } else { id_bits(n) },
                    ebx: if index == 0 { 1 } else { n },
                    ecx: (level << 8) | index,
                    edx: apic_id,
                    ..Default::default()
                });
            }
        }
    }

    if let Some(tsc_khz) = topo.tsc_khz {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: tsc_khz,
            ebx: LAPIC_TIMER_KHZ,
            ..Default::default()
        });
    }

    CpuId::from_entries(&entries)
        .expect("the adapted CPUID has no more entries than KVM_MAX_CPUID_ENTRIES")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xdead_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR_BASE,
                eax: 0x4000_0001,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_V2_EXT_TOPOLOGY,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology_for_four_vcpus() {
        let topo = CpuTopology {
            num_vcpus: 4,
            tsc_khz: Some(2_000_000),
        };
        let c = vcpu_cpuid(&base(), 3, topo);
        let l1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "brand/clflush bits are kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let core = find(&c, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 0).edx, 3);
        let timing = find(&c, LEAF_HYPERVISOR_TIMING, 0);
        assert_eq!((timing.eax, timing.ebx), (2_000_000, LAPIC_TIMER_KHZ));
        assert_eq!(
            find(&c, LEAF_HYPERVISOR_BASE, 0).eax,
            LEAF_HYPERVISOR_TIMING
        );
        assert!(!c
            .as_slice()
            .iter()
            .any(|e| e.function == LEAF_V2_EXT_TOPOLOGY));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 64].map(id_bits), [0, 1, 2, 2, 3, 6]);
    }
}
