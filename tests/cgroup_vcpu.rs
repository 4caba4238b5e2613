//! vCPU threads confined in a cgroup of their own (cgroup v1 here: cpu, cpuacct, cpuset),
//! with a real probe guest spinning at CPL3 on two vCPUs.

mod common;
use common::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn spin_args<'a>(parent: &'a str, probe: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        "--kernel",
        probe,
        "--cmdline",
        "probe.scenario=spin",
        "--cpus",
        "2",
        "--memory",
        "64M",
        "--cgroup",
        parent,
    ];
    a.extend_from_slice(extra);
    a
}

/// (thread name, cpu cgroup path) of every thread of `pid`.
fn thread_groups(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm"))
                .unwrap()
                .trim()
                .to_string();
            let cg = std::fs::read_to_string(t.path().join("cgroup")).unwrap();
            let cpu = cg
                .lines()
                .find_map(|l| l.split_once(":cpu:").map(|(_, p)| p.to_string()))
                .or_else(|| {
                    cg.lines()
                        .find_map(|l| l.split_once(":cpu,cpuacct:").map(|(_, p)| p.to_string()))
                })
                .unwrap_or_default();
            (comm, cpu)
        })
        .collect()
}

fn usage_ns(parent: &TestCgroupParent) -> u64 {
    let vm = parent.children("cpuacct");
    assert_eq!(vm.len(), 1, "one VM group: {vm:?}");
    let p = parent
        .path("cpuacct")
        .join(&vm[0])
        .join("vcpus/cpuacct.usage");
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

/// Share of one CPU the vCPU group used over `window`.
fn measured_share(parent: &TestCgroupParent, window: Duration) -> f64 {
    let (u0, t0) = (usage_ns(parent), Instant::now());
    std::thread::sleep(window);
    let (u1, t1) = (usage_ns(parent), Instant::now());
    (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64
}

#[test]
fn vcpu_threads_alone_are_in_the_vcpu_group_and_a_cap_holds() {
    if !kvm_available("vcpu_threads_alone_are_in_the_vcpu_group_and_a_cap_holds") {
        return;
    }
    let Some(parent) = TestCgroupParent::new("cap") else {
        return;
    };
    let probe = probes().probe.to_str().unwrap().to_string();
    let mut w = Wisp::spawn(&spin_args(
        &parent.name,
        &probe,
        &["--vcpu-cpus", "0.2", "--id", "capvm"],
    ));
    w.wait_for("probe: progress", T);
    let groups = thread_groups(w.pid());
    let vcpus: Vec<_> = groups
        .iter()
        .filter(|(n, _)| n.starts_with("wisp-vcpu"))
        .collect();
    assert_eq!(vcpus.len(), 2, "{groups:?}");
    for (name, cg) in &groups {
        let in_vcpus =
            cg.starts_with(&format!("/{}/wisp-capvm-", parent.name)) && cg.ends_with("/vcpus");
        if name.starts_with("wisp-vcpu") {
            assert!(in_vcpus, "{name} is in {cg}");
        } else if name == "wisp" {
            assert!(
                !in_vcpus,
                "the VMM's main thread is in the vCPU group: {cg}"
            );
        }
    }
    // Two vCPUs spinning flat out, capped at 20% of one CPU in total.
    let share = measured_share(&parent, Duration::from_secs(3));
    assert!(
        (0.15..=0.25).contains(&share),
        "vCPUs used {:.1}% of a CPU, cap 20%",
        share * 100.0
    );
    w.signal(libc::SIGTERM);
    let f = w.wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(128 + libc::SIGTERM), "{}", f.stderr);
    for c in CGROUP_V1_CONTROLLERS {
        assert!(
            parent.children(c).is_empty(),
            "{c}: {:?} left after SIGTERM",
            parent.children(c)
        );
    }
}

#[test]
fn cpuset_and_per_vcpu_affinity_are_applied() {
    if !kvm_available("cpuset_and_per_vcpu_affinity_are_applied") {
        return;
    }
    let Some(parent) = TestCgroupParent::new("pin") else {
        return;
    };
    let probe = probes().probe.to_str().unwrap().to_string();
    let mut w = Wisp::spawn(&spin_args(
        &parent.name,
        &probe,
        &["--vcpu-cpuset", "0-1", "--vcpu-affinity", "0:1,1:0"],
    ));
    w.wait_for("probe: progress", T);
    for t in std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        match comm.trim() {
            "wisp-vcpu0" => assert_eq!(allowed, "1"),
            "wisp-vcpu1" => assert_eq!(allowed, "0"),
            _ => {}
        }
    }
    let vm = &parent.children("cpuset")[0];
    let cpus =
        std::fs::read_to_string(parent.path("cpuset").join(vm).join("vcpus/cpuset.cpus")).unwrap();
    assert_eq!(cpus.trim(), "0-1");
}

