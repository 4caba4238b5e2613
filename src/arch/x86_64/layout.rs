//! The guest-physical address map of a wisp VM on x86_64 (see also the DSDT in acpi.rs).

/// The GDT wisp writes for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack for the 64-bit entry (the kernel switches to its own at once).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, PDPT, PD (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line; Linux's limit on x86 is 2048 bytes, wisp allows 4096 (PVH).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: RAM below it, reserved from it to 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; the RSDP sits first, in the range a legacy guest scans (0xe0000-0xfffff).
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels and probe guests load from 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The MMIO hole below 4 GiB: device windows, the IOAPIC and the LAPICs live here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one 4 KiB page each
/// (`wisp_devices::virtio::MMIO_WINDOW_SIZE`), from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map on Intel; out of the way.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy I/O ports.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const PVPANIC_PORT: u64 = 0x505;
pub const ACPI_PM_PORT: u64 = 0x3c0;

/// Interrupt lines (GSIs of the in-kernel IOAPIC).
pub const I8042_GSI: u32 = 1;
pub const COM1_GSI: u32 = 4;
/// The first GSI for virtio devices; the IOAPIC has 24 pins.
pub const VIRTIO_GSI_START: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

/// e820 entry types (ACPI 6.5 §15.1).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest RAM ranges for `mem_size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// The e820 map the guest is told: (start, size, type) entries, sorted, not overlapping.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let end = start + size;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram_total(map: &[(u64, u64, u32)]) -> u64 {
        map.iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum::<u64>()
    }

    #[test]
    fn small_guest_has_low_ram_and_one_range_above_1m() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0xe0000, 0x20000, E820_RESERVED),
                (MIB, 127 * MIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let map = e820_map(5 * GIB);
        let last = map.last().unwrap();
        assert_eq!(*last, (4 * GIB, 2 * GIB, E820_RAM));
        assert_eq!(map[3], (MIB, 3 * GIB - MIB, E820_RAM));
        // Everything but the legacy holes (EBDA..1 MiB) is RAM.
        assert_eq!(ram_total(&map), 5 * GIB - (MIB - 0x9fc00));
        assert!(map
            .iter()
            .all(|&(s, l, _)| s + l <= MMIO_HOLE_START || s >= MMIO_HOLE_END));
    }

    #[test]
    fn ram_ranges_split_at_the_hole() {
        assert_eq!(ram_ranges(GIB), vec![(0, GIB)]);
        assert_eq!(ram_ranges(3 * GIB), vec![(0, 3 * GIB)]);
        assert_eq!(
            ram_ranges(3 * GIB + MIB),
            vec![(0, 3 * GIB), (4 * GIB, MIB)]
        );
    }
}
