//! Tier 3 through the control API, as a node agent drives it: the test kernel configured over
//! the socket with a root disk (an MBR-partitioned image, found by PARTUUID, no initramfs) and
//! a NIC with offloads turned off (wisp's `offload` extension), booted, running the same disk
//! and network scenarios as from the CLI; a second drive's medium changed with
//! `PATCH /drives` while the guest runs (its kernel sees the new size); then shut down
//! cleanly by `SendCtrlAltDel` (the i8042 key sequence, the kernel's keyboard driver, init's
//! SIGINT handler, poweroff). The metadata service as an agent uses it: `PUT /mmds/config`
//! (V2 on eth0) and `PUT /mmds` before boot, the guest's busybox fetching a session token and
//! its instance id, `PATCH /mmds` while it runs and the guest reading the new value. Also the
//! kernel's virtio_balloon driver through `/balloon`.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TAP: &str = "wtap0";
const GUEST_MAC: &str = "52:54:00:aa:bb:11";
const DISK_SIGNATURE: u32 = 0x7769_7370;

/// One API call with curl over the Unix socket; returns (status, body).
fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, &format!("http://localhost{path}")])
        .args(if body.is_empty() {
            vec![]
        } else {
            vec!["-H", "Content-Type: application/json", "-d", body]
        })
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn api_ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, answer) = api(sock, method, path, body);
    assert!(
        (200..300).contains(&status),
        "{method} {path} {body}: {status} {answer}"
    );
}

/// The scratch drive's bandwidth limit: a bucket of 512 KiB refilled every 500 ms (1 MiB/s).
const RL_BUCKET: u64 = 512 << 10;
/// What the guest writes to it (the whole 4 MiB drive).
const RL_KIB: u64 = 4096;

/// The guest's write to the rate-limited drive took at least as long as the limit allows: the
/// bucket's first 512 KiB pass at once, the rest at 1 MiB/s. Only the lower bound is checked
/// (a loaded host can only make it slower); 5% is left for the guest clock's granularity.
fn assert_rate_limited_write(out: &str) {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("WISP-INIT: ratelimit_kib="))
        .unwrap_or_else(|| panic!("no ratelimit line:\n{out}"));
    let (t0, t1) = line
        .split_once("seconds=")
        .and_then(|(_, t)| t.split_once('-'))
        .unwrap_or_else(|| panic!("bad ratelimit line {line}"));
    let seconds = t1.trim().parse::<f64>().unwrap() - t0.parse::<f64>().unwrap();
    let bytes_per_second = (RL_BUCKET * 2) as f64;
    let least = ((RL_KIB << 10) - RL_BUCKET) as f64 / bytes_per_second;
    assert!(
        seconds >= least * 0.95,
        "{RL_KIB} KiB through a 1 MiB/s limiter took {seconds:.2} s, under {least:.2} s"
    );
}

