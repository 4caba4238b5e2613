//! Loading the kernel (ELF with a PVH note, ELF vmlinux, bzImage), the initramfs and the
//! command line, and writing what the kernel reads at entry: `hvm_start_info` for PVH, the
//! zero page (`struct boot_params`) for the 64-bit boot protocol.

use super::layout::*;
use super::regs::EntryMode;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use wisp_devices::cast::u64_to_usize;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot structures to guest memory at {addr:#x} failed")]
    GuestMemory { addr: u64 },
}

/// What the vCPU setup needs from the loaded images.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: EntryMode,
}

/// Where the kernel's format was recognised.
enum Format {
    Elf,
    BzImage,
}

fn sniff(file: &mut File) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(Format::Elf));
    }
    // Linux boot protocol: "HdrS" at 0x202.
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Whether `kernel` is a Linux kernel: every bzImage is, and an ELF is when it carries
/// Linux's ELF notes ("Linux" owner, or the Xen guest-OS note saying "linux").
pub fn is_linux(kernel: &Path) -> bool {
    let Ok(mut f) = crate::config::open_host_file(kernel, false) else {
        return false;
    };
    match sniff(&mut f) {
        Ok(Some(Format::BzImage)) => true,
        Ok(Some(Format::Elf)) => elf_has_linux_note(&mut f).unwrap_or(false),
        _ => false,
    }
}

fn elf_has_linux_note(f: &mut File) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut ehdr = [0u8; 64];
    f.read_exact_at(&mut ehdr, 0)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 0x20),
        u16_at(&ehdr, 0x36),
        u16_at(&ehdr, 0x38),
    );
    if phentsize < 56 || phnum > 64 {
        return Ok(false);
    }
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff.saturating_add(i * u64::from(phentsize)))?;
        const PT_NOTE: u32 = 4;
        if u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(&ph, 0x08), u64_at(&ph, 0x20).min(64 << 10));
        let mut notes = vec![0u8; u64_to_usize(size)];
        f.read_exact_at(&mut notes, off)?;
        let mut at = 0usize;
        let align = |n: usize| (n + 3) & !3;
        while at + 12 <= notes.len() {
            let (namesz, descsz, kind) = (
                u32_at(&notes, at) as usize,
                u32_at(&notes, at + 4) as usize,
                u32_at(&notes, at + 8),
            );
            let name_at = at + 12;
            let desc_at = name_at.saturating_add(align(namesz));
            let next = desc_at.saturating_add(align(descsz));
            if next > notes.len() {
                break;
            }
            let name = &notes[name_at..name_at + namesz];
            let desc = &notes[desc_at..desc_at + descsz];
            const XEN_ELFNOTE_GUEST_OS: u32 = 6;
            if name.starts_with(b"Linux\0")
                || (name.starts_with(b"Xen\0")
                    && kind == XEN_ELFNOTE_GUEST_OS
                    && desc.starts_with(b"linux"))
            {
                return Ok(true);
            }
            at = next;
        }
    }
    Ok(false)
}

/// Loads the kernel, initrd and command line and writes the boot structures.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<LoadedKernel, BootError> {
    let kerr = |reason: String| BootError::Kernel {
        path: kernel.to_path_buf(),
        reason,
    };
    let mut file = crate::config::open_host_file(kernel, false).map_err(kerr)?;
    let format = sniff(&mut file)
        .map_err(|e| kerr(crate::config::io_reason(&e)))?
        .ok_or_else(|| kerr("not a kernel: neither an ELF image nor a bzImage".into()))?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        Format::Elf => Elf::load(mem, None, &mut file, highmem),
        Format::BzImage => BzImage::load(mem, None, &mut file, highmem),
    }
    .map_err(|e| kerr(loader_reason(&e, mem_size)))?;

    write_cmdline(mem, cmdline)?;
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, mem_size, path, result.kernel_end)?),
        None => None,
    };

    let entry = match (format, result.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_start_info(mem, mem_size, initrd, rsdp)?;
            EntryMode::Pvh {
                entry: entry.raw_value(),
                start_info: PVH_INFO_START,
            }
        }
        (Format::Elf, _) => {
            write_zero_page(mem, mem_size, None, initrd, cmdline, rsdp)?;
            EntryMode::Linux64 {
                entry: result.kernel_load.raw_value(),
                zero_page: ZERO_PAGE_START,
            }
        }
        (Format::BzImage, _) => {
            let hdr = result
                .setup_header
                .ok_or_else(|| kerr("bzImage without a setup header".into()))?;
            if hdr.version < 0x0206 {
                return Err(kerr(format!(
                    "boot protocol {}.{:02} is too old for the 64-bit entry (2.06 or later needed)",
                    hdr.version >> 8,
                    hdr.version & 0xff
                )));
            }
            write_zero_page(mem, mem_size, Some(hdr), initrd, cmdline, rsdp)?;
            // The 64-bit entry point is 0x200 past the protected-mode code (boot.rst).
            EntryMode::Linux64 {
                entry: result.kernel_load.raw_value() + 0x200,
                zero_page: ZERO_PAGE_START,
            }
        }
    };
    Ok(LoadedKernel { entry })
}

