//! Seccomp filters on every thread: a call outside a thread's filter kills wisp with SIGSYS
//! and a line naming the thread and the call (through the WISP_SECCOMP_SELFTEST test hook,
//! which makes the named thread call execve right after installing its filter); every thread
//! of a running VM is filtered, and none is with --seccomp-level 0; bad levels are refused.

mod common;
use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wisp-seccomp-{}-{name}.sock", std::process::id()))
}

/// wisp with `env` set and no core dump (a SIGSYS death would otherwise write one the size
/// of the guest's memory).
fn wisp_cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(wisp_bin());
    cmd.args(args).env_remove("WISP_SECCOMP_SELFTEST");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: setrlimit is async-signal-safe and only changes the child's own limit.
    unsafe {
        cmd.pre_exec(|| {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A probe guest that waits (in HLT) for ctrl-alt-del.
fn probe_args() -> Vec<String> {
    [
        "run",
        "--kernel",
        probes().probe.to_str().unwrap(),
        "--cmdline",
        "probe.scenario=ctrl-alt-del",
        "--memory",
        "64M",
        "--cpus",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

/// The same guest from a Firecracker config file, with metrics (so that the metrics thread
/// runs): the arguments of `wisp --no-api --config-file F --metrics-path M`.
fn probe_with_metrics(dir: &TestDir) -> Vec<String> {
    let config = dir.join("vm.json");
    let metrics = dir.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    let body = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}",
                              "boot_args": "probe.scenario=ctrl-alt-del"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64}}}}"#,
        probes().probe.display()
    );
    std::fs::write(&config, body).unwrap();
    vec![
        "--no-api".into(),
        "--config-file".into(),
        config.to_str().unwrap().into(),
        "--metrics-path".into(),
        metrics.to_str().unwrap().into(),
    ]
}

fn assert_killed_by_seccomp(f: &Finished, kind: &str) {
    assert_eq!(
        f.status.signal(),
        Some(libc::SIGSYS),
        "{kind}: {:?}\nstderr:\n{}",
        f.status,
        f.stderr
    );
    let line = format!(
        "wisp: seccomp: the {kind} thread made a system call its filter does not allow: \
         execve (59); killed by SIGSYS"
    );
    assert!(
        f.stderr.lines().any(|l| l == line),
        "{kind}: no line {line:?} in stderr:\n{}",
        f.stderr
    );
}

