//! Tier 3: the test kernel's own virtio drivers against wisp's devices, in one boot:
//! - vda, a raw disk with an MBR partition table whose ext4 partition the guest mounts, reads
//!   the host's file from and writes its own (debugfs and e2fsck on the host);
//! - vdb, a large sparse raw disk the guest writes a pattern into, past 4 GiB too;
//! - vdc, a `readonly=on` disk whose writes the guest gets refused;
//! - vdd and vde, ext4 filesystems in qcow2 overlays over a raw and over a qcow2 base, mounted
//!   and written by the guest and judged by qemu-img (bases byte-identical afterwards);
//! - eth0 on a tap in a network namespace of the test's own, with DHCP (dnsmasq), ping and TCP
//!   transfers both ways, checksums compared on both ends; eth1 on a second tap carrying
//!   netconsole to a UDP listener. Each NIC's MAC is seen in the guest.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const TAP: &str = "wtap0";
const GUEST_MAC: &str = "52:54:00:aa:bb:01";
const TAP1: &str = "wtap1";
const TAP1_MAC: &str = "02:00:00:00:01:01";
const GUEST1_MAC: &str = "52:54:00:aa:bb:02";
/// Byte offsets the guest writes a pattern at on the sparse disk: the start, within the
/// first 4 GiB, and past 4 and 5 GiB (sector numbers over 32 bits of bytes).
const OFFSETS: [u64; 4] = [0, 3 << 30, (4 << 30) + 1536, (5 << 30) + 4096];
const SPARSE_SIZE: u64 = 6 << 30;

/// An ext4 image of `mib` MiB holding /host.txt with `text`.
fn ext4_with(dir: &std::path::Path, name: &str, text: &str, mib: u32) -> std::path::PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("host.txt"), format!("{text}\n")).unwrap();
    let img = dir.join(name);
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            // Zeroed here rather than by the guest's ext4lazyinit thread (slow on PVM).
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            root.to_str().unwrap(),
            img.to_str().unwrap(),
            &format!("{mib}M"),
        ],
    );
    img
}

/// /guest.bin out of an ext4 image (debugfs, no loop mount), and its checksum.
fn guest_file_sha(fs: &std::path::Path) -> String {
    let copy = fs.with_extension("guest.bin");
    run_ok(
        "debugfs",
        &[
            "-R",
            &format!("dump /guest.bin {}", copy.display()),
            fs.to_str().unwrap(),
        ],
    );
    sha256_hex(&copy)
}

