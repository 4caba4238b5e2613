//! Boot-time vCPU state: MSRs, general and segment registers, page tables, FPU and LAPIC.

use super::layout::*;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing boot structures to guest memory at {addr:#x} failed")]
    GuestMemory { addr: u64 },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, source }
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, RSI = boot_params.
    Linux64 { entry: u64, zero_page: u64 },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// MSRs (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The flat boot GDT: null, 64-bit code, 32-bit code, data, TSS (as Linux's boot GDT).
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x08: 64-bit code
    gdt_entry(0xc09b, 0, 0xfffff), // 0x10: 32-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x008b, 0, 0xfffff), // 0x20: TSS
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The kvm_segment a GDT entry describes, loaded with `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    #[allow(clippy::cast_possible_truncation)] // 20 bits
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Kvm {
        op: "SET_MSRS",
        source: kvm_ioctls::Error::new(libc::ENOMEM),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
    if written != entries.len() {
        // KVM stops at the first MSR it refuses; the rest keep their reset values, which
        // a kernel tolerates. Say which one, since a software KVM may refuse some.
        log::info!(
            "KVM accepted {written} of {} boot MSRs (refused {:#x})",
            entries.len(),
            entries[written].index
        );
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("SET_FPU"))
}

/// LINT0 delivers ExtINT (the 8259's output) and LINT1 NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let r = &mut lapic.regs[reg..reg + 4];
        let v = u32::from_le_bytes(std::array::from_fn(|i| r[i].to_ne_bytes()[0]));
        let v = (v & !0x700) | (mode << 8);
        for (dst, b) in r.iter_mut().zip(v.to_le_bytes()) {
            *dst = libc::c_char::from_ne_bytes([b]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("SET_LAPIC"))
}

/// Writes the boot GDT (and for the 64-bit entry, the identity page tables) into guest
/// memory and loads the boot vCPU's registers for `mode`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), RegsError> {
    write_gdt(mem)?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&GDT) - 1).expect("a few entries");
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.tr = segment(GDT[4], 0x20);
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh { entry, start_info } => {
            // PVH ABI: CS flat 32-bit code, other segments flat data, CR0.PE, paging off.
            set_segments(&mut sregs, segment(GDT[2], 0x10), segment(GDT[3], 0x18));
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryMode::Linux64 { entry, zero_page } => {
            write_page_tables(mem)?;
            set_segments(&mut sregs, segment(GDT[1], 0x08), segment(GDT[3], 0x18));
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm("SET_REGS"))
}

fn set_segments(sregs: &mut kvm_sregs, code: kvm_segment, data: kvm_segment) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        let addr = BOOT_GDT_START + 8 * i as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|_| RegsError::GuestMemory { addr })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestMemory {
            addr: BOOT_IDT_START,
        })
}

/// Identity-maps the first 1 GiB with 2 MiB pages, enough for the kernel's 64-bit entry,
/// which builds its own tables at once.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|_| RegsError::GuestMemory { addr })
    };
    w(PDPTE_START | PRESENT_RW, PML4_START)?;
    w(PDE_START | PRESENT_RW, PDPTE_START)?;
    for i in 0..512u64 {
        w((i << 21) | PRESENT_RW | PAGE_SIZE_2M, PDE_START + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_linux_expects() {
        let cs64 = segment(GDT[1], 0x08);
        assert_eq!((cs64.l, cs64.db, cs64.type_, cs64.present), (1, 0, 0xb, 1));
        assert_eq!(cs64.limit, 0xffff_ffff);
        let cs32 = segment(GDT[2], 0x10);
        assert_eq!((cs32.l, cs32.db, cs32.s, cs32.g), (0, 1, 1, 1));
        let ds = segment(GDT[3], 0x18);
        assert_eq!((ds.type_, ds.base, ds.limit), (0x3, 0, 0xffff_ffff));
        let tss = segment(GDT[4], 0x20);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last & !0xfff, 511 << 21);
        assert_eq!(pde_last & 0x83, 0x83);
    }
}
