//! The jailer's input checks: every refusal happens before anything on the host is made.

use super::*;
use clap::Parser;

/// A scratch directory of this test's own, removed on drop (also when the test fails).
fn scratch(tag: &str) -> vmm_sys_util::tempdir::TempDir {
    vmm_sys_util::tempdir::TempDir::new_with_prefix(format!("/tmp/wisp-jail-unit-{tag}-")).unwrap()
}

/// The jailer's command line: defaults for the required flags unless `extra` gives them.
fn args(base: &Path, extra: &[&str]) -> Result<JailArgs, String> {
    let exec = std::env::current_exe().unwrap().display().to_string();
    let base = base.display().to_string();
    let mut argv = vec!["jailer".to_string()];
    for (flag, value) in [
        ("--id", "vm-1"),
        ("--exec-file", &exec),
        ("--uid", "10123"),
        ("--gid", "10124"),
        ("--chroot-base-dir", &base),
    ] {
        if !extra.contains(&flag) {
            argv.extend([flag.to_string(), value.to_string()]);
        }
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    JailerCli::try_parse_from(argv)
        .map(|c| c.args)
        .map_err(|e| e.to_string())
}

fn refused(base: &Path, extra: &[&str]) -> String {
    let e = args(base, extra)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "not one line: {e}");
    e
}

#[test]
fn good_input_names_the_chroot_and_cgroup() {
    let tmp = scratch("good");
    let base = tmp.as_path();
    let a = args(
        base,
        &[
            "--cgroup",
            "cpuset.cpus=0",
            "--cgroup",
            "memory.limit_in_bytes=256M",
            "--parent-cgroup",
            "agents/vms",
            "--resource-limit",
            "no-file=1024",
            "--resource-limit",
            "fsize=4096",
            "--link-in",
            "/etc/hostname:/disks/x",
            "--",
            "--api-sock",
            "/run/api.sock",
        ],
    )
    .unwrap();
    let j = a.validate().unwrap();
    let name = j
        .exec_file
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let canon = std::fs::canonicalize(base).unwrap();
    assert_eq!(j.paths.id_dir, canon.join(&name).join("vm-1"));
    assert_eq!(j.paths.root, canon.join(&name).join("vm-1/root"));
    assert_eq!(j.paths.cgroup, PathBuf::from("agents/vms/vm-1"));
    assert_eq!((j.uid, j.gid), (10123, 10124));
    assert_eq!(j.cgroup_version, CgroupVersion::V1);
    assert_eq!(j.cgroups[1].controller, "memory");
    assert_eq!(j.cgroups[1].file, "memory.limit_in_bytes");
    assert_eq!(
        j.resource_limits,
        [ResourceLimit::NoFile(1024), ResourceLimit::FileSize(4096)]
    );
    assert_eq!(j.link_in[0].jail, PathBuf::from("disks/x"));
    assert_eq!(j.exec_args, ["--api-sock", "/run/api.sock"]);
    // Without --parent-cgroup the exec file's name is the parent, as Firecracker's.
    let j = args(base, &[]).unwrap().validate().unwrap();
    assert_eq!(j.paths.cgroup, PathBuf::from(&name).join("vm-1"));
    // Nothing was made by validating.
    assert_eq!(std::fs::read_dir(base).unwrap().count(), 0);
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let tmp = scratch("bad");
    let base = tmp.as_path();
    for (extra, expected) in [
        (&["--id", "a/b"][..], "--id: \"a/b\" is not a valid id"),
        (&["--id", ".."], "--id: \"..\" is not a valid id"),
        (&["--id", "a_b"], "is not a valid id"),
        (&["--id", ""], "is not a valid id"),
        (&["--id", &"x".repeat(65)], "is not a valid id"),
        (
            &["--exec-file", "/nonexistent/wisp"],
            "--exec-file: /nonexistent/wisp: No such file",
        ),
        (
            &["--exec-file", "/tmp"],
            "--exec-file: /tmp is not a regular file",
        ),
        (&["--uid", "0"], "--uid 0 is root"),
        (&["--gid", "0"], "--gid 0 is root"),
        (&["--uid", "ten"], "--uid: \"ten\" is not a number"),
        (
            &["--netns", "/run/netns/wisp-no-such-ns"],
            "--netns: /run/netns/wisp-no-such-ns: No such file",
        ),
        (
            &["--cgroup-version", "3"],
            "--cgroup-version: \"3\" is not 1 or 2",
        ),
        (&["--cgroup", "../cpu.max=1"], "may not contain '/' or '..'"),
        (
            &["--cgroup", "cpu/../../x.y=1"],
            "may not contain '/' or '..'",
        ),
        (
            &["--cgroup", "cpu.max"],
            "expected <controller>.<file>=<value>",
        ),
        (
            &["--cgroup", "cpumax=1"],
            "expected <controller>.<file>=<value>",
        ),
        (
            &["--cgroup", "cpu.max="],
            "the value must be one non-empty line",
        ),
        (
            &["--parent-cgroup", "/abs"],
            "--parent-cgroup: \"/abs\" must be a relative path",
        ),
        (&["--parent-cgroup", "a/../b"], "--parent-cgroup"),
        (&["--resource-limit", "cpu=1"], "unknown resource"),
        (&["--resource-limit", "no-file=x"], "not a whole number"),
        (
            &["--link-in", "/nonexistent:/x"],
            "--link-in: \"/nonexistent:/x\": /nonexistent: No such file",
        ),
        (&["--link-in", "/etc/hostname:../x"], "no '..'"),
        (&["--link-in", "/tmp"], "is not a regular file"),
        (
            &["--chroot-base-dir", "/nonexistent-base"],
            "--chroot-base-dir: /nonexistent-base: No such file",
        ),
    ] {
        let e = refused(base, extra);
        assert!(e.contains(expected), "{extra:?}: {e}");
    }
    // A chroot base that is a symbolic link.
    let link = base.join("link");
    std::os::unix::fs::symlink(base, &link).unwrap();
    let e = refused(base, &["--chroot-base-dir", link.to_str().unwrap()]);
    assert!(e.contains("is a symbolic link"), "{e}");
    // Root only when asked for.
    let j = args(base, &["--uid", "0", "--gid", "0", "--allow-root"]).unwrap();
    assert_eq!(j.validate().unwrap().uid, 0);
}

