//! Tier 3: the test kernel booted through the API to init's shell on the console (a qcow2
//! overlay over the MBR root disk, a NIC on a tap in a namespace of the test's own), a file
//! written and the uptime read, then paused, snapshotted and killed; a new wisp loads the
//! snapshot and resumes: the file reads back, the uptime went on (it did not restart), the
//! guest answers ping on the same tap, and after a clean poweroff `qemu-img check` finds the
//! overlay clean. The console's input is a FIFO per wisp (the shell reads commands from it).

mod common;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TAP: &str = "wtap0";
const GUEST_IP: &str = "10.0.0.2";
const DISK_SIGNATURE: u32 = 0x7769_7371;
const BOOT: Duration = Duration::from_secs(1500);
const T: Duration = Duration::from_secs(300);

fn api_ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (st, answer) = api_call(sock, method, path, Some(body));
    assert!(
        (200..300).contains(&st),
        "{method} {path} {body}: {st} {answer}"
    );
}

/// wisp in the namespace with its console input from a new FIFO `dir/<name>.in`; returns it
/// and the FIFO's write end (opened read-write so that neither side waits for the other).
fn spawn_with_console(ns: &TestNetns, dir: &Path, name: &str) -> (Wisp, std::fs::File, PathBuf) {
    let fifo = dir.join(format!("{name}.in"));
    run_ok("mkfifo", &[fifo.to_str().unwrap()]);
    let input = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let w = Wisp::spawn_cmd(ns.command("sh").args([
        "-c",
        &format!(
            "exec {} --api-sock {} < {}",
            wisp_bin(),
            sock.display(),
            fifo.display()
        ),
    ]));
    wait_api_socket(&sock);
    (w, input, sock)
}

fn type_line(input: &mut std::fs::File, line: &str) {
    input.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// Waits for a whole `key<number>` line on the console (`UP1-123.45` -> 123.45). The serial
/// port hands the host a line in pieces, so `key` alone may be there before its value.
fn wait_value(w: &mut Wisp, key: &str) -> f64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let console = w.stdout();
        let value = console
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.trim().parse().ok());
        if let Some(v) = value {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no whole {key} line within {T:?}:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn linux_restored_in_a_new_wisp_keeps_its_files_uptime_and_network() {
    if !kvm_available("linux_restored_in_a_new_wisp_keeps_its_files_uptime_and_network") {
        return;
    }
    let dir = TestDir::new("linux-snap");
    let raw = dir.join("root-disk.raw");
    mbr_disk(&image("rootfs.ext4"), &raw, DISK_SIGNATURE);
    let overlay = dir.join("root-overlay.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            raw.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );
    let ns = TestNetns::new("t3snap");
    ns.add_tap(TAP, "10.0.0.1/24");

    let _slot = linux_boot_slot();
    let (mut a, mut a_in, sock) = spawn_with_console(&ns, &dir, "a");
    // No wisp.scenario: init runs `info` and starts a shell on the console.
    let boot_args = format!("{LINUX_CMDLINE} rw ip={GUEST_IP}::10.0.0.1:255.255.255.0::eth0:off");
    api_ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{boot_args}"}}"#,
            image("vmlinux").display()
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true,
                 "partuuid": "{DISK_SIGNATURE:08x}-01", "format": "qcow2", "backing_files": true}}"#,
            overlay.display()
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        &format!(r#"{{"iface_id": "eth0", "host_dev_name": "{TAP}"}}"#),
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    a.wait_for("starting a shell on the console", BOOT);
    type_line(
        &mut a_in,
        "echo written-before-the-snapshot > /snap-file.txt; sync",
    );
    type_line(&mut a_in, "echo UP1-$(cut -d' ' -f1 /proc/uptime)");
    let up1 = wait_value(&mut a, "UP1-");
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &ns_name(&ns),
            "ping",
            "-c",
            "1",
            "-W",
            "30",
            GUEST_IP,
        ],
    );

    api_ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("state.snap").display(),
        dir.join("mem.raw").display()
    );
    api_ok(&sock, "PUT", "/snapshot/create", &body);
    a.signal(libc::SIGKILL);
    a.wait(T);

    let (mut b, mut b_in, sock) = spawn_with_console(&ns, &dir, "b");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        dir.join("state.snap").display(),
        dir.join("mem.raw").display()
    );
    api_ok(&sock, "PUT", "/snapshot/load", &load);
    type_line(&mut b_in, "echo FILE-$(cat /snap-file.txt)");
    type_line(&mut b_in, "echo UP2-$(cut -d' ' -f1 /proc/uptime)");
    b.wait_for("FILE-written-before-the-snapshot", T);
    let up2 = wait_value(&mut b, "UP2-");
    assert!(
        up2 >= up1,
        "uptime went from {up1} to {up2}: the kernel restarted"
    );
    // The restored guest's network: the same tap, opened by the new wisp.
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &ns_name(&ns),
            "ping",
            "-c",
            "3",
            "-W",
            "30",
            GUEST_IP,
        ],
    );
    type_line(&mut b_in, "sync; poweroff -f");
    let f = b.wait(T);
    assert_eq!(
        f.code(),
        Some(0),
        "console:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    let out = Command::new("qemu-img")
        .args(["check", overlay.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The namespace's name, for `ip netns exec`.
fn ns_name(ns: &TestNetns) -> String {
    // TestNetns::command builds `ip netns exec NAME program`: take NAME from it.
    let c = ns.command("true");
    c.get_args()
        .nth(2)
        .map(|a| a.to_string_lossy().into_owned())
        .expect("ip netns exec NAME")
}