#[test]
fn groups_are_removed_after_exit_panic_and_sigkill() {
    if !kvm_available("groups_are_removed_after_exit_panic_and_sigkill") {
        return;
    }
    let Some(parent) = TestCgroupParent::new("clean") else {
        return;
    };
    let probe = probes().probe.to_str().unwrap().to_string();
    let run = |scenario: &str| {
        let cmdline = format!("probe.scenario={scenario}");
        Wisp::spawn(&[
            "run",
            "--kernel",
            &probe,
            "--cmdline",
            &cmdline,
            "--memory",
            "64M",
            "--cgroup",
            &parent.name,
            "--vcpu-cpus",
            "0.5",
        ])
        .wait(T)
    };
    let f = run("hello");
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    assert!(
        parent.children("cpu").is_empty(),
        "after poweroff: {:?}",
        parent.children("cpu")
    );
    let f = run("panic");
    assert_eq!(f.code(), Some(2), "{}", f.stderr);
    assert!(
        parent.children("cpu").is_empty(),
        "after a guest panic: {:?}",
        parent.children("cpu")
    );

    // SIGKILL leaves the groups; the next start removes them.
    let mut w = Wisp::spawn(&spin_args(&parent.name, &probe, &[]));
    w.wait_for("probe: progress", T);
    w.signal(libc::SIGKILL);
    let f = w.wait(Duration::from_secs(10));
    assert_eq!(f.status.code(), None);
    assert_eq!(
        parent.children("cpu").len(),
        1,
        "a killed wisp cannot clean up"
    );
    let f = run("hello");
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    for c in CGROUP_V1_CONTROLLERS {
        assert!(
            parent.children(c).is_empty(),
            "{c}: stale group kept: {:?}",
            parent.children(c)
        );
    }
}

#[test]
fn bad_cgroup_settings_are_refused_before_the_guest_starts() {
    let hello = "/nonexistent-never-booted";
    let probe = if std::path::Path::new("/dev/kvm").exists() {
        probes().hello.to_str().unwrap().to_string()
    } else {
        hello.to_string()
    };
    let cases: [(&[&str], &str); 6] = [
        (&["--cgroup", "/", "--vcpu-cpu-max", "0/100000"], "quota"),
        (&["--cgroup", "/", "--vcpu-cpu-max", "50000/10"], "period"),
        (&["--cgroup", "/", "--vcpu-cpuset", "0-4095"], "4095"),
        (&["--cgroup", "/tmp/not-a-cgroup"], "/tmp/not-a-cgroup"),
        (&["--cgroup", "wisp-no-such-parent"], "does not exist"),
        (&["--vcpu-cpus", "0.5"], "--vcpu-cpus needs --cgroup PARENT"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["run", "--kernel", &probe, "--memory", "64M"];
        args.extend_from_slice(extra);
        let f = Wisp::spawn(&args).wait(T);
        assert_eq!(f.code(), Some(1), "{extra:?}: {}", f.stderr);
        assert!(f.stdout.is_empty(), "the guest started for {extra:?}");
        assert!(
            f.stderr.contains(want),
            "{extra:?}: {:?} lacks {want:?}",
            f.stderr
        );
        assert_eq!(f.stderr.lines().count(), 1, "{}", f.stderr);
    }
}
