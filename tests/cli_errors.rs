//! Bad input on the command line: each is a one-line error naming the problem, a non-zero
//! exit, and never a panic or a backtrace.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn run_wisp(args: &[&str]) -> Finished {
    Wisp::spawn(args).wait(Duration::from_secs(30))
}

fn assert_one_line_error(f: &Finished, expected: &str) {
    assert_eq!(f.code(), Some(1), "stderr: {}", f.stderr);
    let lines: Vec<&str> = f.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{}", f.stderr);
    assert!(lines[0].starts_with("wisp: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expected),
        "{:?} does not contain {expected:?}",
        lines[0]
    );
    assert!(!f.stderr.contains("panicked") && !f.stderr.contains("RUST_BACKTRACE"));
}

#[test]
fn missing_kernel_file_is_named() {
    let f = run_wisp(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&f, "kernel /nonexistent/vmlinux: No such file or directory");
}

#[test]
fn file_that_is_not_a_kernel_is_refused() {
    let f = run_wisp(&["run", "--kernel", "/etc/passwd", "--memory", "64M"]);
    if f.stderr.contains("/dev/kvm") {
        // Without KVM the VM cannot be created, so the kernel is never read.
        assert!(kvm_available("file_that_is_not_a_kernel_is_refused"));
    }
    assert_one_line_error(&f, "kernel /etc/passwd: not a kernel");
}

#[test]
fn directory_as_kernel_is_refused() {
    let f = run_wisp(&["run", "--kernel", "/tmp"]);
    assert_one_line_error(&f, "kernel /tmp: is a directory");
}

#[test]
fn out_of_range_cpus_and_memory_are_refused() {
    for (flag, value, expected) in [
        ("--cpus", "0", "cpus must be between 1 and 32, got 0"),
        ("--cpus", "1000", "cpus must be between 1 and 32, got 1000"),
        ("--cpus", "two", "cpus must be between 1 and 32"),
        (
            "--memory",
            "1K",
            "memory must be between 64 MiB and 1 TiB, got 1K",
        ),
        (
            "--memory",
            "2T",
            "memory must be between 64 MiB and 1 TiB, got 2T",
        ),
        ("--memory", "lots", "--memory: invalid memory size \"lots\""),
        (
            "--console",
            "tty",
            "console must be stdio, file:PATH or none",
        ),
    ] {
        let f = run_wisp(&["run", "--kernel", "/etc/passwd", flag, value]);
        assert_one_line_error(&f, expected);
    }
}

#[test]
fn no_kernel_at_all_says_how_to_give_one() {
    let f = run_wisp(&["run"]);
    assert_one_line_error(&f, "no kernel given: use --kernel PATH");
}

#[test]
fn bad_config_file_names_the_field() {
    let dir = TestDir::new("cli-errors");
    let file = dir.join("vm.json");
    std::fs::write(&file, r#"{"kernel": "/etc/passwd", "vcpus": 2}"#).unwrap();
    let f = run_wisp(&["run", "--config", file.to_str().unwrap()]);
    assert_one_line_error(&f, "unknown field `vcpus`");
    std::fs::write(&file, r#"{"kernel": "/etc/passwd", "cpus": "many"}"#).unwrap();
    let f = run_wisp(&["run", "--config", file.to_str().unwrap()]);
    assert_one_line_error(&f, "invalid type");
}

#[test]
fn no_permission_on_dev_kvm_is_explained() {
    if !kvm_available("no_permission_on_dev_kvm_is_explained") {
        return;
    }
    // /dev/kvm is root-only here; run wisp as nobody.
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        eprintln!("skipped no_permission_on_dev_kvm_is_explained: needs root to drop privileges");
        assert!(
            std::env::var("WISP_REQUIRE_KVM").is_err(),
            "CI runs as root"
        );
        return;
    }
    let kernel = probes().hello.clone();
    std::fs::set_permissions(
        kernel.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let f = Wisp::spawn_cmd(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(wisp_bin())
            .args(["run", "--memory", "64M", "--kernel"])
            .arg(&kernel),
    )
    .wait(Duration::from_secs(30));
    assert_one_line_error(&f, "cannot open /dev/kvm: Permission denied");
}

#[test]
fn an_image_naming_a_host_file_is_refused_unless_backing_files_are_on() {
    let dir = TestDir::new("cli-backing");
    let ov = dir.join("ov.qcow2");
    let out = Command::new(wisp_bin())
        .args([
            "image",
            "create",
            "--size",
            "1M",
            "--backing",
            "/etc/passwd",
        ])
        .args(["--backing-format", "raw"])
        .arg(&ov)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let disk = format!("path={},format=qcow2", ov.display());
    let f = run_wisp(&["run", "--kernel", "/etc/passwd", "--disk", &disk]);
    if f.stderr.contains("/dev/kvm") {
        // Without KVM the VM cannot be created, so no disk is opened.
        assert!(kvm_available(
            "an_image_naming_a_host_file_is_refused_unless_backing_files_are_on"
        ));
    }
    assert_one_line_error(&f, "names the backing file \"/etc/passwd\"");
    assert!(f.stderr.contains("backing_files=on"), "{}", f.stderr);

    let disk = format!("path={},backing_devices=on", ov.display());
    let f = run_wisp(&["run", "--kernel", "/etc/passwd", "--disk", &disk]);
    assert_one_line_error(&f, "needs backing_files=on or backing_dir=DIR");
}

#[test]
fn image_info_describes_an_image_wisp_refuses_instead_of_failing() {
    let dir = TestDir::new("cli-info");
    let img = dir.join("ext.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"])
        .arg(&img)
        .arg("1M")
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: qemu-img not found (apt-get install qemu-utils)");
        return;
    }
    let out = Command::new(wisp_bin())
        .args(["image", "info"])
        .arg(&img)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for line in [
        "compat: 1.1",
        "cluster size: 65536",
        "refcount bits: 16",
        "internal snapshots: 0",
        "wisp opens it: refused: images with extended L2 entries",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in:\n{stdout}");
    }
}
