//! Opening the host files behind a disk. A file is opened without blocking (a named pipe
//! put where an image was expected must not hang the VMM), and the type of the opened file,
//! not of whatever the path named a moment earlier, decides whether it is used. Backing
//! files named by an image are opened only as the operator's [`BackingPolicy`] allows.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Which backing files an image may name. An image is data from whoever made it: its
/// backing file name can point anywhere (`/etc/shadow`, `../../x`, `/dev/sda`), and the
/// guest then reads that file. The default follows none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Backing files are followed at all.
    pub enabled: bool,
    /// Every file of the chain must lie inside this directory, reached without symbolic
    /// links (openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS).
    pub beneath: Option<PathBuf>,
    /// Block devices may be backing files (otherwise only regular files).
    pub block_devices: bool,
}

impl BackingPolicy {
    /// No backing files (what a VM disk gets unless the operator says otherwise).
    pub fn off() -> BackingPolicy {
        BackingPolicy::default()
    }

    /// Backing files anywhere, regular files only: for images the caller made itself.
    pub fn any_file() -> BackingPolicy {
        BackingPolicy {
            enabled: true,
            ..BackingPolicy::default()
        }
    }
}

/// Opens `path` for a disk: a regular file, or a block device if `block_devices`. Returns
/// the file (blocking again) and its size.
pub fn open_image_file(path: &Path, write: bool, block_devices: bool) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    checked_image_file(file, block_devices)
}

/// Accepts an opened file only as a regular file (or block device), and clears the
/// O_NONBLOCK it was opened with.
fn checked_image_file(file: File, block_devices: bool) -> io::Result<(File, u64)> {
    let ft = file.metadata()?.file_type();
    if ft.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if let Some(r) = refusal(ft, block_devices) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, r));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    // Seeking to the end gives the size of block devices too; callers that read the file
    // sequentially (a kernel, an initrd) start at its beginning.
    let len = (&file).seek(SeekFrom::End(0))?;
    (&file).seek(SeekFrom::Start(0))?;
    Ok((file, len))
}

/// Why a file of type `ft` is not what a disk (or a file wisp reads, such as a kernel) may
/// be: `None` for a regular file, and for a block device if `block_devices`.
pub fn refusal(ft: std::fs::FileType, block_devices: bool) -> Option<&'static str> {
    Some(if ft.is_file() || (ft.is_block_device() && block_devices) {
        return None;
    } else if ft.is_dir() {
        "is a directory"
    } else if ft.is_block_device() {
        "is a block device, not a regular file (block devices are not allowed here)"
    } else if block_devices {
        if ft.is_fifo() {
            "is a named pipe, not a regular file or block device"
        } else if ft.is_socket() {
            "is a socket, not a regular file or block device"
        } else {
            "is a character device, not a regular file or block device"
        }
    } else if ft.is_fifo() {
        "is a named pipe, not a regular file"
    } else if ft.is_socket() {
        "is a socket, not a regular file"
    } else {
        "is a character device, not a regular file"
    })
}

/// Why a backing file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum BackingOpenError {
    #[error("backing files are off for this disk; give backing_files=on (or backing_dir=DIR) if the image and its chain are trusted")]
    Off,
    #[error("it resolves to {resolved}, outside backing_dir {dir}")]
    Outside { resolved: PathBuf, dir: PathBuf },
    #[error("backing_dir {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens the backing file `name` recorded in the image at `overlay` (open as
