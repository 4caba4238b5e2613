//! Tests on this host's real cgroup v1 hierarchies (cpu, cpuacct, cpuset), as root, with real
//! spinning threads. Skipped when /sys/fs/cgroup/cpu is absent, unless WISP_REQUIRE_KVM=1.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;

/// The CPU measurements need the CPUs to themselves: one real-cgroup test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn v1_host() -> Option<Host> {
    if !Path::new("/sys/fs/cgroup/cpu").is_dir() {
        if std::env::var("WISP_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!(
                "/sys/fs/cgroup/cpu is absent but WISP_REQUIRE_KVM=1 requires the cgroup v1 tests"
            );
        }
        eprintln!("skipping: /sys/fs/cgroup/cpu is absent (no cgroup v1 cpu hierarchy)");
        return None;
    }
    Some(Host::current().expect("reading this host's cgroup set-up"))
}

fn v1_mounts(host: &Host) -> Vec<CgroupMount> {
    let mut out: Vec<CgroupMount> = Vec::new();
    for ctrl in ["cpu", "cpuacct", "cpuset"] {
        let m = host.mounts.find(ctrl).expect("v1 controller").clone();
        assert_eq!(m.version, CgroupVersion::V1);
        if !out.iter().any(|o| o.point == m.point) {
            out.push(m);
        }
    }
    out
}

/// A parent group `wispunit-<tag>-<pid>` in each v1 hierarchy; on drop, every group below it
/// is emptied (threads back to the root) and removed, also when the test failed.
struct TestParent {
    name: String,
    mounts: Vec<CgroupMount>,
}

impl TestParent {
    fn new(host: &Host, tag: &str) -> TestParent {
        let p = TestParent {
            name: format!("wispunit-{tag}-{}", std::process::id()),
            mounts: v1_mounts(host),
        };
        for m in &p.mounts {
            let dir = m.point.join(&p.name);
            remove_tree(&m.point, &dir);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            if m.controllers.iter().any(|c| c == "cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(m.point.join(f)).unwrap();
                    std::fs::write(dir.join(f), v.trim()).unwrap();
                }
            }
        }
        p
    }

    fn dir(&self, controller: &str) -> PathBuf {
        let m = self
            .mounts
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == controller))
            .unwrap();
        m.point.join(&self.name)
    }

    fn spec(&self) -> CgroupSpec {
        CgroupSpec {
            parent: self.name.clone(),
            ..Default::default()
        }
    }

    /// Names of the `wisp-*` groups under this parent, in every hierarchy.
    fn wisp_groups(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for m in &self.mounts {
            for e in std::fs::read_dir(m.point.join(&self.name))
                .unwrap()
                .flatten()
            {
                if e.file_name().to_string_lossy().starts_with("wisp-") {
                    out.push(e.path());
                }
            }
        }
        out
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        for m in &self.mounts {
            remove_tree(&m.point, &m.point.join(&self.name));
        }
    }
}

fn remove_tree(root: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            remove_tree(root, &e.path());
        }
    }
    for tid in std::fs::read_to_string(dir.join("tasks"))
        .unwrap_or_default()
        .split_whitespace()
    {
        let _ = std::fs::write(root.join("tasks"), tid);
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("could not remove test cgroup {}", dir.display());
}

/// Threads standing in for vCPUs: each places itself with `add_vcpu_thread` (as the VMM's
/// vCPU threads do) and spins until dropped.
struct Spinners {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    tids: Vec<libc::pid_t>,
}

impl Spinners {
    fn start(cg: &Arc<VmCgroup>, count: usize) -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        for i in 0..count {
            let (cg, stop, tx) = (cg.clone(), stop.clone(), tx.clone());
            handles.push(std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let res = cg.add_vcpu_thread(i, tid);
                let ok = res.is_ok();
                drop(cg);
                tx.send((i, tid, res)).unwrap();
                while ok && !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }));
        }
        let mut s = Spinners {
            stop,
            handles,
            tids: vec![0; count],
        };
        for _ in 0..count {
            let (i, tid, res) = rx.recv().unwrap();
            res.unwrap_or_else(|e| panic!("add_vcpu_thread({i}, {tid}): {e}"));
            s.tids[i] = tid;
        }
        s
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The cgroup path of thread `tid` of this process in the hierarchy of `controller`.
fn thread_cgroup(tid: libc::pid_t, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no {controller} line in /proc/self/task/{tid}/cgroup"))
}

