//! PVM, the software KVM backend of our development machines (ENVIRONMENT.md), cannot
//! complete a few instructions that ordinary kernel paths run at CPL0: KVM_RUN then ends with
//! an emulation failure at the instruction. It also ignores the CPUID a VMM sets, so these
//! cannot be avoided by hiding features. wisp completes the ones ordinary kernels run
//! (`int3` in the alternatives self-test, `fwait` in FPU teardown, `popcnt` in bitmap code,
//! `clac`/`stac` around user accesses, `lsl` in the paranoid entry of NMI/#DB/#MC with
//! FSGSBASE, `verw` before `hlt` against MDS / MMIO stale data) as the CPU would, asks Linux guests not to use XSAVE
//! (`noxsave`, see `linux_cmdline_additions`), and reports any other instruction clearly.
//! On hardware KVM none of this is ever reached.

use kvm_ioctls::VcpuFd;
use std::fmt;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod decode;

use decode::{decode, Insn, MemOperand, Operand};
use wisp_devices::cast::u64_to_usize;

/// Whether /dev/kvm is served by PVM.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

const RFLAGS_AC: u64 = 1 << 18;
/// Arithmetic flags POPCNT writes: CF, PF, AF, ZF, SF, OF.
const RFLAGS_ARITH: u64 = 0x8d5;
const RFLAGS_ZF: u64 = 1 << 6;
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
    /// `popcnt reg, reg`.
    Popcnt,
    /// `clac` / `stac`: RFLAGS.AC cleared or set.
    Clac,
    Stac,
    /// `cmpxchg16b` / `cmpxchg8b` on guest memory (locked or per-CPU).
    CmpxchgDouble,
    /// `lsl`: a segment limit loaded from the GDT/LDT (or ZF cleared).
    Lsl,
    /// `verr` / `verw`: ZF says whether a segment is readable / writable (Linux runs `verw`
    /// before `hlt` to clear CPU buffers against MDS and MMIO stale data).
    Verify,
}

/// Kernel command-line words a Linux guest needs on a PVM host: its emulator cannot run
/// XSAVE/XRSTOR at CPL0, and the guest cannot be told so through CPUID (PVM ignores the
/// CPUID the VMM sets), so the kernel is asked to use FXSAVE instead.
pub fn linux_cmdline_additions(cmdline: &str) -> Option<&'static str> {
    let has = |w: &str| cmdline.split_whitespace().any(|x| x == w);
    (!has("noxsave")).then_some("noxsave")
}

/// Fuzzing entry point (fuzz/fuzz_targets/pvm_decode.rs): decodes `bytes` as
/// `complete_emulation_failure` does (at most the 15 bytes an instruction can have) and
/// applies the register effects of what it decoded. Panics if a decoded instruction claims
/// more bytes than it was given.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8], regs: &mut kvm_bindings::kvm_regs) -> Option<Completed> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let insn = decode(bytes)?;
    let len = match insn {
        Insn::Int3 | Insn::Fwait => 1,
        Insn::Clac | Insn::Stac => 3,
        Insn::Popcnt { len, .. }
        | Insn::CmpxchgDouble { len, .. }
        | Insn::Lsl { len, .. }
        | Insn::Verify { len, .. } => usize::from(len),
    };
    assert!(
        len <= bytes.len(),
        "{insn:?} decoded from {} bytes",
        bytes.len()
    );
    Some(execute(insn, regs))
}

