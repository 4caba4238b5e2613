//! KVM state of a stopped VM, read out and written back: each vCPU's registers, FPU, MSRs,
//! LAPIC and events, and the VM's irqchips, PIT and clock. What a snapshot carries of KVM.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM took {written} of {count} MSRs; it refused MSR {index:#x}")]
    MsrRefused {
        written: usize,
        count: usize,
        index: u32,
    },
    #[error(
        "the snapshot's TSC runs at {saved} kHz, this host's at {host} kHz, and this KVM \
         cannot scale it: {source}"
    )]
    TscFrequency {
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {count} entries is more than KVM takes")]
    TooMany { what: &'static str, count: usize },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

/// Machine-check control and banks: KVM lists them, but they are the host's view of errors,
/// not guest state, and Firecracker leaves them out too.
fn msr_is_guest_state(index: u32) -> bool {
    const MSR_IA32_MCG_CTL: u32 = 0x17b;
    const MSR_IA32_MC0_CTL2: u32 = 0x280;
    const MSR_IA32_MC0_CTL: u32 = 0x400;
    index != MSR_IA32_MCG_CTL
        && !(MSR_IA32_MC0_CTL2..MSR_IA32_MC0_CTL2 + 0x20).contains(&index)
        && !(MSR_IA32_MC0_CTL..MSR_IA32_MC0_CTL + 0x80).contains(&index)
}

/// The MSRs a snapshot saves: KVM_GET_MSR_INDEX_LIST less the machine-check ones, in index
/// order (so IA32_TSC is written back before IA32_TSC_DEADLINE, which counts from it).
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| msr_is_guest_state(i))
        .collect();
    indices.sort_unstable();
    indices.dedup();
    Ok(indices)
}

/// One vCPU's state, as KVM gives it.
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area: wisp never asks for AMX (ARCH_REQ_XCOMP_GUEST_PERM),
    /// so the guest's state fits.
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Those of `msrs_to_save` this KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// None where KVM does not report it (no KVM_CAP_GET_TSC_KHZ).
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads a stopped vCPU's state (its thread is out of KVM_RUN).
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: Box::new(fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?),
            xcrs: fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Writes the state into a new vCPU, in the order KVM needs: CPUID first (it decides
    /// which MSRs and XSAVE features exist), the LAPIC before the MSRs (TSC deadline) and the
    /// events last (a pending interrupt needs its LAPIC).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::TooMany {
            what: "CPUID",
            count: self.cpuid.len(),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if let Some(saved) = self.tsc_khz {
            let host = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            if host != saved {
                fd.set_tsc_khz(saved)
                    .map_err(|source| StateError::TscFrequency {
                        saved,
                        host,
                        source,
                    })?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: KVM copies its uabi XSAVE size from the buffer, which is 4 KiB (the size of
        // kvm_xsave) unless the process asked for dynamic features (AMX), which wisp never does.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads `indices` in batches; an MSR this KVM refuses to read is left out (KVM stops a
/// batch at the first one it refuses), so a backend that lacks one still snapshots.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            what: "MSRs",
            count: entries.len(),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(batch.len())]);
        if read < batch.len() {
            log::debug!("snapshot: this KVM does not read MSR {:#x}", batch[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut done = 0;
    for batch in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(batch).map_err(|_| StateError::TooMany {
            what: "MSRs",
            count: batch.len(),
        })?;
        let written = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written < batch.len() {
            return Err(StateError::MsrRefused {
                written: done + written,
                count: entries.len(),
                index: batch[written].index,
            });
        }
        done += written;
    }
    Ok(())
}

/// The VM-wide state of KVM's in-kernel devices and clock.
#[derive(Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the VM's state; every vCPU is stopped.
    pub fn save(fd: &VmFd) -> Result<Self, StateError> {
        let chip = |id| -> Result<kvm_irqchip, StateError> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(chip)
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a new VM that has its irqchip and PIT, before its vCPUs run.
    pub fn restore(&self, fd: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        fd.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // The guest's clock goes on from the saved value, whatever time passed: no flags (not
        // KVM_CLOCK_REALTIME, which would add the time the VM spent on disk). TSC_STABLE is a
        // fact KVM reports, not one it takes.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// Whether the saved clock was KVM_CLOCK_TSC_STABLE (a kvmclock the guest may read
    /// without the host's help).
    pub fn clock_tsc_stable(&self) -> bool {
        self.clock.flags & kvm_bindings::KVM_CLOCK_TSC_STABLE != 0
    }
}

#[cfg(test)]
mod tests;
