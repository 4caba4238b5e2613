//! The control API driving real VMs: configure, start, pause, resume, metrics, runtime
//! cgroup limits, over a real Unix socket, with curl (as a node agent's shell scripts would)
//! and with a small client.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wisp-api-{}-{name}.sock", std::process::id()))
}

fn curl(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args([
            "-X",
            method,
            &format!("http://localhost{path}"),
            "-H",
            "Content-Type: application/json",
        ])
        .args(if body.is_empty() {
            vec![]
        } else {
            vec!["-d", body]
        })
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn progress_count(console: &str) -> usize {
    lines_with(console, "probe: progress ").len()
}

/// CPU time (user + system, clock ticks) of the threads named wisp-vcpu*.
fn vcpu_ticks(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("wisp-vcpu"))
        })
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = after.split_whitespace().collect();
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn configure_start_pause_resume_and_stop_through_the_api() {
    if !kvm_available("configure_start_pause_resume_and_stop_through_the_api") {
        return;
    }
    let sock = sock_path("life");
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "vm-life"]);
    wait_api_socket(&sock);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (st, body) = curl(&sock, "GET", "/", "");
    assert_eq!(st, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "vm-life");

    // Wrong state: pause before boot.
    let (st, body) = curl(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("fault_message"));
    // A start without a boot source says what is missing.
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(st, 400);
    assert!(body.contains("boot-source"), "{body}");

    let kernel = probes().probe.to_str().unwrap().to_string();
    let (st, body) = curl(
        &sock,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{kernel}", "boot_args": "probe.scenario=spin"}}"#),
    );
    assert_eq!(st, 204, "{body}");
    let (st, body) = curl(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    assert_eq!(st, 204, "{body}");
    let (st, body) = curl(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(st, 204, "{body}");
    w.wait_for("probe: progress 2", T);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&api_call(&sock, "GET", "/", None).1).unwrap()
            ["state"],
        "Running"
    );

    // Paused: no progress lines, no vCPU CPU time.
    let (st, _) = api_call(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(st, 204);
    std::thread::sleep(Duration::from_millis(300));
    let (lines, ticks) = (progress_count(&w.stdout()), vcpu_ticks(w.pid()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        progress_count(&w.stdout()),
        lines,
        "the guest made progress while paused"
    );
    assert!(
        vcpu_ticks(w.pid()) - ticks <= 2,
        "paused vCPU threads used CPU"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&api_call(&sock, "GET", "/", None).1).unwrap()
            ["state"],
        "Paused"
    );

    let (st, _) = api_call(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(st, 204);
    w.wait_for(&format!("probe: progress {}", lines + 2), T);

    let (st, body) = api_call(&sock, "GET", "/vm/metrics", None);
    assert_eq!(st, 200);
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(m["vcpu_exits"].as_u64().unwrap() > 0, "{body}");
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(st, 400, "a second start: {body}");
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/x"}"#),
    );
    assert_eq!(st, 400, "boot source after start: {body}");

    w.signal(libc::SIGTERM);
    let f = w.wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(128 + libc::SIGTERM));
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn config_file_without_api_boots_and_exits_with_the_guest() {
    if !kvm_available("config_file_without_api_boots_and_exits_with_the_guest") {
        return;
    }
    let dir = TestDir::new("api-cfg");
    let file = dir.join("vm.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.scenario=smp"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 128}}}}"#,
            probes().probe.display()
        ),
    )
    .unwrap();
    let f = Wisp::spawn(&["--config-file", file.to_str().unwrap(), "--no-api"]).wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    assert!(f.stdout.contains("probe: cpus 2"), "{}", f.stdout);
    // A bad file is one clear line.
    std::fs::write(
        &file,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "machine-config": {{"vcpu_count": 0, "mem_size_mib": 128}}}}"#,
            probes().probe.display()
        ),
    )
    .unwrap();
    let f = Wisp::spawn(&["--config-file", file.to_str().unwrap(), "--no-api"]).wait(T);
    assert_eq!(f.code(), Some(1));
    assert!(f.stderr.contains("vcpu_count"), "{}", f.stderr);
}

