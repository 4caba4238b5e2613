//! Tier 3: the test kernel's own virtio drivers against wisp's devices, in one boot: an ext4
//! disk written by the guest and read back on the host, a qcow2 overlay written by the guest
//! and judged by qemu-img, and a NIC on a tap in a network namespace of the test's own with
//! DHCP (dnsmasq), ping and TCP transfers both ways, checksums compared on both ends.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const TAP: &str = "wtap0";
const GUEST_MAC: &str = "52:54:00:aa:bb:01";

fn sha256_hex(path: &std::path::Path) -> String {
    let out = run_ok("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn linux_uses_disks_and_network_through_wisp_devices() {
    if !kvm_available("linux_uses_disks_and_network_through_wisp_devices") {
        return;
    }
    // Guest kernel networking is interpreted on PVM: move less data there.
    let kib = if pvm_host() { 256 } else { 64 * 1024 };
    let dir = std::env::temp_dir().join(format!("wisp-linux-dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::write(dir.join("root/host.txt"), "written-by-the-host\n").unwrap();
    let ext4 = dir.join("data.ext4");
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            dir.join("root").to_str().unwrap(),
            ext4.to_str().unwrap(),
            "32M",
        ],
    );
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5au8; 4 << 20]).unwrap();
    let overlay = dir.join("overlay.qcow2");
    run_ok(
        wisp_bin(),
        &[
            "image",
            "create",
            "--backing",
            base.to_str().unwrap(),
            "--backing-format",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );

    let ns = TestNetns::new("t3dev");
    ns.add_tap(TAP, "10.0.0.1/24");
    let lease = dir.join("leases");
    let mut dnsmasq = ns
        .command("dnsmasq")
        // dnsmasq takes long options only as --opt=value.
        .args(["--no-daemon", "--port=0", "--bind-interfaces"])
        .arg(format!("--interface={TAP}"))
        .arg("--dhcp-range=10.0.0.2,10.0.0.2,1h")
        .arg(format!("--dhcp-leasefile={}", lease.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq");
    // A dnsmasq that refused its options is gone at once; say so rather than wait for DHCP.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dnsmasq.try_wait().unwrap().is_none(),
        "dnsmasq exited at start"
    );
    // The host end of the TCP transfers: receive on 9000, send `kib` KiB on 9001.
    let to_guest = dir.join("to_guest.bin");
    run_ok(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", to_guest.display()),
            "bs=1024",
            &format!("count={kib}"),
            "status=none",
        ],
    );
    let from_guest = dir.join("from_guest.bin");
    let listener = format!(
        r#"
import socket
rx = socket.socket(); rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); rx.bind(("10.0.0.1", 9000)); rx.listen(1)
tx = socket.socket(); tx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); tx.bind(("10.0.0.1", 9001)); tx.listen(1)
rx.settimeout(900); tx.settimeout(900)
c, _ = rx.accept(); c.settimeout(300)
want = {bytes}; got = b""
while len(got) < want:
    d = c.recv(65536)
    if not d: break
    got += d
open("{out}", "wb").write(got); c.close()
c, _ = tx.accept(); c.sendall(open("{inp}", "rb").read()); c.close()
"#,
        bytes = kib * 1024,
        out = from_guest.display(),
        inp = to_guest.display()
    );
    let mut py = ns
        .command("python3")
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin
        .take()
        .unwrap()
        .write_all(listener.as_bytes())
        .unwrap();

    let _slot = linux_boot_slot();
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let disk0 = format!("path={},format=raw,serial=data", ext4.display());
    let disk1 = format!("path={},format=qcow2", overlay.display());
    let cmdline = format!(
        "console=ttyS0 panic=-1 ip=dhcp wisp.scenario=info,disk,net,poweroff wisp.peer=10.0.0.1 wisp.nc_kib={kib}"
    );
    let kernel = image("vmlinux");
    let initrd = image("initramfs.cpio");
    let f = Wisp::spawn_cmd(ns.command(wisp_bin()).args([
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--cmdline",
        &cmdline,
        "--disk",
        &disk0,
        "--disk",
        &disk1,
        "--net",
        &net,
    ]))
    .wait(Duration::from_secs(1200));
    let out = &f.stdout;
    assert_eq!(f.code(), Some(0), "console:\n{out}\nstderr:\n{}", f.stderr);
    for scenario in ["info", "disk", "net"] {
        assert!(
            out.contains(&format!("WISP-INIT: scenario {scenario} ok")),
            "scenario {scenario} failed:\n{out}"
        );
    }
    assert!(out.contains("WISP-INIT: powering off"), "{out}");

    // DHCP through the tap, the MAC we gave.
    assert!(out.contains("IP-Config: Got DHCP answer"), "{out}");
    assert_eq!(lines_with(out, "WISP-INIT: net_addr="), vec!["10.0.0.2/24"]);
    assert_eq!(lines_with(out, "WISP-INIT: net_mac_eth0="), vec![GUEST_MAC]);
    assert!(out.contains("WISP-INIT: net_ping_ok"));
    // TCP both ways, intact.
    let _ = py.wait();
    assert_eq!(
        lines_with(out, "WISP-INIT: net_tx_sha256="),
        vec![sha256_hex(&from_guest)]
    );
    assert_eq!(
        lines_with(out, "WISP-INIT: net_rx_sha256="),
        vec![sha256_hex(&to_guest)]
    );

    // The ext4 disk: the guest saw the host's file, and its file is on the host's image.
    assert_eq!(
        lines_with(out, "WISP-INIT: disk_host_file="),
        vec!["written-by-the-host"]
    );
    assert_eq!(
        lines_with(out, "WISP-INIT: disk_vda_sectors="),
        vec![(32 * 2048).to_string()]
    );
    let copy = dir.join("guest.bin");
    run_ok(
        "debugfs",
        &[
            "-R",
            &format!("dump /guest.bin {}", copy.display()),
            ext4.to_str().unwrap(),
        ],
    );
    assert_eq!(
        lines_with(out, "WISP-INIT: disk_sha256="),
        vec![sha256_hex(&copy)]
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn", ext4.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // The qcow2 overlay: clean for qemu-img, the guest's bytes at 1 MiB, the base untouched.
    assert!(out.contains("WISP-INIT: disk_vdb_written"));
    let check = Command::new("qemu-img")
        .args(["check", overlay.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let flat = dir.join("flat.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            overlay.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&flat).unwrap();
    assert_eq!(&bytes[1 << 20..(1 << 20) + 21], b"wisp-guest-wrote-this");
    assert!(
        bytes[..1 << 20].iter().all(|&b| b == 0x5a),
        "backing data seen through the overlay"
    );
    assert!(
        std::fs::read(&base).unwrap().iter().all(|&b| b == 0x5a),
        "the backing file was written"
    );
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
