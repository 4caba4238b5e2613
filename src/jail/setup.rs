//! Building the jail and exec'ing the VMM in it, in Firecracker's jailer's order: files into
//! the chroot while the host is visible, then resource limits, cgroups, the network
//! namespace, the pivot into the chroot, the device nodes, daemonizing, the PID namespace,
//! dropping root, exec.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};

use super::{cgroup, elf, io_err, sys, Jail, JailError, ResourceLimit, DEFAULT_NO_FILE};
use crate::startup_trace::clock_us;

/// Device nodes the VM needs: (path inside the chroot, major, minor), from the kernel's
/// admin-guide/devices.txt.
const DEVICES: &[(&str, u32, u32)] = &[
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    // Rust's std and the guest-visible random MAC fallback read it.
    ("dev/urandom", 1, 9),
];
/// Made inside the chroot and given to the VMM's user: /dev for the nodes, /run for the
/// default API socket (/run/firecracker.socket).
const OWNED_DIRS: &[&str] = &["dev", "dev/net", "run"];
/// wisp recognises the software KVM of its development hosts by this sysfs directory
/// (`arch::x86_64::pvm`); the chroot has no /sys, so the jailer makes an empty stand-in.
const PVM_MARKER: &str = "sys/module/kvm_pvm";

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

/// Creates `dir` (mode 0755, root's) unless it exists; refuses anything there that is not a
/// real directory, so that no symbolic link left in the chroot sends a later step outside.
fn make_dir(dir: &Path) -> Result<(), JailError> {
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io_err("creating", dir)(e))
        }
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io_err("reading", dir))?;
    if !meta.file_type().is_dir() {
        return Err(JailError::Unsafe {
            path: dir.to_path_buf(),
            reason: "is in the way of the jail and is not a directory (a symbolic link?)",
        });
    }
    Ok(())
}

/// Creates every directory of `rel` below `base`.
fn make_dirs(base: &Path, rel: &Path) -> Result<(), JailError> {
    let mut dir = base.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        dir.push(name);
        make_dir(&dir)?;
    }
    Ok(())
}

/// Removes whatever is at `path` (a file of an earlier run with the same id), without
/// following a symbolic link.
fn clear(path: &Path) -> Result<(), JailError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// Hard-links `from` at `to`, or copies it when they are on different file systems.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), JailError> {
    clear(to)?;
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => std::fs::copy(from, to)
            .map(drop)
            .map_err(io_err("copying into the jail", from)),
        Err(e) => Err(io_err("linking into the jail", from)(e)),
    }
}

/// `path` as seen from `root` (a path inside the chroot, absolute or not).
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Everything placed in the chroot while the host's files are still visible.
fn populate(jail: &Jail) -> Result<(), JailError> {
    let root = &jail.paths.root;
    for dir in [
        jail.paths.id_dir.parent().expect("<base>/<exec name>"),
        &jail.paths.id_dir,
        root,
    ] {
        make_dir(dir)?;
    }
    link_or_copy(&jail.exec_file, &root.join(&jail.paths.exec_name))?;
    let runtime =
        elf::runtime_files(&jail.exec_file).map_err(io_err("reading", &jail.exec_file))?;
    for file in runtime {
        let rel = file.strip_prefix("/").unwrap_or(&file).to_path_buf();
        make_dirs(root, rel.parent().unwrap_or(Path::new("")))?;
        let host = std::fs::canonicalize(&file).map_err(io_err("reading", &file))?;
        link_or_copy(&host, &inside(root, &rel))?;
    }
    for l in &jail.link_in {
        let host = std::fs::canonicalize(&l.host).map_err(io_err("reading", &l.host))?;
        make_dirs(root, l.jail.parent().unwrap_or(Path::new("")))?;
        let dest = inside(root, &l.jail);
        link_or_copy(&host, &dest)?;
        sys::lchown(&dest, jail.uid, jail.gid).map_err(io_err("chown", &dest))?;
    }
    if Path::new("/").join(PVM_MARKER).is_dir() {
        make_dirs(root, Path::new(PVM_MARKER))?;
    }
    Ok(())
}