fn assert_fsck_clean(fs: &std::path::Path) {
    let fsck = Command::new("e2fsck")
        .args(["-fn", fs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck {}: {}",
        fs.display(),
        String::from_utf8_lossy(&fsck.stdout)
    );
}

fn assert_qemu_img_check_clean(img: &std::path::Path) {
    let check = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check {}: {}",
        img.display(),
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn linux_uses_disks_and_network_through_wisp_devices() {
    if !kvm_available("linux_uses_disks_and_network_through_wisp_devices") {
        return;
    }
    // The slot first: the peer and DHCP server below time out on their own clocks, which
    // must not run while another Linux test holds the slot.
    let _slot = linux_boot_slot();
    // Guest kernel networking is interpreted on PVM: move less data there.
    let kib = if pvm_host() { 256 } else { 64 * 1024 };
    let dir = TestDir::new("linux-dev");

    // vda: a partitioned raw disk, ext4 in partition 1.
    let part_fs = ext4_with(&dir, "part.ext4", "written-by-the-host", 32);
    let vda = dir.join("vda.raw");
    mbr_disk(&part_fs, &vda, 0x5749_5350);
    let vda_sectors = std::fs::metadata(&vda).unwrap().len() / 512;
    // vdb: 6 GiB, sparse.
    let vdb = dir.join("vdb-sparse.raw");
    std::fs::File::create(&vdb)
        .unwrap()
        .set_len(SPARSE_SIZE)
        .unwrap();
    // vdc: read-only.
    let vdc = dir.join("vdc-ro.raw");
    std::fs::write(&vdc, vec![0xa5u8; 1 << 20]).unwrap();
    let vdc_sha = sha256_hex(&vdc);
    // vdd: ext4 in a qcow2 overlay over a raw base; vde: over a qcow2 base.
    let raw_base = ext4_with(&dir, "base.ext4", "from-the-raw-base", 32);
    let vdd = dir.join("over-raw.qcow2");
    let qcow_src = ext4_with(&dir, "qbase.ext4", "from-the-qcow2-base", 32);
    let qcow_base = dir.join("base.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            qcow_src.to_str().unwrap(),
            qcow_base.to_str().unwrap(),
        ],
    );
    let vde = dir.join("over-qcow2.qcow2");
    for (base, fmt, overlay) in [(&raw_base, "raw", &vdd), (&qcow_base, "qcow2", &vde)] {
        run_ok(
            wisp_bin(),
            &[
                "image",
                "create",
                "--backing",
                base.to_str().unwrap(),
                "--backing-format",
                fmt,
                overlay.to_str().unwrap(),
            ],
        );
    }
    let raw_base_sha = sha256_hex(&raw_base);
    let qcow_base_sha = sha256_hex(&qcow_base);

    let ns = TestNetns::new("t3dev");
    ns.add_tap(TAP, "10.0.0.1/24");
    ns.add_tap(TAP1, "10.0.1.1/24");
    ns.ip(&["link", "set", "dev", TAP1, "address", TAP1_MAC]);
    // netconsole's receiver on the second NIC's host end.
    let netlog = dir.join("netconsole.log");
    let mut udp = ns
        .command("python3")
        .args([
            "-c",
            &format!(
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('10.0.1.1', 6666))\nf = open('{}', 'ab', buffering=0)\n\
                 while True:\n    f.write(s.recv(65536))\n",
                netlog.display()
            ),
        ])
        .spawn()
        .expect("udp listener");
    let mut dnsmasq = ns.dnsmasq(TAP, "10.0.0.2", &dir);
    let peer = ns.tcp_peer("10.0.0.1", kib, &dir);

    let offsets: Vec<String> = OFFSETS.iter().map(|o| o.to_string()).collect();
    let cmdline = format!(
        "{LINUX_CMDLINE} ip=:::::eth0:dhcp \
         netconsole=6665@10.0.1.2/eth1,6666@10.0.1.1/{TAP1_MAC} \
         wisp.kmsg=1 wisp.scenario=info,disk,net,poweroff wisp.ext4=vda1,vdd,vde wisp.raw=vdb \
         wisp.offsets={} wisp.ro=vdc wisp.peer=10.0.0.1 wisp.nc_kib={kib}",
        offsets.join(",")
    );
    let kernel = image("vmlinux");
    let initrd = image("initramfs.cpio");
    let disks = [
        format!("path={},format=raw,serial=data", vda.display()),
        format!("path={},format=raw,serial=scratch", vdb.display()),
        format!(
            "path={},format=raw,readonly=on,serial=ro-disk",
            vdc.display()
        ),
        // Overlays the test made itself: their backing files are trusted (backing_files=on).
        format!("path={},format=qcow2,backing_files=on", vdd.display()),
        format!("path={},format=qcow2,backing_files=on", vde.display()),
    ];
    let mut cmd = ns.command(wisp_bin());
    cmd.args([
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
    ]);
    for d in &disks {
        cmd.args(["--disk", d]);
    }
    cmd.args(["--net", &format!("tap={TAP},mac={GUEST_MAC}")]);
    cmd.args(["--net", &format!("tap={TAP1},mac={GUEST1_MAC}")]);
    let f = Wisp::spawn_cmd(&mut cmd).wait_guest(Duration::from_secs(1500));
    let out = &f.stdout;
    // Guest-side timings, for the record (the guest kernel is interpreted on PVM).
    for key in ["net_tcp_seconds", "disk_vda1_mounted", "disk_vde_unmounted"] {
        eprintln!(
            "guest {key}: {:?}",
            lines_with(out, &format!("WISP-INIT: {key}"))
        );
    }
    assert_eq!(f.code(), Some(0), "console:\n{out}\nstderr:\n{}", f.stderr);
    assert_scenarios_ok(out, &["info", "disk", "net"]);
    assert!(out.contains("WISP-INIT: powering off"), "{out}");

    // DHCP through the tap, the MAC we gave.
    assert_dhcp_and_ping(out, GUEST_MAC);
    // TCP both ways, intact.
    peer.assert_intact(out);
    // Offloads were offered and taken: CSUM, GUEST_TSO4, HOST_TSO4 (bits 0, 7, 11).
    // The longest copy: an intact one (see assert_said).
    let features = said(out, "net_features_eth0");
    let features = [features
        .iter()
        .max_by_key(|f| f.len())
        .unwrap_or_else(|| panic!("no features line:\n{out}"))
        .as_str()];
    for bit in [0, 7, 11] {
        assert_eq!(
            features[0].as_bytes()[bit],
            b'1',
            "feature bit {bit}: {features:?}"
        );
    }

    // Two NICs, each with its MAC; netconsole carried kernel messages to the listener.
    assert_said(out, "net_mac_eth1", GUEST1_MAC);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let netlog_text = loop {
        let t = String::from_utf8_lossy(&std::fs::read(&netlog).unwrap_or_default()).to_string();
        if t.contains("WISP-NETCONSOLE: hello from the guest")
            || std::time::Instant::now() > deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = udp.kill();
    let _ = udp.wait();
    assert!(
        netlog_text.contains("WISP-NETCONSOLE: hello from the guest"),
        "netconsole listener got:\n{netlog_text}"
    );
    assert!(
        netlog_text.contains("IP-Config"),
        "kernel messages over netconsole:\n{netlog_text}"
    );

    // The kernel probed every disk with its capacity, and scanned vda's partition table.
    for (dev, sectors) in [
        ("vda", vda_sectors),
        ("vdb", SPARSE_SIZE / 512),
        ("vdc", 2048),
        ("vdd", 32 * 2048),
        ("vde", 32 * 2048),
    ] {
        assert!(
            out.contains(&format!("[{dev}] {sectors} 512-byte logical blocks")),
            "virtio_blk probe of {dev} ({sectors} sectors) not in the kernel log:\n{out}"
        );
        assert_said(out, &format!("disk_{dev}_sectors"), &sectors.to_string());
    }
    assert!(
        out.contains(" vda: vda1"),
        "no partition scan of vda:\n{out}"
    );
    assert_said(out, "disk_vda_partitions", "vda1");
    // Serials and the read-only flag as the guest's sysfs shows them.
    assert_said(out, "disk_vda_serial", "data");
    assert_said(out, "disk_vdb_serial", "scratch");
    assert_said(out, "disk_vdc_serial", "ro-disk");
    assert_said(out, "disk_vdc_ro", "1");
    assert_said(out, "disk_vda_ro", "0");

    // vda1: the guest saw the host's file, and its own file is in the partition.
    assert_said(out, "disk_vda1_host_file", "written-by-the-host");
    let part = dir.join("vda1.ext4");
    extract(
        &vda,
        2048 * 512,
        std::fs::metadata(&part_fs).unwrap().len(),
        &part,
    );
    assert_said(out, "disk_vda1_sha256", &guest_file_sha(&part));
    assert_fsck_clean(&part);

    // vdb: the pattern at every offset, past 4 GiB too; the file still sparse-sized.
    assert!(out.contains("WISP-INIT: disk_vdb_pattern_written"), "{out}");
    assert_eq!(std::fs::metadata(&vdb).unwrap().len(), SPARSE_SIZE);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&vdb).unwrap();
        for off in OFFSETS {
            let want = format!("wisp-pattern@{off}");
            let mut got = vec![0u8; want.len()];
            f.read_exact_at(&mut got, off).unwrap();
            assert_eq!(String::from_utf8_lossy(&got), want, "at offset {off}");
        }
    }

    // vdc: the guest's write was refused, the file is unchanged.
    assert!(out.contains("WISP-INIT: disk_vdc_write_refused"), "{out}");
    assert_eq!(sha256_hex(&vdc), vdc_sha, "the read-only disk changed");

    // vdd, vde: ext4 in qcow2 overlays. qemu-img finds them clean, the guest's files are in
    // them, the bases are byte-identical.
    for (dev, overlay, host_text) in [
        ("vdd", &vdd, "from-the-raw-base"),
        ("vde", &vde, "from-the-qcow2-base"),
    ] {
        assert_said(out, &format!("disk_{dev}_host_file"), host_text);
        assert_qemu_img_check_clean(overlay);
        let flat = dir.join(format!("{dev}.flat.ext4"));
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
        assert_said(out, &format!("disk_{dev}_sha256"), &guest_file_sha(&flat));
        assert_fsck_clean(&flat);
    }
    assert_eq!(
        sha256_hex(&raw_base),
        raw_base_sha,
        "the raw base was written"
    );
    assert_eq!(
        sha256_hex(&qcow_base),
        qcow_base_sha,
        "the qcow2 base was written"
    );
    assert_qemu_img_check_clean(&qcow_base);
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    drop(ns);
}