#[test]
fn linux_booted_through_the_api_shuts_down_on_ctrl_alt_del() {
    if !kvm_available("linux_booted_through_the_api_shuts_down_on_ctrl_alt_del") {
        return;
    }
    let kib = if pvm_host() { 256 } else { 64 * 1024 };
    let dir = TestDir::new("linux-api");

    // The root filesystem image in partition 1 of an MBR disk.
    let rootfs = image("rootfs.ext4");
    let disk = dir.join("root-disk.raw");
    mbr_disk(&rootfs, &disk, DISK_SIGNATURE);
    // The second drive: 4 MiB, later replaced by an 8 MiB medium.
    let scratch = dir.join("scratch-4m.raw");
    std::fs::write(&scratch, vec![0x11u8; 4 << 20]).unwrap();
    let scratch2 = dir.join("scratch-8m.raw");
    std::fs::write(&scratch2, vec![0x22u8; 8 << 20]).unwrap();

    let ns = TestNetns::new("t3api");
    ns.add_tap(TAP, "10.0.0.1/24");
    let mut dnsmasq = ns.dnsmasq(TAP, "10.0.0.2", &dir);
    let peer = ns.tcp_peer("10.0.0.1", kib, &dir);

    let _slot = linux_boot_slot();
    let sock = dir.join("api.sock");
    let (log, metrics) = (dir.join("fc.log"), dir.join("fc.metrics"));
    // Started as Firecracker's jailer and client libraries start Firecracker.
    let mut w = Wisp::spawn_cmd(ns.command(wisp_bin()).args([
        "--id",
        "linux-api",
        "--start-time-us",
        "0",
        "--start-time-cpu-us",
        "0",
        "--parent-cpu-time-us",
        "0",
        "--api-sock",
        sock.to_str().unwrap(),
        "--log-path",
        log.to_str().unwrap(),
        "--level",
        "Info",
        "--show-level",
        "--show-log-origin",
        "--metrics-path",
        metrics.to_str().unwrap(),
    ]));
    wait_api_socket(&sock);

    let boot_args = format!(
        "{LINUX_CMDLINE} ip=:::::eth0:dhcp \
         wisp.kmsg=1 wisp.scenario=info,rootfs,ratelimit,net,mmds,cad wisp.peer=10.0.0.1 wisp.nc_kib={kib} \
         wisp.rl_dev=vdb wisp.rl_kib={RL_KIB} wisp.mmds_expect=i-api-2"
    );
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
                 "is_read_only": false, "partuuid": "{DISK_SIGNATURE:08x}-01", "format": "raw"}}"#,
            disk.display()
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/drives/scratch",
        &format!(
            r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false,
                 "is_read_only": false,
                 "rate_limiter": {{"bandwidth": {{"size": {RL_BUCKET}, "refill_time": 500}}}}}}"#,
            scratch.display()
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        &format!(
            r#"{{"iface_id": "eth0", "host_dev_name": "{TAP}", "guest_mac": "{GUEST_MAC}",
                 "offload": false}}"#
        ),
    );
    // The metadata service on eth0, V2 (session tokens), and the instance's first document.
    api_ok(
        &sock,
        "PUT",
        "/mmds/config",
        r#"{"version": "V2", "network_interfaces": ["eth0"]}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"instance-id": "i-api-1", "local-ipv4": "10.0.0.2"}}}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );

    // The guest read the document; the agent changes it and the guest reads the new value
    // (the scenario polls until it does).
    w.wait_for("WISP-INIT: mmds_value=", Duration::from_secs(1500));
    api_ok(
        &sock,
        "PATCH",
        "/mmds",
        r#"{"latest": {"meta-data": {"instance-id": "i-api-2"}}}"#,
    );
    w.wait_for(
        "WISP-INIT: waiting for ctrl-alt-del",
        Duration::from_secs(1500),
    );
    let (status, info) = api(&sock, "GET", "/", "");
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    // A new medium for the second drive: the guest kernel is told (config change interrupt)
    // and reads the new capacity.
    api_ok(
        &sock,
        "PATCH",
        "/drives/scratch",
        &format!(
            r#"{{"drive_id": "scratch", "path_on_host": "{}"}}"#,
            scratch2.display()
        ),
    );
    w.wait_for(
        "[vdb] new size: 16384 512-byte logical blocks",
        Duration::from_secs(300),
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    let f = w.wait(Duration::from_secs(300));
    let out = &f.stdout;
    assert_eq!(f.code(), Some(0), "console:\n{out}\nstderr:\n{}", f.stderr);
    assert!(
        out.contains("WISP-INIT: ctrl-alt-del received, shutting down"),
        "{out}"
    );
    assert_scenarios_ok(out, &["info", "rootfs", "ratelimit", "net", "mmds"]);
    // MMDS: the token dance, the value before and after the PATCH, JSON on request.
    assert_said(out, "mmds_token_len", "64");
    assert_said(out, "mmds_value", "i-api-1");
    assert_said(out, "mmds_no_token", "refused");
    assert_said(
        out,
        "mmds_json",
        r#"{"instance-id":"i-api-1","local-ipv4":"10.0.0.2"}"#,
    );
    assert_said(out, "mmds_updated", "i-api-2");
    assert_rate_limited_write(out);

    // Firecracker's log and metrics: the VM's start logged with id, thread, level and origin;
    // the metrics lines (periodic and on exit) count the guest's network traffic.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(" [linux-api:main:INFO:") && l.contains("] VM started: ")),
        "{log}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "no metrics line");
    let total = |field: &str| -> u64 {
        lines
            .iter()
            .map(|m| m["net_eth0"][field].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(
        total("rx_packets_count") > 0 && total("tx_packets_count") > 0,
        "{lines:?}"
    );
    // Firecracker's mmds group counts the frames the guest sent to the MMDS.
    let mmds = |field: &str| -> u64 {
        lines
            .iter()
            .map(|m| m["mmds"][field].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(
        mmds("rx_accepted") > 0 && mmds("connections_created") >= 4 && mmds("rx_no_token") >= 1,
        "{lines:?}"
    );

    // The root filesystem is partition 1 of the drive (PARTUUID), read-write, no initramfs;
    // the guest's file is in it.
    assert!(out.contains(" vda: vda1"), "{out}");
    assert!(out.contains("[vdb] 8192 512-byte logical blocks"), "{out}");
    assert_said(out, "root_dev", "vda1");
    assert_said(out, "root_mode", "rw");
    let part = dir.join("root-part.ext4");
    assert_guest_root_file(&disk, &rootfs, &part);
    let fsck = Command::new("e2fsck")
        .args(["-fn", part.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck after the clean shutdown: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // The NIC: DHCP, the MAC given over the API, no offloads negotiated, TCP intact.
    assert_dhcp_and_ping(out, GUEST_MAC);
    // The longest copy: an intact one (see assert_said).
    let features = said(out, "net_features_eth0");
    let features = [features
        .iter()
        .max_by_key(|f| f.len())
        .unwrap_or_else(|| panic!("no features line:\n{out}"))
        .as_str()];
    for bit in [0, 1, 7, 8, 11, 12] {
        assert_eq!(
            features[0].as_bytes()[bit],
            b'0',
            "offload bit {bit} negotiated: {features:?}"
        );
    }
    assert_eq!(features[0].as_bytes()[15], b'1', "MRG_RXBUF: {features:?}");
    peer.assert_intact(out);

    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    drop(ns);
}

/// The test kernel through `wisp jail`, as a node agent written for Firecracker starts it:
/// uid 10123 in a network namespace (a tap owned by that uid) and a memory cgroup, the
/// kernel and the MBR root disk linked into the chroot, configured through the socket inside
/// it. From the host while the guest runs: the confinement; then the guest's root-disk write,
/// DHCP, ping and TCP both ways, a clean power off, and nothing left after the cleanup.
#[test]
fn linux_jailed_through_the_api_boots_confined() {
    const UID: u32 = 10123;
    const JAIL_TAP: &str = "wjltap0";
    if !kvm_available("linux_jailed_through_the_api_boots_confined") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped linux_jailed_through_the_api_boots_confined: the jailer needs root");
        return;
    }
    let kib = if pvm_host() { 256 } else { 64 * 1024 };
    let dir = TestDir::new("linux-jail");
    let base = dir.join("jails");
    std::fs::create_dir(&base).unwrap();
    let rootfs = image("rootfs.ext4");
    let disk = dir.join("root-disk.raw");
    mbr_disk(&rootfs, &disk, DISK_SIGNATURE);
    // The agent's own copy of the kernel: --link-in gives the linked file to the VM's user.
    let kernel = dir.join("vmlinux");
    std::fs::copy(image("vmlinux"), &kernel).unwrap();

    let ns = TestNetns::new("t3jail");
    let uid = UID.to_string();
    ns.ip(&[
        "tuntap", "add", "dev", JAIL_TAP, "mode", "tap", "user", &uid, "group", &uid,
    ]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", JAIL_TAP]);
    ns.ip(&["link", "set", JAIL_TAP, "up"]);
    let mut dnsmasq = ns.dnsmasq(JAIL_TAP, "10.0.0.2", &dir);
    let peer = ns.tcp_peer("10.0.0.1", kib, &dir);

    let _slot = linux_boot_slot();
    let mut jail = TestJail::new("linux", &base, &["memory"]);
    jail.wisp = Some(Wisp::spawn_cmd(
        Command::new(wisp_bin())
            .args(["jail", "--id", &jail.id, "--exec-file", wisp_bin()])
            .args(["--uid", &uid, "--gid", &uid])
            .arg("--chroot-base-dir")
            .arg(&base)
            .arg("--netns")
            .arg(format!("/run/netns/{}", ns.name))
            .args(["--cgroup", "memory.limit_in_bytes=1073741824"])
            .args(["--parent-cgroup", &jail.parent_cgroup])
            .arg("--link-in")
            .arg(format!("{}:/vmlinux", kernel.display()))
            .arg("--link-in")
            .arg(format!("{}:/disks/root.raw", disk.display()))
            .args(["--", "--api-sock", "/run/api.sock"]),
    ));
    let root = jail.root();
    let sock = root.join("run/api.sock");
    wait_api_socket(&sock);

    let boot_args = format!(
        "{LINUX_CMDLINE} ip=:::::eth0:dhcp \
         wisp.kmsg=1 wisp.scenario=info,rootfs,net wisp.peer=10.0.0.1 wisp.nc_kib={kib}"
    );
    api_ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "/vmlinux", "boot_args": "{boot_args}"}}"#),
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
            r#"{{"drive_id": "rootfs", "path_on_host": "/disks/root.raw", "is_root_device": true,
                 "is_read_only": false, "partuuid": "{DISK_SIGNATURE:08x}-01"}}"#
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        &format!(
            r#"{{"iface_id": "eth0", "host_dev_name": "{JAIL_TAP}", "guest_mac": "{GUEST_MAC}"}}"#
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let pid = jail.wisp.as_ref().unwrap().pid();
    // Confined while the guest runs, with every thread started and filtered.
    assert_jailed(pid, &root, UID);
    assert!(assert_every_thread_filtered(pid) >= 3);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let line = format!(":memory:/{}/{}", jail.parent_cgroup, jail.id);
    assert!(cgroups.lines().any(|l| l.ends_with(&line)), "{cgroups}");

    let f = jail.wisp.take().unwrap().wait(Duration::from_secs(1500));
    let out = &f.stdout;
    assert_eq!(f.code(), Some(0), "console:\n{out}\nstderr:\n{}", f.stderr);
    assert_scenarios_ok(out, &["info", "rootfs", "net"]);
    assert_said(out, "root_dev", "vda1");
    assert_guest_root_file(&disk, &rootfs, &dir.join("root-part.ext4"));
    assert_dhcp_and_ping(out, GUEST_MAC);
    peer.assert_intact(out);
    jail.assert_cleaned_up();

    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    drop(ns);
}

/// wisp's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
        << 10
}

/// `GET /balloon/statistics` until `done` holds (5 s apart, `timeout` in all).
fn balloon_stats_until(
    sock: &Path,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (status, body) = api(sock, "GET", "/balloon/statistics", "");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if done(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "balloon statistics still {v} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// The test kernel's own virtio_balloon driver: its memory statistics reach
/// `GET /balloon/statistics`, a target set with `PATCH /balloon` is met (the driver reports
/// `actual`) without wisp's resident memory growing (the pages it gives are dropped by the
/// host), and a target of 0 gives them back.
#[test]
fn linux_balloon_meets_its_target_and_reports_statistics() {
    if !kvm_available("linux_balloon_meets_its_target_and_reports_statistics") {
        return;
    }
    let dir = TestDir::new("linux-balloon");
    let _slot = linux_boot_slot();
    let sock = dir.join("api.sock");
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "balloon"]);
    wait_api_socket(&sock);
    api_ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{LINUX_CMDLINE} wisp.scenario=info,cad"}}"#,
            image("vmlinux").display(),
            image("initramfs.cpio").display()
        ),
    );
    api_ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    w.wait_for(
        "WISP-INIT: waiting for ctrl-alt-del",
        Duration::from_secs(1500),
    );

    // The driver's statistics: total memory as the guest counts it (less than 256 MiB:
    // the kernel's own), free memory.
    let s = balloon_stats_until(&sock, Duration::from_secs(300), |v| {
        v["total_memory"].is_u64() && v["free_memory"].is_u64()
    });
    let total = s["total_memory"].as_u64().unwrap();
    assert!((128 << 20..=256 << 20).contains(&total), "{s}");
    assert!(s["free_memory"].as_u64().unwrap() > 0, "{s}");

    let before = rss(w.pid());
    api_ok(&sock, "PATCH", "/balloon", r#"{"amount_mib": 64}"#);
    let s = balloon_stats_until(&sock, Duration::from_secs(600), |v| v["actual_mib"] == 64);
    assert_eq!(s["target_mib"], 64, "{s}");
    let after = rss(w.pid());
    assert!(
        after <= before + (8 << 20),
        "RSS grew from {} to {} MiB while the guest gave 64 MiB back",
        before >> 20,
        after >> 20
    );
    api_ok(&sock, "PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    balloon_stats_until(&sock, Duration::from_secs(600), |v| v["actual_mib"] == 0);

    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    let f = w.wait(Duration::from_secs(300));
    assert_eq!(
        f.code(),
        Some(0),
        "console:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert_scenarios_ok(&f.stdout, &["info"]);
}
