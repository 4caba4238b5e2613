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

/// Whether /dev/kvm is served by PVM.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

const OPCODE_INT3: u8 = 0xcc;
const OPCODE_FWAIT: u8 = 0x9b;
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

/// An instruction decoded far enough to complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insn {
    Int3,
    Fwait,
    /// Register-to-register POPCNT: destination, source (0-15, SDM encoding), width in bytes.
    Popcnt {
        dst: u8,
        src: u8,
        width: u8,
        len: u8,
    },
    Clac,
    Stac,
    /// CMPXCHG8B/16B m64/m128 (0F C7 /1): `wide` is the 16-byte form (REX.W).
    CmpxchgDouble {
        mem: MemOperand,
        wide: bool,
        len: u8,
    },
    /// LSL r, r/m16 (0F 03 /r): destination register, the selector's source, operand width.
    Lsl {
        dst: u8,
        src: Operand,
        width: u8,
        len: u8,
    },
    /// VERR r/m16 (0F 00 /4) or VERW r/m16 (0F 00 /5).
    Verify {
        write: bool,
        src: Operand,
        len: u8,
    },
}

/// Where an instruction's r/m operand is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operand {
    Reg(u8),
    Mem(MemOperand),
}

/// A decoded memory operand (Intel SDM vol. 2 §2.1.5, 64-bit addressing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemOperand {
    /// 0x64 (FS) or 0x65 (GS) segment override.
    seg: Option<u8>,
    base: Option<u8>,
    index: Option<(u8, u8)>,
    disp: i64,
    rip_relative: bool,
}

/// Decodes a ModRM memory operand at `bytes[0]`; returns it and the bytes it used.
fn decode_modrm_mem(
    bytes: &[u8],
    rex_b: u8,
    rex_x: u8,
    seg: Option<u8>,
) -> Option<(MemOperand, usize)> {
    let modrm = *bytes.first()?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if md == 3 {
        return None;
    }
    let mut used = 1;
    let mut op = MemOperand {
        seg,
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
    };
    if rm == 4 {
        let sib = *bytes.get(1)?;
        used += 1;
        let (scale, index, base) = (
            sib >> 6,
            ((sib >> 3) & 7) | (rex_x << 3),
            (sib & 7) | (rex_b << 3),
        );
        if index != 4 {
            op.index = Some((index, 1 << scale));
        }
        if !(md == 0 && sib & 7 == 5) {
            op.base = Some(base);
        }
        if md == 0 && sib & 7 == 5 {
            op.disp = i64::from(i32::from_le_bytes(
                bytes.get(used..used + 4)?.try_into().ok()?,
            ));
            used += 4;
        }
    } else if md == 0 && rm == 5 {
        op.rip_relative = true;
        op.disp = i64::from(i32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?));
        used += 4;
    } else {
        op.base = Some(rm | (rex_b << 3));
    }
    match md {
        1 => {
            op.disp = i64::from(*bytes.get(used)? as i8);
            used += 1;
        }
        2 => {
            op.disp = i64::from(i32::from_le_bytes(
                bytes.get(used..used + 4)?.try_into().ok()?,
            ));
            used += 4;
        }
        _ => {}
    }
    Some((op, used))
}

/// Decodes a ModRM r/m operand at `bytes[0]`: a register or memory; returns it and the bytes
/// it used.
fn rm_operand(bytes: &[u8], rex_b: u8, rex_x: u8, seg: Option<u8>) -> Option<(Operand, usize)> {
    let modrm = *bytes.first()?;
    if modrm >> 6 == 3 {
        return Some((Operand::Reg((modrm & 7) | (rex_b << 3)), 1));
    }
    let (m, used) = decode_modrm_mem(bytes, rex_b, rex_x, seg)?;
    Some((Operand::Mem(m), used))
}

