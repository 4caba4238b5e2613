//! The jailer's cgroups: `<hierarchy root>/<parent>/<id>` in each hierarchy a `--cgroup`
//! setting names, its files written, then the whole process moved in (before it drops root,
//! since afterwards it could not). The hierarchies are found in /proc/self/mountinfo.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{io_err, CgroupSetting, JailError};
pub use crate::cgroup::CgroupVersion;
use crate::cgroup::MountTable;

fn mounts() -> Result<MountTable, JailError> {
    MountTable::from_proc().map_err(|e| JailError::Cgroups(e.to_string()))
}

/// Writes `value` to a control file in one write(2), as the kernel expects.
fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| JailError::Io {
            what: "writing the cgroup file",
            path: path.to_path_buf(),
            source,
        })
}

fn read(path: &Path) -> Result<String, JailError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err("reading the cgroup file", path))
}

/// The mount point of the hierarchy holding `controller` in `version`.
fn hierarchy(
    table: &MountTable,
    version: CgroupVersion,
    controller: &str,
) -> Result<PathBuf, JailError> {
    let unavailable = |looked: String| {
        JailError::Cgroups(format!(
            "--cgroup: controller `{controller}` is not available in {version} ({looked})"
        ))
    };
    match version {
        CgroupVersion::V1 => table
            .mounts
            .iter()
            .find(|m| m.version == version && m.controllers.iter().any(|c| c == controller))
            .map(|m| m.point.clone())
            .ok_or_else(|| unavailable("no cgroup v1 hierarchy is bound to it".into())),
        CgroupVersion::V2 => {
            let m = table
                .mounts
                .iter()
                .find(|m| m.version == version)
                .ok_or_else(|| unavailable("no cgroup2 mount".into()))?;
            let listed = read(&m.point.join("cgroup.controllers"))?;
            if !listed.split_whitespace().any(|c| c == controller) {
                return Err(unavailable(format!(
                    "{} lists only `{listed}`",
                    m.point.join("cgroup.controllers").display()
                )));
            }
            Ok(m.point.clone())
        }
    }
}

/// Checks, before anything is made, that a hierarchy of `version` serves every setting's
/// controller.
pub fn check_available(
    version: CgroupVersion,
    settings: &[CgroupSetting],
) -> Result<(), JailError> {
    if settings.is_empty() {
        return Ok(());
    }
    let table = mounts()?;
    for s in settings {
        hierarchy(&table, version, &s.controller)?;
    }
    Ok(())
}

/// Makes `rel` under `root` level by level. In a v1 cpuset hierarchy a new group starts
/// with no CPUs or memory nodes, and no task may join it: each level gets its parent's.
/// In v2, each level above enables the controller for its children.
fn make_path(
    root: &Path,
    rel: &Path,
    version: CgroupVersion,
    controller: &str,
) -> Result<PathBuf, JailError> {
    let mut dir = root.to_path_buf();
    for name in rel.components() {
        if version == CgroupVersion::V2 {
            let ctl = dir.join("cgroup.subtree_control");
            if !read(&ctl)?.split_whitespace().any(|c| c == controller) {
                write(&ctl, &format!("+{controller}"))?;
            }
        }
        let parent = dir.clone();
        dir.push(name);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err("creating the cgroup", &dir)(e))
            }
            _ => {}
        }
        if version == CgroupVersion::V1 && controller == "cpuset" {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if read(&dir.join(f))?.is_empty() {
                    write(&dir.join(f), &read(&parent.join(f))?)?;
                }
            }
        }
    }
    Ok(dir)
}

/// Creates the groups, writes the settings (all of them before any join: a v1 cpuset takes
/// no task until its CPUs are set), then moves this process into each group. Returns the
/// groups.
pub fn enter(
    version: CgroupVersion,
    rel: &Path,
    settings: &[CgroupSetting],
) -> Result<Vec<PathBuf>, JailError> {
    if settings.is_empty() {
        return Ok(Vec::new());
    }
    let table = mounts()?;
    let mut groups: Vec<PathBuf> = Vec::new();
    for s in settings {
        let root = hierarchy(&table, version, &s.controller)?;
        let group = make_path(&root, rel, version, &s.controller)?;
        write(&group.join(&s.file), &s.value)?;
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    let pid = std::process::id().to_string();
    for g in &groups {
        write(&g.join("cgroup.procs"), &pid)?;
    }
    Ok(groups)
}

/// Removes `<root>/<rel>` from every hierarchy of `version` that has it. A group that still
/// holds a process cannot be removed (EBUSY): the error says so. A process that just exited
/// may take a moment to leave, hence the short retry.
pub fn remove(version: CgroupVersion, rel: &Path) -> Result<Vec<PathBuf>, JailError> {
    const BUSY_FOR: Duration = Duration::from_secs(2);
    let table = mounts()?;
    let mut removed = Vec::new();
    for m in table.mounts.iter().filter(|m| m.version == version) {
        let dir = m.point.join(rel);
        if !dir.is_dir() || removed.contains(&dir) {
            continue;
        }
        let deadline = Instant::now() + BUSY_FOR;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(JailError::Cgroups(format!(
                        "cannot remove the cgroup {}: processes are still in it (stop the VM first)",
                        dir.display()
                    )))
                }
                Err(e) => return Err(io_err("removing the cgroup", &dir)(e)),
            }
        }
        removed.push(dir);
    }
    Ok(removed)
}
