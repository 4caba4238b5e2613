//! The live cgroups of one VM: creation, thread placement, limits, usage and removal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::fs;
use super::mounts::{CgroupMount, CgroupVersion, Host};
use super::spec::{check_pin_in_cpuset, check_vm_name, Affinity, CgroupSpec, CpuList, CpuMax};
use super::Error;

/// Name of the vCPU sub-group inside the VM's group.
pub const VCPU_GROUP: &str = "vcpus";
const GROUP_PREFIX: &str = "wisp-";

/// The VM's group in one hierarchy.
#[derive(Debug)]
struct Group {
    version: CgroupVersion,
    /// Which of cpu, cpuacct, cpuset this hierarchy serves for us.
    controllers: Vec<&'static str>,
    parent_dir: PathBuf,
    vm_dir: PathBuf,
    vcpu_dir: PathBuf,
    /// The process's own group at creation, where leftover threads are moved back.
    origin: PathBuf,
    /// Not a real cgroupfs (tests): control files are created on write.
    stand_in: bool,
    /// v2: the whole process was moved into `vm_dir`.
    moved_process: bool,
}

impl Group {
    fn serves(&self, controller: &str) -> bool {
        self.controllers.contains(&controller)
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), Error> {
        fs::write(path, value, self.stand_in)
    }

    fn thread_file(&self) -> &'static str {
        match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.threads",
        }
    }
}

/// The cgroups of one VM. Dropping it (or [`VmCgroup::remove`]) removes them.
#[derive(Debug)]
pub struct VmCgroup {
    name: String,
    groups: Vec<Group>,
    affinity: Option<Affinity>,
    online: CpuList,
    /// vCPU threads placed so far, as (vCPU index, TID).
    threads: Mutex<Vec<(usize, libc::pid_t)>>,
    removed: bool,
}

