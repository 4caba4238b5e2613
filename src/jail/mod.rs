//! `wisp jail` (also wisp started as `jailer`): Firecracker's jailer contract, so a node agent
//! written for Firecracker's `jailer` starts wisp confined. As root it builds
//! `<chroot-base-dir>/<exec-file name>/<id>/root`, puts the exec file (and, for a dynamically
//! linked one, its loader and libraries) and the device nodes a VM needs inside, moves itself
//! into the cgroups and network namespace it was given, pivots into the chroot in a mount
//! namespace of its own, drops to `--uid`/`--gid` with no capabilities and no_new_privs, and
//! execs the exec file with `--id`, the start-up times and the arguments after `--`.
//!
//! Everything it made is listed by [`JailPaths`] and removed by `wisp jail --cleanup`.
//! Inside the jail wisp has no /proc, /sys or cgroup tree: its per-vCPU cgroup is refused
//! there (see [`inside`]); the jailer's own `--cgroup` confines the whole process instead.

mod cgroup;
mod elf;
mod setup;
mod sys;

use clap::Args;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub use cgroup::CgroupVersion;
pub use setup::run;

/// Firecracker's default chroot base.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// The longest `--id` (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;
/// RLIMIT_NOFILE when no `--resource-limit no-file=` is given, as Firecracker's jailer.
pub const DEFAULT_NO_FILE: u64 = 2048;

/// The jailer's flags, as Firecracker's `jailer` spells them.
#[derive(Args, Debug, Default, Clone)]
pub struct JailArgs {
    /// The VM's id: 1 to 64 letters, digits or '-'; names the chroot and cgroup directories.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// The VMM binary to copy into the chroot and exec (wisp); its file name names the
    /// chroot's parent directory.
    #[arg(long, value_name = "PATH")]
    pub exec_file: Option<PathBuf>,
    /// The user the VMM runs as (not 0 unless --allow-root).
    #[arg(long, value_name = "UID")]
    pub uid: Option<String>,
    /// The group the VMM runs as (not 0 unless --allow-root).
    #[arg(long, value_name = "GID")]
    pub gid: Option<String>,
    /// Accept uid or gid 0 (the VMM then keeps root's capabilities: for debugging only).
    #[arg(long)]
    pub allow_root: bool,
    /// Where chroots are built (must exist and not be a symbolic link) [default: /srv/jailer].
    #[arg(long, value_name = "DIR")]
    pub chroot_base_dir: Option<PathBuf>,
    /// Join this network namespace (e.g. /var/run/netns/NAME) before exec.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// A cgroup file to write, `<controller>.<file>=<value>` (e.g. cpuset.cpus=0,
    /// memory.max=256M), repeatable; the process joins `<controller root>/<parent>/<id>`.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// 1 (controllers under /sys/fs/cgroup/<controller>) or 2 (the unified hierarchy)
    /// [default: 1].
    #[arg(long, value_name = "1|2")]
    pub cgroup_version: Option<String>,
    /// The cgroup the VM's group is made in, relative to each hierarchy's root [default: the
    /// exec file's name].
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// Exec the VMM as pid 1 of a new PID namespace; its pid (as the host sees it) is written
    /// to `<chroot>/<exec file name>.pid`.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Start a new session and point stdin, stdout and stderr at /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// `no-file=N` or `fsize=N` (bytes), repeatable [default: no-file=2048].
    #[arg(long = "resource-limit", value_name = "RESOURCE=N")]
    pub resource_limits: Vec<String>,
    /// wisp's addition: hard-link (or copy, across file systems) a host file into the
    /// chroot and give it to --uid/--gid, repeatable: `HOST_PATH[:JAIL_PATH]` (default: the
    /// file's name at the chroot's root). The link shares the host file's inode, owner
    /// included: use it for the VM's own files (its disks), not for files shared between VMs.
    #[arg(long = "link-in", value_name = "HOST[:JAIL]")]
    pub link_in: Vec<String>,
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Remove what the jailer made for --id (the `<id>` chroot directory and cgroup
    /// directories) instead of starting anything; the VM must have exited.
    #[arg(long)]
    pub cleanup: bool,
    /// The VMM's arguments (after `--`), e.g. `--api-sock /run/api.sock` (a path inside the
    /// chroot).
    #[arg(last = true, value_name = "VMM ARGS")]
    pub exec_args: Vec<OsString>,
}

/// The command line of wisp started under the name `jailer`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "jailer",
    about = "wisp's jailer: starts a VMM in a chroot, namespaces and cgroups, as an \
             unprivileged user (Firecracker's jailer contract)"
)]
pub struct JailerCli {
    #[command(flatten)]
    pub args: JailArgs,
}