/// The threads of a VM run with `wisp run`: main (the event loop), the vCPUs, the console
/// writer and the metrics writer. Each makes a denied call and the process dies of it.
#[test]
fn a_denied_call_on_each_vm_thread_kills_wisp_naming_thread_and_call() {
    if !kvm_available("a_denied_call_on_each_vm_thread_kills_wisp_naming_thread_and_call") {
        return;
    }
    let dir = TestDir::new("seccomp-selftest");
    let args = probe_with_metrics(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for kind in ["main", "vcpu", "console", "metrics"] {
        for level in ["1", "2"] {
            let mut a = args.clone();
            a.extend(["--seccomp-level", level]);
            let f = Wisp::spawn_cmd(&mut wisp_cmd(&a, &[("WISP_SECCOMP_SELFTEST", kind)])).wait(T);
            assert_killed_by_seccomp(&f, kind);
        }
    }
    // With no filters the hook's execve fails harmlessly and the guest runs: here it boots
    // and waits for ctrl-alt-del until stopped.
    let args = probe_args();
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--seccomp-level", "0"]);
    let mut w = Wisp::spawn_cmd(&mut wisp_cmd(&a, &[("WISP_SECCOMP_SELFTEST", "vcpu")]));
    w.wait_for("probe: waiting for ctrl-alt-del", T);
    w.signal(libc::SIGTERM);
    let f = w.wait(T);
    assert_eq!(f.code(), Some(128 + libc::SIGTERM), "{}", f.stderr);
}

/// The API threads: the acceptor dies before it accepts anything, a connection thread as it
/// starts to read its request.
#[test]
fn a_denied_call_on_each_api_thread_kills_wisp_naming_thread_and_call() {
    let sock = sock_path("api");
    let f = Wisp::spawn_cmd(&mut wisp_cmd(
        &["--api-sock", sock.to_str().unwrap()],
        &[("WISP_SECCOMP_SELFTEST", "api")],
    ))
    .wait(T);
    assert_killed_by_seccomp(&f, "api");

    let sock = sock_path("conn");
    let w = Wisp::spawn_cmd(&mut wisp_cmd(
        &["--api-sock", sock.to_str().unwrap()],
        &[("WISP_SECCOMP_SELFTEST", "api-conn")],
    ));
    // The first connection that gets through starts the connection thread that dies.
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Ok(mut s) = UnixStream::connect(&sock) {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the API socket never accepted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let f = w.wait(T);
    assert_killed_by_seccomp(&f, "api-conn");
    let _ = std::fs::remove_file(&sock);
}

/// (comm, Seccomp, NoNewPrivs) of each of wisp's own threads. Kernel workers KVM attaches to
/// the VM's process (kvm-nx-lpage-recovery) are not wisp's and are left out, and so is a
/// thread that ends while it is read (an earlier request's connection thread).
fn thread_modes(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(task) = task else { continue };
        let dir = task.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let comm = comm.trim().to_string();
        if !comm.starts_with("wisp") {
            continue;
        }
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((comm, field("Seccomp:"), field("NoNewPrivs:")));
    }
    out.sort();
    out
}

fn start_probe_over_api(w: &mut Wisp, sock: &Path, dir: &TestDir) {
    wait_api_socket(sock);
    let metrics = dir.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    let body = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(api_call(sock, "PUT", "/metrics", Some(&body)).0, 204);
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=ctrl-alt-del"}}"#,
        probes().probe.display()
    );
    assert_eq!(api_call(sock, "PUT", "/boot-source", Some(&body)).0, 204);
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 64}"#;
    assert_eq!(
        api_call(sock, "PUT", "/machine-config", Some(machine)).0,
        204
    );
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(api_call(sock, "PUT", "/actions", Some(start)).0, 204);
    w.wait_for("probe: waiting for ctrl-alt-del", T);
}

