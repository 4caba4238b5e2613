//! PVM, the software KVM backend of our development machines (ENVIRONMENT.md), cannot
//! complete a few instructions that ordinary kernel paths run at CPL0: KVM_RUN then ends with
//! an emulation failure at the instruction. It also ignores the CPUID a VMM sets, so these
//! cannot be avoided by hiding features. wisp completes the ones ordinary kernels run
//! (`int3` in the alternatives self-test, `fwait` in FPU teardown, `popcnt` in bitmap code,
//! `clac`/`stac` around user accesses) as the CPU would, asks Linux guests not to use XSAVE
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
        [0x0f, 0xb8, modrm, ..] if rep && !lock && seg.is_none() && modrm >> 6 == 3 => {
            Some(Insn::Popcnt {
                dst: ((modrm >> 3) & 7) | (r << 3),
                src: (modrm & 7) | (b << 3),
                width: if w {
                    8
                } else if opsize16 {
                    2
                } else {
                    4
                },
                len: (i + 3) as u8,
            })
        }
        _ => None,
    }
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
        // Needs guest memory: complete_emulation_failure sends it to cmpxchg_double.
        Insn::CmpxchgDouble { .. } => Completed::CmpxchgDouble,
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
    let mut ea = op.disp as u64;
    if op.rip_relative {
        ea = ea.wrapping_add(next_rip);
    }
    if let Some(b) = op.base {
        ea = ea.wrapping_add(*gpr(regs, b));
    }
    if let Some((i, scale)) = op.index {
        ea = ea.wrapping_add(gpr(regs, i).wrapping_mul(u64::from(scale)));
    }
    match op.seg {
        Some(0x64) => ea = ea.wrapping_add(sregs.fs.base),
        Some(0x65) => ea = ea.wrapping_add(sregs.gs.base),
        _ => {}
    }
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

fn name(c: Completed) -> &'static str {
    match c {
        Completed::Int3 => "int3 (injected #BP)",
        Completed::Fwait => "fwait",
        Completed::Popcnt => "popcnt",
        Completed::Clac => "clac",
        Completed::Stac => "stac",
        Completed::CmpxchgDouble => "lock cmpxchg8b/16b",
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
    fn noxsave_is_added_once() {
        assert_eq!(linux_cmdline_additions("console=ttyS0"), Some("noxsave"));
        assert_eq!(linux_cmdline_additions("console=ttyS0 noxsave"), None);
    }
}