/// Bad jailer input and failed set-up; each names the flag or the file.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--{0} is required")]
    Missing(&'static str),
    #[error("--id: {0:?} is not a valid id (1 to {MAX_ID_LEN} letters, digits or '-')")]
    BadId(String),
    #[error("--exec-file: {}: {source}", path.display())]
    ExecFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--exec-file: {} is not a regular file", .0.display())]
    ExecNotAFile(PathBuf),
    #[error("--exec-file: the file name of {} must be UTF-8 text (it names the chroot's directory)", .0.display())]
    ExecName(PathBuf),
    #[error("--{flag}: {value:?} is not a number")]
    BadNumber { flag: &'static str, value: String },
    #[error("--{0} 0 is root: the VMM would keep every capability; give --allow-root to mean it")]
    Root(&'static str),
    #[error("--chroot-base-dir: {}: {source}", path.display())]
    ChrootBase {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--chroot-base-dir: {} is a symbolic link; give the directory it points to", .0.display())]
    ChrootBaseSymlink(PathBuf),
    #[error("--chroot-base-dir: {} is not a directory", .0.display())]
    ChrootBaseNotADir(PathBuf),
    #[error("--netns: {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cgroup-version: {0:?} is not 1 or 2")]
    CgroupVersion(String),
    #[error("--cgroup: {value:?}: {reason}")]
    Cgroup { value: String, reason: &'static str },
    #[error("--parent-cgroup: {0:?} must be a relative path of plain names (no '/', '.', '..' at either end or inside)")]
    ParentCgroup(String),
    #[error("--resource-limit: {value:?}: {reason}")]
    ResourceLimit { value: String, reason: &'static str },
    #[error("--link-in: {value:?}: {reason}")]
    LinkIn { value: String, reason: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Cgroups(String),
    #[error("{}: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: &'static str },
    #[error("process {pid} still runs in {}: stop it before the cleanup", root.display())]
    StillRunning { pid: u32, root: PathBuf },
    #[error("cannot exec {}: {source}", path.display())]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `--resource-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    NoFile(u64),
    FileSize(u64),
}

/// One `--link-in`: a host file and where it goes, relative to the chroot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkIn {
    pub host: PathBuf,
    pub jail: PathBuf,
}

/// One `--cgroup`: `<controller>.<file>` and the value written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    pub controller: String,
    pub file: String,
    pub value: String,
}

/// Where the jailer puts things; what `--cleanup` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPaths {
    /// `<base>/<exec name>/<id>`: removed whole by the cleanup.
    pub id_dir: PathBuf,
    /// `<id_dir>/root`: the VMM's `/`.
    pub root: PathBuf,
    /// The exec file's name: the VMM is `/<exec_name>` inside.
    pub exec_name: String,
    /// Relative to each hierarchy's root: `<parent>/<id>`.
    pub cgroup: PathBuf,
}

/// The validated jailer input: nothing on the host has been touched yet.
#[derive(Debug, Clone)]
pub struct Jail {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub paths: JailPaths,
    pub netns: Option<PathBuf>,
    pub cgroup_version: CgroupVersion,
    pub cgroups: Vec<CgroupSetting>,
    pub new_pid_ns: bool,
    pub daemonize: bool,
    pub resource_limits: Vec<ResourceLimit>,
    pub link_in: Vec<LinkIn>,
    pub exec_args: Vec<OsString>,
}

/// What `wisp jail --cleanup` removes.
#[derive(Debug, Clone)]
pub struct Cleanup {
    pub paths: JailPaths,
    pub cgroup_version: CgroupVersion,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { what, path, source }
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A relative path of plain names only: no root, `.`, `..` or empty name.
fn plain_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !p.split('/').any(|s| s.is_empty() || s == "." || s == "..")
}

fn id_of(args: &JailArgs) -> Result<String, JailError> {
    let id = args.id.clone().ok_or(JailError::Missing("id"))?;
    if !valid_id(&id) {
        return Err(JailError::BadId(id));
    }
    Ok(id)
}

fn number(flag: &'static str, v: &str) -> Result<u32, JailError> {
    v.parse().map_err(|_| JailError::BadNumber {
        flag,
        value: v.to_string(),
    })
}

fn chroot_base(args: &JailArgs) -> Result<PathBuf, JailError> {
    let base = args
        .chroot_base_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHROOT_BASE));
    let meta = std::fs::symlink_metadata(&base).map_err(|source| JailError::ChrootBase {
        path: base.clone(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(JailError::ChrootBaseSymlink(base));
    }
    if !meta.is_dir() {
        return Err(JailError::ChrootBaseNotADir(base));
    }
    std::fs::canonicalize(&base).map_err(|source| JailError::ChrootBase { path: base, source })
}

fn cgroup_version(args: &JailArgs) -> Result<CgroupVersion, JailError> {
    match args.cgroup_version.as_deref() {
        None | Some("1") => Ok(CgroupVersion::V1),
        Some("2") => Ok(CgroupVersion::V2),
        Some(v) => Err(JailError::CgroupVersion(v.to_string())),
    }
}

fn paths(args: &JailArgs, id: &str, exec_name: String) -> Result<JailPaths, JailError> {
    let base = chroot_base(args)?;
    let parent = match &args.parent_cgroup {
        Some(p) if !plain_relative(p) => return Err(JailError::ParentCgroup(p.clone())),
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(&exec_name),
    };
    let id_dir = base.join(&exec_name).join(id);
    Ok(JailPaths {
        root: id_dir.join("root"),
        id_dir,
        cgroup: parent.join(id),
        exec_name,
    })
}

/// The exec file's name, which must be a plain name the chroot can hold.
fn exec_name(path: &Path) -> Result<String, JailError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| plain_relative(n))
        .map(str::to_string)
        .ok_or_else(|| JailError::ExecName(path.to_path_buf()))
}

fn parse_cgroup(value: &str) -> Result<CgroupSetting, JailError> {
    let bad = |reason| JailError::Cgroup {
        value: value.to_string(),
        reason,
    };
    let (key, v) = value
        .split_once('=')
        .ok_or_else(|| bad("expected <controller>.<file>=<value>"))?;
    if key.contains('/') || key.contains("..") || key.contains('\0') {
        return Err(bad("the file name may not contain '/' or '..'"));
    }
    let (controller, _) = key
        .split_once('.')
        .filter(|(c, f)| !c.is_empty() && !f.is_empty())
        .ok_or_else(|| bad("expected <controller>.<file>=<value>, e.g. cpuset.cpus=0"))?;
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(bad(
            "the file name may hold only letters, digits, '.', '_' and '-'",
        ));
    }
    if v.is_empty() || v.contains(['\n', '\0']) {
        return Err(bad("the value must be one non-empty line"));
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: key.to_string(),
        value: v.to_string(),
    })
}

