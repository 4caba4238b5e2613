//! Tier 2: virtio-blk through the probe guest's own virtio-mmio driver (tests/guests/virtio.c),
//! which runs at CPL3 (native speed even on a software KVM): it finds the disk in the DSDT,
//! negotiates, writes a pattern, flushes, reads it back, and the host then finds the pattern
//! in the file. The pattern and the output lines are in tests/guests/README.md.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmm_sys_util::tempdir::TempDir;

const T: Duration = Duration::from_secs(60);

/// The probe's disk pattern: the little-endian word at disk byte offset `o` is
/// `(o / 4) * 0x9e3779b1 + seed`.
fn pattern(offset: u64, len: usize, seed: u32) -> Vec<u8> {
    (0..len as u64)
        .step_by(4)
        .flat_map(|i| {
            (((offset + i) / 4) as u32)
                .wrapping_mul(0x9e37_79b1)
                .wrapping_add(seed)
                .to_le_bytes()
        })
        .collect()
}

fn tempdir() -> TempDir {
    TempDir::new_with_prefix("/tmp/wisp-virtio-blk-").expect("create a temporary directory")
}

/// A sparse raw disk of `size` bytes.
fn raw_disk(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let path = dir.as_path().join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create the disk file");
    path
}

fn disk_arg(path: &Path, extra: &str) -> String {
    format!("path={}{extra}", path.display())
}