/// The hierarchies the VM's groups go in, with the controllers each serves for us.
fn hierarchies(
    host: &Host,
    need_cpuset: bool,
) -> Result<Vec<(&CgroupMount, Vec<&'static str>)>, Error> {
    let cpu = host.mounts.find("cpu")?;
    let mut wanted = vec![("cpu", cpu)];
    if cpu.version == CgroupVersion::V1 {
        wanted.push(("cpuacct", host.mounts.find("cpuacct")?));
    }
    match host.mounts.find("cpuset") {
        Ok(m) => wanted.push(("cpuset", m)),
        Err(e) if need_cpuset => return Err(e),
        Err(_) => log::info!("no cpuset controller on this host: vCPU cpusets are unavailable"),
    }
    let mut out: Vec<(&CgroupMount, Vec<&'static str>)> = Vec::new();
    for (ctrl, mount) in wanted {
        match out.iter_mut().find(|(m, _)| m.point == mount.point) {
            Some((_, ctrls)) => ctrls.push(ctrl),
            None => out.push((mount, vec![ctrl])),
        }
    }
    Ok(out)
}

/// The parent as a path relative to each hierarchy's mount point.
fn relative_parent(host: &Host, parent: &str) -> Result<PathBuf, Error> {
    let p = Path::new(parent);
    if !p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    if p == Path::new("/") {
        return Ok(PathBuf::new());
    }
    let mount = host
        .mounts
        .mount_of(p)
        .ok_or_else(|| Error::ParentOutsideMount {
            parent: parent.to_string(),
            mounts: host.mounts.describe(),
        })?;
    Ok(p.strip_prefix(&mount.point)
        .expect("mount_of returns a prefix of the path")
        .to_path_buf())
}

/// `wisp-<vm>-<pid>-<start>` → (pid, start).
fn parse_group_name(name: &str) -> Option<(libc::pid_t, u64)> {
    let rest = name.strip_prefix(GROUP_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let start = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let vm = parts.next()?;
    (!vm.is_empty()).then_some((pid, start))
}

fn set_thread_affinity(tid: libc::pid_t, cpu: u32) -> Result<(), Error> {
    // SAFETY: cpu_set_t is plain data; CPU_SET indexes within it (cpu <= MAX_CPU < CPU_SETSIZE,
    // checked by validation); sched_setaffinity reads the set we own.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(Error::ThreadAffinity {
            tid,
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl VmCgroup {
    /// Creates the VM's groups under `spec.parent` on this host and applies the spec's limits.
    pub fn create(spec: &CgroupSpec, vm_name: &str) -> Result<VmCgroup, Error> {
        VmCgroup::create_on(&Host::current()?, spec, vm_name)
    }

    /// As [`VmCgroup::create`], with the host's mount table and cgroups given.
    pub fn create_on(host: &Host, spec: &CgroupSpec, vm_name: &str) -> Result<VmCgroup, Error> {
        spec.validate_with_online(&host.online_cpus)?;
        check_vm_name(vm_name)?;
        let hier = hierarchies(host, spec.cpuset.is_some())?;
        let rel = relative_parent(host, &spec.parent)?;
        // Check every parent before touching anything.
        for (mount, _) in &hier {
            let dir = mount.point.join(&rel);
            if !dir.is_dir() {
                return Err(Error::ParentMissing { path: dir });
            }
        }
        let pid = std::process::id() as libc::pid_t;
        let start = fs::process_start_time(pid).unwrap_or(0);
        let name = format!("{GROUP_PREFIX}{vm_name}-{pid}-{start}");

        // Groups are recorded as they are made, so a failure part-way removes them on drop.
        let mut cg = VmCgroup {
            name,
            groups: Vec::new(),
            affinity: spec.affinity.clone(),
            online: host.online_cpus.clone(),
            threads: Mutex::new(Vec::new()),
            removed: false,
        };
        for (mount, controllers) in hier {
            let parent_dir = mount.point.join(&rel);
            let vm_dir = parent_dir.join(&cg.name);
            let group = Group {
                version: mount.version,
                controllers,
                origin: host.own_group(mount).unwrap_or_else(|| mount.point.clone()),
                stand_in: !fs::is_cgroupfs(&mount.point),
                vcpu_dir: vm_dir.join(VCPU_GROUP),
                vm_dir,
                parent_dir,
                moved_process: false,
            };
            match mount.version {
                CgroupVersion::V1 => cg.make_v1(group)?,
                CgroupVersion::V2 => cg.make_v2(group, &mount.point)?,
            }
        }
        cg.set_limits(spec.cpu_max, spec.cpuset.clone())?;
        log::info!("vCPU cgroup {} ready", cg.name);
        Ok(cg)
    }

    fn make_v1(&mut self, g: Group) -> Result<(), Error> {
        fs::mkdir(&g.vm_dir)?;
        self.groups.push(g);
        let g = self.groups.last().expect("just pushed");
        if g.serves("cpuset") {
            // A v1 cpuset group starts with empty cpus and mems and takes no task until set.
            copy_cpuset(g, &g.parent_dir, &g.vm_dir)?;
        }
        fs::mkdir(&g.vcpu_dir)?;
        if g.serves("cpuset") {
            copy_cpuset(g, &g.vm_dir, &g.vcpu_dir)?;
        }
        Ok(())
    }

    fn make_v2(&mut self, g: Group, mount_point: &Path) -> Result<(), Error> {
        let ctrls: Vec<&str> = g
            .controllers
            .iter()
            .copied()
            .filter(|c| *c != "cpuacct")
            .collect();
        // Each group from the root down to the parent must hand the controllers to its children.
        let mut dir = mount_point.to_path_buf();
        enable_controllers(&g, &dir, &ctrls)?;
        let rel = g
            .parent_dir
            .strip_prefix(mount_point)
            .expect("parent_dir is under the mount")
            .to_path_buf();
        for c in rel.components() {
            dir.push(c);
            enable_controllers(&g, &dir, &ctrls)?;
        }
        fs::mkdir(&g.vm_dir)?;
        self.groups.push(g);
        let g = self.groups.last_mut().expect("just pushed");
        fs::mkdir(&g.vcpu_dir)?;
        g.write(&g.vcpu_dir.join("cgroup.type"), "threaded")?;
        enable_controllers(g, &g.vm_dir, &ctrls)?;
        // Threads move only within a threaded domain, so the process joins the VM group.
        g.moved_process = true;
        g.write(
            &g.vm_dir.join("cgroup.procs"),
            &std::process::id().to_string(),
        )?;
        Ok(())
    }

    /// The group's name, `wisp-<vm>-<pid>-<start>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vCPU group's directory in each hierarchy used.
    pub fn vcpu_dirs(&self) -> Vec<PathBuf> {
        self.groups.iter().map(|g| g.vcpu_dir.clone()).collect()
    }

    /// The VM group's directory in each hierarchy used.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        self.groups.iter().map(|g| g.vm_dir.clone()).collect()
    }

    /// The cgroup version serving the cpu controller.
    pub fn version(&self) -> CgroupVersion {
        self.group_for("cpu")
            .map_or(CgroupVersion::V1, |g| g.version)
    }

    fn group_for(&self, controller: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.serves(controller))
    }

    /// Moves vCPU thread `tid` into the vCPU group and pins it if the spec says so. Call it
    /// from the vCPU thread (gettid) before its first KVM_RUN.
    pub fn add_vcpu_thread(&self, vcpu_index: usize, tid: libc::pid_t) -> Result<(), Error> {
        for g in &self.groups {
            g.write(&g.vcpu_dir.join(g.thread_file()), &tid.to_string())?;
        }
        if let Some(cpu) = self.affinity.as_ref().and_then(|a| a.host_cpu(vcpu_index)) {
            set_thread_affinity(tid, cpu)?;
        }
        self.threads
            .lock()
            .expect("thread list lock poisoned")
            .push((vcpu_index, tid));
        Ok(())
    }

    /// Changes the cap and/or cpuset of the vCPU group at run time; `None` leaves a setting
    /// as it is. `CpuMax { quota_us: None, .. }` removes the cap.
    pub fn set_limits(
        &self,
        cpu_max: Option<CpuMax>,
        cpuset: Option<CpuList>,
    ) -> Result<(), Error> {
        if let Some(m) = &cpu_max {
            m.validate()?;
        }
        if let Some(set) = &cpuset {
            set.check_online("cpuset", &self.online)?;
            if let Some(a) = &self.affinity {
                for pin in &a.0 {
                    check_pin_in_cpuset(pin, set)?;
                }
            }
        }
        if let Some(m) = cpu_max {
            let g = self
                .group_for("cpu")
                .expect("cpu hierarchy is always set up");
            match g.version {
                CgroupVersion::V1 => {
                    let quota = g.vcpu_dir.join("cpu.cfs_quota_us");
                    // Lift the cap first so no transient quota/period pair is rejected.
                    g.write(&quota, "-1")?;
                    g.write(
                        &g.vcpu_dir.join("cpu.cfs_period_us"),
                        &m.period_us.to_string(),
                    )?;
                    if let Some(q) = m.quota_us {
                        g.write(&quota, &q.to_string())?;
                    }
                }
                CgroupVersion::V2 => {
                    let quota = m.quota_us.map_or("max".to_string(), |q| q.to_string());
                    g.write(
                        &g.vcpu_dir.join("cpu.max"),
                        &format!("{quota} {}", m.period_us),
                    )?;
                }
            }
        }
        if let Some(set) = cpuset {
            let g = self
                .group_for("cpuset")
                .ok_or_else(|| Error::ControllerUnavailable {
                    controller: "cpuset".to_string(),
                    looked_at: "no cgroup v1 hierarchy or cgroup v2 mount serves it on this host"
                        .to_string(),
                })?;
            g.write(&g.vcpu_dir.join("cpuset.cpus"), &set.to_string())?;
            // A cpuset change may reset the threads' affinity: pin them again.
            if let Some(a) = &self.affinity {
                for (vcpu, tid) in self
                    .threads
                    .lock()
                    .expect("thread list lock poisoned")
                    .iter()
                {
                    if let Some(cpu) = a.host_cpu(*vcpu) {
                        set_thread_affinity(*tid, cpu)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// CPU time used by the vCPU threads so far, in µs.
    pub fn usage_usec(&self) -> Result<u64, Error> {
        let (g, file) = match self.group_for("cpuacct") {
            Some(g) => (g, "cpuacct.usage"),
            None => (
                self.group_for("cpu")
                    .expect("cpu hierarchy is always set up"),
                "cpu.stat",
            ),
        };
        let path = g.vcpu_dir.join(file);
        let text = fs::read(&path)?;
        let bad = || Error::BadKernelFile {
            path: path.clone(),
            content: text.trim().to_string(),
        };
        if file == "cpuacct.usage" {
            let ns: u64 = text.trim().parse().map_err(|_| bad())?;
            return Ok(ns / 1000);
        }
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(bad)
    }

    /// Removes the groups, moving any thread still in them back to the process's own group.
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), Error> {
        let mut first_err = None;
        for g in std::mem::take(&mut self.groups).into_iter().rev() {
            if let Err(e) = teardown_group(&g) {
                log::warn!("removing vCPU cgroup: {e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Removes empty `wisp-*` groups under `parent` whose wisp process is gone (killed
    /// before it could clean up). Returns how many VM groups were removed.
    pub fn cleanup_stale(parent: &str) -> Result<usize, Error> {
        VmCgroup::cleanup_stale_on(&Host::current()?, parent)
    }

    /// As [`VmCgroup::cleanup_stale`], with the host given.
    pub fn cleanup_stale_on(host: &Host, parent: &str) -> Result<usize, Error> {
        let rel = relative_parent(host, parent)?;
        let mut removed = BTreeSet::new();
        for (mount, _) in hierarchies(host, false)? {
            let dir = mount.point.join(&rel);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((pid, start)) = parse_group_name(&name) else {
                    continue;
                };
                if fs::process_start_time(pid) == Some(start) {
                    continue; // its wisp is alive
                }
                let vm_dir = entry.path();
                let res = fs::rmdir(&vm_dir.join(VCPU_GROUP)).and_then(|()| fs::rmdir(&vm_dir));
                match res {
                    Ok(()) => {
                        log::info!("removed stale cgroup {}", vm_dir.display());
                        removed.insert(name);
                    }
                    Err(e) => log::warn!("leaving stale cgroup {}: {e}", vm_dir.display()),
                }
            }
        }
        Ok(removed.len())
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.teardown();
        }
    }
}

fn copy_cpuset(g: &Group, from: &Path, to: &Path) -> Result<(), Error> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let value = fs::read(&from.join(file))?;
        g.write(&to.join(file), value.trim())?;
    }
    Ok(())
}

/// Makes `dir` hand `ctrls` to its children (cgroup v2 `cgroup.subtree_control`).
fn enable_controllers(g: &Group, dir: &Path, ctrls: &[&str]) -> Result<(), Error> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_trimmed(&file).unwrap_or_default();
    let missing: Vec<String> = ctrls
        .iter()
        .filter(|c| {
            !enabled
                .split_whitespace()
                .any(|e| e.trim_start_matches('+') == **c)
        })
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    g.write(&file, &missing.join(" "))
}

fn teardown_group(g: &Group) -> Result<(), Error> {
    match g.version {
        CgroupVersion::V1 => {
            let dest = g.origin.join("tasks");
            for dir in [&g.vcpu_dir, &g.vm_dir] {
                for tid in fs::read_ids(&dir.join("tasks")) {
                    // A thread that exited meanwhile (ESRCH) needs no moving.
                    if let Err(e) = g.write(&dest, &tid.to_string()) {
                        log::debug!("moving thread {tid} out of {}: {e}", dir.display());
                    }
                }
            }
        }
        CgroupVersion::V2 => {
            if g.moved_process && g.vm_dir.exists() {
                let pid = std::process::id().to_string();
                g.write(&g.origin.join("cgroup.procs"), &pid)?;
            }
        }
    }
    fs::rmdir(&g.vcpu_dir)?;
    fs::rmdir(&g.vm_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::MountTable;

    #[test]
    fn group_names_carry_pid_and_start_time() {
        assert_eq!(parse_group_name("wisp-vm1-123-456"), Some((123, 456)));
        assert_eq!(parse_group_name("wisp-my-vm-7-8"), Some((7, 8)));
        assert_eq!(parse_group_name("wisp--7-8"), None);
        assert_eq!(parse_group_name("wisp-vm-x-8"), None);
        assert_eq!(parse_group_name("other-vm-1-2"), None);
        assert_eq!(parse_group_name("wisp-1-2"), None);
    }

    /// A temporary directory laid out like a cgroup mount, removed on drop.
    /// What the kernel does on rmdir of a cgroup: its control files go with it.
    fn drop_control_files(dirs: &[PathBuf]) {
        for d in dirs {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                if e.path().is_file() {
                    std::fs::remove_file(e.path()).unwrap();
                }
            }
        }
    }

    struct FakeV2 {
        root: PathBuf,
    }

    impl FakeV2 {
        fn new(tag: &str, controllers: &str) -> FakeV2 {
            let root =
                std::env::temp_dir().join(format!("wisp-cgroup-v2-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for dir in [root.clone(), root.join("machine")] {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
                std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
                std::fs::write(dir.join("cgroup.procs"), "").unwrap();
            }
            FakeV2 { root }
        }

        fn host(&self) -> Host {
            Host {
                mounts: MountTable::parse(&format!(
                    "30 23 0:26 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
                    self.root.display()
                )),
                self_cgroup: "0::/\n".to_string(),
                online_cpus: "0-3".parse().unwrap(),
            }
        }

        fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.root.join(rel))
                .unwrap_or_else(|e| panic!("{rel}: {e}"))
                .trim()
                .to_string()
        }
    }

    impl Drop for FakeV2 {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn v2_creates_threaded_vcpu_group_and_enables_controllers_along_the_path() {
        let fake = FakeV2::new("create", "cpu cpuset memory io");
        let host = fake.host();
        let spec = CgroupSpec {
            parent: "machine".into(),
            cpu_max: Some("20000/100000".parse().unwrap()),
            cpuset: Some("1-2".parse().unwrap()),
            affinity: None,
        };
        let cg = VmCgroup::create_on(&host, &spec, "vm0").unwrap();
        assert_eq!(cg.version(), CgroupVersion::V2);
        let pid = std::process::id();
        let vm = format!("machine/{}", cg.name());
        assert!(cg.name().starts_with(&format!("wisp-vm0-{pid}-")));
        assert_eq!(fake.read("cgroup.subtree_control"), "+cpu +cpuset");
        assert_eq!(fake.read("machine/cgroup.subtree_control"), "+cpu +cpuset");
        assert_eq!(
            fake.read(&format!("{vm}/cgroup.subtree_control")),
            "+cpu +cpuset"
        );
        assert_eq!(fake.read(&format!("{vm}/vcpus/cgroup.type")), "threaded");
        assert_eq!(fake.read(&format!("{vm}/cgroup.procs")), pid.to_string());
        assert_eq!(fake.read(&format!("{vm}/vcpus/cpu.max")), "20000 100000");
        assert_eq!(fake.read(&format!("{vm}/vcpus/cpuset.cpus")), "1-2");

        cg.add_vcpu_thread(0, 4321).unwrap();
        assert_eq!(fake.read(&format!("{vm}/vcpus/cgroup.threads")), "4321");

        cg.set_limits(Some(CpuMax::UNLIMITED), None).unwrap();
        assert_eq!(fake.read(&format!("{vm}/vcpus/cpu.max")), "max 100000");
        cg.set_limits(
            Some("60000/50000".parse().unwrap()),
            Some("3".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(fake.read(&format!("{vm}/vcpus/cpu.max")), "60000 50000");
        assert_eq!(fake.read(&format!("{vm}/vcpus/cpuset.cpus")), "3");
        assert!(matches!(
            cg.set_limits(None, Some("7".parse().unwrap())),
            Err(Error::CpuNotOnline { cpu: 7, .. })
        ));

        std::fs::write(
            fake.root.join(&vm).join("vcpus/cpu.stat"),
            "usage_usec 4242\nuser_usec 4000\nsystem_usec 242\n",
        )
        .unwrap();
        assert_eq!(cg.usage_usec().unwrap(), 4242);

        let dirs = vec![cg.vcpu_dirs()[0].clone(), cg.vm_dirs()[0].clone()];
        drop_control_files(&dirs);
        cg.remove().unwrap();
        // The process went back to its own group (the root here), and the groups are gone.
        assert_eq!(fake.read("cgroup.procs"), pid.to_string());
        assert!(dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn v2_keeps_controllers_already_enabled() {
        let fake = FakeV2::new("enabled", "cpu cpuset");
        std::fs::write(fake.root.join("cgroup.subtree_control"), "cpu cpuset\n").unwrap();
        std::fs::write(fake.root.join("machine/cgroup.subtree_control"), "cpu\n").unwrap();
        let spec = CgroupSpec {
            parent: fake.root.join("machine").display().to_string(),
            ..Default::default()
        };
        let cg = VmCgroup::create_on(&fake.host(), &spec, "vm1").unwrap();
        // Untouched where already enabled; only the missing one written.
        assert_eq!(fake.read("cgroup.subtree_control"), "cpu cpuset");
        assert_eq!(fake.read("machine/cgroup.subtree_control"), "+cpuset");
        assert!(!fake
            .root
            .join("machine")
            .join(cg.name())
            .join("vcpus/cpu.max")
            .exists());
        let dirs = vec![cg.vcpu_dirs()[0].clone(), cg.vm_dirs()[0].clone()];
        drop_control_files(&dirs);
        drop(cg);
        assert!(dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn v2_without_cpu_controller_is_a_clear_error_and_touches_nothing() {
        let fake = FakeV2::new("nocpu", "memory io");
        let spec = CgroupSpec {
            parent: "machine".into(),
            ..Default::default()
        };
        let err = VmCgroup::create_on(&fake.host(), &spec, "vm2").unwrap_err();
        assert!(
            matches!(&err, Error::ControllerUnavailable { controller, .. } if controller == "cpu"),
            "{err}"
        );
        assert!(err.to_string().contains("memory io"), "{err}");
        assert_eq!(fake.read("cgroup.subtree_control"), "");
        // A cpuset asked for on a host without the cpuset controller.
        let fake = FakeV2::new("nocpuset", "cpu");
        let spec = CgroupSpec {
            parent: "machine".into(),
            cpuset: Some("0".parse().unwrap()),
            ..Default::default()
        };
        let err = VmCgroup::create_on(&fake.host(), &spec, "vm2").unwrap_err();
        assert!(
            matches!(&err, Error::ControllerUnavailable { controller, .. } if controller == "cpuset"),
            "{err}"
        );
    }

    #[test]
    fn v2_parent_errors_come_before_any_write() {
        let fake = FakeV2::new("parent", "cpu cpuset");
        let host = fake.host();
        let spec = |parent: &str| CgroupSpec {
            parent: parent.into(),
            ..Default::default()
        };
        let err = VmCgroup::create_on(&host, &spec("/tmp/not-a-cgroup"), "vm").unwrap_err();
        assert!(matches!(err, Error::ParentOutsideMount { .. }), "{err}");
        let err = VmCgroup::create_on(&host, &spec("machine/missing"), "vm").unwrap_err();
        assert!(
            matches!(&err, Error::ParentMissing { path } if path.ends_with("machine/missing")),
            "{err}"
        );
        let err = VmCgroup::create_on(&host, &spec("machine"), "bad/name").unwrap_err();
        assert!(matches!(err, Error::InvalidVmName { .. }), "{err}");
        assert_eq!(fake.read("cgroup.subtree_control"), "");
    }

    #[test]
    fn v2_stale_group_of_dead_process_is_removed() {
        let fake = FakeV2::new("stale", "cpu cpuset");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id() as libc::pid_t;
        let my_start = fs::process_start_time(me).unwrap();
        let stale = fake.root.join(format!("machine/wisp-old-{dead}-1"));
        let reused = fake
            .root
            .join(format!("machine/wisp-reused-{me}-{}", my_start + 1));
        let live = fake.root.join(format!("machine/wisp-live-{me}-{my_start}"));
        let other = fake.root.join("machine/not-wisp-1-2");
        for d in [&stale, &reused, &live, &other] {
            std::fs::create_dir_all(d.join("vcpus")).unwrap();
        }
        let n = VmCgroup::cleanup_stale_on(&fake.host(), "machine").unwrap();
        assert_eq!(n, 2);
        assert!(!stale.exists() && !reused.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn v1_comounted_cpu_cpuacct_and_cpuset_get_one_group_each() {
        let root = std::env::temp_dir().join(format!("wisp-cgroup-v1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let _cleanup = FakeV2 { root: root.clone() };
        let (cpu, cpuset) = (root.join("cpu,cpuacct"), root.join("cpuset"));
        for d in [cpu.join("machine"), cpuset.join("machine")] {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(cpuset.join("machine/cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(cpuset.join("machine/cpuset.mems"), "0\n").unwrap();
        let host = Host {
            mounts: MountTable::parse(&format!(
                "25 24 0:22 / {} rw - cgroup cgroup rw,cpu,cpuacct\n\
                 26 24 0:23 / {} rw - cgroup cgroup rw,cpuset\n",
                cpu.display(),
                cpuset.display()
            )),
            self_cgroup: "3:cpuset:/\n2:cpu,cpuacct:/\n".to_string(),
            online_cpus: "0-3".parse().unwrap(),
        };
        let spec = CgroupSpec {
            parent: "machine".into(),
            cpu_max: Some("30000/50000".parse().unwrap()),
            ..Default::default()
        };
        let cg = VmCgroup::create_on(&host, &spec, "v1").unwrap();
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .trim()
                .to_string()
        };
        let dirs = cg.vcpu_dirs();
        assert_eq!(dirs.len(), 2, "{dirs:?}");
        assert!(dirs[0].starts_with(cpu.join("machine")));
        assert_eq!(read(dirs[0].join("cpu.cfs_period_us")), "50000");
        assert_eq!(read(dirs[0].join("cpu.cfs_quota_us")), "30000");
        // The cpuset groups were filled from the parent before any task could join.
        for d in [cg.vm_dirs()[1].clone(), dirs[1].clone()] {
            assert_eq!(read(d.join("cpuset.cpus")), "0-3");
            assert_eq!(read(d.join("cpuset.mems")), "0");
        }
        cg.add_vcpu_thread(1, 999).unwrap();
        assert_eq!(read(dirs[0].join("tasks")), "999");
        assert_eq!(read(dirs[1].join("tasks")), "999");
        std::fs::write(dirs[0].join("cpuacct.usage"), "1234567\n").unwrap();
        assert_eq!(cg.usage_usec().unwrap(), 1234);
        cg.set_limits(None, Some("2".parse().unwrap())).unwrap();
        assert_eq!(read(dirs[1].join("cpuset.cpus")), "2");
        let all: Vec<PathBuf> = dirs.iter().chain(cg.vm_dirs().iter()).cloned().collect();
        drop_control_files(&all);
        cg.remove().unwrap();
        assert!(all.iter().all(|d| !d.exists()));
    }
}