fn parse_resource_limit(value: &str) -> Result<ResourceLimit, JailError> {
    let bad = |reason| JailError::ResourceLimit {
        value: value.to_string(),
        reason,
    };
    let (name, n) = value
        .split_once('=')
        .ok_or_else(|| bad("expected no-file=N or fsize=N"))?;
    let n: u64 = n
        .parse()
        .map_err(|_| bad("the limit is not a whole number"))?;
    match name {
        "no-file" => Ok(ResourceLimit::NoFile(n)),
        "fsize" => Ok(ResourceLimit::FileSize(n)),
        _ => Err(bad("unknown resource (no-file or fsize)")),
    }
}

fn parse_link_in(value: &str) -> Result<LinkIn, JailError> {
    let bad = |reason: String| JailError::LinkIn {
        value: value.to_string(),
        reason,
    };
    let (host, jail) = match value.split_once(':') {
        Some((h, j)) => (PathBuf::from(h), j.to_string()),
        None => {
            let h = PathBuf::from(value);
            let name = h
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| bad("the host path has no file name".into()))?
                .to_string();
            (h, name)
        }
    };
    let meta = std::fs::metadata(&host).map_err(|e| bad(format!("{}: {e}", host.display())))?;
    if !meta.is_file() {
        return Err(bad(format!("{} is not a regular file", host.display())));
    }
    let rel = jail.trim_start_matches('/');
    if !plain_relative(rel) {
        return Err(bad(
            "the jail path must be a path of plain names inside the chroot (no '..')".into(),
        ));
    }
    Ok(LinkIn {
        host,
        jail: PathBuf::from(rel),
    })
}