/// The general register with SDM number `n` (0 = RAX ... 15 = R15).
fn gpr(regs: &mut kvm_bindings::kvm_regs, n: u8) -> &mut u64 {
    match n {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Applies `insn`'s register effects as the CPU would (int3 also needs #BP injected).
fn execute(insn: Insn, regs: &mut kvm_bindings::kvm_regs) -> Completed {
    match insn {
        // Need guest memory: complete_emulation_failure sends them to cmpxchg_double / lsl.
        Insn::CmpxchgDouble { .. } => Completed::CmpxchgDouble,
        Insn::Lsl { .. } => Completed::Lsl,
        Insn::Verify { .. } => Completed::Verify,
        Insn::Int3 => {
            regs.rip = regs.rip.wrapping_add(1);
            Completed::Int3
        }
        Insn::Fwait => {
            regs.rip = regs.rip.wrapping_add(1);
            Completed::Fwait
        }
        Insn::Clac | Insn::Stac => {
            regs.rip = regs.rip.wrapping_add(3);
            if insn == Insn::Clac {
                regs.rflags &= !RFLAGS_AC;
                Completed::Clac
            } else {
                regs.rflags |= RFLAGS_AC;
                Completed::Stac
            }
        }
        Insn::Popcnt {
            dst,
            src,
            width,
            len,
        } => {
            let mask = if width == 8 {
                u64::MAX
            } else {
                (1u64 << (width * 8)) - 1
            };
            let value = *gpr(regs, src) & mask;
            let count = u64::from(value.count_ones());
            let d = gpr(regs, dst);
            // 32-bit results zero-extend; 16-bit ones keep the upper bits (SDM vol. 1 3.4.1.1).
            *d = if width == 2 {
                (*d & !0xffff) | count
            } else {
                count
            };
            regs.rflags &= !RFLAGS_ARITH;
            if value == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            Completed::Popcnt
        }
    }
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
    let Some(insn) = decode(&bytes) else {
        return Err(fail(rip, bytes, "this KVM's emulator does not support it"));
    };
    let done = match insn {
        Insn::CmpxchgDouble { mem: op, wide, len } => {
            let sregs = vcpu
                .get_sregs()
                .map_err(|e| fail(rip, bytes.clone(), &format!("KVM_GET_SREGS failed: {e}")))?;
            cmpxchg_double(vcpu, mem, &mut regs, &sregs, op, wide, len)
                .map_err(|reason| fail(rip, bytes.clone(), &reason))?
        }
        Insn::Lsl {
            dst,
            src,
            width,
            len,
        } => {
            let (sregs, selector) = read_selector(vcpu, mem, &mut regs, src, len)
                .map_err(|reason| fail(rip, bytes.clone(), &reason))?;
            let limit = segment_descriptor(&sregs, selector, guest_reader(vcpu, mem))
                .and_then(|d| d.limit());
            lsl(&mut regs, dst, width, len, limit)
        }
        Insn::Verify { write, src, len } => {
            let (sregs, selector) = read_selector(vcpu, mem, &mut regs, src, len)
                .map_err(|reason| fail(rip, bytes.clone(), &reason))?;
            let ok = segment_descriptor(&sregs, selector, guest_reader(vcpu, mem))
                .is_some_and(|d| d.verifies(write));
            set_zf(&mut regs, ok);
            regs.rip = regs.rip.wrapping_add(u64::from(len));
            Completed::Verify
        }
        other => execute(other, &mut regs),
    };
    vcpu.set_regs(&regs)
        .map_err(|e| fail(rip, bytes.clone(), &format!("KVM_SET_REGS failed: {e}")))?;
    if done == Completed::Int3 {
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
    }
    // The first completion of each kind is worth an info line; kernels run some of these
    // (clac on every interrupt entry) thousands of times.
    static SEEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let bit = 1u8 << (done as u8);
    if SEEN.fetch_or(bit, std::sync::atomic::Ordering::Relaxed) & bit == 0 {
        log::info!(
            "pvm: completed {} at {rip:#x} (further ones logged at debug level)",
            name(done)
        );
    } else {
        log::debug!("pvm: completed {} at {rip:#x}", name(done));
    }
    Ok(done)
}

/// Serialises the completion of locked memory instructions across vCPUs: every vCPU that
/// runs one on PVM exits to wisp, so holding this makes the read-compare-write atomic
/// against the others' (not against plain stores, which a correct caller does not mix in).
static LOCKED_OPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// CMPXCHG8B/16B (SDM vol. 2A): compare EDX:EAX / RDX:RAX with the memory operand; if equal,
/// store ECX:EBX / RCX:RBX there and set ZF, else load it into EDX:EAX / RDX:RAX and clear ZF.
fn cmpxchg_double(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    regs: &mut kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
    op: MemOperand,
    wide: bool,
    len: u8,
) -> Result<Completed, String> {
    let size: u64 = if wide { 16 } else { 8 };
    let next_rip = regs.rip.wrapping_add(u64::from(len));
    let ea = effective_address(regs, sregs, op, len);
    // CMPXCHG16B needs a 16-byte aligned operand (#GP otherwise); an 8-byte one must not
    // straddle a page here, since each page translates on its own.
    if (wide && !ea.is_multiple_of(16)) || (ea & 0xfff) + size > 0x1000 {
        return Err(format!("unaligned operand at {ea:#x}"));
    }
    let t = vcpu
        .translate_gva(ea)
        .map_err(|e| format!("KVM_TRANSLATE of {ea:#x} failed: {e}"))?;
    if t.valid == 0 || t.writeable == 0 {
        return Err(format!("operand at {ea:#x} is not mapped writable"));
    }
    let gpa = GuestAddress(t.physical_address);
    let _serialised = LOCKED_OPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cur = [0u8; 16];
    mem.read_slice(&mut cur[..u64_to_usize(size)], gpa)
        .map_err(|_| format!("operand at {ea:#x} is outside guest memory"))?;
    let (lo, hi) = if wide {
        (
            u64::from_le_bytes(cur[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(cur[8..].try_into().expect("8 bytes")),
        )
    } else {
        (
            u64::from(u32::from_le_bytes(cur[..4].try_into().expect("4 bytes"))),
            u64::from(u32::from_le_bytes(cur[4..8].try_into().expect("4 bytes"))),
        )
    };
    let mask = if wide { u64::MAX } else { 0xffff_ffff };
    if lo == regs.rax & mask && hi == regs.rdx & mask {
        let mut new = [0u8; 16];
        if wide {
            new[..8].copy_from_slice(&regs.rbx.to_le_bytes());
            new[8..].copy_from_slice(&regs.rcx.to_le_bytes());
        } else {
            new[..4].copy_from_slice(&regs.rbx.to_le_bytes()[..4]);
            new[4..8].copy_from_slice(&regs.rcx.to_le_bytes()[..4]);
        }
        mem.write_slice(&new[..u64_to_usize(size)], gpa)
            .map_err(|_| format!("operand at {ea:#x} is outside guest memory"))?;
        regs.rflags |= RFLAGS_ZF;
    } else {
        regs.rax = lo;
        regs.rdx = hi;
        regs.rflags &= !RFLAGS_ZF;
    }
    regs.rip = next_rip;
    Ok(Completed::CmpxchgDouble)
}

/// The linear address of a memory operand of an instruction `len` bytes long at `regs.rip`
/// (64-bit mode: only FS and GS have a base).
fn effective_address(
    regs: &mut kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
    op: MemOperand,
    len: u8,
) -> u64 {
    let mut ea = op.disp as u64;
    if op.rip_relative {
        ea = ea.wrapping_add(regs.rip.wrapping_add(u64::from(len)));
    }
    if let Some(b) = op.base {
        ea = ea.wrapping_add(*gpr(regs, b));
    }
    if let Some((i, scale)) = op.index {
        ea = ea.wrapping_add(gpr(regs, i).wrapping_mul(u64::from(scale)));
    }
    match op.seg {
        Some(0x64) => ea.wrapping_add(sregs.fs.base),
        Some(0x65) => ea.wrapping_add(sregs.gs.base),
        _ => ea,
    }
}

/// Reads the selector operand of LSL/VERR/VERW; returns it with the segment registers.
fn read_selector(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    regs: &mut kvm_bindings::kvm_regs,
    src: Operand,
    len: u8,
) -> Result<(kvm_bindings::kvm_sregs, u16), String> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    let selector = match src {
        // A selector is the register's low 16 bits.
        Operand::Reg(n) => {
            let r = gpr(regs, n).to_le_bytes();
            u16::from_le_bytes([r[0], r[1]])
        }
        Operand::Mem(op) => {
            let ea = effective_address(regs, &sregs, op, len);
            let mut sel = [0u8; 2];
            if read_virt(vcpu, mem, ea, &mut sel) != sel.len() {
                return Err(format!("selector operand at {ea:#x} unreadable"));
            }
            u16::from_le_bytes(sel)
        }
    };
    Ok((sregs, selector))
}

/// Reads guest-linear memory, all of `buf` or nothing.
fn guest_reader<'a>(
    vcpu: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
) -> impl Fn(u64, &mut [u8]) -> bool + 'a {
    move |va, buf| read_virt(vcpu, mem, va, buf) == buf.len()
}

/// A segment descriptor as LSL, VERR and VERW see it, once they have checked that the
/// selector names one they may look at.
#[derive(Debug, Clone, Copy)]
struct Descriptor {
    raw: u64,
    /// CPL and the selector's RPL, for the privilege check.
    cpl: u16,
    rpl: u16,
}

impl Descriptor {
    fn system(&self) -> bool {
        self.raw & (1 << 44) == 0
    }

    fn typ(&self) -> u8 {
        ((self.raw >> 40) & 0xf) as u8
    }

    fn code(&self) -> bool {
        !self.system() && self.typ() & 0b1000 != 0
    }

    fn conforming_code(&self) -> bool {
        self.code() && self.typ() & 0b0100 != 0
    }

    /// DPL >= CPL and DPL >= RPL (SDM vol. 2A, LSL/VERR).
    fn privileged_enough(&self) -> bool {
        let dpl = ((self.raw >> 45) & 3) as u16;
        dpl >= self.cpl && dpl >= self.rpl
    }

    /// The limit LSL loads, or `None` when LSL clears ZF: in IA-32e mode only code/data,
    /// LDT and 64-bit TSS descriptors have one, and all but conforming code segments need
    /// the privilege check.
    fn limit(&self) -> Option<u32> {
        if self.system() && !matches!(self.typ(), 0x2 | 0x9 | 0xb) {
            return None;
        }
        if !self.conforming_code() && !self.privileged_enough() {
            return None;
        }
        #[allow(clippy::cast_possible_truncation)] // 20 bits
        let raw_limit = ((self.raw & 0xffff) | ((self.raw >> 32) & 0xf_0000)) as u32;
        Some(if self.raw & (1 << 55) != 0 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        })
    }

    /// VERW: a writable data segment; VERR: a data segment or a readable code segment.
    /// Privilege checked except for conforming code segments (SDM vol. 2A, VERR/VERW).
    fn verifies(&self, write: bool) -> bool {
        if self.system() {
            return false;
        }
        let usable = if write {
            !self.code() && self.typ() & 0b0010 != 0
        } else {
            !self.code() || self.typ() & 0b0010 != 0
        };
        usable && (self.conforming_code() || self.privileged_enough())
    }
}