fn cpus_allowed(tid: libc::pid_t) -> String {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// Percentage of one CPU used by the vCPU group over `secs`, from cpuacct.
fn measure_percent(cg: &VmCgroup, secs: f64) -> f64 {
    // Let the new cap take hold for a few periods first.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let u0 = cg.usage_usec().unwrap();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let u1 = cg.usage_usec().unwrap();
    let wall = t0.elapsed().as_micros() as f64;
    (u1 - u0) as f64 / wall * 100.0
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

#[test]
fn cgroup_v1_vcpu_threads_are_placed_and_capped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = v1_host() else { return };
    let parent = TestParent::new(&host, "cap");
    // Other work on this shared machine must not starve the spinners below their cap: give
    // the test parent the largest CPU weight, so what is measured is the cap alone.
    std::fs::write(parent.dir("cpu").join("cpu.shares"), "262144").unwrap();
    let mut spec = parent.spec();
    spec.cpu_max = Some(CpuMax::parse_cpus("0.2").unwrap());
    let cg = Arc::new(VmCgroup::create(&spec, "cap").unwrap());
    let vcpu_path = format!("/{}/{}/vcpus", parent.name, cg.name());
    assert_eq!(
        std::fs::read_to_string(cg.vcpu_dirs()[0].join("cpu.cfs_quota_us"))
            .unwrap()
            .trim(),
        "20000"
    );

    let spin = Spinners::start(&cg, 2);
    for &tid in &spin.tids {
        for ctrl in ["cpu", "cpuacct", "cpuset"] {
            assert_eq!(thread_cgroup(tid, ctrl), vcpu_path, "thread {tid}, {ctrl}");
        }
    }
    let main_tid = std::process::id() as libc::pid_t;
    for tid in [main_tid, gettid()] {
        for ctrl in ["cpu", "cpuacct", "cpuset"] {
            assert!(
                !thread_cgroup(tid, ctrl).contains(cg.name()),
                "non-vCPU thread {tid} is in the VM's {ctrl} group"
            );
        }
    }

    let capped = measure_percent(&cg, 2.0);
    eprintln!("2 spinning threads capped at 20% of one CPU used {capped:.1}%");
    assert!(
        (15.0..=25.0).contains(&capped),
        "used {capped:.1}% under a 20% cap"
    );

    cg.set_limits(Some(CpuMax::parse_cpus("0.6").unwrap()), None)
        .unwrap();
    let raised = measure_percent(&cg, 2.0);
    eprintln!("after raising the cap to 60%: {raised:.1}%");
    assert!(
        (55.0..=65.0).contains(&raised),
        "used {raised:.1}% under a 60% cap"
    );
    assert!(
        raised >= capped + 15.0,
        "usage did not rise: {capped:.1}% -> {raised:.1}%"
    );

    cg.set_limits(Some(CpuMax::UNLIMITED), None).unwrap();
    assert_eq!(
        std::fs::read_to_string(cg.vcpu_dirs()[0].join("cpu.cfs_quota_us"))
            .unwrap()
            .trim(),
        "-1"
    );
}

#[test]
fn cgroup_v1_cpuset_and_per_vcpu_affinity_are_honoured() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = v1_host() else { return };
    if host.online_cpus.cpus().len() < 2 {
        eprintln!("skipping: needs 2 online CPUs");
        return;
    }
    let (a, b) = (host.online_cpus.cpus()[0], host.online_cpus.cpus()[1]);
    let parent = TestParent::new(&host, "pin");
    let main_allowed = cpus_allowed(gettid());

    // The cpuset alone.
    let mut spec = parent.spec();
    spec.cpuset = Some(CpuList::new(vec![b]));
    let cg = Arc::new(VmCgroup::create(&spec, "set").unwrap());
    let spin = Spinners::start(&cg, 2);
    for &tid in &spin.tids {
        assert_eq!(cpus_allowed(tid), b.to_string(), "thread {tid}");
    }
    cg.set_limits(None, Some(CpuList::new(vec![a, b]))).unwrap();
    for &tid in &spin.tids {
        assert_eq!(cpus_allowed(tid), CpuList::new(vec![a, b]).to_string());
    }
    assert_eq!(cpus_allowed(gettid()), main_allowed);
    drop(spin);
    drop(cg);

    // Per-vCPU pinning inside a cpuset, kept across a cpuset change.
    let mut spec = parent.spec();
    spec.cpuset = Some(CpuList::new(vec![a, b]));
    spec.affinity = Some(format!("0:{b},1:{a}").parse().unwrap());
    let cg = Arc::new(VmCgroup::create(&spec, "pin").unwrap());
    let spin = Spinners::start(&cg, 2);
    assert_eq!(cpus_allowed(spin.tids[0]), b.to_string());
    assert_eq!(cpus_allowed(spin.tids[1]), a.to_string());
    cg.set_limits(None, Some(CpuList::new(vec![a, b]))).unwrap();
    assert_eq!(cpus_allowed(spin.tids[0]), b.to_string());
    assert_eq!(cpus_allowed(spin.tids[1]), a.to_string());
    // A cpuset that would leave a pinned vCPU outside is refused.
    let err = cg
        .set_limits(None, Some(CpuList::new(vec![a])))
        .unwrap_err();
    assert!(
        matches!(err, Error::AffinityOutsideCpuset { vcpu: 0, .. }),
        "{err}"
    );
    assert_eq!(cpus_allowed(gettid()), main_allowed);
}

