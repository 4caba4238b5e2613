//! Every way a VM ends but SIGKILL keeps what the guest wrote (issue 11, item 12): the probe
//! guest writes 1 MiB to a fresh qcow2 image with no FLUSH, then the VM ends by power off,
//! reset, panic, a stop signal, or an API request the guest answers with a reset. qemu-img is
//! the judge: the image is clean, the data is allocated where the guest wrote it, and it
//! reads back as written.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm_sys_util::tempdir::TempDir;

const T: Duration = Duration::from_secs(60);
const SEED: u32 = 77;
const KIB: usize = 1024;

/// The probe's disk pattern: the little-endian word at disk byte offset `o` is
/// `(o / 4) * 0x9e3779b1 + seed`.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u64)
        .step_by(4)
        .flat_map(|i| {
            ((i / 4) as u32)
                .wrapping_mul(0x9e37_79b1)
                .wrapping_add(seed)
                .to_le_bytes()
        })
        .collect()
}

fn fresh_qcow2(dir: &TempDir) -> PathBuf {
    let path = dir.as_path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&path), "16M"],
    );
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn cmdline(end: &str) -> String {
    format!("probe.scenario=blk-write-then-end probe.end={end} probe.seed={SEED} probe.kib={KIB}")
}

/// `wisp run` with the probe and the image as its one disk.
fn spawn_run(disk: &Path, end: &str) -> Wisp {
    let probe = path_str(&probes().probe).to_string();
    let disk = format!("path={},format=qcow2", disk.display());
    Wisp::spawn(&[
        "run",
        "--kernel",
        &probe,
        "--memory",
        "128M",
        "--cmdline",
        &cmdline(end),
        "--disk",
        &disk,
    ])
}

/// What qemu-img finds: no errors or leaks, the first MiB allocated as data, and the
/// guest's pattern there (zeros after it).
fn assert_image_holds_the_writes(disk: &Path, console: &str) {
    assert!(console.contains("probe: blk written\n"), "{console}");
    assert!(!console.contains("probe: FAIL"), "{console}");
    let check = std::process::Command::new("qemu-img")
        .args(["check", path_str(disk)])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && report.contains("No errors were found"),
        "qemu-img check: {}\n{report}{}",
        check.status,
        String::from_utf8_lossy(&check.stderr)
    );
    let map: serde_json::Value = serde_json::from_str(&run_ok(
        "qemu-img",
        &["map", "--output=json", path_str(disk)],
    ))
    .unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["start"].as_u64().unwrap() < (KIB as u64) << 10)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data >= (KIB as u64) << 10, "qemu-img map: {map}");
    let raw = disk.with_extension("raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path_str(disk),
            path_str(&raw),
        ],
    );
    let bytes = std::fs::read(&raw).unwrap();
    assert!(
        bytes[..KIB << 10] == pattern(KIB << 10, SEED)[..],
        "the guest's writes do not read back"
    );
    assert!(bytes[KIB << 10..].iter().all(|&b| b == 0));
}

#[test]
fn unflushed_qcow2_writes_survive_poweroff_reset_and_panic() {
    if !kvm_available("unflushed_qcow2_writes_survive_poweroff_reset_and_panic") {
        return;
    }
    for (end, code) in [("poweroff", 0), ("reset", 0), ("panic", 2)] {
        let dir = TempDir::new_with_prefix("/tmp/wisp-clean-stop-").unwrap();
        let disk = fresh_qcow2(&dir);
        let f = spawn_run(&disk, end).wait(T);
        assert_eq!(f.code(), Some(code), "{end}: {}\n{}", f.stdout, f.stderr);
        assert_image_holds_the_writes(&disk, &f.stdout);
    }
}

#[test]
fn unflushed_qcow2_writes_survive_stop_signals() {
    if !kvm_available("unflushed_qcow2_writes_survive_stop_signals") {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let dir = TempDir::new_with_prefix("/tmp/wisp-clean-stop-").unwrap();
        let disk = fresh_qcow2(&dir);
        let mut w = spawn_run(&disk, "hang");
        w.wait_for("probe: blk written\n", T);
        w.signal(sig);
        let f = w.wait(T);
        assert_eq!(f.code(), Some(128 + sig), "{}\n{}", f.stdout, f.stderr);
        assert_image_holds_the_writes(&disk, &f.stdout);
    }
}

#[test]
fn unflushed_qcow2_writes_survive_an_api_driven_stop() {
    if !kvm_available("unflushed_qcow2_writes_survive_an_api_driven_stop") {
        return;
    }
    let dir = TempDir::new_with_prefix("/tmp/wisp-clean-stop-").unwrap();
    let disk = fresh_qcow2(&dir);
    let config = dir.as_path().join("vm.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": probes().probe,
                "boot_args": cmdline("cad"),
            },
            "drives": [{
                "drive_id": "data",
                "path_on_host": disk,
                "is_root_device": false,
                "format": "qcow2",
            }],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        })
        .to_string(),
    )
    .unwrap();
    let sock = dir.as_path().join("api.sock");
    let mut w = Wisp::spawn(&[
        "--api-sock",
        path_str(&sock),
        "--config-file",
        path_str(&config),
    ]);
    w.wait_for("probe: blk written\n", T);
    let (status, body) = api_call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let f = w.wait(T);
    assert_eq!(f.code(), Some(0), "{}\n{}", f.stdout, f.stderr);
    assert_image_holds_the_writes(&disk, &f.stdout);
}
