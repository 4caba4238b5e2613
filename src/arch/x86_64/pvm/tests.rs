//! The decoder and the completions, on byte strings and register sets (no KVM needed).

use super::decode::*;
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
