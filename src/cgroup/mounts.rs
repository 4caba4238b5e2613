//! Which cgroup hierarchy serves each controller, read from the mount table.

use std::path::{Path, PathBuf};

use super::fs::read_trimmed;
use super::spec::CpuList;
use super::Error;

/// The cgroup version of one hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "cgroup v1",
            CgroupVersion::V2 => "cgroup v2",
        })
    }
}

/// One cgroup or cgroup2 mount from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub version: CgroupVersion,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The cgroup of the hierarchy shown at `point` ("/" unless in a cgroup namespace or bind mount).
    pub root: PathBuf,
    /// v1: the controllers bound to the hierarchy (its mount options). v2: empty; read
    /// `cgroup.controllers` instead.
    pub controllers: Vec<String>,
}

/// The cgroup mounts of this mount namespace: an input, so tests can lay out their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable {
    pub mounts: Vec<CgroupMount>,
}

const V1_CONTROLLER_OPTIONS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "net_cls",
    "net_prio",
    "perf_event",
    "hugetlb",
    "rdma",
    "misc",
];

impl MountTable {
    pub fn from_proc() -> Result<MountTable, Error> {
        const MOUNTINFO: &str = "/proc/self/mountinfo";
        let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| Error::Io {
            op: "read",
            path: MOUNTINFO.into(),
            source,
        })?;
        Ok(MountTable::parse(&text))
    }

    /// Parses mountinfo (proc(5)): `id parent maj:min root point opts [tags] - fstype src superopts`.
    /// Lines that are not cgroup mounts, or malformed, are skipped.
    pub fn parse(mountinfo: &str) -> MountTable {
        let mut mounts = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            if left.len() < 5 || right.len() < 3 {
                continue;
            }
            let (root, point) = (unescape(left[3]), unescape(left[4]));
            let version = match right[0] {
                "cgroup" => CgroupVersion::V1,
                "cgroup2" => CgroupVersion::V2,
                _ => continue,
            };
            let controllers = match version {
                CgroupVersion::V1 => right[2]
                    .split(',')
                    .filter(|o| V1_CONTROLLER_OPTIONS.contains(o))
                    .map(str::to_string)
                    .collect(),
                CgroupVersion::V2 => Vec::new(),
            };
            mounts.push(CgroupMount {
                version,
                point: root_path(point),
                root: root_path(root),
                controllers,
            });
        }
        MountTable { mounts }
    }

    /// The mount whose point is the longest prefix of `path`.
    pub(crate) fn mount_of(&self, path: &Path) -> Option<&CgroupMount> {
        self.mounts
            .iter()
            .filter(|m| path.starts_with(&m.point))
            .max_by_key(|m| m.point.components().count())
    }

    /// The hierarchy serving `controller`: a v1 hierarchy bound to it, else a v2 mount that
    /// lists it in its root `cgroup.controllers`.
    pub(crate) fn find(&self, controller: &str) -> Result<&CgroupMount, Error> {
        if let Some(m) = self.mounts.iter().find(|m| {
            m.version == CgroupVersion::V1 && m.controllers.iter().any(|c| c == controller)
        }) {
            return Ok(m);
        }
        let mut looked_at = Vec::new();
        for m in self
            .mounts
            .iter()
            .filter(|m| m.version == CgroupVersion::V2)
        {
            let file = m.point.join("cgroup.controllers");
            let listed = read_trimmed(&file).unwrap_or_default();
            if listed.split_whitespace().any(|c| c == controller) {
                return Ok(m);
            }
            looked_at.push(format!(
                "the cgroup v2 mount {} lists only `{}`",
                m.point.display(),
                listed
            ));
        }
        looked_at.insert(0, "no cgroup v1 hierarchy has it".to_string());
        Err(Error::ControllerUnavailable {
            controller: controller.to_string(),
            looked_at: looked_at.join("; "),
        })
    }

    pub(crate) fn describe(&self) -> String {
        if self.mounts.is_empty() {
            return "no cgroup mounts".to_string();
        }
        self.mounts
            .iter()
            .map(|m| m.point.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn root_path(p: String) -> PathBuf {
    PathBuf::from(if p.is_empty() { "/".to_string() } else { p })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What wisp reads about the host: the mount table, the process's own cgroups and the online
/// CPUs. Real code uses `Host::current()`; tests build one around a temporary directory.
#[derive(Debug, Clone)]
pub struct Host {
    pub mounts: MountTable,
    /// Contents of /proc/self/cgroup: `id:controllers:path` lines.
    pub self_cgroup: String,
    pub online_cpus: CpuList,
}

impl Host {
    pub fn current() -> Result<Host, Error> {
        const SELF_CGROUP: &str = "/proc/self/cgroup";
        Ok(Host {
            mounts: MountTable::from_proc()?,
            self_cgroup: std::fs::read_to_string(SELF_CGROUP).map_err(|source| Error::Io {
                op: "read",
                path: SELF_CGROUP.into(),
                source,
            })?,
            online_cpus: CpuList::online()?,
        })
    }

    /// The directory of this process's cgroup in `mount`'s hierarchy.
    pub(crate) fn own_group(&self, mount: &CgroupMount) -> Option<PathBuf> {
        for line in self.self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let matches = match mount.version {
                CgroupVersion::V2 => id == "0" && ctrls.is_empty(),
                CgroupVersion::V1 => ctrls
                    .split(',')
                    .any(|c| mount.controllers.iter().any(|m| m == c)),
            };
            if matches {
                let rel = Path::new(path).strip_prefix(&mount.root).ok()?;
                return Some(mount.point.join(rel));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_hybrid_mountinfo() {
        let t = MountTable::parse(HYBRID);
        assert_eq!(t.mounts.len(), 5);
        assert_eq!(
            t.find("cpu").unwrap().point,
            Path::new("/sys/fs/cgroup/cpu")
        );
        assert_eq!(t.find("cpuset").unwrap().controllers, vec!["cpuset"]);
        assert_eq!(t.mounts[3].controllers, Vec::<String>::new());
        assert_eq!(t.mounts[4].version, CgroupVersion::V2);
        assert_eq!(
            t.mount_of(Path::new("/sys/fs/cgroup/cpu/a/b"))
                .unwrap()
                .point,
            Path::new("/sys/fs/cgroup/cpu")
        );
        assert!(t.mount_of(Path::new("/sys/fs/cgroup/foo")).is_none());
        assert!(t.mount_of(Path::new("/sys/fs/cgroup/cpuacctx")).is_none());
    }

    #[test]
    fn parses_comounted_and_escaped_mounts() {
        let t = MountTable::parse(
            "25 24 0:22 /ns /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             26 24 0:23 / /mnt/my\\040cg rw shared:5 - cgroup2 cgroup2 rw,nsdelegate\n\
             garbage line\n",
        );
        assert_eq!(t.mounts.len(), 2);
        assert_eq!(t.mounts[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(t.mounts[0].root, Path::new("/ns"));
        assert_eq!(t.mounts[1].point, Path::new("/mnt/my cg"));
        let cpu = t.find("cpu").unwrap();
        assert_eq!(cpu, t.find("cpuacct").unwrap());
    }

    #[test]
    fn own_group_maps_proc_cgroup_through_mount_root() {
        let t = MountTable::parse(
            "25 24 0:22 /ns /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             26 24 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        );
        let host = Host {
            mounts: t.clone(),
            self_cgroup: "3:cpuset:/\n2:cpu,cpuacct:/ns/a/b\n0::/user.slice\n".into(),
            online_cpus: "0".parse().unwrap(),
        };
        assert_eq!(
            host.own_group(&t.mounts[0]).unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/a/b")
        );
        assert_eq!(
            host.own_group(&t.mounts[1]).unwrap(),
            Path::new("/sys/fs/cgroup/unified/user.slice")
        );
    }

    #[test]
    fn missing_controller_names_what_was_looked_at() {
        let dir = std::env::temp_dir().join(format!("wisp-cg-mounts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), "hugetlb\n").unwrap();
        let t = MountTable::parse(&format!(
            "41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n",
            dir.display()
        ));
        let err = t.find("cpu").unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        let msg = err.to_string();
        assert!(matches!(err, Error::ControllerUnavailable { .. }));
        assert!(msg.contains("`cpu`"), "{msg}");
        assert!(msg.contains("cgroup v2 mount"), "{msg}");
        assert!(msg.contains("hugetlb"), "{msg}");
    }
}