/// Decodes the few instructions wisp completes (Intel SDM vol. 2: prefixes, REX, ModRM).
fn decode(bytes: &[u8]) -> Option<Insn> {
    let mut i = 0;
    let (mut opsize16, mut rep, mut lock, mut seg) = (false, false, false, None);
    while let Some(&b) = bytes.get(i) {
        match b {
            0x66 => opsize16 = true,
            0xf3 => rep = true,
            0xf0 => lock = true,
            0x64 | 0x65 => seg = Some(b),
            _ => break,
        }
        i += 1;
    }
    let rex = bytes.get(i).copied().filter(|b| b & 0xf0 == 0x40);
    if rex.is_some() {
        i += 1;
    }
    let (w, r, b) = rex.map_or((false, 0, 0), |x| (x & 8 != 0, (x >> 2) & 1, x & 1));
    let x = rex.map_or(0, |v| (v >> 1) & 1);
    match bytes.get(i..)? {
        [OPCODE_INT3, ..] if i == 0 => Some(Insn::Int3),
        _ if lock && bytes.get(i..i + 2) != Some(&[0x0f, 0xc7]) => None,
        [OPCODE_FWAIT, ..] if i == 0 => Some(Insn::Fwait),
        [0x0f, 0x01, 0xca, ..] if i == 0 => Some(Insn::Clac),
        [0x0f, 0x01, 0xcb, ..] if i == 0 => Some(Insn::Stac),
        [0x0f, 0xc7, modrm, ..] if !rep && (modrm >> 3) & 7 == 1 => {
            let (mem, used) = decode_modrm_mem(&bytes[i + 2..], b, x, seg)?;
            Some(Insn::CmpxchgDouble {
                mem,
                wide: w,
                len: (i + 2 + used) as u8,
            })
        }
        [0x0f, 0x00, modrm, ..] if !rep && matches!((modrm >> 3) & 7, 4 | 5) => {
            let (src, used) = rm_operand(&bytes[i + 2..], b, x, seg)?;
            Some(Insn::Verify {
                write: (modrm >> 3) & 7 == 5,
                src,
                len: (i + 2 + used) as u8,
            })
        }
        [0x0f, 0x03, modrm, ..] if !rep => {
            let dst = ((modrm >> 3) & 7) | (r << 3);
            let (src, used) = rm_operand(&bytes[i + 2..], b, x, seg)?;
            Some(Insn::Lsl {
                dst,
                src,
                width: operand_width(w, opsize16),
                len: (i + 2 + used) as u8,
            })
        }
        [0x0f, 0xb8, modrm, ..] if rep && !lock && seg.is_none() && modrm >> 6 == 3 => {
            Some(Insn::Popcnt {
                dst: ((modrm >> 3) & 7) | (r << 3),
                src: (modrm & 7) | (b << 3),
                width: operand_width(w, opsize16),
                len: (i + 3) as u8,
            })
        }
        _ => None,
    }
}

