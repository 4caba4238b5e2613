//! Tier 2: the entropy device (virtio-rng) through the probe guest's own virtio-mmio driver
//! (tests/guests/rng.c), at CPL3: it finds the device in the DSDT, reads random bytes,
//! and checks the 64 KiB cap and the refusal of a driver-readable buffer as a guest sees them.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn assert_rng_ok(f: &Finished) {
    assert!(
        !f.stdout.contains("probe: FAIL"),
        "rng reported a failure:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    let lines: Vec<&str> = f
        .stdout
        .lines()
        .filter(|l| l.starts_with("probe: rng"))
        .collect();
    assert_eq!(
        lines,
        [
            // VERSION_1, RING_INDIRECT_DESC and RING_EVENT_IDX; no device features.
            "probe: rng features 0x130000000",
            "probe: rng read 4096 distinct ok",
            "probe: rng chain 2000",
            "probe: rng big 131072 got 65536",
            "probe: rng read-only refused",
            "probe: rng ok",
        ],
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("probe: done rng\n"), "{}", f.stdout);
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

#[test]
fn wisp_run_gives_the_guest_an_entropy_device_after_its_disks() {
    if !kvm_available("wisp_run_gives_the_guest_an_entropy_device_after_its_disks") {
        return;
    }
    let dir = TestDir::new("virtio-rng");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", disk.display());
    let f = run_probe("rng", 1, "128M", &["--disk", &disk], T);
    assert_rng_ok(&f);
    // On by default, in the window after the disk's.
    assert!(
        f.stdout
            .contains("probe: virtio-mmio 0xd0001000 gsi 6 device 4 (acpi)\n"),
        "{}",
        f.stdout
    );
}

#[test]
fn the_entropy_device_is_described_on_the_command_line_too() {
    if !kvm_available("the_entropy_device_is_described_on_the_command_line_too") {
        return;
    }
    let f = run_probe("rng", 1, "128M", &["--virtio-mmio-cmdline"], T);
    assert_rng_ok(&f);
    assert!(
        f.stdout
            .contains("probe: virtio-mmio 0xd0000000 gsi 5 device 4 (cmdline)\n"),
        "{}",
        f.stdout
    );
}

#[test]
fn entropy_off_leaves_the_guest_without_the_device() {
    if !kvm_available("entropy_off_leaves_the_guest_without_the_device") {
        return;
    }
    let f = run_probe("rng", 1, "128M", &["--entropy", "off"], T);
    assert!(
        f.stdout
            .contains("probe: FAIL rng no virtio device 4 number 0 (0 virtio-mmio windows"),
        "{}",
        f.stdout
    );
}

/// Firecracker's config file: the device exists only when its `entropy` section is given.
#[test]
fn a_firecracker_config_file_with_an_entropy_section_gives_the_device() {
    if !kvm_available("a_firecracker_config_file_with_an_entropy_section_gives_the_device") {
        return;
    }
    let dir = TestDir::new("virtio-rng-fc");
    let run = |entropy: &str| {
        let file = dir.join("vm.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.scenario=rng"}},
                    "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}{entropy}}}"#,
                probes().probe.display()
            ),
        )
        .unwrap();
        let metrics = dir.join("metrics.json");
        let _ = std::fs::remove_file(&metrics);
        let f = Wisp::spawn(&[
            "--config-file",
            file.to_str().unwrap(),
            "--no-api",
            "--metrics-path",
            metrics.to_str().unwrap(),
        ])
        .wait(T);
        // Counters are changes since the line before: their sum is the total.
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        let total = move |field: &str| -> u64 {
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter_map(|m| m["entropy"][field].as_u64())
                .sum()
        };
        (f, total)
    };
    // The bytes the scenario's requests got: 2 x 4096, 2000, 65536, 0 (refused), 512.
    const BYTES: u64 = 2 * 4096 + 2000 + 65536 + 512;
    let (f, total) = run(r#", "entropy": {"rate_limiter": null}"#);
    assert_rng_ok(&f);
    assert_eq!(total("entropy_bytes"), BYTES);
    assert_eq!(total("entropy_rate_limiter_throttled"), 0);
    // A limit the guest's requests run into (16 KiB, then 160 KiB/s): they wait in the ring
    // for the limiter's timer and all complete, the 64 KiB one after a full bucket.
    let (f, total) =
        run(r#", "entropy": {"rate_limiter": {"bandwidth": {"size": 16384, "refill_time": 100}}}"#);
    assert_rng_ok(&f);
    assert_eq!(total("entropy_bytes"), BYTES);
    assert!(total("entropy_rate_limiter_throttled") >= 1);
    assert!(total("rate_limiter_event_count") >= 1);
    let (without, _) = run("");
    assert!(
        without
            .stdout
            .contains("probe: FAIL rng no virtio device 4"),
        "{}",
        without.stdout
    );
}
