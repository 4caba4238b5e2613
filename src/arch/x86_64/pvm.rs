//! PVM, the software KVM backend of our development machines (ENVIRONMENT.md), cannot
//! complete a few instructions that ordinary kernel paths run at CPL0: KVM_RUN then ends with
//! an emulation failure at the instruction. wisp completes the two that kernels cannot avoid
//! (`int3` in the alternatives self-test, `fwait` in FPU teardown) as the CPU would, and
//! reports any other one clearly. On hardware KVM none of this is ever reached.

use kvm_ioctls::VcpuFd;
use std::fmt;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Whether /dev/kvm is served by PVM.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

const OPCODE_INT3: u8 = 0xcc;
const OPCODE_FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;
/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// An instruction wisp completed for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// `int3`: RIP stepped past it and #BP injected, as the CPU does for a trap.
    Int3,
    /// `fwait` with no pending x87 exception is a no-op: RIP stepped past it.
    Fwait,
}

/// An instruction that could not be completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulationFailure {
    pub rip: u64,
    /// Up to 15 bytes at RIP, or none when RIP does not translate to guest memory.
    pub bytes: Vec<u8>,
    pub reason: String,
}

impl fmt::Display for EmulationFailure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "KVM could not emulate the instruction at rip {:#x} (bytes:",
            self.rip
        )?;
        if self.bytes.is_empty() {
            write!(f, " unreadable")?;
        }
        for b in &self.bytes {
            write!(f, " {b:02x}")?;
        }
        write!(f, "): {}", self.reason)
    }
}

/// Handles a KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_EMULATION.
pub fn complete_emulation_failure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
) -> Result<Completed, EmulationFailure> {
    let fail = |rip, bytes, reason: &str| EmulationFailure {
        rip,
        bytes,
        reason: reason.to_string(),
    };
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| fail(0, vec![], &format!("KVM_GET_REGS failed: {e}")))?;
    let rip = regs.rip;
    let bytes = read_insn(vcpu, mem, rip);
    match bytes.first().copied() {
        Some(OPCODE_INT3) => {
            regs.rip = rip.wrapping_add(1);
            vcpu.set_regs(&regs)
                .map_err(|e| fail(rip, bytes.clone(), &format!("KVM_SET_REGS failed: {e}")))?;
            let mut events = vcpu.get_vcpu_events().map_err(|e| {
                fail(
                    rip,
                    bytes.clone(),
                    &format!("KVM_GET_VCPU_EVENTS failed: {e}"),
                )
            })?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            vcpu.set_vcpu_events(&events).map_err(|e| {
                fail(
                    rip,
                    bytes.clone(),
                    &format!("KVM_SET_VCPU_EVENTS failed: {e}"),
                )
            })?;
            log::info!("pvm: completed int3 at {rip:#x} (injected #BP)");
            Ok(Completed::Int3)
        }
        Some(OPCODE_FWAIT) => {
            regs.rip = rip.wrapping_add(1);
            vcpu.set_regs(&regs)
                .map_err(|e| fail(rip, bytes.clone(), &format!("KVM_SET_REGS failed: {e}")))?;
            log::info!("pvm: completed fwait at {rip:#x}");
            Ok(Completed::Fwait)
        }
        _ => Err(fail(rip, bytes, "this KVM's emulator does not support it")),
    }
}

/// The instruction bytes at guest-virtual `rip`, translated through the guest's page tables
/// (page by page: an instruction may cross a page boundary).
fn read_insn(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_INSN_LEN);
    let mut va = rip;
    while out.len() < MAX_INSN_LEN {
        let Ok(t) = vcpu.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let in_page = 0x1000 - (va & 0xfff) as usize;
        let n = in_page.min(MAX_INSN_LEN - out.len());
        let mut buf = vec![0u8; n];
        if mem
            .read_slice(&mut buf, GuestAddress(t.physical_address))
            .is_err()
        {
            break;
        }
        out.extend_from_slice(&buf);
        va = va.wrapping_add(n as u64);
    }
    out
}
