//! A raw disk image: the file's bytes are the disk's bytes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::fault::{inject, Faults, FileOp};
use super::DiskBackend;
use crate::cast::u64_to_usize;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path} is a directory")]
    IsDirectory { path: PathBuf },
    #[error("disk image {path} is in use by another process ({held}); is another wisp or QEMU using it?")]
    Locked { path: PathBuf, held: String },
    #[error("disk image {path}: cannot lock it: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("disk image {path}: cannot find its size: {source}")]
    Size { path: PathBuf, source: io::Error },
}

pub use super::lock::lock_file;

/// A raw image file (or block device).
#[derive(Debug)]
pub struct RawFile {
    file: File,
    len: u64,
    read_only: bool,
    /// An fdatasync failed: the kernel may have dropped dirty pages and a later
    /// fdatasync would report success, so every later flush fails (as QEMU does).
    sync_failed: bool,
    faults: Option<Faults>,
}

impl RawFile {
    /// Opens and locks `path`. Errors name the path: missing, a directory, no permission,
    /// or locked by another process.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<RawFile, RawError> {
        let path = path.as_ref();
        // Not blocking on a named pipe; the opened file's type decides.
        let (file, len) =
            super::open::open_image_file(path, !read_only, true).map_err(|source| {
                if source.raw_os_error() == Some(libc::EISDIR) {
                    RawError::IsDirectory {
                        path: path.to_owned(),
                    }
                } else {
                    RawError::Open {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        lock_file(&file, path, !read_only)?;
        Ok(RawFile {
            file,
            len,
            read_only,
            sync_failed: false,
            faults: None,
        })
    }

    /// A file the caller opened and locked (a qcow2 image's raw backing file).
    pub(crate) fn from_locked_file(file: File, len: u64, read_only: bool) -> RawFile {
        RawFile {
            file,
            len,
            read_only,
            sync_failed: false,
            faults: None,
        }
    }

    /// Whether the disk begins with the qcow2 magic (a caller may warn that it is used raw).
    pub fn starts_with_qcow2_magic(&self) -> bool {
        matches!(
            super::qcow2::probe_format(&self.file),
            Ok(super::qcow2::Format::Qcow2)
        )
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is beyond the disk ({} bytes)",
                    self.len
                ),
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ))
        } else {
            Ok(())
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        inject(&self.faults, FileOp::Fallocate)?;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = u64_to_usize((len - done).min(zeroes.len() as u64));
            inject(&self.faults, FileOp::Write)?;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl RawFile {
    /// Reads the sum of `bufs`' lengths from `offset` straight into `bufs` (guest memory),
    /// with preadv: no bounce buffer.
    pub fn read_vectored_at<B: BitmapSlice>(
        &mut self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, total)?;
        super::file_vectored(&self.file, offset, bufs, 0, total, true)
    }

    /// Writes `bufs` (guest memory) at `offset` with pwritev: no bounce buffer.
    pub fn write_vectored_at<B: BitmapSlice>(
        &mut self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        self.check_writable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, total)?;
        inject(&self.faults, FileOp::Write)?;
        super::file_vectored(&self.file, offset, bufs, 0, total, false)
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

/// Fills `buf` from `offset`; bytes past the end of the file read as zero.
pub(crate) fn pread_zero_fill(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl DiskBackend for RawFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        // A file that shrank under us reads as zeros past its end.
        pread_zero_fill(&self.file, buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, buf.len() as u64)?;
        inject(&self.faults, FileOp::Write)?;
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.read_vectored_at(offset, bufs)
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.write_vectored_at(offset, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.sync_failed {
            return Err(io::Error::other(
                "an earlier flush failed and data written before it may be lost; reopen the disk",
            ));
        }
        let r = inject(&self.faults, FileOp::Sync).and_then(|()| self.file.sync_data());
        self.sync_failed = r.is_err();
        r
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is a hint; a file system without holes keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zeroes_by_writing(offset, len),
            r => r,
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn set_faults(&mut self, faults: Option<Faults>) {
        self.faults = faults;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::TempDir;
    use std::os::unix::fs::MetadataExt;

    fn image(dir: &TempDir, name: &str, len: usize) -> PathBuf {
        let p = dir.path().join(name);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn reads_and_writes_at_offsets() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 8192);
        let mut f = RawFile::open(&p, false).unwrap();
        assert_eq!(f.len(), 8192);
        f.write_at(1000, b"hello").unwrap();
        let mut b = [0u8; 5];
        f.read_at(1000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        drop(f);
        let data = std::fs::read(&p).unwrap();
        assert_eq!(&data[1000..1005], b"hello");
        assert_eq!(data[999], (999 % 251) as u8);
    }

    #[test]
    fn vectored_io_moves_data_between_guest_memory_and_the_file() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 65536);
        let mut f = RawFile::open(&p, false).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let data: Vec<u8> = (0..12000u32).map(|i| (i * 7 % 256) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x100)).unwrap();
        // 1500 slices of 8 bytes: more than one preadv/pwritev can take.
        let slices: Vec<_> = (0..1500u64)
            .map(|i| {
                mem.get_slices(GuestAddress(0x100 + 8 * i), 8)
                    .next()
                    .unwrap()
                    .unwrap()
            })
            .collect();
        f.write_vectored_at(1000, &slices).unwrap();
        let file = std::fs::read(&p).unwrap();
        assert_eq!(&file[1000..13000], &data[..]);
        assert_eq!(file[999], (999 % 251) as u8);
        assert_eq!(file[13000], (13000 % 251) as u8);

        mem.write_slice(&[0u8; 12000], GuestAddress(0x100)).unwrap();
        f.read_vectored_at(1000, &slices).unwrap();
        let mut back = vec![0u8; 12000];
        mem.read_slice(&mut back, GuestAddress(0x100)).unwrap();
        assert_eq!(back, data);

        // Past the end of a file that shrank under us: zeros, as read_at gives.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(5000)
            .unwrap();
        mem.write_slice(&[0xffu8; 12000], GuestAddress(0x100))
            .unwrap();
        f.read_vectored_at(1000, &slices).unwrap();
        mem.read_slice(&mut back, GuestAddress(0x100)).unwrap();
        assert_eq!(&back[..4000], &data[..4000]);
        assert!(back[4000..].iter().all(|&b| b == 0));
        assert!(f.read_vectored_at(65536 - 8, &slices[..2]).is_err());
    }

    #[test]
    fn refuses_ranges_beyond_the_end() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 4096);
        let mut f = RawFile::open(&p, false).unwrap();
        assert!(f.write_at(4095, b"ab").is_err());
        assert!(f.read_at(u64::MAX, &mut [0u8; 2]).is_err());
        assert!(f.discard(4000, 200).is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
    }