#[test]
fn cgroup_v1_groups_are_removed_with_threads_still_inside() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = v1_host() else { return };
    let parent = TestParent::new(&host, "drop");
    let cg = Arc::new(VmCgroup::create(&parent.spec(), "drop").unwrap());
    let dirs: Vec<PathBuf> = cg.vm_dirs();
    assert_eq!(dirs.len(), 3);
    assert!(dirs.iter().all(|d| d.join("vcpus").is_dir()));
    let spin = Spinners::start(&cg, 2);
    // The threads are alive and inside: removal moves them back to the process's groups.
    let cg = Arc::try_unwrap(cg).expect("only the test holds the VmCgroup now");
    let before = thread_cgroup(gettid(), "cpu");
    cg.remove().unwrap();
    assert!(dirs.iter().all(|d| !d.exists()), "left behind: {dirs:?}");
    for &tid in &spin.tids {
        assert_eq!(thread_cgroup(tid, "cpu"), before);
    }
    drop(spin);

    // Drop alone removes them too.
    // The parent given as a path under the cpu mount applies to every hierarchy.
    let mut spec = parent.spec();
    spec.parent = parent.dir("cpu").display().to_string();
    let cg = VmCgroup::create(&spec, "drop2").unwrap();
    assert_eq!(cg.vm_dirs().len(), 3);
    let dirs = cg.vm_dirs();
    assert!(dirs.iter().all(|d| d.is_dir()));
    drop(cg);
    assert!(dirs.iter().all(|d| !d.exists()), "left behind: {dirs:?}");
    assert!(parent.wisp_groups().is_empty());
}

#[test]
fn cgroup_v1_stale_group_of_dead_wisp_is_cleaned_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = v1_host() else { return };
    let parent = TestParent::new(&host, "stale");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("wisp-killed-{dead}-12345");
    for m in &parent.mounts {
        std::fs::create_dir_all(m.point.join(&parent.name).join(&stale).join("vcpus")).unwrap();
    }
    let live = VmCgroup::create(&parent.spec(), "live").unwrap();
    assert_eq!(VmCgroup::cleanup_stale(&parent.name).unwrap(), 1);
    let left = parent.wisp_groups();
    assert!(left.iter().all(|d| !d.ends_with(&stale)), "{left:?}");
    assert!(live.vm_dirs().iter().all(|d| d.is_dir()));
    assert_eq!(VmCgroup::cleanup_stale(&parent.name).unwrap(), 0);
    // The absolute path form of the parent finds the same groups.
    drop(live);
    assert_eq!(
        VmCgroup::cleanup_stale(&parent.dir("cpu").display().to_string()).unwrap(),
        0
    );
}