fn set_limits(limits: &[ResourceLimit]) -> Result<(), JailError> {
    let mut no_file = DEFAULT_NO_FILE;
    for l in limits {
        match *l {
            ResourceLimit::NoFile(n) => no_file = n,
            ResourceLimit::FileSize(n) => {
                sys::setrlimit(libc::RLIMIT_FSIZE, n).map_err(sys_err("setrlimit(RLIMIT_FSIZE)"))?
            }
        }
    }
    sys::setrlimit(libc::RLIMIT_NOFILE, no_file).map_err(sys_err("setrlimit(RLIMIT_NOFILE)"))
}

/// After the pivot: the directories and device nodes of the VMM's user.
fn make_devices(uid: u32, gid: u32) -> Result<(), JailError> {
    let root = Path::new("/");
    sys::lchown(root, uid, gid).map_err(io_err("chown", root))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", root))?;
    for dir in OWNED_DIRS {
        let dir = root.join(dir);
        make_dir(&dir)?;
        sys::lchown(&dir, uid, gid).map_err(io_err("chown", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
    }
    for &(path, major, minor) in DEVICES {
        let path = root.join(path);
        clear(&path)?;
        sys::mknod_char(&path, major, minor).map_err(io_err("mknod", &path))?;
        sys::lchown(&path, uid, gid).map_err(io_err("chown", &path))?;
    }
    Ok(())
}

fn daemonize(dev_null: &File) -> Result<(), JailError> {
    sys::setsid().map_err(sys_err(
        "setsid (--daemonize: the jailer must not be a process group leader)",
    ))?;
    for fd in 0..=2 {
        sys::dup2(dev_null.as_raw_fd(), fd).map_err(sys_err("dup2 to /dev/null"))?;
    }
    Ok(())
}

/// Builds the jail and execs the VMM in it; returns only on failure.
pub fn run(jail: &Jail) -> Result<Infallible, JailError> {
    let start_us = clock_us(libc::CLOCK_MONOTONIC);
    let mut start_cpu_us = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let mut parent_cpu_us = 0;
    sys::close_inherited_fds().map_err(sys_err("closing inherited descriptors"))?;
    populate(jail)?;
    set_limits(&jail.resource_limits)?;
    cgroup::enter(jail.cgroup_version, &jail.paths.cgroup, &jail.cgroups)?;
    if let Some(ns) = &jail.netns {
        let f = File::open(ns).map_err(io_err("opening the network namespace", ns))?;
        sys::setns_net(&f).map_err(|source| JailError::Netns {
            path: ns.clone(),
            source,
        })?;
    }
    let dev_null = if jail.daemonize {
        let p = Path::new("/dev/null");
        Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(io_err("opening", p))?,
        )
    } else {
        None
    };
    sys::unshare(libc::CLONE_NEWNS).map_err(sys_err("unshare(CLONE_NEWNS)"))?;
    sys::pivot_into(&jail.paths.root).map_err(io_err("pivot_root into", &jail.paths.root))?;
    make_devices(jail.uid, jail.gid)?;
    if let Some(f) = &dev_null {
        daemonize(f)?;
    }
    drop(dev_null);
    let exec = Path::new("/").join(&jail.paths.exec_name);
    if jail.new_pid_ns {
        sys::unshare(libc::CLONE_NEWPID).map_err(sys_err("unshare(CLONE_NEWPID)"))?;
        parent_cpu_us = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start_cpu_us);
        // SAFETY: the jailer is single-threaded, so the child may run any code.
        match unsafe { libc::fork() } {
            -1 => {
                return Err(sys_err("fork into the new PID namespace")(
                    io::Error::last_os_error(),
                ))
            }
            0 => start_cpu_us = 0,
            child => {
                // The VMM is pid 1 of its namespace; the node agent finds its host pid here.
                let pid_file = PathBuf::from(format!("{}.pid", exec.display()));
                clear(&pid_file)?;
                std::fs::write(&pid_file, child.to_string())
                    .map_err(io_err("writing", &pid_file))?;
                std::process::exit(0);
            }
        }
    }
    sys::drop_privileges(jail.uid, jail.gid).map_err(sys_err("dropping to --uid/--gid"))?;
    let err = std::process::Command::new(&exec)
        .env_clear()
        .arg("--id")
        .arg(&jail.id)
        .arg("--start-time-us")
        .arg(start_us.to_string())
        .arg("--start-time-cpu-us")
        .arg(start_cpu_us.to_string())
        .arg("--parent-cpu-time-us")
        .arg(parent_cpu_us.to_string())
        .arg("--jailed")
        .args(&jail.exec_args)
        .exec();
    Err(JailError::Exec {
        path: exec,
        source: err,
    })
}
