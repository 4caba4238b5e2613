//! The guest's CPUID: what KVM supports, normalised per vCPU (APIC ids and topology), with the
//! hypervisor bit set and no PMU or power management.
//!
//! PVM hosts (ENVIRONMENT.md) ignore the CPUID a VMM sets: the guest sees the host's values
//! (measured: leaf 1 ECX reads back the host's, XSAVE and POPCNT included, whatever
//! KVM_SET_CPUID2 said). So features PVM cannot emulate cannot be hidden here; see
//! `pvm/` for how wisp copes instead.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

// Leaf 1.
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
// Leaf 0xB/0x1F level types (Intel SDM vol. 2A, CPUID leaf 0BH).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

// KVM paravirtual features (CPUID 0x40000001 EAX, Documentation/virt/kvm/x86/cpuid.rst)
// that the guest uses through hypercalls.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
/// Hypercall-based features: on PVM a guest's KVM_HC_SEND_IPI never completes (measured: an
/// AP spins on the hypercall instruction forever), so guests must not be offered them there.
pub const PVM_BROKEN_KVM_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;

/// Clears KVM paravirtual feature bits (0x40000001 EAX).
pub fn hide_kvm_features(cpuid: &mut CpuId, features: u32) {
    for e in cpuid.as_mut_slice() {
        if e.function == 0x4000_0001 {
            e.eax &= !features;
        }
    }
}

/// Rewrites `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `vcpu_id` of `vcpu_count`, one
/// package; with `smt`, two threads per core (APIC id bit 0 is the thread, as Firecracker
/// lays it out; the caller keeps `vcpu_count` 1 or even).
pub fn normalize(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8, smt: bool) {
    let n = u32::from(vcpu_count);
    let apic_id = u32::from(vcpu_id);
    let threads_per_core: u32 = if smt && n > 1 { 2 } else { 1 };
    let thread_bits = threads_per_core - 1;
    let cores = (n / threads_per_core).max(1);
    // Bits of the x2APIC id below the package id (threads and cores).
    let core_bits = 32 - (n.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // EBX: APIC id [31:24], logical processors per package [23:16],
                // CLFLUSH line size in qwords [15:8].
                e.ebx = (apic_id << 24) | (n.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                // OSXSAVE mirrors the guest's CR4.OSXSAVE; KVM sets it when the guest does.
                e.ecx &= !LEAF1_ECX_OSXSAVE;
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; each cache is private to one core
                // unless it is the last level (EAX[25:14]: threads sharing it - 1).
                let level = (e.eax >> 5) & 0x7;
                e.eax &= 0x3fff;
                e.eax |= (cores.saturating_sub(1) & 0x3f) << 26;
                let sharing = if level >= 3 { n } else { threads_per_core };
                e.eax |= (sharing.saturating_sub(1) & 0xfff) << 14;
            }
            0x6 => {
                // No power management to the guest (no HWP, no turbo).
                e.eax = 0;
                e.ecx = 0;
            }
            0xa => {
                // No PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = thread_bits;
                        e.ebx = threads_per_core;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
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
            _ => {}
        }
    }
}

/// Looks up a leaf, for tests and diagnostics.
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entry = |function, index, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x1234_5678,
            ebx: 0xffff_ffff,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            entry(0x1, 0, LEAF1_ECX_OSXSAVE, LEAF1_EDX_HTT),
            entry(0x7, 0, 0, 0),
            entry(0xb, 0, 0, 0),
            entry(0xb, 1, 0, 0),
            entry(0xa, 0, 1, 1),
        ])
        .unwrap()
    }

    #[test]
    fn apic_id_and_topology_per_vcpu() {
        let mut c = sample();
        normalize(&mut c, 5, 8, false);
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 8);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_OSXSAVE, 0);
        let smt = find(&c, 0xb, 0).unwrap();
        assert_eq!((smt.ebx, smt.edx, smt.ecx >> 8), (1, 5, LEVEL_TYPE_SMT));
        let core = find(&c, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.edx), (3, 8, 5));
        assert_eq!(find(&c, 0xa, 0).unwrap().eax, 0);
    }

    #[test]
    fn smt_puts_two_threads_on_each_core() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0x1,
                ..Default::default()
            },
            // An L1 cache (level 1) and the L3 (level 3) of leaf 4.
            kvm_cpuid_entry2 {
                function: 0x4,
                index: 0,
                eax: 1 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4,
                index: 3,
                eax: 3 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        normalize(&mut c, 3, 4, true);
        let smt = find(&c, 0xb, 0).unwrap();
        // Shift 1 to the core id, 2 threads at this level, x2APIC id 3 (core 1, thread 1).
        assert_eq!(
            (smt.eax, smt.ebx, smt.edx, smt.ecx >> 8),
            (1, 2, 3, LEVEL_TYPE_SMT)
        );
        let core = find(&c, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
        let l1 = find(&c, 0x4, 0).unwrap();
        // 2 cores per package, the L1 shared by a core's 2 threads.
        assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff), (1, 1));
        let l3 = find(&c, 0x4, 3).unwrap();
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (1, 3));
        assert_ne!(find(&c, 1, 0).unwrap().edx & LEAF1_EDX_HTT, 0);

        // Without SMT: one thread per core.
        normalize(&mut c, 3, 4, false);
        let smt = find(&c, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx), (0, 1));
        let l1 = find(&c, 0x4, 0).unwrap();
        assert_eq!((l1.eax >> 26, (l1.eax >> 14) & 0xfff), (3, 0));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = sample();
        normalize(&mut c, 0, 1, false);
        assert_eq!(find(&c, 1, 0).unwrap().edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 1).unwrap().eax, 0);
    }
}