#[test]
fn cgroup_v1_bad_settings_are_clear_errors_and_leave_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = v1_host() else { return };
    let parent = TestParent::new(&host, "bad");
    let with = |f: &dyn Fn(&mut CgroupSpec)| {
        let mut s = parent.spec();
        f(&mut s);
        VmCgroup::create(&s, "bad").unwrap_err()
    };

    let e = with(&|s| {
        s.cpu_max = Some(CpuMax {
            quota_us: Some(0),
            period_us: 100_000,
        })
    });
    assert!(matches!(e, Error::QuotaTooSmall { quota_us: 0 }), "{e}");
    let e = with(&|s| {
        s.cpu_max = Some(CpuMax {
            quota_us: Some(5000),
            period_us: 2_000_000,
        })
    });
    assert!(
        matches!(
            e,
            Error::PeriodOutOfRange {
                period_us: 2_000_000
            }
        ),
        "{e}"
    );
    let absent = host.online_cpus.cpus().last().unwrap() + 1;
    let e = with(&|s| s.cpuset = Some(CpuList::new(vec![absent])));
    assert!(
        matches!(e, Error::CpuNotOnline { cpu, .. } if cpu == absent),
        "{e}"
    );
    let e = with(&|s| s.affinity = Some("0:0,0:0".parse().unwrap()));
    assert!(matches!(e, Error::DuplicateVcpu { vcpu: 0 }), "{e}");
    let e = with(&|s| s.parent = "/tmp/wisp-not-a-cgroup".into());
    assert!(matches!(e, Error::ParentOutsideMount { .. }), "{e}");
    assert!(e.to_string().contains("/sys/fs/cgroup/cpu"), "{e}");
    let e = with(&|s| s.parent = "/sys/fs/cgroup/wisp-not-a-mount".into());
    assert!(matches!(e, Error::ParentOutsideMount { .. }), "{e}");
    let e = with(&|s| s.parent = format!("{}/missing", parent.name));
    assert!(matches!(e, Error::ParentMissing { .. }), "{e}");

    // A host where only the (empty) cgroup v2 mount would serve cpu.
    let mut v2_only = host.clone();
    v2_only
        .mounts
        .mounts
        .retain(|m| m.version == CgroupVersion::V2);
    if !v2_only.mounts.mounts.is_empty() {
        let e = VmCgroup::create_on(&v2_only, &CgroupSpec::default(), "bad").unwrap_err();
        assert!(
            matches!(&e, Error::ControllerUnavailable { controller, .. } if controller == "cpu"),
            "{e}"
        );
        assert!(e.to_string().contains("cgroup v2 mount"), "{e}");
        eprintln!("{e}");
    }

    // The kernel refusing a CPU the parent's cpuset does not allow, named with file and value.
    let cpus = host.online_cpus.cpus();
    if cpus.len() >= 2 {
        std::fs::write(
            parent.dir("cpuset").join("cpuset.cpus"),
            cpus[0].to_string(),
        )
        .unwrap();
        let e = with(&|s| s.cpuset = Some(CpuList::new(vec![cpus[1]])));
        match &e {
            Error::KernelRejected { file, value, .. } => {
                assert!(file.ends_with("vcpus/cpuset.cpus"), "{e}");
                assert!(e.to_string().contains("parent group's cpuset.cpus"), "{e}");
                assert_eq!(value, &cpus[1].to_string());
            }
            _ => panic!("expected KernelRejected, got {e}"),
        }
        eprintln!("{e}");
    }
    // No group was left behind by any failure.
    assert!(
        parent.wisp_groups().is_empty(),
        "{:?}",
        parent.wisp_groups()
    );
}

const PERM_CHILD_ENV: &str = "WISP_CGROUP_PERMISSION_CHILD";

#[test]
fn cgroup_v1_unwritable_parent_is_permission_denied() {
    // Child mode: re-executed as an unprivileged user, tries to create the VM's groups.
    if let Ok(parent) = std::env::var(PERM_CHILD_ENV) {
        let spec = CgroupSpec {
            parent,
            ..Default::default()
        };
        let e = VmCgroup::create(&spec, "perm").unwrap_err();
        assert!(matches!(e, Error::PermissionDenied { .. }), "{e}");
        println!("child error: {e}");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = v1_host() else { return };
    let parent = TestParent::new(&host, "perm");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cgroup::host_tests::cgroup_v1_unwritable_parent_is_permission_denied",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PERM_CHILD_ENV, &parent.name)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("child error: ").map(|(_, e)| e))
        .unwrap_or_else(|| panic!("child printed no error: {stdout}"));
    eprintln!("{line}");
    assert!(line.contains("permission denied"), "{line}");
    assert!(line.contains(&parent.name), "{line}");
    assert!(parent.wisp_groups().is_empty());
}