#[test]
fn cleanup_needs_only_the_names() {
    let tmp = scratch("cleanup");
    let base = tmp.as_path();
    let c = JailerCli::try_parse_from([
        "jailer",
        "--cleanup",
        "--id",
        "vm-2",
        "--exec-file",
        "/gone/wisp",
        "--chroot-base-dir",
        base.to_str().unwrap(),
    ])
    .unwrap()
    .args
    .validate_cleanup()
    .unwrap();
    assert_eq!(c.paths.cgroup, PathBuf::from("wisp/vm-2"));
    let canon = std::fs::canonicalize(base).unwrap();
    assert_eq!(c.paths.id_dir, canon.join("wisp/vm-2"));
    std::fs::create_dir_all(c.paths.root.join("dev")).unwrap();
    assert_eq!(c.run().unwrap(), std::slice::from_ref(&c.paths.id_dir));
    assert!(!c.paths.id_dir.exists());
    // Nothing left: nothing to do, no error.
    assert!(c.run().unwrap().is_empty());
}

#[test]
fn subcommand_and_jailer_name_take_the_same_flags() {
    let cli = crate::cli::Cli::try_parse_from([
        "wisp",
        "jail",
        "--id",
        "x",
        "--uid",
        "1",
        "--gid",
        "1",
        "--",
        "--api-sock",
        "/a",
    ])
    .unwrap();
    let Some(crate::cli::Command::Jail(a)) = cli.command else {
        panic!("not the jail subcommand");
    };
    assert_eq!(a.id.as_deref(), Some("x"));
    assert_eq!(a.exec_args, ["--api-sock", "/a"]);
}
