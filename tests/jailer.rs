//! `wisp jail` as a node agent written for Firecracker uses it: started through a `jailer`
//! symlink as uid 10123 in a network namespace the test creates (with a tap owned by that
//! uid) and in cgroups of the test's own, with the kernel and a raw disk linked into the
//! chroot, configured and started through the API socket inside the chroot. From the host:
//! the process's root, ids, capabilities, no_new_privs, every thread's seccomp filter,
//! cgroups, network namespace and descriptors; the probe guest's disk round trip (in the host file) and network traffic
//! (on the tap). Then `wisp jail --cleanup` removes everything the jailer made; the guards
//! do the same when a test fails. Every refusal of bad input, with nothing made.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UID: u32 = 10123;
const T: Duration = Duration::from_secs(60);
const TAP: &str = "wjtap0";
const GUEST_MAC: &str = "52:54:00:12:34:99";

fn can_run(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped {test}: the jailer needs root");
        return false;
    }
    if !Path::new("/sys/fs/cgroup/cpuset/cpuset.cpus").exists()
        || !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
    {
        assert!(
            std::env::var("WISP_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: cgroup v1 cpuset and memory hierarchies are needed and WISP_REQUIRE_KVM=1"
        );
        eprintln!("skipped {test}: no cgroup v1 cpuset and memory hierarchies");
        return false;
    }
    true
}

const CONTROLLERS: [&str; 2] = ["cpuset", "memory"];

fn inode(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.dev(), m.ino())
}

fn api_ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, answer) = api_call(sock, method, path, Some(body));
    assert!(
        (200..300).contains(&status),
        "{method} {path} {body}: {status} {answer}"
    );
}

/// The probe's disk pattern (tests/guests/README.md): the little-endian word at byte `o` is
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

