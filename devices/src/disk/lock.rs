//! Image locks that QEMU understands (block/file-posix.c, `raw_apply_lock_bytes`): shared
//! OFD locks on single bytes. Byte 100 + i is held by every open that uses permission i,
//! byte 200 + i by every open that does not let others use permission i. An open first takes
//! its bytes, then looks for a conflicting holder of the opposite bytes. Readers of one
//! file (the base of several overlays) coexist; a writer excludes other writers and readers
//! that need the image not to change, whether they are wisp or QEMU.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::raw::RawError;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits (include/block/block-common.h, `BLK_PERM_*`), by bit number.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const RESIZE: u32 = 1 << 3;

/// Locks `file` for a read-write (`writable`) or read-only open, as QEMU locks the file
/// under a qcow2 or raw disk: readers use "consistent read", writers also "write" and
/// "resize"; neither lets others write or resize. The locks go away when the file closes.
pub fn lock_file(file: &File, path: &Path, writable: bool) -> Result<(), RawError> {
    let perm = if writable {
        CONSISTENT_READ | WRITE | RESIZE
    } else {
        CONSISTENT_READ
    };
    let unshared = WRITE | RESIZE;
    let lock_err = |source: io::Error| match source.raw_os_error() {
        // Someone holds an exclusive lock over the byte (an older wisp locked whole files).
        Some(libc::EAGAIN) | Some(libc::EACCES) => RawError::Locked {
            path: path.to_owned(),
            held: "a lock over the whole file".into(),
        },
        _ => RawError::Lock {
            path: path.to_owned(),
            source,
        },
    };
    for (bit, _) in PERM_NAMES.iter().enumerate() {
        if perm & (1 << bit) != 0 {
            set_shared_lock(file, PERM_BASE + bit as i64).map_err(lock_err)?;
        }
        if unshared & (1 << bit) != 0 {
            set_shared_lock(file, SHARED_BASE + bit as i64).map_err(lock_err)?;
        }
    }
    let test = |byte| {
        held_by_another(file, byte).map_err(|source| RawError::Lock {
            path: path.to_owned(),
            source,
        })
    };
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        if perm & (1 << bit) != 0 && test(SHARED_BASE + bit as i64)? {
            return Err(RawError::Locked {
                path: path.to_owned(),
                held: format!("it does not share {name:?} access"),
            });
        }
        if unshared & (1 << bit) != 0 && test(PERM_BASE + bit as i64)? {
            return Err(RawError::Locked {
                path: path.to_owned(),
                held: format!("it has {name:?} access"),
            });
        }
    }
    Ok(())
}

// The lock types and SEEK_SET are 0 to 2: they fit the struct's shorts.
#[allow(clippy::cast_possible_truncation)]
fn flock_byte(ty: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_shared_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_byte(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the flock we pass and does not keep the pointer.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file description holds any lock on `byte` (our own locks never
/// conflict with a test through the same description).
fn held_by_another(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_byte(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK fills in the flock we pass and does not keep the pointer.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::qcow2::{self, Format, Qcow2};
    use crate::test_utils::TempDir;
    use std::io::{BufRead, BufReader, Write};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};

    fn have_qemu_io() -> bool {
        let ok = Command::new("qemu-io").arg("--version").output().is_ok();
        if !ok {
            eprintln!("SKIPPED: qemu-io not found (apt-get install qemu-utils)");
        }
        ok
    }

    /// A base with two qcow2 overlays, as a cloud node keeps them.
    fn base_and_overlays(dir: &TempDir) -> (PathBuf, PathBuf, PathBuf) {
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
        let [a, b] = ["a.qcow2", "b.qcow2"].map(|n| dir.path().join(n));
        for o in [&a, &b] {
            qcow2::create(o, None, None, Some((&base, Format::Raw))).unwrap();
        }
        (base, a, b)
    }

    /// One `qemu-io -c 'read 0 512'` run: Ok, or Err with what it said.
    fn qemu_io_once(path: &Path, fmt: &str, read_only: bool) -> Result<(), String> {
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        let out = cmd
            .args(["-f", fmt, "-c", "read 0 512"])
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("read 512/512") {
            Ok(())
        } else {
            Err(text)
        }
    }

    /// A qemu-io that keeps `path` open until dropped.
    struct QemuIo(Child);

    impl QemuIo {
        fn open(path: &Path, fmt: &str, read_only: bool) -> QemuIo {
            let mut cmd = Command::new("qemu-io");
            if read_only {
                cmd.arg("-r");
            }
            let mut child = cmd
                .args(["-f", fmt])
                .arg(path)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Once a read has been answered, the image is open and locked.
            writeln!(child.stdin.as_mut().unwrap(), "read 0 512").unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            while !line.contains("read 512/512") {
                line.clear();
                if out.read_line(&mut line).unwrap() == 0 {
                    let mut err = String::new();
                    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err)
                        .unwrap();
                    panic!("qemu-io could not open {}: {err}", path.display());
                }
            }
            QemuIo(child)
        }
    }

    impl Drop for QemuIo {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }

    #[test]
    fn qemu_cannot_use_an_image_wisp_writes() {
        if !have_qemu_io() {
            return;
        }
        let dir = TempDir::new();
        let (base, a, _) = base_and_overlays(&dir);
        let _wisp = Qcow2::open(&a, false).unwrap();
        for read_only in [false, true] {
            let e = qemu_io_once(&a, "qcow2", read_only).unwrap_err();
            assert!(e.contains("lock"), "{e}");
        }
        // The base is only read: qemu may read it, not write it.
        qemu_io_once(&base, "raw", true).unwrap();
        let e = qemu_io_once(&base, "raw", false).unwrap_err();
        assert!(e.contains("\"write\" lock"), "{e}");
    }

    #[test]
    fn qemu_reads_another_overlay_of_the_base_wisp_runs_on() {
        if !have_qemu_io() {
            return;
        }
        let dir = TempDir::new();
        let (_, a, b) = base_and_overlays(&dir);
        let _wisp = Qcow2::open(&a, false).unwrap();
        qemu_io_once(&b, "qcow2", true).unwrap();
        qemu_io_once(&b, "qcow2", false).unwrap();
    }

    #[test]
    fn wisp_shares_with_a_running_qemu_as_qemu_does() {
        if !have_qemu_io() {
            return;
        }
        let dir = TempDir::new();
        let (_, a, b) = base_and_overlays(&dir);
        let qemu = QemuIo::open(&b, "qcow2", false);
        // Another overlay of the same base: fine, read-write.
        drop(Qcow2::open(&a, false).unwrap());
        // The image qemu writes: not even read.
        for read_only in [true, false] {
            let e = Qcow2::open(&b, read_only).err().unwrap().to_string();
            assert!(e.contains("in use by another process"), "{e}");
        }
        drop(qemu);
        drop(Qcow2::open(&b, false).unwrap());

        // A qemu that only reads the image lets wisp read it too.
        let _qemu = QemuIo::open(&b, "qcow2", true);
        drop(Qcow2::open(&b, true).unwrap());
        let e = Qcow2::open(&b, false).err().unwrap().to_string();
        assert!(e.contains("in use by another process"), "{e}");
    }
}
