//! The state file: what is written reads back, and every kind of bad file is refused with
//! one line (no panic, nothing returned).

use super::*;
use zerocopy::FromZeros;

/// A snapshot of `vcpus` vCPUs with recognisable values (no KVM needed).
pub(crate) fn sample(vcpus: u8) -> Snapshot {
    let mut config = VmConfig::new("/boot/vmlinux".into());
    config.cpus = vcpus;
    let vcpu = |i: u8| {
        let mut regs = kvm_bindings::kvm_regs::new_zeroed();
        regs.rip = 0x1000 + u64::from(i);
        regs.rax = 0xfeed;
        VcpuState {
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806c1,
                ..Default::default()
            }],
            mp_state: kvm_bindings::kvm_mp_state::new_zeroed(),
            regs,
            sregs: kvm_bindings::kvm_sregs::new_zeroed(),
            xsave: Box::new(kvm_bindings::kvm_xsave::new_zeroed()),
            xcrs: kvm_bindings::kvm_xcrs::new_zeroed(),
            debugregs: kvm_bindings::kvm_debugregs::new_zeroed(),
            lapic: kvm_bindings::kvm_lapic_state::new_zeroed(),
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0xc000_0082,
                data: 0xffff_ffff_8100_0000,
                ..Default::default()
            }],
            events: kvm_bindings::kvm_vcpu_events::new_zeroed(),
            tsc_khz: Some(2_793_436),
        }
    };
    Snapshot {
        config,
        devices: DevicesState {
            serial: wisp_devices::legacy::SerialRegs {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 1,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"ls\n".to_vec(),
            },
            i8042: Default::default(),
            virtio: vec![wisp_devices::virtio::MmioState {
                device_type: 2,
                status: 0xf,
                queues: vec![Default::default()],
                ..Default::default()
            }],
            disks: vec![devices::DiskImage {
                path: "/img/root.qcow2".into(),
                format: "qcow2".into(),
                size: 1 << 30,
            }],
        },
        vm: VmState {
            pic_master: kvm_bindings::kvm_irqchip::new_zeroed(),
            pic_slave: kvm_bindings::kvm_irqchip::new_zeroed(),
            ioapic: kvm_bindings::kvm_irqchip::new_zeroed(),
            pit: kvm_bindings::kvm_pit_state2::new_zeroed(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 123_456_789,
                ..Default::default()
            },
        },
        vcpus: (0..vcpus).map(vcpu).collect(),
    }
}

fn path() -> &'static Path {
    Path::new("/snap/vm.snap")
}

/// Rewrites the checksum so that a change elsewhere is what the reader sees.
fn reseal(file: &mut [u8]) {
    let at = file.len() - 8;
    let crc = crc64::crc64(0, &file[..at]);
    file[at..].copy_from_slice(&crc.to_le_bytes());
}

fn one_line(e: &SnapshotError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

#[test]
fn a_snapshot_reads_back_as_written() {
    let s = sample(3);
    let back = Snapshot::decode(path(), &s.encode()).unwrap();
    assert_eq!(back.config, s.config);
    assert_eq!(back.devices, s.devices);
    assert_eq!(back.vcpus.len(), 3);
    assert_eq!(back.vcpus[2].regs, s.vcpus[2].regs);
    assert_eq!(back.vcpus[0].msrs[0].data, 0xffff_ffff_8100_0000);
    assert_eq!(back.vcpus[0].cpuid[0].eax, 0x806c1);
    assert_eq!(back.vcpus[1].tsc_khz, Some(2_793_436));
    assert_eq!(back.vm.clock.clock, 123_456_789);
}

#[test]
fn refuses_every_truncation() {
    let file = sample(2).encode();
    for len in (0..file.len()).filter(|l| *l < 64 || l % 61 == 0 || *l > file.len() - 16) {
        let e = Snapshot::decode(path(), &file[..len])
            .err()
            .expect("refused");
        let msg = one_line(&e);
        if len >= 8 && len >= FIXED_HEADER + WISP_VERSION.len() {
            assert!(msg.contains("truncated"), "{len}: {msg}");
        }
    }
}

#[test]
fn refuses_any_flipped_byte_and_trailing_bytes() {
    let file = sample(2).encode();
    let body_at = FIXED_HEADER + WISP_VERSION.len();
    for at in (0..file.len()).filter(|a| *a < 64 || a % 37 == 0 || *a >= file.len() - 8) {
        let mut bad = file.clone();
        bad[at] ^= 0x20;
        let e = Snapshot::decode(path(), &bad).err().expect("refused");
        let msg = one_line(&e);
        if at >= body_at {
            assert!(
                matches!(e, SnapshotError::Checksum { .. }),
                "byte {at}: {msg}"
            );
        }
    }
    let mut longer = file.clone();
    longer.push(0);
    assert!(matches!(
        Snapshot::decode(path(), &longer),
        Err(SnapshotError::Malformed { .. })
    ));
}

#[test]
fn refuses_another_format_or_wisp_version_with_both_versions_named() {
    let mut file = sample(1).encode();
    file[8..12].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut file);
    let e = Snapshot::decode(path(), &file).err().unwrap();
    assert_eq!(
        one_line(&e),
        "snapshot file /snap/vm.snap: format version 2, this wisp reads version 1"
    );

    let mut file = sample(1).encode();
    let v = VERSION_AT;
    // Same length, another version: "0.1.0" -> "9.1.0".
    file[v] = b'9';
    reseal(&mut file);
    let e = Snapshot::decode(path(), &file).err().unwrap();
    assert!(matches!(e, SnapshotError::WispVersion { .. }));
    assert!(one_line(&e).contains("taken by wisp \"9"), "{e}");
}

#[test]
fn refuses_a_body_whose_vcpu_count_differs_from_its_config() {
    let mut s = sample(2);
    s.config.cpus = 3;
    let e = Snapshot::decode(path(), &s.encode()).err().unwrap();
    assert!(
        one_line(&e).contains("2 vCPU states for a VM of 3 vCPUs"),
        "{e}"
    );
}

#[test]
fn refuses_what_is_not_a_snapshot_and_files_too_large() {
    let e = Snapshot::decode(path(), b"{\"kernel\": \"/vmlinux\"}")
        .err()
        .unwrap();
    assert!(matches!(e, SnapshotError::NotASnapshot { .. }));
    // A body length near u64::MAX does not overflow or allocate.
    let mut file = sample(1).encode();
    let len_at = FIXED_HEADER + WISP_VERSION.len() - 8;
    file[len_at..len_at + 8].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
    let e = Snapshot::decode(path(), &file).err().unwrap();
    assert!(matches!(e, SnapshotError::Malformed { .. }), "{e}");

    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/wisp-snap").unwrap();
    let big = dir.as_path().join("big.snap");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(MAX_FILE_SIZE + 1).unwrap();
    assert!(matches!(
        Snapshot::read_file(&big),
        Err(SnapshotError::TooLarge { .. })
    ));
    let good = dir.as_path().join("good.snap");
    sample(2).write_file(&good).unwrap();
    assert_eq!(Snapshot::read_file(&good).unwrap().vcpus.len(), 2);
    let e = Snapshot::read_file(&dir.as_path().join("missing.snap"))
        .err()
        .unwrap();
    assert!(one_line(&e).contains("missing.snap"), "{e}");
}
