//! Snapshots through Firecracker's API on real VMs (probe guests): a paused VM saved,
//! killed and restored in a new wisp goes on where it was (its count, its timer, every vCPU,
//! its disk I/O); clones of one snapshot run side by side on disks of their own; bad
//! snapshots and requests in the wrong state are refused and leave nothing half-restored.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// `(count, ticks, ap)` of every complete `probe: count N ticks T ap A` line, in order.
fn counts(console: &str) -> Vec<(u64, u64, u64)> {
    lines_with(console, "probe: count ")
        .into_iter()
        .filter_map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (f.len() == 3).then(|| (f[0], f[1], f[2]))
        })
        .collect()
}

/// One guest's console across processes (`before` then `after`, a line cut by the snapshot
/// joined again): its counts go 1, 2, 3, ... with none missing or repeated, and the timer's
/// ticks and the APs' count never go back. Returns the counts.
fn assert_one_run(before: &str, after: &str) -> Vec<(u64, u64, u64)> {
    assert!(
        !after.contains("probe: start") && !after.contains("probe: FAIL"),
        "the restored guest booted again or failed:\n{after}"
    );
    let joined = format!("{before}{after}");
    let c = counts(&joined);
    for (i, w) in c.windows(2).enumerate() {
        assert_eq!(w[1].0, w[0].0 + 1, "count line {i}:\n{joined}");
        assert!(w[1].1 >= w[0].1 && w[1].2 >= w[0].2, "line {i}:\n{joined}");
    }
    assert_eq!(c[0].0, 1, "{joined}");
    c
}

/// The console once the paused guest's last output has gone through wisp's console writer
/// (it writes on a thread of its own): the same text on two looks 100 ms apart.
fn settled_stdout(w: &Wisp) -> String {
    let mut seen = w.stdout();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = w.stdout();
        if now == seen {
            return now;
        }
        seen = now;
    }
}

fn api_ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (st, answer) = api_call(sock, method, path, Some(body));
    assert_eq!(st, 204, "{method} {path} {body}: {answer}");
}

fn spawn_api(sock: &Path) -> Wisp {
    let w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_api_socket(sock);
    w
}

/// A wisp running the `snap` probe scenario on `disk` with `cpus` vCPUs, counting.
fn start_counter(sock: &Path, disk: &Path, cpus: u8) -> Wisp {
    let mut w = spawn_api(sock);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=snap"}}"#,
        probes().probe.display()
    );
    api_ok(sock, "PUT", "/boot-source", &boot);
    api_ok(
        sock,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": {cpus}, "mem_size_mib": 128}}"#),
    );
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}"#,
        disk.display()
    );
    api_ok(sock, "PUT", "/drives/data", &drive);
    api_ok(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    w.wait_for("probe: count 3 ", T);
    w
}

/// Pauses the counter, snapshots it into `dir` (state.snap, mem.raw) and kills it; returns
/// its console (the guest may have been paused in the middle of a line).
fn snapshot_and_kill(w: Wisp, sock: &Path, dir: &Path) -> String {
    api_ok(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("state.snap").display(),
        dir.join("mem.raw").display()
    );
    api_ok(sock, "PUT", "/snapshot/create", &body);
    let before = settled_stdout(&w);
    w.signal(libc::SIGKILL);
    let f = w.wait(T);
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    // Nothing printed between the pause and the kill.
    assert_eq!(f.stdout, before);
    before
}

fn load_body(dir: &Path, resume: bool) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": {resume}}}"#,
        dir.join("state.snap").display(),
        dir.join("mem.raw").display()
    )
}