fn loader_reason(e: &linux_loader::loader::Error, mem_size: u64) -> String {
    use linux_loader::loader::Error as L;
    match e {
        L::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
        | L::Bzimage(linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel) => {
            format!(
                "does not fit in guest memory ({} MiB) where it asks to be loaded",
                mem_size >> 20
            )
        }
        L::Elf(e) => format!("not a loadable ELF kernel: {e}"),
        L::Bzimage(e) => format!("not a loadable bzImage: {e}"),
        e => e.to_string(),
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the limit is {}",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::GuestMemory {
            addr: CMDLINE_START,
        })
}

/// Places the initrd page-aligned at the top of low memory (below the MMIO hole and below
/// what the 64-bit boot protocol's default initrd_addr_max allows), above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let ierr = |reason: String| BootError::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = crate::config::open_host_file(path, false).map_err(ierr)?;
    let size = file
        .metadata()
        .map_err(|e| ierr(crate::config::io_reason(&e)))?
        .len();
    const INITRD_ADDR_MAX: u64 = 0x3fff_ffff;
    let top = mem_size.min(MMIO_HOLE_START).min(INITRD_ADDR_MAX + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| {
            ierr(format!(
                "{size} bytes do not fit in guest memory below {top:#x} beside the kernel; give the VM more memory"
            ))
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, u64_to_usize(size))
        .map_err(|e| ierr(format!("reading it failed: {e}")))?;
    Ok((addr, size))
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        })
        .collect();
    let memmap_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = memmap_addr + std::mem::size_of_val(map.as_slice()) as u64;
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_addr } else { 0 },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        // A handful of e820 entries (layout::e820_map).
        memmap_entries: u32::try_from(map.len()).expect("a few e820 entries"),
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(memmap_addr));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|_| {
        BootError::GuestMemory {
            addr: PVH_INFO_START,
        }
    })
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    initrd: Option<(u64, u64)>,
    cmdline: &str,
    rsdp: u64,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
    const CAN_USE_HEAP: u8 = 0x80;

    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).expect("below 4 GiB");
    // write_cmdline refused a line of CMDLINE_MAX_SIZE (4 KiB) or more.
    params.hdr.cmdline_size = u32::try_from(cmdline.len() + 1).expect("at most 4 KiB");
    if let Some((addr, size)) = initrd {
        // The initrd was placed below the MMIO hole, under 4 GiB.
        #[allow(clippy::cast_possible_truncation)]
        let (addr, size) = (addr as u32, size as u32);
        params.hdr.ramdisk_image = addr;
        params.hdr.ramdisk_size = size;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::GuestMemory {
            addr: ZERO_PAGE_START,
        });
    }
    for (slot, (start, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = *start;
        slot.size = *size;
        slot.r#type = *kind;
    }
    // At most e820_table.len() (128), checked above.
    #[allow(clippy::cast_possible_truncation)]
    let entries = map.len() as u8;
    params.e820_entries = entries;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory {
            addr: ZERO_PAGE_START,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("wisp-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let p = temp_file("notkernel", b"#!/bin/sh\necho hello\n");
        let e = load(&mem(64 << 20), 64 << 20, &p, None, "", 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "kernel {}: not a kernel: neither an ELF image nor a bzImage",
                p.display()
            )
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn rejects_a_truncated_elf() {
        let p = temp_file("truncelf", b"\x7fELF\x02\x01\x01");
        let e = load(&mem(64 << 20), 64 << 20, &p, None, "", 0).unwrap_err();
        assert!(e.to_string().contains("not a loadable ELF kernel"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let m = mem(128 << 20);
        write_zero_page(
            &m,
            128 << 20,
            None,
            Some((0x700_0000, 0x1234)),
            "console=ttyS0",
            0xe0000,
        )
        .unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 14);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[3];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (1 << 20, 127 << 20, 1)
        );
    }

    #[test]
    fn start_info_lists_memmap_and_initrd_module() {
        let m = mem(5 << 30);
        write_start_info(&m, 5 << 30, Some((0x3000_0000, 4096)), 0xe0000).unwrap();
        let r32 = |a: u64| m.read_obj::<u32>(GuestAddress(a)).unwrap();
        let r64 = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r32(PVH_INFO_START), 0x336e_c578);
        assert_eq!(r32(PVH_INFO_START + 12), 1); // nr_modules
        assert_eq!(r64(PVH_INFO_START + 24), CMDLINE_START);
        assert_eq!(r64(PVH_INFO_START + 32), 0xe0000);
        let memmap = r64(PVH_INFO_START + 40);
        let entries = r32(PVH_INFO_START + 48);
        assert_eq!(entries, 5);
        let last = memmap + 24 * 4;
        assert_eq!(
            (r64(last), r64(last + 8), r32(last + 16)),
            (4 << 30, 2 << 30, 1)
        );
        let module = r64(PVH_INFO_START + 16);
        assert_eq!((r64(module), r64(module + 8)), (0x3000_0000, 4096));
    }

    #[test]
    fn initrd_goes_high_in_low_memory_and_refuses_what_does_not_fit() {
        let m = mem(64 << 20);
        let p = temp_file("initrd", &[0xab; 5000]);
        let (addr, size) = load_initrd(&m, 64 << 20, &p, 0x20_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0xab);
        let e = load_initrd(&m, 64 << 20, &p, 64 << 20).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn cmdline_with_nul_is_refused() {
        let m = mem(64 << 20);
        assert!(write_cmdline(&m, "a\0b").is_err());
        write_cmdline(&m, "quiet").unwrap();
        let mut b = [0u8; 6];
        m.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"quiet\0");
    }
}