/// `wisp run` of a probe scenario with extra command-line words and wisp flags.
fn run_scenario(cmdline: &str, wisp_args: &[&str]) -> Finished {
    let probe = probes().probe.to_str().unwrap().to_string();
    let mut args = vec![
        "run",
        "--kernel",
        &probe,
        "--memory",
        "128M",
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(wisp_args);
    Wisp::spawn(&args).wait(T)
}

fn assert_clean(f: &Finished, scenario: &str) {
    assert!(
        !f.stdout.contains("probe: FAIL"),
        "{scenario} reported a failure:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert!(
        f.stdout.contains(&format!("probe: done {scenario}\n")),
        "{scenario} did not finish:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

/// The console lines starting with "probe: blk", in order.
fn blk_lines(f: &Finished) -> Vec<&str> {
    f.stdout
        .lines()
        .filter(|l| l.starts_with("probe: blk"))
        .collect()
}

#[test]
fn probe_writes_flushes_and_reads_back_a_pattern() {
    if !kvm_available("probe_writes_flushes_and_reads_back_a_pattern") {
        return;
    }
    let dir = tempdir();
    let disk = raw_disk(&dir, "disk.raw", 64 << 20);
    let f = run_scenario(
        "probe.scenario=blk probe.seed=7",
        &["--disk", &disk_arg(&disk, ",serial=wisp-blk-1")],
    );
    assert_clean(&f, "blk");
    assert!(
        f.stdout
            .contains("probe: virtio-mmio 0xd0000000 gsi 5 device 2 (acpi)\n"),
        "{}",
        f.stdout
    );
    let lines = blk_lines(&f);
    assert_eq!(
        lines[1..],
        [
            "probe: blk capacity 131072",
            "probe: blk serial wisp-blk-1",
            "probe: blk write ok",
            "probe: blk flush ok",
            "probe: blk readback ok",
        ],
        "{}",
        f.stdout
    );
    // VERSION_1 (bit 32) and FLUSH (bit 9) offered, RO (bit 5) not.
    let features = lines[0].strip_prefix("probe: blk features 0x").unwrap();
    let features = u64::from_str_radix(features, 16).unwrap();
    assert_eq!(features & (1 << 32 | 1 << 9 | 1 << 5), 1 << 32 | 1 << 9);

    // 64 KiB at sector 8, nothing around it.
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(data[4096..4096 + 65536], pattern(4096, 65536, 7)[..]);
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096 + 65536..].iter().all(|&b| b == 0));

    // Read-only: the write is refused with IOERR, the earlier pattern reads back, the file
    // is unchanged.
    let f = run_scenario(
        "probe.scenario=blk probe.seed=7",
        &["--disk", &disk_arg(&disk, ",readonly=on")],
    );
    assert_clean(&f, "blk");
    let lines = blk_lines(&f);
    assert_eq!(
        lines[1..],
        [
            "probe: blk capacity 131072 readonly",
            "probe: blk serial (none)",
            "probe: blk readonly-write refused",
            "probe: blk flush ok",
            "probe: blk readback ok",
        ],
        "{}",
        f.stdout
    );
    assert!(
        std::fs::read(&disk).unwrap() == data,
        "read-only disk changed"
    );

    // Another seed on the read-only disk: the data is not that pattern.
    let f = run_scenario(
        "probe.scenario=blk probe.seed=8",
        &["--disk", &disk_arg(&disk, ",readonly=on")],
    );
    assert_clean(&f, "blk");
    assert!(
        f.stdout.contains("probe: blk readback differs\n"),
        "{}",
        f.stdout
    );
    assert!(
        std::fs::read(&disk).unwrap() == data,
        "read-only disk changed"
    );
}

#[test]
fn second_disk_and_command_line_description() {
    if !kvm_available("second_disk_and_command_line_description") {
        return;
    }
    let dir = tempdir();
    let a = raw_disk(&dir, "a.raw", 8 << 20);
    let b = raw_disk(&dir, "b.raw", 16 << 20);
    // probe.disk=1: the second disk, at the second window and GSI.
    let f = run_scenario(
        "probe.scenario=blk probe.disk=1 probe.seed=3 probe.sector=100 probe.kib=128",
        &[
            "--disk",
            &disk_arg(&a, ",serial=first"),
            "--disk",
            &disk_arg(&b, ",serial=second"),
        ],
    );
    assert_clean(&f, "blk");
    assert!(
        f.stdout
            .contains("probe: virtio-mmio 0xd0001000 gsi 6 device 2 (acpi)\n"),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("probe: blk capacity 32768\n"));
    assert!(f.stdout.contains("probe: blk serial second\n"));
    let data = std::fs::read(&b).unwrap();
    assert_eq!(data[51200..51200 + 131072], pattern(51200, 131072, 3)[..]);
    assert!(std::fs::read(&a).unwrap().iter().all(|&x| x == 0));

    // --virtio-mmio-cmdline: no LNRO0005 in the DSDT, the probe reads virtio_mmio.device=.
    let f = run_scenario(
        "probe.scenario=blk probe.seed=4",
        &["--virtio-mmio-cmdline", "--disk", &disk_arg(&a, "")],
    );
    assert_clean(&f, "blk");
    assert!(
        f.stdout
            .contains("probe: virtio-mmio 0xd0000000 gsi 5 device 2 (cmdline)\n"),
        "{}",
        f.stdout
    );
    let data = std::fs::read(&a).unwrap();
    assert_eq!(data[4096..4096 + 65536], pattern(4096, 65536, 4)[..]);
}

#[test]
fn qcow2_disk_round_trips_the_pattern() {
    if !kvm_available("qcow2_disk_round_trips_the_pattern") {
        return;
    }
    let dir = tempdir();
    let img = dir.as_path().join("disk.qcow2");
    let out = Command::new(wisp_bin())
        .args(["image", "create", "--size", "64M", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let f = run_scenario(
        "probe.scenario=blk probe.seed=11 probe.sector=1000 probe.kib=1024",
        &["--disk", &disk_arg(&img, ",format=qcow2")],
    );
    assert_clean(&f, "blk");
    assert!(
        f.stdout.contains("probe: blk readback ok\n"),
        "{}",
        f.stdout
    );
    // With qemu-img, the data is where the guest put it in the qcow2 image too.
    let raw = dir.as_path().join("converted.raw");
    match Command::new("qemu-img")
        .args(["convert", "-O", "raw", img.to_str().unwrap()])
        .arg(&raw)
        .status()
    {
        Ok(s) if s.success() => {
            let data = std::fs::read(&raw).unwrap();
            let off = 1000 * 512;
            assert_eq!(
                data[off..off + (1 << 20)],
                pattern(off as u64, 1 << 20, 11)[..]
            );
        }
        other => {
            eprintln!("qemu-img convert not run ({other:?}); pattern checked by the guest only")
        }
    }
}

#[test]
fn hostile_chains_and_registers_leave_the_device_working() {
    if !kvm_available("hostile_chains_and_registers_leave_the_device_working") {
        return;
    }
    let dir = tempdir();
    let disk = raw_disk(&dir, "disk.raw", 8 << 20);
    let f = run_scenario(
        "probe.scenario=blk-hostile",
        &["--disk", &disk_arg(&disk, "")],
    );
    assert_clean(&f, "blk-hostile");
    let cases = lines_with(&f.stdout, "probe: blk hostile ");
    // Each chain comes back with an error status, or unanswered (status byte untouched,
    // used length 0); a head outside the queue cannot be returned at all: the device
    // stops and sets DEVICE_NEEDS_RESET (0x40) until the driver resets it.
    for want in [
        "data-outside-memory status 1 len 1",
        "header-outside-memory status 1 len 1",
        "status-outside-memory status 255 len 0",
        "data-address-wraps status 1 len 1",
        "looping-chain status 255 len 0",
        "next-outside-queue status 255 len 0",
        "status-readable status 255 len 0",
        "status-zero-length status 255 len 0",
        "no-status status 255 len 0",
        "short-header status 1 len 1",
        "odd-length status 1 len 1",
        "read-into-readable status 1 len 1",
        "beyond-capacity status 1 len 1",
        "straddles-capacity status 1 len 1",
        "huge-sector status 1 len 1",
        "unknown-type status 2 len 1",
        "head-outside-queue dropped status-reg 0x4f",
        "driver-ok-before-features-ok status-reg 0x3",
        "unoffered-features status-reg 0x3",
        "queue-num-3 ready 0 status-reg 0x4b",
        "ring-outside-memory ready 0 status-reg 0x4b",
        "register-garbage queue-99-max 0 status-reg 0xf",
        "registers ok",
        "survived",
    ] {
        assert!(cases.contains(&want), "missing {want:?} in:\n{}", f.stdout);
    }
    // The hostile run only read: the disk is still all zeroes.
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
    // wisp said why, without panicking.
    assert!(
        f.stderr.contains("is outside guest memory"),
        "stderr: {}",
        f.stderr
    );

    let f = run_scenario(
        "probe.scenario=blk-hostile",
        &["--disk", &disk_arg(&disk, ",readonly=on")],
    );
    assert_clean(&f, "blk-hostile");
    let cases = lines_with(&f.stdout, "probe: blk hostile ");
    assert!(
        cases.contains(&"readonly-write status 1 len 1"),
        "{}",
        f.stdout
    );
    assert!(cases.contains(&"survived"), "{}", f.stdout);
}

#[test]
fn flushed_data_survives_sigkill() {
    if !kvm_available("flushed_data_survives_sigkill") {
        return;
    }
    let dir = tempdir();
    let disk = raw_disk(&dir, "disk.raw", 16 << 20);
    let probe = probes().probe.to_str().unwrap().to_string();
    let disk_spec = disk_arg(&disk, "");
    let mut w = Wisp::spawn(&[
        "run",
        "--kernel",
        &probe,
        "--memory",
        "128M",
        "--cmdline",
        "probe.scenario=blk-flush-then-hang probe.seed=42",
        "--disk",
        &disk_spec,
    ]);
    w.wait_for("probe: blk flushed\n", T);
    w.signal(libc::SIGKILL);
    let f = w.wait(Duration::from_secs(10));
    assert_eq!(f.status.code(), None, "killed by a signal");
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(data[..1 << 20], pattern(0, 1 << 20, 42)[..]);
    assert!(data[1 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn bench_scenario_keeps_a_queue_depth_in_flight() {
    if !kvm_available("bench_scenario_keeps_a_queue_depth_in_flight") {
        return;
    }
    let dir = tempdir();
    let disk = raw_disk(&dir, "disk.raw", 64 << 20);
    let f = run_scenario(
        "probe.scenario=blk-bench probe.op=randwrite probe.qd=16 probe.ms=300",
        &["--disk", &disk_arg(&disk, "")],
    );
    assert_clean(&f, "blk-bench");
    let line = lines_with(&f.stdout, "probe: blk bench randwrite bs 4096 qd 16 ios ");
    let ios: u64 = line
        .first()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bench line:\n{}", f.stdout));
    assert!(ios > 16, "{ios} writes completed");
    // The writes landed in the file.
    assert!(std::fs::read(&disk).unwrap().iter().any(|&b| b != 0));
}