/// `overlay_file`), read-only, as `policy` allows. Returns the path it resolved to, the
/// file and its size.
pub(crate) fn open_backing_file(
    overlay: &Path,
    overlay_file: &File,
    name: &Path,
    policy: &BackingPolicy,
) -> Result<(PathBuf, File, u64), BackingOpenError> {
    if !policy.enabled {
        return Err(BackingOpenError::Off);
    }
    let Some(dir) = &policy.beneath else {
        let path = resolve_backing(overlay, name);
        let (file, len) = open_image_file(&path, false, policy.block_devices)?;
        return Ok((path, file, len));
    };
    let dir_err = |source| BackingOpenError::Dir {
        dir: dir.clone(),
        source,
    };
    let real_dir = dir.canonicalize().map_err(dir_err)?;
    // Relative names are relative to the directory the overlay really is in.
    let overlay_dir = real_path(overlay_file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| resolve_backing(overlay, Path::new(".")));
    let resolved = normalize(&overlay_dir.join(name));
    let inside = resolved
        .strip_prefix(&real_dir)
        .ok()
        .filter(|rel| !rel.as_os_str().is_empty());
    let Some(rel) = inside else {
        return Err(BackingOpenError::Outside {
            resolved,
            dir: dir.clone(),
        });
    };
    let dir_file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(&real_dir)
        .map_err(dir_err)?;
    let file = openat2_beneath(&dir_file, rel).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: a symbolic link on the way, which backing_dir does not follow",
                resolved.display()
            ),
        ),
        Some(libc::EXDEV) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: leaves backing_dir", resolved.display()),
        ),
        _ => io::Error::new(e.kind(), format!("{}: {e}", resolved.display())),
    })?;
    let (file, len) = checked_image_file(file, policy.block_devices)?;
    Ok((resolved, file, len))
}