/// The descriptor `selector` names in the GDT or LDT, or `None` for a null selector or one
/// past its table's limit (LSL, VERR and VERW then clear ZF). `read` reads guest-linear
/// memory.
fn segment_descriptor(
    sregs: &kvm_bindings::kvm_sregs,
    selector: u16,
    read: impl Fn(u64, &mut [u8]) -> bool,
) -> Option<Descriptor> {
    let index_offset = u64::from(selector & !7);
    let (base, table_limit) = if selector & 4 != 0 {
        if sregs.ldt.unusable != 0 {
            return None;
        }
        (sregs.ldt.base, u64::from(sregs.ldt.limit))
    } else {
        if index_offset == 0 {
            return None;
        }
        (sregs.gdt.base, u64::from(sregs.gdt.limit))
    };
    if index_offset + 7 > table_limit {
        return None;
    }
    let mut raw = [0u8; 8];
    if !read(base.wrapping_add(index_offset), &mut raw) {
        return None;
    }
    Some(Descriptor {
        raw: u64::from_le_bytes(raw),
        cpl: sregs.cs.selector & 3,
        rpl: selector & 3,
    })
}

fn set_zf(regs: &mut kvm_bindings::kvm_regs, on: bool) {
    if on {
        regs.rflags |= RFLAGS_ZF;
    } else {
        regs.rflags &= !RFLAGS_ZF;
    }
}

