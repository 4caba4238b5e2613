//! Tier 3 through the control API, as a node agent drives it: the test kernel configured over
//! the socket with a root disk (an MBR-partitioned image, found by PARTUUID, no initramfs) and
//! a NIC with offloads turned off (wisp's `offload` extension), booted, running the same disk
//! and network scenarios as from the CLI; a second drive's medium changed with
//! `PATCH /drives` while the guest runs (its kernel sees the new size); then shut down
//! cleanly by `SendCtrlAltDel` (the i8042 key sequence, the kernel's keyboard driver, init's
//! SIGINT handler, poweroff). The metadata service as an agent uses it: `PUT /mmds/config`
//! (V2 on eth0) and `PUT /mmds` before boot, the guest's busybox fetching a session token and
//! its instance id, `PATCH /mmds` while it runs and the guest reading the new value. The same
//! boot has a vsock (`PUT /vsock`) and an entropy device (`PUT /entropy`): the host streams
//! bytes into a guest listener through `CONNECT <port>` on `uds_path`, and takes the guest's
//! stream at `<uds_path>_<port>`. Also the kernel's virtio_balloon driver through `/balloon`.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// The guest's vsock CID, the port its vsockio listens on, and the host port it connects to
/// (a listener of the test's at `<uds_path>_5001`).
const VSOCK_CID: u32 = 7;
const VSOCK_GUEST_PORT: u32 = 5000;
const VSOCK_HOST_PORT: u32 = 5001;
/// How long one side of a vsock stream may wait for the other (the guest is interpreted).
const VSOCK_T: Duration = Duration::from_secs(300);

/// vsockio's test pattern (images/init/vsockio.c): the top byte of each state of the 32-bit
/// LCG x = x * 1664525 + 1013904223 from x = 1.
fn vsockio_pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 1;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// Bytes for the guest that vsockio's pattern does not produce (xorshift64).
fn other_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Host -> guest, as a node agent reaches its guest agent: connect to wisp's `uds_path`, say
/// `CONNECT <port>`, read `OK <host port>`, stream `data` and close the writing side; the guest
/// closes once it has everything, which ends the host's read. Returns the host port of `OK`.
fn vsock_stream_to_guest(uds: &Path, port: u32, data: &[u8]) -> u32 {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(VSOCK_T)).unwrap();
    s.set_write_timeout(Some(VSOCK_T)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    let host_port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {ok:?}"));
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("the guest's close within the timeout");
    assert!(rest.is_empty(), "the guest sent {} bytes back", rest.len());
    host_port
}

/// Guest -> host: the guest's connection to the host port, taken from `listener` (polled, so a
/// guest that never connects fails the test instead of hanging it), read to its end.
fn vsock_stream_from_guest(listener: &UnixListener) -> Vec<u8> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + VSOCK_T;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the guest did not connect within {VSOCK_T:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(VSOCK_T)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("the guest's stream and its end within the timeout");
    got
}

#[test]
fn linux_booted_through_the_api_shuts_down_on_ctrl_alt_del() {
    if !kvm_available("linux_booted_through_the_api_shuts_down_on_ctrl_alt_del") {
        return;
    }
    // The slot first: the peer and DHCP server below time out on their own clocks, which
    // must not run while another Linux test holds the slot.
    let _slot = linux_boot_slot();
    let kib = if pvm_host() { 256 } else { 64 * 1024 };
    // Each vsock stream (the guest keeps what it receives in its 48 MiB root filesystem).
    let vsock_kib = if pvm_host() { 256 } else { 8 * 1024 };
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

    // The guest's connection to the host's port VSOCK_HOST_PORT lands here.
    let uds = dir.join("v.sock");
    let from_guest = UnixListener::bind(format!("{}_{VSOCK_HOST_PORT}", uds.display())).unwrap();
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
         wisp.kmsg=1 wisp.scenario=info,entropy,rootfs,ratelimit,net,mmds,vsock,cad \
         wisp.peer=10.0.0.1 wisp.nc_kib={kib} wisp.rl_dev=vdb wisp.rl_kib={RL_KIB} \
         wisp.mmds_expect=i-api-2 wisp.vsock_port={VSOCK_GUEST_PORT} \
         wisp.vsock_host_port={VSOCK_HOST_PORT} wisp.vsock_kib={vsock_kib}"
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
        "/vsock",
        &format!(
            r#"{{"guest_cid": {VSOCK_CID}, "uds_path": "{}"}}"#,
            uds.display()
        ),
    );
    api_ok(&sock, "PUT", "/entropy", "{}");
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );

    // The guest read the document (its value, then as JSON); the agent changes it and the
    // guest reads the new value (the scenario polls until it does). A PATCH sent at the value
    // raced the JSON read.
    w.wait_for_guest("WISP-INIT: mmds_json=", Duration::from_secs(1500));
    api_ok(
        &sock,
        "PATCH",
        "/mmds",
        r#"{"latest": {"meta-data": {"instance-id": "i-api-2"}}}"#,
    );

    // vsock both ways while the guest's init runs its vsock scenario.
    w.wait_for_guest(
        &format!("vsockio: listening on {VSOCK_GUEST_PORT}"),
        Duration::from_secs(1500),
    );
    let to_guest = other_bytes((vsock_kib * 1024) as usize);
    let ok_port = vsock_stream_to_guest(&uds, VSOCK_GUEST_PORT, &to_guest);
    let got = vsock_stream_from_guest(&from_guest);
    let want = vsockio_pattern((vsock_kib * 1024) as usize);
    assert_eq!(got.len(), want.len(), "bytes from the guest");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("the guest's stream differs from byte {i} on");
    }

    w.wait_for_guest(
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
    w.wait_for_guest(
        "[vdb] new size: 16384 512-byte logical blocks",
        Duration::from_secs(300),
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    let f = w.wait_guest(Duration::from_secs(300));
    let out = &f.stdout;
    assert_eq!(f.code(), Some(0), "console:\n{out}\nstderr:\n{}", f.stderr);
    assert!(
        out.contains("WISP-INIT: ctrl-alt-del received, shutting down"),
        "{out}"
    );
    assert_scenarios_ok(
        out,
        &[
            "info",
            "entropy",
            "rootfs",
            "ratelimit",
            "net",
            "mmds",
            "vsock",
        ],
    );
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
    // PUT /entropy: the kernel's hw_random core took the virtio-rng device.
    assert_said(out, "rng_current", "virtio_rng.0");
    // PUT /vsock: the guest's CID, and the bytes the host sent as the guest counted them.
    assert!(
        ok_port >= 1 << 30,
        "OK {ok_port}: not one of wisp's local ports"
    );
    assert_said(out, "vsock_cid", &VSOCK_CID.to_string());
    assert_said(out, "vsock_rx_bytes", &to_guest.len().to_string());
    let to_guest_file = dir.join("vsock-to-guest.bin");
    std::fs::write(&to_guest_file, &to_guest).unwrap();
    assert_said(out, "vsock_rx_sha256", &sha256_hex(&to_guest_file));

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
    // The slot first: the peer and DHCP server below time out on their own clocks, which
    // must not run while another Linux test holds the slot.
    let _slot = linux_boot_slot();
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

    let f = jail
        .wisp
        .take()
        .unwrap()
        .wait_guest(Duration::from_secs(1500));
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
    w.wait_for_guest(
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
    let f = w.wait_guest(Duration::from_secs(300));
    assert_eq!(
        f.code(),
        Some(0),
        "console:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert_scenarios_ok(&f.stdout, &["info"]);
}