#[test]
fn jailed_probe_guest_runs_confined_and_is_cleaned_up() {
    if !can_run("jailed_probe_guest_runs_confined_and_is_cleaned_up") {
        return;
    }
    let dir = TestDir::new("jail-probe");
    let base = dir.join("jails");
    std::fs::create_dir(&base).unwrap();
    let ns = TestNetns::new("jail");
    let uid = UID.to_string();
    ns.ip(&[
        "tuntap", "add", "dev", TAP, "mode", "tap", "user", &uid, "group", &uid,
    ]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    let netns = PathBuf::from(format!("/run/netns/{}", ns.name));

    // The node agent's files: its own copy of the kernel and the VM's disk.
    let kernel = dir.join("probe.elf");
    std::fs::copy(&probes().probe, &kernel).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    // The log file the agent made, given to the VMM (the jail has no /proc for wisp's
    // usual re-open of an existing log file).
    let log = dir.join("wisp.log");
    std::fs::write(&log, b"").unwrap();
    // Started as Firecracker's jailer, through a symlink of that name.
    let jailer = dir.join("jailer");
    std::os::unix::fs::symlink(wisp_bin(), &jailer).unwrap();
    // A descriptor the caller leaked to the jailer (no close-on-exec): it must not reach
    // the VMM.
    let leaked = std::fs::File::create(dir.join("leaked")).unwrap();

    let mut guard = TestJail::new("probe", &base, &CONTROLLERS);
    let mut cmd = Command::new(&jailer);
    cmd.args(["--id", &guard.id, "--exec-file", wisp_bin()])
        .args(["--uid", &uid, "--gid", &uid])
        .arg("--chroot-base-dir")
        .arg(&base)
        .arg("--netns")
        .arg(&netns)
        .args(["--cgroup", "cpuset.cpus=0"])
        .args(["--cgroup", "memory.limit_in_bytes=268435456"])
        .args(["--parent-cgroup", &guard.parent_cgroup])
        .args(["--resource-limit", "no-file=1024"])
        .arg("--link-in")
        .arg(format!("{}:/probe.elf", kernel.display()))
        .arg("--link-in")
        .arg(format!("{}:/disks/vm.raw", disk.display()))
        .arg("--link-in")
        .arg(format!("{}:/logs/wisp.log", log.display()))
        .args(["--", "--api-sock", "/run/api.sock"])
        .args(["--log-path", "/logs/wisp.log", "--level", "Info"]);
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = leaked.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; the new descriptor 50 has no close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 50) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    guard.wisp = Some(Wisp::spawn_cmd(&mut cmd));
    let root = guard.root();
    let sock = root.join("run/api.sock");
    wait_api_socket(&sock);
    let pid = guard.wisp.as_ref().unwrap().pid();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));

    // The process: its root is the chroot, it is uid/gid 10123 with no capability left and
    // no_new_privs, in the jail's cgroups and the test's network namespace.
    assert_jailed(pid, &root, UID);
    // The cleanup refuses to pull the jail from under a running VMM.
    let early = guard.cleanup();
    let err = String::from_utf8_lossy(&early.stderr);
    assert!(
        !early.status.success() && err.contains(&format!("process {pid} still runs in")),
        "{err}"
    );
    assert!(sock.exists());
    let cgroups = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
    for c in CONTROLLERS {
        let line = format!(":{c}:/{}/{}", guard.parent_cgroup, guard.id);
        assert!(
            cgroups.lines().any(|l| l.ends_with(&line)),
            "{line} not in\n{cgroups}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory/{}/{}/memory.limit_in_bytes",
            guard.parent_cgroup, guard.id
        ))
        .unwrap()
        .trim(),
        "268435456"
    );
    assert_eq!(
        std::fs::metadata(proc_dir.join("ns/net")).unwrap().ino(),
        std::fs::metadata(&netns).unwrap().ino()
    );
    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().filter(|w| *w == "1024").count() == 2),
        "{limits}"
    );
    // No descriptor the jailer's caller left open.
    assert!(!proc_dir.join("fd/50").exists());
    for fd in std::fs::read_dir(proc_dir.join("fd")).unwrap().flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(!target.ends_with("leaked"), "{:?} -> {target:?}", fd.path());
    }
    // Inside: the exec file, the device nodes of the VM's user, the linked files.
    let dev = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!(
        (dev.uid(), dev.gid(), dev.rdev()),
        (UID, UID, libc::makedev(10, 232))
    );
    let tun = std::fs::metadata(root.join("dev/net/tun")).unwrap();
    assert_eq!((tun.uid(), tun.rdev()), (UID, libc::makedev(10, 200)));
    assert_eq!(inode(&root.join("disks/vm.raw")), inode(&disk));
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), UID);

    // wisp's own per-vCPU cgroup cannot work in the jail: refused, saying why.
    let (code, body) = api_call(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "cgroup": {"parent": "x"}}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not available inside `wisp jail`"), "{body}");

    // Configured as a node agent does, with paths inside the chroot.
    api_ok(
        &sock,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/probe.elf", "boot_args": "probe.scenario=blk-net probe.seed=5 probe.pings=3 probe.serve_ms=60000 probe.burst=100"}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/drives/vm",
        r#"{"drive_id": "vm", "path_on_host": "/disks/vm.raw", "is_root_device": false, "is_read_only": false}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        &format!(r#"{{"iface_id": "eth0", "host_dev_name": "{TAP}", "guest_mac": "{GUEST_MAC}"}}"#),
    );
    api_ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    api_ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let w = guard.wisp.as_mut().unwrap();
    w.wait_for("probe: net ready\n", T);
    // Every thread (main, API, vCPU, console) under its seccomp filter.
    let threads = assert_every_thread_filtered(pid);
    assert!(threads >= 3, "{threads} threads");
    let ping = ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "5", "10.0.0.2"])
        .output()
        .unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && ping_out.contains("3 packets transmitted, 3 received"),
        "ping: {ping_out}\nconsole:\n{}",
        w.stdout()
    );
    let f = guard.wisp.take().unwrap().wait(T);
    assert_eq!(
        f.code(),
        Some(0),
        "console:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    for line in [
        "probe: blk write ok",
        "probe: blk flush ok",
        "probe: blk readback ok",
        "probe: net link up",
        "probe: net answered 3",
        "probe: net burst sent 100",
        "probe: done blk-net",
    ] {
        assert!(
            f.stdout.contains(&format!("{line}\n")),
            "missing {line:?}:\n{}",
            f.stdout
        );
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains(&format!("[{}:main] Running wisp v", guard.id)),
        "{log}"
    );
    // The guest's writes are in the host's file (the chroot's link to it).
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(data[4096..4096 + 65536], pattern(4096, 65536, 5)[..]);
    // Its frames reached the tap: ARP, the ping replies and the UDP burst.
    let rx: u64 = ns
        .command("cat")
        .arg(format!("/sys/class/net/{TAP}/statistics/rx_packets"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
        .unwrap();
    assert!(rx >= 100 + 3, "tap received {rx} frames");

    // Everything the jailer made goes with the cleanup.
    guard.assert_cleaned_up();
    assert_eq!(std::fs::read_dir(base.join("wisp")).unwrap().count(), 0);
}

#[test]
fn new_pid_ns_and_daemonize_leave_the_vmm_as_pid_1_of_its_own_session() {
    if !can_run("new_pid_ns_and_daemonize_leave_the_vmm_as_pid_1_of_its_own_session") {
        return;
    }
    let dir = TestDir::new("jail-pidns");
    let base = dir.join("jails");
    std::fs::create_dir(&base).unwrap();
    let uid = UID.to_string();
    let guard = TestJail::new("pidns", &base, &CONTROLLERS);
    // The jailer forks: the VMM is not its caller's child, so it is found by its pid file.
    let jailer = Command::new(wisp_bin())
        .args(["jail", "--id", &guard.id, "--exec-file", wisp_bin()])
        .args(["--uid", &uid, "--gid", &uid])
        .arg("--chroot-base-dir")
        .arg(&base)
        .args(["--cgroup", "cpuset.cpus=0"])
        .args(["--parent-cgroup", &guard.parent_cgroup])
        .args([
            "--new-pid-ns",
            "--daemonize",
            "--",
            "--api-sock",
            "/api.sock",
        ])
        .output()
        .unwrap();
    assert!(
        jailer.status.success(),
        "{}",
        String::from_utf8_lossy(&jailer.stderr)
    );
    let root = guard.root();
    wait_api_socket(&root.join("api.sock"));
    let pid: i32 = std::fs::read_to_string(root.join("wisp.pid"))
        .unwrap()
        .parse()
        .unwrap();
    // Killed at the end of the test whatever happens: the guard cannot, it is no child.
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signals the VMM this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let kill = Kill(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // Its pid in the host's namespace, then 1 in its own.
    assert_eq!(status_field(&status, "NSpid"), format!("{pid}\t1"));
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    // A session of its own (the jailer's, made before the fork), stdio on /dev/null.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // SAFETY: getsid(0) asks for the caller's own session.
    let our_session = unsafe { libc::getsid(0) };
    assert_ne!(after_comm[3], our_session.to_string(), "session id: {stat}");
    for fd in 0..3 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(),
            Path::new("/dev/null")
        );
    }
    // Stopped as a node agent stops it; then nothing is left.
    // SAFETY: signals the VMM this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + T;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "wisp did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(kill);
    guard.assert_cleaned_up();
}