    #[test]
    fn discard_punches_a_hole() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 1 << 20);
        let mut f = RawFile::open(&p, false).unwrap();
        let before = std::fs::metadata(&p).unwrap().blocks();
        f.discard(0, 1 << 19).unwrap();
        let after = std::fs::metadata(&p).unwrap().blocks();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let data = std::fs::read(&p).unwrap();
        // Either punched (zeros, fewer blocks) or kept (hint ignored): both allowed, but on
        // a file system with holes it must be punched.
        if after < before {
            assert!(data[..1 << 19].iter().all(|&b| b == 0));
        } else {
            assert_eq!(data[5], 5);
        }
        assert_eq!(data[(1 << 19) + 7], (((1 << 19) + 7) % 251) as u8);
    }

    #[test]
    fn write_zeroes_zeroes_the_range_only() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 65536);
        let mut f = RawFile::open(&p, false).unwrap();
        f.write_zeroes(4096, 8192, false).unwrap();
        f.write_zeroes(20480, 4096, true).unwrap();
        drop(f);
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 65536);
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert!(data[20480..24576].iter().all(|&b| b == 0));
        assert_eq!(data[4095], (4095 % 251) as u8);
        assert_eq!(data[12288], (12288 % 251) as u8);
        assert_eq!(data[24576], (24576 % 251) as u8);
    }

    #[test]
    fn read_only_open_refuses_writes() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 4096);
        let mut f = RawFile::open(&p, true).unwrap();
        assert!(f.read_only());
        assert!(f.write_at(0, b"x").is_err());
        assert!(f.write_zeroes(0, 512, true).is_err());
        assert!(f.discard(0, 512).is_err());
        assert_eq!(std::fs::read(&p).unwrap()[0], 0);
    }

    /// The kernel may drop dirty pages whose writeback failed and report success to the
    /// next fdatasync: after one failed flush, every later flush must fail too.
    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        use crate::disk::fault::{Faults, FileOp};
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 8192);
        let mut f = RawFile::open(&p, false).unwrap();
        let faults = Faults::fail_nth(0, libc::EIO).only(&[FileOp::Sync]);
        f.set_faults(Some(faults.clone()));
        f.write_at(0, b"abc").unwrap();
        let e = f.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        f.write_at(3, b"def").unwrap();
        assert!(f.flush().is_err(), "a flush after a failed one succeeded");
        assert!(f.flush().is_err());
        assert_eq!(faults.failed(), vec![FileOp::Sync]);
        drop(f);
        // Reopening starts afresh.
        let mut f = open_retry(&p, false);
        f.flush().unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[..6], b"abcdef");
    }

    /// Issue 11 item 6 for raw disks: every write-side file call of a workload fails
    /// once (EIO or ENOSPC); exactly the request it hit fails, flushes stay failed after a
    /// failed one, and every acknowledged write is in the file.
    #[test]
    fn every_failed_write_call_fails_its_request_and_keeps_acknowledged_data() {
        use crate::disk::fault::workload::{run_fault_workload, FaultModel, FaultReq::*};
        use crate::disk::fault::Faults;
        let dir = TempDir::new();
        let size = 1usize << 20;
        let reqs = [
            Write(0, 70000, 0x11),
            Write(300_000, 512, 0x12),
            Flush,
            Zero(4096, 8192),
            Discard(65536, 131_072),
            Write(100_000, 100_000, 0x13),
            Flush,
            Write(500_000, 4096, 0x14),
            Zero(600_000, 70000),
            Flush,
        ];
        let p = dir.path().join("a.img");
        let run = |faults: Faults, what: &str| {
            let _ = std::fs::remove_file(&p);
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            std::fs::write(&p, &data).unwrap();
            let mut model = FaultModel::new(data);
            let mut f = open_retry(&p, false);
            f.set_faults(Some(faults.clone()));
            let fired = run_fault_workload(&mut f, &reqs, &faults, &mut model, None, what);
            drop(f);
            model.check(&std::fs::read(&p).unwrap(), what);
            fired
        };
        let counter = Faults::count_only();
        run(counter.clone(), "no fault");
        let calls = counter.calls();
        assert!(calls >= 10, "{calls} calls");
        for n in 0..calls {
            let errno = if n % 2 == 0 { libc::EIO } else { libc::ENOSPC };
            let what = format!("call {n} of {calls} failing with errno {errno}");
            assert!(
                run(Faults::fail_nth(n, errno), &what),
                "{what}: did not fire"
            );
        }
    }

    /// Another test thread starting a child process holds a copy of every open file of this
    /// process until the child execs, and with it the lock of an image a test has just
    /// closed: opens the test expects to succeed wait that out (bounded).
    fn open_retry(p: &Path, read_only: bool) -> RawFile {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match RawFile::open(p, read_only) {
                Err(RawError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                r => return r.unwrap(),
            }
        }
    }

    /// [`probe_from_another_process`] for an open that must succeed once such a transient
    /// holder (see [`open_retry`]) is gone.
    fn probe_until_opened(p: &Path, read_only: bool) -> i32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let code = probe_from_another_process(p, read_only);
            if code != 11 || std::time::Instant::now() >= deadline {
                return code;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn second_read_write_open_of_a_file_is_refused() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 4096);
        let first = RawFile::open(&p, false).unwrap();
        let err = RawFile::open(&p, false).unwrap_err();
        assert!(matches!(err, RawError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("a.img"), "{err}");
        // A read-only open conflicts with the writer too.
        assert!(matches!(
            RawFile::open(&p, true).unwrap_err(),
            RawError::Locked { .. }
        ));
        drop(first);
        // Closing releases the lock.
        let _again = open_retry(&p, false);
    }

    /// Run by `a_second_process_cannot_open_a_locked_image`: opens the image named in the
    /// environment as another wisp would and reports through its exit status.
    #[test]
    #[ignore = "helper run in a child process"]
    fn lock_probe_child() {
        let Ok(path) = std::env::var("WISP_LOCK_PROBE") else {
            return;
        };
        let read_only = std::env::var("WISP_LOCK_PROBE_RO").is_ok();
        let code = match RawFile::open(&path, read_only) {
            Ok(_) => 10,
            Err(RawError::Locked { .. }) => 11,
            Err(RawError::Open { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                13
            }
            Err(_) => 12,
        };
        std::process::exit(code);
    }

    fn probe_from_another_process(path: &Path, read_only: bool) -> i32 {
        probe_as(path, read_only, None)
    }

    fn probe_as(path: &Path, read_only: bool, uid: Option<u32>) -> i32 {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "disk::raw::tests::lock_probe_child",
            "--test-threads=1",
        ])
        .env("WISP_LOCK_PROBE", path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if read_only {
            cmd.env("WISP_LOCK_PROBE_RO", "1");
        }
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        cmd.status().unwrap().code().unwrap()
    }

    #[test]
    fn a_second_process_cannot_open_a_locked_image() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 4096);
        let writer = RawFile::open(&p, false).unwrap();
        assert_eq!(
            probe_from_another_process(&p, false),
            11,
            "read-write open refused"
        );
        assert_eq!(
            probe_from_another_process(&p, true),
            11,
            "read-only open refused"
        );
        drop(writer);
        let reader = open_retry(&p, true);
        assert_eq!(probe_until_opened(&p, true), 10, "readers share");
        assert_eq!(
            probe_from_another_process(&p, false),
            11,
            "no writer while read"
        );
        drop(reader);
        assert_eq!(probe_until_opened(&p, false), 10);
    }

    #[test]
    fn read_only_opens_share_the_file_but_exclude_a_writer() {
        let dir = TempDir::new();
        let p = image(&dir, "a.img", 4096);
        let r1 = RawFile::open(&p, true).unwrap();
        let _r2 = RawFile::open(&p, true).unwrap();
        assert!(matches!(
            RawFile::open(&p, false).unwrap_err(),
            RawError::Locked { .. }
        ));
        drop(r1);
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = TempDir::new();
        let missing = dir.path().join("missing.img");
        let err = RawFile::open(&missing, false).unwrap_err();
        assert!(
            matches!(&err, RawError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("missing.img"));

        let err = RawFile::open(dir.path(), true).unwrap_err();
        assert!(matches!(err, RawError::IsDirectory { .. }), "{err}");
        let err = RawFile::open(dir.path(), false).unwrap_err();
        assert!(matches!(err, RawError::IsDirectory { .. }), "{err}");
    }

    #[test]
    fn open_without_permission_is_an_error() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let p = image(&dir, "ro.img", 4096);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // root ignores file modes: open it as nobody from a child process.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            assert_eq!(probe_as(&p, false, Some(65534)), 13);
            assert_eq!(probe_as(&p, true, Some(65534)), 10);
            return;
        }
        let err = RawFile::open(&p, false).unwrap_err();
        assert!(
            matches!(&err, RawError::Open { source, .. } if source.kind() == io::ErrorKind::PermissionDenied),
            "{err}"
        );
        assert!(err.to_string().contains("ro.img"), "{err}");
        assert!(RawFile::open(&p, true).is_ok());
    }
}
