//! The Intel MultiProcessor table (MP spec 1.4): a floating pointer and a configuration table
//! describing the same machine as the MADT (a processor entry per vCPU, the IOAPIC, ISA IRQs
//! on the IOAPIC's pins as wired, ExtINT and NMI on every LAPIC's LINT0/LINT1).
//!
//! Linux reads the MADT when there is one, but it looks for an MP table first in any case,
//! and without one it scans all of 0xf0000-0xfffff, remapping the rest of the range for every
//! 16 bytes (`smp_scan_config`): seconds of page-table work when the guest kernel is
//! interpreted. At the start of the EBDA (the last KiB of base memory, which Linux searches
//! second) the table is found at once. Kernels without ACPI use it to find CPUs and IRQs.

use super::layout::{EBDA_START, IOAPIC_PINS, IOAPIC_START, LAPIC_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the floating pointer goes; the configuration table follows it.
pub const MPTABLE_START: u64 = EBDA_START;
/// The EBDA ends at 640 KiB; the table must fit below.
const MPTABLE_LIMIT: u64 = 0xa0000;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ID: u8 = 0;
const ISA_BUS_ID: u8 = 0;

/// Entry types (MP spec 1.4 table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types (table 4-10).
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Processor flags (table 4-5): enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Every LAPIC (table 4-12).
const ALL_LAPICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table for {vcpus} vCPUs needs {needed} bytes, more than the {available} in the EBDA")]
    TooLarge {
        vcpus: u8,
        needed: usize,
        available: u64,
    },
    #[error("writing the MP table to guest memory at {addr:#x} failed")]
    GuestMemory { addr: u64 },
}

/// The floating pointer and configuration table for `vcpus` vCPUs (LAPIC IDs 0..vcpus, as in
/// the MADT), to be placed at `MPTABLE_START`.
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    let table_addr = MPTABLE_START + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut entry = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };
    for id in 0..vcpus {
        let mut cpu = [0u8; 20];
        cpu[0] = MP_PROCESSOR;
        cpu[1] = id;
        cpu[2] = APIC_VERSION;
        cpu[3] = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        // CPU signature (family 6) and feature flags (FPU, APIC): informational only.
        cpu[4..8].copy_from_slice(&0x600u32.to_le_bytes());
        cpu[8..12].copy_from_slice(&(1u32 | 1 << 9).to_le_bytes());
        entry(&cpu);
    }
    entry(&[MP_BUS, ISA_BUS_ID, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut ioapic = [MP_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    ioapic[4..].copy_from_slice(
        &u32::try_from(IOAPIC_START)
            .expect("below 4 GiB")
            .to_le_bytes(),
    );
    entry(&ioapic);
    // Each bus IRQ on the IOAPIC pin of the same number, flags 0 (conforming to the ISA bus:
    // edge, active high), as the MADT implies with no source overrides.
    for pin in 0..u8::try_from(IOAPIC_PINS).expect("24 pins") {
        entry(&[MP_INTSRC, MP_INT, 0, 0, ISA_BUS_ID, pin, IOAPIC_ID, pin]);
    }
    entry(&[MP_LINTSRC, MP_EXTINT, 0, 0, ISA_BUS_ID, 0, ALL_LAPICS, 0]);
    entry(&[MP_LINTSRC, MP_NMI, 0, 0, ISA_BUS_ID, 0, ALL_LAPICS, 1]);

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let length = u16::try_from(44 + entries.len()).expect("a few KiB at most");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum
    table.extend_from_slice(b"WISP    ");
    table.extend_from_slice(b"WISPVM      ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(
        &u32::try_from(LAPIC_START)
            .expect("below 4 GiB")
            .to_le_bytes(),
    );
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended entries
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; 16];
    floating[..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(
        &u32::try_from(table_addr)
            .expect("below 1 MiB")
            .to_le_bytes(),
    );
    floating[8] = 1; // length in 16-byte units
    floating[9] = MPC_SPEC_REV;
    // feature byte 1 = 0: a configuration table is present (no default configuration).
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&table);
    let available = MPTABLE_LIMIT - MPTABLE_START;
    if out.len() as u64 > available {
        return Err(MptableError::TooLarge {
            vcpus,
            needed: out.len(),
            available,
        });
    }
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs at `MPTABLE_START`.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::GuestMemory {
            addr: MPTABLE_START,
        })
}

/// The byte that makes `bytes` sum to zero (mod 256), given that it is zero now.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_sum_to_zero_and_point_at_each_other() {
        for vcpus in [1, 2, 32] {
            let t = build(vcpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let at = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(at, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            assert!(MPTABLE_START + t.len() as u64 <= MPTABLE_LIMIT);
        }
    }

    /// Walks the entries as Linux's `smp_read_mpc` does, by type and size.
    #[test]
    fn describes_the_machine_the_madt_describes() {
        let t = build(4).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            LAPIC_START as u32
        );
        let (mut off, mut cpus, mut bsp, mut intsrc, mut lint) = (44, vec![], 0, 0, 0);
        for _ in 0..count {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push(table[off + 1]);
                    if table[off + 3] & CPU_BOOTSTRAP != 0 {
                        bsp += 1;
                    }
                    off += 20;
                }
                MP_BUS => {
                    assert_eq!(&table[off + 2..off + 8], b"ISA   ");
                    off += 8;
                }
                MP_IOAPIC => {
                    assert_eq!(
                        u32::from_le_bytes(table[off + 4..off + 8].try_into().unwrap()),
                        IOAPIC_START as u32
                    );
                    off += 8;
                }
                MP_INTSRC => {
                    assert_eq!(table[off + 5], table[off + 7], "IRQ n on pin n");
                    intsrc += 1;
                    off += 8;
                }
                MP_LINTSRC => {
                    lint += 1;
                    off += 8;
                }
                other => panic!("entry type {other}"),
            }
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!((bsp, intsrc, lint), (1, IOAPIC_PINS, 2));
    }
}