/// `wisp jail` with the required flags (unless `extra` gives them) and `extra`.
fn jail_refusal(base: &Path, extra: &[&str]) -> String {
    let base_s = base.to_str().unwrap();
    let mut args = vec!["jail"];
    for (flag, value) in [
        ("--id", "bad-input"),
        ("--exec-file", wisp_bin()),
        ("--uid", "10123"),
        ("--gid", "10123"),
        ("--chroot-base-dir", base_s),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let out = Command::new(wisp_bin()).args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("wisp: error: "), "{err}");
    err
}

#[test]
fn bad_jailer_input_is_refused_in_one_line_and_nothing_is_made() {
    let dir = TestDir::new("jail-bad");
    let base = dir.join("jails");
    std::fs::create_dir(&base).unwrap();
    let link = dir.join("jails-link");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    let ok_file = dir.join("file");
    std::fs::write(&ok_file, b"x").unwrap();
    let escape = format!("{}:../../x", ok_file.display());
    for (extra, expected) in [
        (&["--id", "../x"][..], "--id: \"../x\" is not a valid id"),
        (&["--id", "a/b"], "is not a valid id"),
        (&["--id", "a b"], "is not a valid id"),
        (
            &["--exec-file", "/nonexistent/wisp"],
            "--exec-file: /nonexistent/wisp",
        ),
        (&["--exec-file", "/tmp"], "is not a regular file"),
        (&["--uid", "0"], "--uid 0 is root"),
        (&["--gid", "0"], "--gid 0 is root"),
        (
            &["--netns", "/run/netns/wisp-no-such-netns"],
            "--netns: /run/netns/wisp-no-such-netns",
        ),
        (
            &["--cgroup-version", "3"],
            "--cgroup-version: \"3\" is not 1 or 2",
        ),
        (
            &["--cgroup", "cpu/../../../tasks=1"],
            "may not contain '/' or '..'",
        ),
        (&["--cgroup", "..cpu.max=1"], "may not contain '/' or '..'"),
        (&["--parent-cgroup", "../x"], "--parent-cgroup"),
        (
            &["--cgroup", "nosuch.file=1"],
            "--cgroup: controller `nosuch` is not available in cgroup v1",
        ),
        (
            &["--chroot-base-dir", link.to_str().unwrap()],
            "is a symbolic link",
        ),
        (&["--resource-limit", "stack=1"], "unknown resource"),
        (&["--link-in", &escape], "no '..'"),
    ] {
        let err = jail_refusal(&base, extra);
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(&base).unwrap().count(),
        0,
        "something was made"
    );
    // Missing required flags.
    let out = Command::new(wisp_bin())
        .args(["jail", "--uid", "1"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "wisp: error: --id is required"
    );
    // The same checks through the `jailer` name, which also answers --version as
    // Firecracker's does.
    let jailer = dir.join("jailer");
    std::os::unix::fs::symlink(wisp_bin(), &jailer).unwrap();
    let out = Command::new(&jailer).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("wisp jailer v"),
        "{out:?}"
    );
    let out = Command::new(&jailer)
        .args([
            "--id",
            "x",
            "--exec-file",
            wisp_bin(),
            "--uid",
            "0",
            "--gid",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("wisp: error: --uid 0 is root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