#[test]
fn cgroup_cap_is_raised_through_the_api_without_a_restart() {
    if !kvm_available("cgroup_cap_is_raised_through_the_api_without_a_restart") {
        return;
    }
    let Some(parent) = TestCgroupParent::new("apicap") else {
        return;
    };
    let sock = sock_path("cap");
    let probe = probes().probe.to_str().unwrap().to_string();
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "capapi"]);
    wait_api_socket(&sock);
    let body = format!(r#"{{"kernel_image_path": "{probe}", "boot_args": "probe.scenario=spin"}}"#);
    assert_eq!(api_call(&sock, "PUT", "/boot-source", Some(&body)).0, 204);
    let mc = format!(
        r#"{{"vcpu_count": 2, "mem_size_mib": 64, "cgroup": {{"parent": "{}", "cpu_max": "20000/100000"}}}}"#,
        parent.name
    );
    let (st, body) = api_call(&sock, "PUT", "/machine-config", Some(&mc));
    assert_eq!(st, 204, "{body}");
    assert_eq!(
        api_call(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    w.wait_for("probe: progress", T);
    let usage = || -> u64 {
        let vm = &parent.children("cpuacct")[0];
        std::fs::read_to_string(parent.path("cpuacct").join(vm).join("vcpus/cpuacct.usage"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let share = |window: Duration| {
        let (u0, t0) = (usage(), Instant::now());
        std::thread::sleep(window);
        (usage() - u0) as f64 / t0.elapsed().as_nanos() as f64
    };
    let low = share(Duration::from_secs(3));
    assert!(
        (0.15..=0.25).contains(&low),
        "capped at 20%: used {:.1}%",
        low * 100.0
    );
    let (st, body) = api_call(
        &sock,
        "PATCH",
        "/vm/cgroup",
        Some(r#"{"cpu_max": "60000/100000"}"#),
    );
    assert_eq!(st, 204, "{body}");
    let high = share(Duration::from_secs(3));
    assert!(
        high > low + 0.2,
        "raised to 60%: used {:.1}% (was {:.1}%)",
        high * 100.0,
        low * 100.0
    );
    let (st, _) = api_call(
        &sock,
        "PATCH",
        "/vm/cgroup",
        Some(r#"{"cpu_max": "0/100000"}"#),
    );
    assert_eq!(st, 400, "a zero quota is refused at run time too");
    w.signal(libc::SIGTERM);
    w.wait(Duration::from_secs(10));
    assert!(parent.children("cpu").is_empty());
}

#[test]
fn send_ctrl_alt_del_reaches_the_guest_which_powers_off() {
    if !kvm_available("send_ctrl_alt_del_reaches_the_guest_which_powers_off") {
        return;
    }
    let sock = sock_path("cad");
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_api_socket(&sock);
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=ctrl-alt-del"}}"#,
        probes().probe.display()
    );
    assert_eq!(api_call(&sock, "PUT", "/boot-source", Some(&body)).0, 204);
    assert_eq!(
        api_call(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    w.wait_for("probe: waiting for ctrl-alt-del", T);
    let (st, body) = curl(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(st, 204, "{body}");
    let f = w.wait(T);
    assert!(f.stdout.contains("probe: ctrl-alt-del"), "{}", f.stdout);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    assert!(!sock.exists());
}

/// A raw disk of `len` bytes whose first bytes are `label` (the rest zeros).
fn labelled_disk(dir: &Path, name: &str, len: usize, label: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut data = vec![0u8; len];
    data[..label.len()].copy_from_slice(label);
    std::fs::write(&p, data).unwrap();
    p
}

/// wisp on an API socket, started with the blk-media probe scenario on drive `data`.
/// A probe guest waiting, up to `wait_ms` each, for `changes` media changes of drive "data".
fn start_media_guest(sock: &Path, disk: &Path, wait_ms: u32, changes: u32) -> Wisp {
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_api_socket(sock);
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=blk-media probe.wait_ms={wait_ms} probe.media_changes={changes}"}}"#,
        probes().probe.display()
    );
    assert_eq!(api_call(sock, "PUT", "/boot-source", Some(&body)).0, 204);
    let body = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}"#,
        disk.display()
    );
    let (st, body) = api_call(sock, "PUT", "/drives/data", Some(&body));
    assert_eq!(st, 204, "{body}");
    let (st, body) = api_call(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(st, 204, "{body}");
    w.wait_for("probe: media waiting", T);
    w
}

fn patch_drive(sock: &Path, path: &Path) -> (u16, String) {
    let body = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
        path.display()
    );
    api_call(sock, "PATCH", "/drives/data", Some(&body))
}

fn assert_no_probe_failure(f: &Finished) {
    assert!(
        !f.stdout.contains("probe: FAIL"),
        "{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert_eq!(f.code(), Some(0), "{}\nstderr:\n{}", f.stdout, f.stderr);
}

#[test]
fn patch_drive_gives_the_running_guest_a_new_medium() {
    if !kvm_available("patch_drive_gives_the_running_guest_a_new_medium") {
        return;
    }
    let dir = TestDir::new("api-media");
    let one = labelled_disk(&dir, "one.img", 1 << 20, b"wisp-media-one!!");
    let two = labelled_disk(&dir, "two.img", 3 << 20, b"wisp-media-two!!");
    let sock = sock_path("media");
    let mut w = start_media_guest(&sock, &one, 60_000, 2);
    assert!(
        w.stdout()
            .contains("probe: media initial capacity 2048 sector0 wisp-media-one!!"),
        "{}",
        w.stdout()
    );

    // Refused before anything is opened: an unknown drive, a rate limiter that cannot be.
    let (st, body) = api_call(
        &sock,
        "PATCH",
        "/drives/nope",
        Some(&format!(
            r#"{{"drive_id": "nope", "path_on_host": "{}"}}"#,
            two.display()
        )),
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains(r#"no drive \"nope\""#), "{body}");
    let (st, body) = api_call(
        &sock,
        "PATCH",
        "/drives/data",
        Some(&format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "rate_limiter": {{"bandwidth": {{"size": 1, "refill_time": 0}}}}}}"#,
            two.display()
        )),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("rate_limiter.bandwidth.refill_time is 0"),
        "{body}"
    );

    let (st, body) = patch_drive(&sock, &two);
    assert_eq!(st, 204, "{body}");
    w.wait_for(
        "probe: media changed capacity 6144 sector0 wisp-media-two!!",
        T,
    );
    // The guest now waits for a second change, so the VM is sure to be running: a guest
    // that ended right after the first could outrun this request on a busy host.
    let (st, body) = api_call(&sock, "GET", "/vm/config", None);
    assert_eq!(st, 200, "{body}");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["drives"][0]["path_on_host"], two.to_str().unwrap());

    // And back: the first file, unlocked when the drive left it, is taken again.
    let (st, body) = patch_drive(&sock, &one);
    assert_eq!(st, 204, "{body}");
    let f = w.wait(T);
    assert_no_probe_failure(&f);
    assert!(
        f.stdout
            .contains("probe: media changed capacity 2048 sector0 wisp-media-one!!"),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("probe: done blk-media"), "{}", f.stdout);
}

#[test]
fn patch_drive_to_a_bad_file_is_refused_and_the_guest_keeps_its_medium() {
    if !kvm_available("patch_drive_to_a_bad_file_is_refused_and_the_guest_keeps_its_medium") {
        return;
    }
    let dir = TestDir::new("api-badmedia");
    let one = labelled_disk(&dir, "one.img", 1 << 20, b"wisp-media-one!!");
    // A named pipe would block whoever opened it until a writer came.
    let fifo = dir.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path in the test's directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sock = sock_path("badmedia");
    let w = start_media_guest(&sock, &one, 8_000, 1);

    let missing = dir.join("missing.img");
    let dir_path = dir.to_path_buf();
    for (path, why) in [
        (&missing, "No such file"),
        (&dir_path, "directory"),
        (&fifo, "named pipe"),
        // Its own file, read-write: it cannot be locked twice.
        (&one, "already drive"),
    ] {
        let (st, body) = patch_drive(&sock, path);
        assert_eq!(st, 400, "{}: {body}", path.display());
        let fault: serde_json::Value = serde_json::from_str(&body).unwrap();
        let msg = fault["fault_message"].as_str().unwrap();
        assert!(
            msg.contains(&*path.to_string_lossy()) && msg.contains(why),
            "{}: {msg}",
            path.display()
        );
    }
    assert!(
        !w.stdout().contains("probe: media unchanged"),
        "the guest stopped waiting before the requests were answered"
    );
    let (_, body) = api_call(&sock, "GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["drives"][0]["path_on_host"], one.to_str().unwrap());

    let f = w.wait(T);
    assert_no_probe_failure(&f);
    assert!(
        f.stdout
            .contains("probe: media unchanged capacity 2048 sector0 wisp-media-one!!"),
        "{}",
        f.stdout
    );
}

#[test]
fn put_logger_sends_wisp_log_lines_to_the_file_at_its_level() {
    if !kvm_available("put_logger_sends_wisp_log_lines_to_the_file_at_its_level") {
        return;
    }
    let dir = TestDir::new("api-logger");
    let log = dir.join("wisp.log");
    let sock = sock_path("logger");
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_api_socket(&sock);

    let bad = dir.join("no/such/dir/wisp.log");
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(r#"{{"log_path": "{}"}}"#, bad.display())),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("log_path") && body.contains(&*bad.to_string_lossy()),
        "{body}"
    );
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(
            r#"{{"log_path": "{}", "level": "Debug", "show_level": true}}"#,
            log.display()
        )),
    );
    assert_eq!(st, 204, "{body}");
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=ctrl-alt-del"}}"#,
        probes().probe.display()
    );
    assert_eq!(api_call(&sock, "PUT", "/boot-source", Some(&body)).0, 204);
    assert_eq!(
        api_call(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    w.wait_for("probe: waiting for ctrl-alt-del", T);
    // Firecracker configures the logger before boot only.
    let (st, body) = api_call(&sock, "PUT", "/logger", Some(r#"{"level": "Error"}"#));
    assert_eq!(st, 400, "{body}");
    let (st, _) = api_call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(st, 204);
    let f = w.wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);

    let text = std::fs::read_to_string(&log).unwrap();
    // Firecracker's line shape: `<time> [<id>:<thread>:<LEVEL>] <message>`.
    assert!(
        text.contains(" [anonymous-instance:main:INFO] VM started: 1 vCPU(s)"),
        "{text}"
    );
    // Debug lines too: the API's request log.
    assert!(
        text.contains(" [anonymous-instance:wisp-api-conn:DEBUG] API PUT /actions -> 204"),
        "{text}"
    );
    assert!(
        !f.stderr.contains("VM started"),
        "the log still went to stderr: {}",
        f.stderr
    );
}
