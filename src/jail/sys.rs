//! The system calls of the jailer, each returning the errno as an `io::Error`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// Closes every descriptor above stderr, so nothing the caller left open reaches the VMM.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; none above 2 is in use by the jailer yet.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    // Kernels before 5.9: close what /proc lists.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor nothing in the jailer holds (the read_dir's own one is
        // already closed, and closing it twice only returns EBADF).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

pub fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass.
    check(unsafe { libc::setrlimit(resource, &lim) })
}

pub fn mknod_char(path: &Path, major: u32, minor: u32) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid C string; mknod creates a node, owner read/write only.
    check(unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
            libc::makedev(major, minor),
        )
    })
}

/// chown without following a symbolic link.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

pub fn setns_net(ns: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a descriptor we own; EINVAL when it is not a network namespace.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only; the jailer is single-threaded.
    check(unsafe { libc::unshare(flags) })
}

fn mount(src: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    // SAFETY: valid C strings or NULL where mount(2) allows it; no data argument.
    check(unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// In a mount namespace of the caller's own: makes `root` the new `/` and lets go of the
/// old one, so no host path is reachable any more (pivot_root(2), as Firecracker's jailer).
pub fn pivot_into(root: &Path) -> io::Result<()> {
    // No mount or unmount below may propagate back to the host's namespace.
    mount(None, Path::new("/"), libc::MS_SLAVE | libc::MS_REC)?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(root), root, libc::MS_BIND | libc::MS_REC)?;
    std::env::set_current_dir(root)?;
    let old = Path::new("old_root");
    match std::fs::create_dir(old) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let (new, put_old) = (cstr(Path::new("."))?, cstr(old)?);
    // SAFETY: valid C strings; pivot_root has no libc wrapper.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, new.as_ptr(), put_old.as_ptr()) };
    // 0 or -1.
    check(i32::try_from(r).unwrap_or(-1))?;
    let put_old = cstr(Path::new("/old_root"))?;
    // SAFETY: a valid C string.
    check(unsafe { libc::umount2(put_old.as_ptr(), libc::MNT_DETACH) })?;
    std::fs::remove_dir("/old_root")?;
    std::env::set_current_dir("/")?;
    let dot = cstr(Path::new("."))?;
    // SAFETY: a valid C string; chroot(".") after pivot_root, as Firecracker does, so that
    // the process's root is the jail even for code that compares roots.
    check(unsafe { libc::chroot(dot.as_ptr()) })
}

pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments; fails (EPERM) for a process group leader.
    check(unsafe { libc::setsid() })
}

pub fn dup2(from: libc::c_int, to: libc::c_int) -> io::Result<()> {
    // SAFETY: both are descriptor numbers; `to` is replaced atomically.
    check(unsafe { libc::dup2(from, to) })
}

/// Leaves root for good: no supplementary groups, gid and uid (real, effective, saved) set,
/// which clears the permitted and effective capabilities, then no_new_privs so that nothing
/// exec'd later can gain any back.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: an empty group list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain ids.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain ids.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}