/// LSL's effect: the limit into `dst` (32-bit results zero-extend, 16-bit ones keep the upper
/// bits) and ZF set, or only ZF cleared.
fn lsl(
    regs: &mut kvm_bindings::kvm_regs,
    dst: u8,
    width: u8,
    len: u8,
    limit: Option<u32>,
) -> Completed {
    match limit {
        Some(limit) => {
            let d = gpr(regs, dst);
            *d = if width == 2 {
                (*d & !0xffff) | u64::from(limit & 0xffff)
            } else {
                u64::from(limit)
            };
            regs.rflags |= RFLAGS_ZF;
        }
        None => regs.rflags &= !RFLAGS_ZF,
    }
    regs.rip = regs.rip.wrapping_add(u64::from(len));
    Completed::Lsl
}

fn name(c: Completed) -> &'static str {
    match c {
        Completed::Int3 => "int3 (injected #BP)",
        Completed::Fwait => "fwait",
        Completed::Popcnt => "popcnt",
        Completed::Clac => "clac",
        Completed::Stac => "stac",
        Completed::CmpxchgDouble => "lock cmpxchg8b/16b",
        Completed::Lsl => "lsl",
        Completed::Verify => "verr/verw",
    }
}

/// The instruction bytes at guest-virtual `rip` (up to 15; fewer where RIP's pages end).
fn read_insn(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let mut out = vec![0u8; MAX_INSN_LEN];
    let n = read_virt(vcpu, mem, rip, &mut out);
    out.truncate(n);
    out
}

/// Reads guest-virtual `va` into `buf` through the guest's page tables, page by page (a read
/// may cross a page boundary); returns how many bytes were readable from the start.
fn read_virt(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mut va: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let Ok(t) = vcpu.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let in_page = 0x1000 - (va & 0xfff) as usize;
        let n = in_page.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(t.physical_address))
            .is_err()
        {
            break;
        }
        done += n;
        va = va.wrapping_add(n as u64);
    }
    done
}

#[cfg(test)]
mod tests;
