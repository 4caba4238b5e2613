//! ACPI tables (rust-vmm acpi_tables): RSDP, XSDT, a hardware-reduced FADT, MADT and a DSDT
//! describing the platform devices, written at ACPI_START.

use super::layout::*;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_devices::legacy::{ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};

const OEM_ID: [u8; 6] = *b"WISP  ";
const OEM_TABLE_ID: [u8; 8] = *b"WISPVM  ";
const OEM_REVISION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes, more than the {available} bytes reserved for them")]
    TooLarge { needed: u64, available: u64 },
    #[error("writing ACPI tables to guest memory at {addr:#x} failed")]
    GuestMemory { addr: u64 },
}

/// A virtio-mmio device the DSDT describes.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// What the tables describe.
pub struct Platform<'a> {
    pub vcpus: u8,
    pub virtio_mmio: &'a [MmioDevice],
}

/// The tables as bytes, each at its guest-physical address, RSDP first.
pub fn build(platform: &Platform) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut next = ACPI_START;
    let mut place = |len: usize| {
        let at = next;
        next = (next + len as u64 + 15) & !15;
        at
    };
    let rsdp_addr = place(Rsdp::len());

    let dsdt = bytes_of(&dsdt(platform));
    let dsdt_addr = place(dsdt.len());
    let fadt = bytes_of(&fadt(dsdt_addr));
    let fadt_addr = place(fadt.len());
    let madt = madt_bytes(platform.vcpus);
    let madt_addr = place(madt.len());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
            available: ACPI_END - ACPI_START,
        });
    }
    Ok(vec![
        (rsdp_addr, rsdp),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ])
}

/// Writes the tables and returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, platform: &Platform) -> Result<u64, AcpiError> {
    let tables = build(platform)?;
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|_| AcpiError::GuestMemory { addr: *addr })?;
    }
    Ok(tables[0].0)
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_port(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt_addr: u64) -> impl Aml {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.reset_reg = io_port(ACPI_PM_PORT + 2);
    f.reset_value = ACPI_RESET_VALUE;
    f.sleep_control_reg = io_port(ACPI_PM_PORT);
    f.sleep_status_reg = io_port(ACPI_PM_PORT + 1);
    // IA-PC boot architecture flags (ACPI 6.5 table 5.11): an 8042 is present (so Linux
    // probes it, for Ctrl-Alt-Del), no VGA, no CMOS RTC.
    const IAPC_8042: u16 = 1 << 1;
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    f.iapc_boot_arch = (IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"WISPWISP").into();
    f.finalize()
}

/// MADT flags (ACPI 6.5 table 5.43): PCAT_COMPAT, the machine also has the dual 8259 PICs
/// (KVM's in-kernel irqchip does). Linux then maps the ISA IRQs 0-15 to IOAPIC pins 0-15, which
/// the legacy devices (the UART's IRQ 4, the i8042's IRQ 1) need; without it they have no
/// interrupt and the serial console's tty fails with EIO.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_FLAGS_OFFSET: usize = 40;
const SDT_CHECKSUM_OFFSET: usize = 9;

fn madt_bytes(vcpus: u8) -> Vec<u8> {
    let mut t = bytes_of(&madt(vcpus));
    // acpi_tables' MADT has no setter for the flags: set them and fix the checksum.
    t[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    t[SDT_CHECKSUM_OFFSET] = 0;
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[SDT_CHECKSUM_OFFSET] = sum.wrapping_neg();
    t
}

fn madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(u32::try_from(LAPIC_START).expect("below 4 GiB")),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        0,
        u32::try_from(IOAPIC_START).expect("below 4 GiB"),
        0,
    ));
    madt
}

fn dsdt(platform: &Platform) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();

    // \_S5: the SLP_TYP a guest writes to the sleep control register to power off.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&ACPI_S5_SLP_TYP]))
        .to_aml_bytes(&mut body);

    let com1 = legacy_device("COM1", "PNP0501", &[(port(COM1_PORT), 8)], Some(COM1_GSI));
    let kbd = legacy_device(
        "PS2K",
        "PNP0303",
        &[(port(I8042_PORT), 1), (port(I8042_PORT) + 4, 1)],
        Some(I8042_GSI),
    );
    // pvpanic's ACPI id is QEMU's (docs/specs/pvpanic.txt), a plain string _HID.
    let pvpanic = LegacyDevice {
        name: "PEVT",
        hid: Hid::Str("QEMU0001"),
        ports: vec![(port(PVPANIC_PORT), 1)],
        irq: None,
    };

    let virtio: Vec<VirtioMmioAml> = platform
        .virtio_mmio
        .iter()
        .enumerate()
        .map(|(i, d)| VirtioMmioAml { index: i, dev: *d })
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1, &kbd, &pvpanic];
    children.extend(virtio.iter().map(|v| v as &dyn Aml));
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);

    dsdt.append_slice(&body);
    dsdt
}

