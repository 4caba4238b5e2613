//! Reads and writes of cgroup control files, with errors that name the file and value.

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::Error;

const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// How long to retry rmdir of a group whose threads are still exiting.
const RMDIR_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether `path` is on a cgroup or cgroup2 filesystem. A directory standing in for one
/// (tests) does not create control files by itself, so writes there create them.
pub(crate) fn is_cgroupfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we own; `c` is a valid C string.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    let magic = st.f_type as i64;
    magic == CGROUP_SUPER_MAGIC || magic == CGROUP2_SUPER_MAGIC
}

pub(crate) fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

pub(crate) fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| io_error("read", path, source))
}

/// Writes `value` in one write(2), as the kernel expects for control files.
pub(crate) fn write(path: &Path, value: &str, create: bool) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
        .map_err(|source| io_error("open", path, source))?;
    f.write_all(value.as_bytes())
        .map_err(|source| Error::KernelRejected {
            file: path.to_path_buf(),
            value: value.trim().to_string(),
            hint: hint_for(path, &source),
            source,
        })
}

/// Rejections with a cause that is not obvious from errno.
fn hint_for(path: &Path, err: &io::Error) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match (name, err.raw_os_error()) {
        ("cgroup.subtree_control", Some(libc::EBUSY)) => {
            " (a cgroup v2 group holding processes cannot enable controllers for its children: \
             pick a parent with no processes of its own)"
        }
        ("cgroup.threads", Some(libc::EOPNOTSUPP)) | ("cgroup.threads", Some(libc::EINVAL)) => {
            " (the thread's process must be in the VM's threaded domain)"
        }
        // v1 cpuset answers EACCES for CPUs outside the parent's set.
        ("cpuset.cpus", Some(libc::EINVAL)) | ("cpuset.cpus", Some(libc::EACCES)) => {
            " (the CPUs must be online and allowed in the parent group's cpuset.cpus)"
        }
        ("cpu.cfs_quota_us", Some(libc::EINVAL)) => {
            " (a cgroup v1 child's quota may not exceed its parent's)"
        }
        (_, Some(libc::ENOSPC)) => " (the group's cpuset.cpus or cpuset.mems is empty)",
        _ => "",
    }
}

pub(crate) fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir(path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => Error::GroupExists {
            path: path.to_path_buf(),
        },
        _ => io_error("create", path, source),
    })
}

/// Removes an (empty) cgroup, retrying while threads that just exited still hold it.
/// A group that is already gone is not an error.
pub(crate) fn rmdir(path: &Path) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < RMDIR_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::GroupBusy {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => return Err(io_error("remove", path, source)),
        }
    }
}

pub(crate) fn io_error(op: &'static str, path: &Path, source: io::Error) -> Error {
    match source.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Error::PermissionDenied {
            op,
            path: path.to_path_buf(),
            source,
        },
        Some(libc::ENOENT) if op == "open" => Error::MissingFile {
            path: path.to_path_buf(),
        },
        _ => Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Thread ids listed in a `tasks` / `cgroup.threads` / `cgroup.procs` file.
pub(crate) fn read_ids(path: &Path) -> Vec<libc::pid_t> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// The start time of `pid` in clock ticks since boot (proc(5) stat field 22), if it is alive.
pub(crate) fn process_start_time(pid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