impl JailArgs {
    /// Checks every flag before anything on the host is made.
    pub fn validate(&self) -> Result<Jail, JailError> {
        let id = id_of(self)?;
        let given = self
            .exec_file
            .clone()
            .ok_or(JailError::Missing("exec-file"))?;
        let exec_file = std::fs::canonicalize(&given).map_err(|source| JailError::ExecFile {
            path: given.clone(),
            source,
        })?;
        if !std::fs::metadata(&exec_file).is_ok_and(|m| m.is_file()) {
            return Err(JailError::ExecNotAFile(exec_file));
        }
        let exec_name = exec_name(&exec_file)?;
        let uid = number("uid", self.uid.as_deref().ok_or(JailError::Missing("uid"))?)?;
        let gid = number("gid", self.gid.as_deref().ok_or(JailError::Missing("gid"))?)?;
        if !self.allow_root {
            if uid == 0 {
                return Err(JailError::Root("uid"));
            }
            if gid == 0 {
                return Err(JailError::Root("gid"));
            }
        }
        let cgroup_version = cgroup_version(self)?;
        let paths = paths(self, &id, exec_name)?;
        if let Some(ns) = &self.netns {
            std::fs::metadata(ns).map_err(|source| JailError::Netns {
                path: ns.clone(),
                source,
            })?;
        }
        let cgroups: Vec<CgroupSetting> = self
            .cgroups
            .iter()
            .map(|c| parse_cgroup(c))
            .collect::<Result<_, _>>()?;
        cgroup::check_available(cgroup_version, &cgroups)?;
        Ok(Jail {
            id,
            exec_file,
            uid,
            gid,
            paths,
            netns: self.netns.clone(),
            cgroup_version,
            cgroups,
            new_pid_ns: self.new_pid_ns,
            daemonize: self.daemonize,
            resource_limits: self
                .resource_limits
                .iter()
                .map(|r| parse_resource_limit(r))
                .collect::<Result<_, _>>()?,
            link_in: self
                .link_in
                .iter()
                .map(|l| parse_link_in(l))
                .collect::<Result<_, _>>()?,
            exec_args: self.exec_args.clone(),
        })
    }

    /// `--cleanup`: only the flags that name what was made. The exec file need not exist
    /// any more; its name is enough.
    pub fn validate_cleanup(&self) -> Result<Cleanup, JailError> {
        let id = id_of(self)?;
        let exec = self
            .exec_file
            .clone()
            .ok_or(JailError::Missing("exec-file"))?;
        let paths = paths(self, &id, exec_name(&exec)?)?;
        Ok(Cleanup {
            paths,
            cgroup_version: cgroup_version(self)?,
        })
    }
}

impl Cleanup {
    /// Removes the VM's cgroup directories (which fails while a process is still in them),
    /// then its chroot directory. Returns what was removed.
    pub fn run(&self) -> Result<Vec<PathBuf>, JailError> {
        // wisp's exit leaves a child closing the VM for a few (loaded: ~100) milliseconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Some(pid) = process_inside(&self.paths.root) {
            if std::time::Instant::now() >= deadline {
                return Err(JailError::StillRunning {
                    pid,
                    root: self.paths.root.clone(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut removed = cgroup::remove(self.cgroup_version, &self.paths.cgroup)?;
        match std::fs::symlink_metadata(&self.paths.id_dir) {
            Ok(_) => {
                // remove_dir_all does not follow symbolic links: whatever the VM left inside
                // cannot point it outside.
                std::fs::remove_dir_all(&self.paths.id_dir).map_err(|source| JailError::Io {
                    what: "removing",
                    path: self.paths.id_dir.clone(),
                    source,
                })?;
                removed.push(self.paths.id_dir.clone());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(JailError::Io {
                    what: "reading",
                    path: self.paths.id_dir.clone(),
                    source,
                })
            }
        }
        Ok(removed)
    }
}

/// A process whose root directory is `root` (the VMM, or anything it left running).
fn process_inside(root: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let jail = std::fs::metadata(root).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let m = std::fs::metadata(e.path().join("root")).ok()?;
        ((m.dev(), m.ino()) == (jail.dev(), jail.ino())).then_some(pid)
    })
}

static INSIDE: AtomicBool = AtomicBool::new(false);

/// Called when the jailer started this wisp (it passes `--jailed`).
pub fn mark_inside() {
    INSIDE.store(true, Ordering::Relaxed);
}

/// Whether this wisp runs inside `wisp jail`'s chroot. There it sees no /sys/fs/cgroup and
/// no /proc, so its per-vCPU cgroup is refused with [`VCPU_CGROUP_REFUSED`]: mounting the
/// cgroup tree into the jail would hand the VMM's user a view of the host's groups; the
/// jailer's `--cgroup` confines the whole VM instead.
pub fn inside() -> bool {
    INSIDE.load(Ordering::Relaxed)
}

pub const VCPU_CGROUP_REFUSED: &str = "the per-vCPU cgroup is not available inside `wisp jail`: \
     the chroot has no /sys/fs/cgroup; confine the VM with the jailer's --cgroup instead";

#[cfg(test)]
mod tests;