enum Hid {
    Eisa(&'static str),
    Str(&'static str),
}

struct LegacyDevice {
    name: &'static str,
    hid: Hid,
    ports: Vec<(u16, u8)>,
    irq: Option<u32>,
}

fn legacy_device(
    name: &'static str,
    hid: &'static str,
    ports: &[(u16, u8)],
    irq: Option<u32>,
) -> LegacyDevice {
    LegacyDevice {
        name,
        hid: Hid::Eisa(hid),
        ports: ports.to_vec(),
        irq,
    }
}

impl Aml for LegacyDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let ios: Vec<aml::IO> = self
            .ports
            .iter()
            .map(|&(p, len)| aml::IO::new(p, p, 1, len))
            .collect();
        let irq = self
            .irq
            .map(|gsi| aml::Interrupt::new(true, true, false, false, gsi));
        let mut res: Vec<&dyn Aml> = ios.iter().map(|io| io as &dyn Aml).collect();
        if let Some(irq) = &irq {
            res.push(irq);
        }
        let crs = aml::ResourceTemplate::new(res);
        let hid = match self.hid {
            Hid::Eisa(id) => aml::Name::new("_HID".into(), &aml::EISAName::new(id)),
            Hid::Str(id) => aml::Name::new("_HID".into(), &id),
        };
        aml::Device::new(
            self.name.into(),
            vec![
                &hid,
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(sink)
    }
}

/// A virtio-mmio device as Linux's virtio_mmio driver matches it: _HID LNRO0005.
/// An I/O port of the layout (all below 0x10000).
fn port(p: u64) -> u16 {
    u16::try_from(p).expect("an x86 I/O port")
}

struct VirtioMmioAml {
    index: usize,
    dev: MmioDevice,
}

impl Aml for VirtioMmioAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let name = format!("V{:03X}", self.index);
        let below_4g = |v: u64| u32::try_from(v).expect("virtio-mmio windows lie below 4 GiB");
        let mem = aml::Memory32Fixed::new(true, below_4g(self.dev.base), below_4g(self.dev.size));
        let irq = aml::Interrupt::new(true, true, false, false, self.dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = self.index as u64;
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn find<'a>(tables: &'a [(u64, Vec<u8>)], sig: &[u8]) -> &'a (u64, Vec<u8>) {
        tables.iter().find(|(_, t)| &t[..sig.len()] == sig).unwrap()
    }

    fn u32_at(t: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(t[off..off + 4].try_into().unwrap())
    }
    fn u64_at(t: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(t[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_checksum_and_link_together() {
        let virtio = [MmioDevice {
            base: VIRTIO_MMIO_START,
            size: 0x1000,
            gsi: 5,
        }];
        let tables = build(&Platform {
            vcpus: 4,
            virtio_mmio: &virtio,
        })
        .unwrap();
        let (rsdp_addr, rsdp) = find(&tables, b"RSD PTR ");
        assert_eq!(*rsdp_addr, ACPI_START);
        assert!(checksum_ok(&rsdp[..20]), "RSDP v1 checksum");
        assert!(checksum_ok(rsdp), "RSDP extended checksum");
        let xsdt_addr = u64_at(rsdp, 24);
        let (addr, xsdt) = find(&tables, b"XSDT");
        assert_eq!(*addr, xsdt_addr);
        for (_, t) in &tables[1..] {
            assert!(
                checksum_ok(t),
                "{} checksum",
                String::from_utf8_lossy(&t[..4])
            );
            assert_eq!(u32_at(t, 4) as usize, t.len(), "length field");
        }
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(
            entries,
            vec![find(&tables, b"FACP").0, find(&tables, b"APIC").0]
        );
        let (_, fadt) = find(&tables, b"FACP");
        assert_eq!(u64_at(fadt, 140), find(&tables, b"DSDT").0, "X_DSDT");
        assert!(tables.iter().all(|(a, t)| a + t.len() as u64 <= ACPI_END));
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let tables = build(&Platform {
            vcpus: 1,
            virtio_mmio: &[],
        })
        .unwrap();
        let (_, f) = find(&tables, b"FACP");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // Generic address structures: space id 1 (I/O), address at +4.
        assert_eq!((f[116], u64_at(f, 120)), (1, ACPI_PM_PORT + 2), "RESET_REG");
        assert_eq!(f[128], ACPI_RESET_VALUE);
        assert_eq!(
            (f[244], u64_at(f, 248)),
            (1, ACPI_PM_PORT),
            "SLEEP_CONTROL_REG"
        );
        assert_eq!(
            (f[256], u64_at(f, 260)),
            (1, ACPI_PM_PORT + 1),
            "SLEEP_STATUS_REG"
        );
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        for n in [1u8, 2, 8, 32] {
            let tables = build(&Platform {
                vcpus: n,
                virtio_mmio: &[],
            })
            .unwrap();
            let (_, m) = find(&tables, b"APIC");
            assert_eq!(u32_at(m, 36), LAPIC_START as u32);
            assert_eq!(u32_at(m, 40), MADT_PCAT_COMPAT, "flags: PCAT_COMPAT");
            let (mut off, mut lapics, mut ioapics) = (44, Vec::new(), 0);
            while off < m.len() {
                let (kind, len) = (m[off], m[off + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(u32_at(m, off + 4) & 1, 1, "enabled");
                        lapics.push(m[off + 3]);
                    }
                    1 => {
                        assert_eq!(u32_at(m, off + 4), IOAPIC_START as u32);
                        ioapics += 1;
                    }
                    _ => {}
                }
                off += len;
            }
            assert_eq!(lapics, (0..n).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn dsdt_names_the_platform_devices() {
        let virtio = [
            MmioDevice {
                base: VIRTIO_MMIO_START,
                size: 0x1000,
                gsi: 5,
            },
            MmioDevice {
                base: VIRTIO_MMIO_START + 0x1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let tables = build(&Platform {
            vcpus: 1,
            virtio_mmio: &virtio,
        })
        .unwrap();
        let (_, d) = find(&tables, b"DSDT");
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"_S5_"));
        assert!(has(b"QEMU0001"), "pvpanic");
        assert!(has(b"LNRO0005"), "virtio-mmio");
        assert!(has(b"V000") && has(b"V001"));
        assert!(has(b"COM1") && has(b"PS2K") && has(b"PEVT"));
    }
}