/// The 32-bit words of disk sector `sector`.
fn sector_words(disk: &Path, sector: u64) -> Vec<u32> {
    let data = std::fs::read(disk).unwrap();
    let at = (sector * 512) as usize;
    data[at..at + 512]
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn raw_disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

#[test]
fn a_snapshot_restored_in_a_new_wisp_goes_on_counting_on_every_vcpu_with_its_disk() {
    if !kvm_available(
        "a_snapshot_restored_in_a_new_wisp_goes_on_counting_on_every_vcpu_with_its_disk",
    ) {
        return;
    }
    let dir = TestDir::new("snap-restore");
    let disk = raw_disk(&dir, "disk.raw");
    let sock = dir.join("a.sock");
    let w = start_counter(&sock, &disk, 2);
    let before = snapshot_and_kill(w, &sock, &dir);
    let (count, ticks, ap) = *counts(&before).last().unwrap();
    let mem_before = sha256_hex(&dir.join("mem.raw"));

    let sock = dir.join("b.sock");
    let mut w = spawn_api(&sock);
    api_ok(&sock, "PUT", "/snapshot/load", &load_body(&dir, true));
    let (st, info) = api_call(&sock, "GET", "/", None);
    assert_eq!(st, 200);
    assert!(info.contains("\"Running\""), "{info}");
    // (The snapshot may have cut line count + 1: wait for the start of count + 6.)
    w.wait_for(&format!("probe: count {} ", count + 6), T);
    w.signal(libc::SIGTERM);
    let f = w.wait(T);
    // The count goes on from where it was (not from 1: one run across both processes), and
    // so do the LAPIC timer's ticks and the other vCPU's count; each round's disk write and
    // read (each with its interrupt) checked out in the guest.
    let all = assert_one_run(&before, &f.stdout);
    let (last, last_ticks, last_ap) = *all.last().unwrap();
    assert!(
        last >= count + 5,
        "{last} after {count}:\n{before}\n---\n{}",
        f.stdout
    );
    assert!(
        last_ticks > ticks,
        "the timer ticks on: {ticks} -> {last_ticks}"
    );
    assert!(last_ap > ap, "the AP counts on: {ap} -> {last_ap}");
    // The restored guest's writes reached the same disk.
    let words = sector_words(&disk, last % 64);
    assert_eq!(
        words[0],
        last as u32,
        "sector {} holds count {last}",
        last % 64
    );
    // The memory file is mapped privately: the restored guest never wrote it.
    assert_eq!(sha256_hex(&dir.join("mem.raw")), mem_before);
}

#[test]
fn clones_of_one_snapshot_run_side_by_side_on_disks_of_their_own() {
    if !kvm_available("clones_of_one_snapshot_run_side_by_side_on_disks_of_their_own") {
        return;
    }
    let dir = TestDir::new("snap-clones");
    let disk = raw_disk(&dir, "disk.raw");
    let sock = dir.join("origin.sock");
    let w = start_counter(&sock, &disk, 1);
    let before = snapshot_and_kill(w, &sock, &dir);
    let (count, _, _) = *counts(&before).last().unwrap();
    let original = sha256_hex(&disk);

    // Each clone loads paused, gets its own copy of the disk, then runs (Firecracker's
    // PATCH /drives between load and resume). One after the other: a clone holds the
    // snapshot's disk (locked) only until its PATCH.
    let mut clones = Vec::new();
    for name in ["a", "b"] {
        let own = dir.join(format!("disk-{name}.raw"));
        std::fs::copy(&disk, &own).unwrap();
        let sock = dir.join(format!("{name}.sock"));
        let w = spawn_api(&sock);
        api_ok(&sock, "PUT", "/snapshot/load", &load_body(&dir, false));
        let (_, info) = api_call(&sock, "GET", "/", None);
        assert!(info.contains("\"Paused\""), "{info}");
        let patch = format!(
            r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
            own.display()
        );
        api_ok(&sock, "PATCH", "/drives/data", &patch);
        clones.push((w, sock, own));
    }
    for (_, sock, _) in &clones {
        api_ok(sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    }
    for (w, _, _) in &mut clones {
        w.wait_for(&format!("probe: count {} ", count + 4), T);
    }
    // Clone b ends; clone a counts on alone.
    let (wb, _, disk_b) = clones.pop().unwrap();
    wb.signal(libc::SIGTERM);
    let fb = wb.wait(T);
    let b_last = assert_one_run(&before, &fb.stdout).last().unwrap().0;
    let (mut wa, _, disk_a) = clones.pop().unwrap();
    wa.wait_for(&format!("probe: count {} ", b_last + 3), T);
    wa.signal(libc::SIGTERM);
    let fa = wa.wait(T);
    let a_last = assert_one_run(&before, &fa.stdout).last().unwrap().0;
    // Each clone wrote its own disk; the snapshot's disk was not touched by either.
    assert!(a_last > b_last);
    assert_eq!(sector_words(&disk_a, a_last % 64)[0], a_last as u32);
    assert_eq!(sector_words(&disk_b, b_last % 64)[0], b_last as u32);
    assert_ne!(
        sha256_hex(&disk_a),
        sha256_hex(&disk_b),
        "the clones diverged"
    );
    assert_eq!(sha256_hex(&disk), original);
}

#[test]
fn bad_snapshots_and_wrong_states_are_refused_and_nothing_is_half_restored() {
    if !kvm_available("bad_snapshots_and_wrong_states_are_refused_and_nothing_is_half_restored") {
        return;
    }
    let dir = TestDir::new("snap-bad");
    let disk = raw_disk(&dir, "disk.raw");
    let sock = dir.join("origin.sock");
    let w = start_counter(&sock, &disk, 1);
    // Diff snapshots are refused by name.
    api_ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_type": "Diff", "snapshot_path": "/tmp/x", "mem_file_path": "/tmp/y"}"#),
    );
    assert_eq!(st, 400);
    assert!(body.contains("Diff snapshots are not supported"), "{body}");
    api_ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // A running VM is not snapshotted.
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("x.snap").display(),
        dir.join("x.mem").display()
    );
    let (st, answer) = api_call(&sock, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(st, 400);
    assert!(
        answer.contains("fault_message") && answer.contains("paused"),
        "{answer}"
    );
    assert!(!dir.join("x.snap").exists());
    // A load after InstanceStart.
    let (st, answer) = api_call(&sock, "PUT", "/snapshot/load", Some(&load_body(&dir, true)));
    assert_eq!(st, 400);
    assert!(
        answer.contains("only valid before InstanceStart"),
        "{answer}"
    );
    snapshot_and_kill(w, &sock, &dir);

    let good = std::fs::read(dir.join("state.snap")).unwrap();
    // Firecracker's flags for snapshot files: the format version, and a file's.
    let run = |args: &[&str]| Wisp::spawn(args).wait(T);
    let f = run(&["--snapshot-version"]);
    assert_eq!((f.code(), f.stdout.as_str()), (Some(0), "v1.0.0\n"));
    let f = run(&[
        "--describe-snapshot",
        dir.join("state.snap").to_str().unwrap(),
    ]);
    assert_eq!((f.code(), f.stdout.as_str()), (Some(0), "v1.0.0\n"));
    let bad_dir = TestDir::new("snap-bad-files");
    std::fs::copy(dir.join("mem.raw"), bad_dir.join("mem.raw")).unwrap();
    let sock = dir.join("b.sock");
    let mut w = spawn_api(&sock);
    let refused = |file: &[u8], want: &str| {
        std::fs::write(bad_dir.join("state.snap"), file).unwrap();
        let (st, answer) = api_call(
            &sock,
            "PUT",
            "/snapshot/load",
            Some(&load_body(&bad_dir, true)),
        );
        assert_eq!(st, 400, "{want}: {answer}");
        assert!(answer.contains(want), "{want}: {answer}");
        let (_, info) = api_call(&sock, "GET", "/", None);
        assert!(info.contains("Not started"), "{info}");
    };
    refused(&good[..good.len() / 2], "truncated");
    let mut flipped = good.clone();
    flipped[good.len() / 3] ^= 0x01;
    refused(&flipped, "checksum mismatch");
    let f = run(&[
        "--describe-snapshot",
        bad_dir.join("state.snap").to_str().unwrap(),
    ]);
    assert_eq!(f.code(), Some(1));
    assert!(
        f.stderr.contains("checksum mismatch") && f.stderr.trim().lines().count() == 1,
        "{}",
        f.stderr
    );
    refused(b"not a snapshot", "not a wisp snapshot");
    // The memory file: missing, then of another size.
    std::fs::remove_file(bad_dir.join("mem.raw")).unwrap();
    refused(&good, "memory file");
    std::fs::write(bad_dir.join("mem.raw"), vec![0u8; 4096]).unwrap();
    refused(&good, "bytes of RAM");
    // The disk grew since the snapshot.
    std::fs::copy(dir.join("mem.raw"), bad_dir.join("mem.raw")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(2 << 20).unwrap();
    refused(&good, "image of 2097152 bytes");
    f.set_len(1 << 20).unwrap();
    // After all that, the good snapshot still loads in the same process, and runs.
    api_ok(&sock, "PUT", "/snapshot/load", &load_body(&dir, true));
    w.wait_for("probe: count ", T);
    w.signal(libc::SIGTERM);
    let f = w.wait(T);
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
}

#[test]
fn a_restored_vm_snapshotted_again_goes_on_in_a_third_wisp() {
    if !kvm_available("a_restored_vm_snapshotted_again_goes_on_in_a_third_wisp") {
        return;
    }
    // The second snapshot is of RAM mapped from the first's memory file: pages the restored
    // guest never touched are the file's, and must be in the new memory file too.
    let dir = TestDir::new("snap-twice");
    let (first, second) = (dir.join("first"), dir.join("second"));
    std::fs::create_dir(&first).unwrap();
    std::fs::create_dir(&second).unwrap();
    let disk = raw_disk(&dir, "disk.raw");
    let sock = dir.join("a.sock");
    let a = start_counter(&sock, &disk, 1);
    let before_a = snapshot_and_kill(a, &sock, &first);
    let count = counts(&before_a).last().unwrap().0;

    let sock = dir.join("b.sock");
    let mut b = spawn_api(&sock);
    api_ok(&sock, "PUT", "/snapshot/load", &load_body(&first, true));
    b.wait_for(&format!("probe: count {} ", count + 4), T);
    let before_b = snapshot_and_kill(b, &sock, &second);
    std::fs::remove_file(first.join("mem.raw")).unwrap();

    let sock = dir.join("c.sock");
    let mut c = spawn_api(&sock);
    api_ok(&sock, "PUT", "/snapshot/load", &load_body(&second, true));
    let count_b = counts(&format!("{before_a}{before_b}")).last().unwrap().0;
    c.wait_for(&format!("probe: count {} ", count_b + 4), T);
    c.signal(libc::SIGTERM);
    let f = c.wait(T);
    let all = assert_one_run(&format!("{before_a}{before_b}"), &f.stdout);
    assert!(all.last().unwrap().0 >= count_b + 3);
}