/// Every thread of a running VM (the API's included, with a connection open) runs in
/// seccomp filter mode with no_new_privs; with --seccomp-level 0 none does. The guest then
/// powers off on ctrl-alt-del, which goes through the filtered API and main threads.
#[test]
fn every_thread_of_a_running_vm_is_filtered_unless_level_0() {
    if !kvm_available("every_thread_of_a_running_vm_is_filtered_unless_level_0") {
        return;
    }
    for (level, seccomp, nnp) in [("2", "2", "1"), ("1", "2", "1"), ("0", "0", "0")] {
        let sock = sock_path(&format!("proc{level}"));
        let mut w = Wisp::spawn_cmd(&mut wisp_cmd(
            &[
                "--api-sock",
                sock.to_str().unwrap(),
                "--seccomp-level",
                level,
            ],
            &[],
        ));
        let dir = TestDir::new(&format!("seccomp-proc{level}"));
        start_probe_over_api(&mut w, &sock, &dir);
        // An open connection with half a request keeps a connection thread waiting.
        let mut conn = UnixStream::connect(&sock).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let deadline = std::time::Instant::now() + T;
        let mut modes = thread_modes(w.pid());
        while !modes.iter().any(|(c, _, _)| c == "wisp-api-conn") {
            assert!(
                std::time::Instant::now() < deadline,
                "no connection thread: {modes:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
            modes = thread_modes(w.pid());
        }
        let comms: Vec<&str> = modes.iter().map(|(c, _, _)| c.as_str()).collect();
        for expected in [
            "wisp",
            "wisp-api",
            "wisp-api-conn",
            "wisp-console",
            "wisp-metrics",
            "wisp-vcpu0",
            "wisp-vcpu1",
        ] {
            assert!(comms.contains(&expected), "{expected} missing: {modes:?}");
        }
        for (comm, s, n) in &modes {
            assert_eq!(
                (s.as_str(), n.as_str()),
                (seccomp, nnp),
                "level {level}: {comm}: {modes:?}"
            );
        }
        drop(conn);
        let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
        assert_eq!(api_call(&sock, "PUT", "/actions", Some(cad)).0, 204);
        let f = w.wait(T);
        assert_eq!(f.code(), Some(0), "level {level}: {}", f.stderr);
        assert!(f.stdout.contains("probe: ctrl-alt-del"), "{}", f.stdout);
    }
}

/// SIGUSR1's register dump (the vCPU reads its registers under its filter), then a clean stop
/// on SIGTERM: the way out (vCPU stop, disk write-back, cgroup and socket removal) runs under
/// the main thread's filter.
#[test]
fn register_dump_and_clean_stop_run_under_the_filters() {
    if !kvm_available("register_dump_and_clean_stop_run_under_the_filters") {
        return;
    }
    let dir = TestDir::new("seccomp-dump");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let args = probe_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--disk", &disk_arg]);
    let mut w = Wisp::spawn_cmd(&mut wisp_cmd(&args, &[]));
    w.wait_for("probe: waiting for ctrl-alt-del", T);
    w.signal(libc::SIGUSR1);
    let deadline = std::time::Instant::now() + T;
    while !(w.stderr().contains("vcpu0: rip ") && w.stderr().contains("vcpu1: rip ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no register dump:\n{}",
            w.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w.signal(libc::SIGTERM);
    let f = w.wait(T);
    assert_eq!(f.code(), Some(128 + libc::SIGTERM), "{}", f.stderr);
    assert!(!f.stderr.contains("seccomp"), "{}", f.stderr);
}

/// Bad levels and the flags wisp cannot honour: one line each, status 1, naming the flag.
#[test]
fn bad_seccomp_flags_get_one_line_errors() {
    let run = |args: &[&str]| Wisp::spawn_cmd(&mut wisp_cmd(args, &[])).wait(T);
    for (args, expected) in [
        (
            &["run", "--kernel", "/k", "--seccomp-level", "7"][..],
            "wisp: error: --seccomp-level: invalid seccomp level '7': 0 (no filters), 1",
        ),
        (
            &["run", "--kernel", "/k", "--seccomp-level", "-1"],
            "wisp: error: --seccomp-level: invalid seccomp level '-1'",
        ),
        (
            &["run", "--kernel", "/k", "--seccomp-level", ""],
            "wisp: error: --seccomp-level: invalid seccomp level ''",
        ),
        (
            &["--seccomp-level", "3", "--no-api", "--config-file", "/c"],
            "wisp: error: --seccomp-level: invalid seccomp level '3'",
        ),
        (
            &["--seccomp-level", "two"],
            "wisp: error: --seccomp-level: invalid seccomp level 'two'",
        ),
        (
            &["--seccomp-filter", "/tmp/f.bpf"],
            "wisp: error: --seccomp-filter: wisp does not load compiled BPF files",
        ),
        (
            &["--no-seccomp", "--seccomp-level", "2"],
            "wisp: error: --no-seccomp: --no-seccomp and --seccomp-level exclude each other",
        ),
    ] {
        let f = run(args);
        assert_eq!(f.code(), Some(1), "{args:?}: {}", f.stderr);
        assert_eq!(f.stderr.lines().count(), 1, "{args:?}: {}", f.stderr);
        assert!(f.stderr.starts_with(expected), "{args:?}: {}", f.stderr);
    }
    // The hook names a thread kind wisp has, or wisp refuses to start.
    let hello = probes().hello.to_str().unwrap();
    let f = Wisp::spawn_cmd(&mut wisp_cmd(
        &["run", "--kernel", hello],
        &[("WISP_SECCOMP_SELFTEST", "gpu")],
    ))
    .wait(T);
    assert_eq!(f.code(), Some(1), "{}", f.stderr);
    assert!(
        f.stderr
            .starts_with("wisp: error: WISP_SECCOMP_SELFTEST=gpu: not a thread kind"),
        "{}",
        f.stderr
    );
}