/// The operand size of an instruction with REX.W `w` and an operand-size prefix `opsize16`.
fn operand_width(w: bool, opsize16: bool) -> u8 {
    if w {
        8
    } else if opsize16 {
        2
    } else {
        4
    }
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
    mem.read_slice(&mut cur[..size as usize], gpa)
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
            new[..4].copy_from_slice(&(regs.rbx as u32).to_le_bytes());
            new[4..8].copy_from_slice(&(regs.rcx as u32).to_le_bytes());
        }
        mem.write_slice(&new[..size as usize], gpa)
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
        Operand::Reg(n) => *gpr(regs, n) as u16,
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
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn decodes_what_it_completes_and_nothing_else() {
        assert_eq!(decode(&[0xcc, 0x90]), Some(Insn::Int3));
        assert_eq!(decode(&[0x9b]), Some(Insn::Fwait));
        assert_eq!(decode(&[0x0f, 0x01, 0xca]), Some(Insn::Clac));
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]), Some(Insn::Stac));
        // popcnt %rdi,%rax (seen in Linux's hweight64)
        assert_eq!(
            decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x01]),
            Some(Insn::Popcnt {
                dst: 0,
                src: 7,
                width: 8,
                len: 5
            })
        );
        // popcnt %r9d,%r10d
        assert_eq!(
            decode(&[0xf3, 0x45, 0x0f, 0xb8, 0xd1]),
            Some(Insn::Popcnt {
                dst: 10,
                src: 9,
                width: 4,
                len: 5
            })
        );
        // lock cmpxchg16b 0x20(%rbp) (seen in Debian's kernel), %gs:(%rsi), (%rsi,%rcx,8)
        assert_eq!(
            decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20, 0x74]),
            Some(Insn::CmpxchgDouble {
                mem: MemOperand {
                    seg: None,
                    base: Some(5),
                    index: None,
                    disp: 0x20,
                    rip_relative: false
                },
                wide: true,
                len: 6
            })
        );
        assert_eq!(
            decode(&[0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x0e]),
            Some(Insn::CmpxchgDouble {
                mem: MemOperand {
                    seg: Some(0x65),
                    base: Some(6),
                    index: None,
                    disp: 0,
                    rip_relative: false
                },
                wide: true,
                len: 6
            })
        );
        assert_eq!(
            decode(&[0xf0, 0x0f, 0xc7, 0x0c, 0xce]),
            Some(Insn::CmpxchgDouble {
                mem: MemOperand {
                    seg: None,
                    base: Some(6),
                    index: Some((1, 8)),
                    disp: 0,
                    rip_relative: false
                },
                wide: false,
                len: 5
            })
        );
        // %gs:cmpxchg16b (%rdi) without lock: Linux's this_cpu_cmpxchg_double.
        assert_eq!(
            decode(&[0x65, 0x48, 0x0f, 0xc7, 0x0f, 0x0f, 0x94]),
            Some(Insn::CmpxchgDouble {
                mem: MemOperand {
                    seg: Some(0x65),
                    base: Some(7),
                    index: None,
                    disp: 0,
                    rip_relative: false
                },
                wide: true,
                len: 5
            })
        );
        // cmpxchg16b on a register, other locked instructions, popcnt with a memory
        // operand, xrstor, a prefixed int3: refused.
        assert_eq!(decode(&[0xf0, 0x48, 0x0f, 0xc7, 0xce]), None);
        assert_eq!(decode(&[0xf0, 0x48, 0x0f, 0xb1, 0x0e]), None);
        assert_eq!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0x07]), None);
        assert_eq!(decode(&[0x48, 0x0f, 0xae, 0x2f]), None);
        assert_eq!(decode(&[0x66, 0xcc]), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn popcnt_counts_sets_zf_and_steps_rip() {
        let mut r = kvm_regs {
            rip: 0x1000,
            rdi: 0xf0f0,
            rax: u64::MAX,
            rflags: 0x2 | 0x8d5,
            ..Default::default()
        };
        let c = execute(
            Insn::Popcnt {
                dst: 0,
                src: 7,
                width: 8,
                len: 5,
            },
            &mut r,
        );
        assert_eq!(c, Completed::Popcnt);
        assert_eq!((r.rax, r.rip, r.rflags), (8, 0x1005, 0x2));
        r.rdi = 0xffff_ffff_0000_0000;
        execute(
            Insn::Popcnt {
                dst: 0,
                src: 7,
                width: 4,
                len: 4,
            },
            &mut r,
        );
        assert_eq!(r.rax, 0);
        assert_eq!(r.rflags & RFLAGS_ZF, RFLAGS_ZF);
        r.rax = 0xaaaa_0000;
        r.rdi = 0x7;
        execute(
            Insn::Popcnt {
                dst: 0,
                src: 7,
                width: 2,
                len: 5,
            },
            &mut r,
        );
        assert_eq!(r.rax, 0xaaaa_0003);
    }

    #[test]
    fn clac_and_stac_flip_ac_only() {
        let mut r = kvm_regs {
            rip: 0x10,
            rflags: 0x2 | RFLAGS_AC,
            ..Default::default()
        };
        execute(Insn::Clac, &mut r);
        assert_eq!((r.rflags, r.rip), (0x2, 0x13));
        execute(Insn::Stac, &mut r);
        assert_eq!((r.rflags, r.rip), (0x2 | RFLAGS_AC, 0x16));
    }

    #[test]
    fn decodes_lsl_register_and_memory_forms() {
        // lsl %rax,%rax: Linux's LOAD_CPU_AND_NODE_SEG_LIMIT in the paranoid entry.
        assert_eq!(
            decode(&[0x48, 0x0f, 0x03, 0xc0, 0x48, 0x25]),
            Some(Insn::Lsl {
                dst: 0,
                src: Operand::Reg(0),
                width: 8,
                len: 4
            })
        );
        // lsl %r9w,%cx and lsl 0x8(%rsp),%r10d
        assert_eq!(
            decode(&[0x66, 0x41, 0x0f, 0x03, 0xc9]),
            Some(Insn::Lsl {
                dst: 1,
                src: Operand::Reg(9),
                width: 2,
                len: 5
            })
        );
        assert_eq!(
            decode(&[0x44, 0x0f, 0x03, 0x54, 0x24, 0x08]),
            Some(Insn::Lsl {
                dst: 10,
                src: Operand::Mem(MemOperand {
                    seg: None,
                    base: Some(4),
                    index: None,
                    disp: 8,
                    rip_relative: false
                }),
                width: 4,
                len: 6
            })
        );
        assert_eq!(decode(&[0xf0, 0x0f, 0x03, 0xc0]), None);
    }

    /// A GDT at linear 0x1000 as the probe guest and Linux lay it out.
    fn gdt_sregs(entries: &[u64]) -> (kvm_bindings::kvm_sregs, Vec<u8>) {
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.gdt.base = 0x1000;
        sregs.gdt.limit = (entries.len() * 8 - 1) as u16;
        sregs.cs.selector = 0x08;
        sregs.ldt.unusable = 1;
        let bytes = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        (sregs, bytes)
    }

    fn limit_of(entries: &[u64], selector: u16, cpl: u16) -> Option<u32> {
        let (mut sregs, table) = gdt_sregs(entries);
        sregs.cs.selector = (sregs.cs.selector & !3) | cpl;
        descriptor_of(&sregs, &table, selector).and_then(|d| d.limit())
    }

    fn descriptor_of(
        sregs: &kvm_bindings::kvm_sregs,
        table: &[u8],
        selector: u16,
    ) -> Option<Descriptor> {
        segment_descriptor(sregs, selector, |va, buf| {
            let off = (va - 0x1000) as usize;
            match table.get(off..off + buf.len()) {
                Some(b) => {
                    buf.copy_from_slice(b);
                    true
                }
                None => false,
            }
        })
    }

    #[test]
    fn verr_and_verw_accept_what_the_cpu_accepts() {
        let gdt = [
            0,
            0x00af9b000000ffff, // 0x08 kernel code, readable
            0x00cf93000000ffff, // 0x10 kernel data, writable (Linux's __KERNEL_DS for verw)
            0x00cff1000000ffff, // 0x18 data, DPL 3, read-only
            0x00af99000000ffff, // 0x20 code, execute-only
            0x00009f000000ffff, // 0x28 conforming readable code, DPL 0
            0x0000890000000067, // 0x30 TSS
        ];
        let (sregs, table) = gdt_sregs(&gdt);
        let v = |sel: u16, write: bool| {
            descriptor_of(&sregs, &table, sel).is_some_and(|d| d.verifies(write))
        };
        assert!(v(0x10, true) && v(0x10, false));
        assert!(!v(0x08, true) && v(0x08, false));
        assert!(!v(0x1b, true) && v(0x1b, false));
        assert!(!v(0x20, false) && !v(0x20, true));
        // Conforming code skips the privilege check; DPL 0 data seen with RPL 3 does not.
        assert!(v(0x2b, false));
        assert!(!v(0x13, true));
        assert!(!v(0x30, false) && !v(0x00, false) && !v(0x38, false));
        // verw (%rip): Linux's mds_clear_cpu_buffers.
        assert_eq!(
            decode(&[0x0f, 0x00, 0x2d, 0x19, 0xbe, 0x5f, 0x00, 0xfb, 0xf4]),
            Some(Insn::Verify {
                write: true,
                src: Operand::Mem(MemOperand {
                    seg: None,
                    base: None,
                    index: None,
                    disp: 0x5fbe19,
                    rip_relative: true
                }),
                len: 7
            })
        );
        assert_eq!(
            decode(&[0x0f, 0x00, 0xe0]),
            Some(Insn::Verify {
                write: false,
                src: Operand::Reg(0),
                len: 3
            })
        );
        // sldt/str/lldt/ltr (0F 00 /0-/3) are not completed.
        assert_eq!(decode(&[0x0f, 0x00, 0xd8]), None);
    }

    #[test]
    fn lsl_reads_limits_and_refuses_as_the_cpu_does() {
        let gdt = [
            0,
            0x00af9b000000ffff, // 0x08 kernel code, G=1
            0x00cf93000000ffff, // 0x10 kernel data, DPL 0, G=1
            0x0000f20000002005, // 0x18 Linux's CPUNODE segment: DPL 3, G=0, node 2 cpu 5
            0x0000890000000067, // 0x20 available 64-bit TSS, limit 0x67
            0,                  // (its upper half)
            0x0000820000000fff, // 0x30 LDT
            0x00008c0000000000, // 0x38 call gate: no limit
            0x000f9f000000ffff, // 0x40 conforming code, DPL 0, G=0
        ];
        assert_eq!(limit_of(&gdt, 0x08, 0), Some(0xffff_ffff));
        assert_eq!(limit_of(&gdt, 0x1b, 0), Some(0x2005));
        assert_eq!(limit_of(&gdt, 0x1b, 3), Some(0x2005));
        assert_eq!(limit_of(&gdt, 0x20, 0), Some(0x67));
        assert_eq!(limit_of(&gdt, 0x30, 0), Some(0xfff));
        // Null selector, past the GDT's limit, a gate, an LDT selector with no LDT.
        assert_eq!(limit_of(&gdt, 0x00, 0), None);
        assert_eq!(limit_of(&gdt, 0x03, 0), None);
        assert_eq!(limit_of(&gdt, 0x48, 0), None);
        assert_eq!(limit_of(&gdt, 0x38, 0), None);
        assert_eq!(limit_of(&gdt, 0x0c, 0), None);
        // DPL 0 data seen with RPL 3 or from CPL 3; a conforming code segment skips the check.
        assert_eq!(limit_of(&gdt, 0x13, 0), None);
        assert_eq!(limit_of(&gdt, 0x10, 3), None);
        assert_eq!(limit_of(&gdt, 0x43, 3), Some(0xfffff));
    }

    #[test]
    fn lsl_writes_by_width_and_only_touches_zf() {
        let flags = 0x2 | 0x8d5;
        let mut r = kvm_regs {
            rip: 0x100,
            rax: u64::MAX,
            rflags: flags & !RFLAGS_ZF,
            ..Default::default()
        };
        assert_eq!(lsl(&mut r, 0, 8, 4, Some(0x2005)), Completed::Lsl);
        assert_eq!((r.rax, r.rip, r.rflags), (0x2005, 0x104, flags));
        r.rax = u64::MAX;
        lsl(&mut r, 0, 4, 3, Some(0x67));
        assert_eq!(r.rax, 0x67);
        r.rax = u64::MAX;
        lsl(&mut r, 0, 2, 4, Some(0x12345));
        assert_eq!(r.rax, 0xffff_ffff_ffff_2345);
        lsl(&mut r, 0, 8, 4, None);
        assert_eq!(r.rax, 0xffff_ffff_ffff_2345);
        assert_eq!((r.rflags, r.rip), (flags & !RFLAGS_ZF, 0x10f));
    }

    #[test]
    fn noxsave_is_added_once() {
        assert_eq!(linux_cmdline_additions("console=ttyS0"), Some("noxsave"));
        assert_eq!(linux_cmdline_additions("console=ttyS0 noxsave"), None);
    }
}