/// openat2(dir, rel, O_RDONLY | O_NONBLOCK, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS): the kernel refuses any step out of `dir` and any symbolic link.
fn openat2_beneath(dir: &File, rel: &Path) -> io::Result<File> {
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero open_how is valid (no flags); the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the path is NUL-terminated and `how` is a valid open_how of the size passed;
    // the kernel keeps neither pointer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // A descriptor is an int; the syscall returns it as a long.
    #[allow(clippy::cast_possible_truncation)]
    let fd = fd as i32;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A relative backing name is relative to the overlay's directory (qcow2.txt).
pub(crate) fn resolve_backing(overlay: &Path, backing: &Path) -> PathBuf {
    if backing.is_absolute() {
        backing.to_owned()
    } else {
        overlay
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(backing)
    }
}

/// The path the kernel has for an open file (what a chain really resolved to).
pub fn real_path(file: &File) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Drops `.` and folds `..` without looking at the file system. Sound here because the
/// prefix comes from the kernel (no symbolic links in it) and openat2 refuses any link
/// in the rest.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::qcow2::{self, Format, Qcow2};
    use crate::disk::DiskBackend;
    use crate::test_utils::TempDir;

    /// An overlay whose header names `name` as its raw backing file, as a hostile image
    /// would (written over a harmless one, since `create` checks the file it names).
    fn overlay_naming(dir: &Path, file: &str, name: &str) -> PathBuf {
        let ov = dir.join(file);
        let placeholder = "x".repeat(name.len());
        std::fs::write(dir.join(&placeholder), [0u8; 512]).unwrap();
        qcow2::create(
            &ov,
            Some(1 << 20),
            None,
            Some((Path::new(&placeholder), Format::Raw)),
        )
        .unwrap();
        let mut img = std::fs::read(&ov).unwrap();
        let at = img
            .windows(placeholder.len())
            .position(|w| w == placeholder.as_bytes())
            .unwrap();
        img[at..at + name.len()].copy_from_slice(name.as_bytes());
        std::fs::write(&ov, img).unwrap();
        ov
    }

    fn refusal(ov: &Path, policy: &BackingPolicy) -> String {
        match Qcow2::open_with(ov, true, policy) {
            Ok(_) => panic!("{} opened under {policy:?}", ov.display()),
            Err(e) => e.to_string(),
        }
    }

    fn sector0(ov: &Path, policy: &BackingPolicy) -> Vec<u8> {
        let mut q = Qcow2::open_with(ov, true, policy).unwrap();
        let mut b = vec![0u8; 512];
        q.read_at(0, &mut b).unwrap();
        b
    }

    #[test]
    fn an_image_reaches_no_host_file_unless_backing_files_are_allowed() {
        let dir = TempDir::new();
        let ov = overlay_naming(dir.path(), "ov.qcow2", "/etc/passwd");
        let e = refusal(&ov, &BackingPolicy::off());
        assert!(
            e.contains("\"/etc/passwd\"") && e.contains("backing files are off"),
            "{e}"
        );
        // Allowed, it is what the image says (this is why it must be asked for).
        assert!(sector0(&ov, &BackingPolicy::any_file()).starts_with(b"root:"));
    }

    #[test]
    fn backing_dir_keeps_the_chain_inside_it_without_symlinks() {
        let dir = TempDir::new();
        let bases = dir.path().join("bases");
        let vms = dir.path().join("vms");
        std::fs::create_dir_all(&bases).unwrap();
        std::fs::create_dir_all(&vms).unwrap();
        std::fs::write(bases.join("base.raw"), b"the base".repeat(64)).unwrap();
        std::fs::write(dir.path().join("secret"), b"not for guests").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", bases.join("link.raw")).unwrap();
        let policy = BackingPolicy {
            enabled: true,
            beneath: Some(bases.clone()),
            block_devices: false,
        };
        // Relative to the overlay's directory, inside bases/ after all: followed.
        let ok = overlay_naming(&vms, "ok.qcow2", "../bases/base.raw");
        assert!(sector0(&ok, &policy).starts_with(b"the base"));
        let abs = bases.join("base.raw");
        let ok = overlay_naming(&vms, "abs.qcow2", abs.to_str().unwrap());
        assert!(sector0(&ok, &policy).starts_with(b"the base"));
        for (name, why) in [
            ("/etc/passwd", "outside backing_dir"),
            ("../secret", "outside backing_dir"),
            ("../bases/../secret", "outside backing_dir"),
            ("../bases", "outside backing_dir"),
            ("../bases/link.raw", "symbolic link"),
            ("../bases/missing.raw", "No such file"),
        ] {
            let ov = overlay_naming(&vms, "bad.qcow2", name);
            let e = refusal(&ov, &policy);
            assert!(e.contains(why), "{name}: {e}");
            std::fs::remove_file(ov).unwrap();
        }
    }

    #[test]
    fn block_devices_are_backing_files_only_when_asked_for() {
        // Any block device of this machine, reached through a symlink in the chain.
        let dev = std::fs::read_dir("/dev").unwrap().flatten().find(|e| {
            e.file_type().is_ok_and(|t| t.is_block_device())
                && File::open(e.path()).is_ok_and(|f| f.metadata().is_ok())
        });
        let Some(dev) = dev else {
            eprintln!("SKIPPED: no readable block device in /dev");
            return;
        };
        let dir = TempDir::new();
        std::os::unix::fs::symlink(dev.path(), dir.path().join("disk.raw")).unwrap();
        let ov = overlay_naming(dir.path(), "ov.qcow2", "disk.raw");
        let e = refusal(&ov, &BackingPolicy::any_file());
        assert!(e.contains("is a block device"), "{e}");
        let devices = BackingPolicy {
            block_devices: true,
            ..BackingPolicy::any_file()
        };
        Qcow2::open_with(&ov, true, &devices).unwrap();
        // The user may name a block device for an overlay of their own.
        let own = dir.path().join("own.qcow2");
        qcow2::create(&own, None, None, Some((&dev.path(), Format::Raw))).unwrap();
    }

    #[test]
    fn a_named_pipe_is_refused_without_blocking() {
        let dir = TempDir::new();
        let fifo = dir.path().join("pipe");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path in our temporary directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for write in [false, true] {
            let e = open_image_file(&fifo, write, true).unwrap_err();
            assert!(e.to_string().contains("named pipe"), "{e}");
        }
        let e = open_image_file(Path::new("/dev/null"), false, true).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }
}
