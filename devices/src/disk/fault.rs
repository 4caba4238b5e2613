//! I/O fault injection for tests and fuzzing: a seam in the disk backends' file layer (no
//! `LD_PRELOAD`). A backend given a [`Faults`] handle asks it before every write-side file
//! call (pwrite/pwritev, fdatasync, fallocate/ftruncate); the handle counts the calls and
//! fails the chosen one with the chosen errno instead of issuing it. Backends without a
//! handle pay one `Option` check per call.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// The kind of a write-side file call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// pwrite / pwritev (guest data or metadata).
    Write,
    /// fdatasync.
    Sync,
    /// fallocate (reserve, punch hole, zero range) or ftruncate.
    Fallocate,
}

#[derive(Debug, Default)]
struct State {
    /// Calls of the selected kinds seen so far.
    calls: u64,
    /// The first call (0-based, counting selected kinds) that fails.
    fail_at: Option<u64>,
    /// Every call from `fail_at` on fails (a full disk, a dead device), not only that one.
    sticky: bool,
    errno: i32,
    /// Kinds counted and failed; `None` means all.
    only: Option<Vec<FileOp>>,
    /// Kinds of the calls that were failed, in order.
    failed: Vec<FileOp>,
}

/// A shared fault plan: clones share the counters, so a test keeps one clone and hands the
/// other to the backend.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<State>>);

impl Faults {
    /// Counts calls and fails none.
    pub fn count_only() -> Faults {
        Faults::default()
    }

    /// Fails call `n` (0-based) with `errno` (e.g. `libc::EIO`, `libc::ENOSPC`); the
    /// calls after it succeed.
    pub fn fail_nth(n: u64, errno: i32) -> Faults {
        Faults(Arc::new(Mutex::new(State {
            fail_at: Some(n),
            errno,
            ..State::default()
        })))
    }

    /// Fails call `n` and every call after it.
    pub fn fail_from(n: u64, errno: i32) -> Faults {
        let f = Faults::fail_nth(n, errno);
        f.state().sticky = true;
        f
    }

    /// Counts and fails only calls of these kinds; the others pass untouched.
    pub fn only(self, kinds: &[FileOp]) -> Faults {
        self.state().only = Some(kinds.to_vec());
        self
    }

    /// Calls of the selected kinds seen so far (failed ones included).
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    /// The kinds of the calls failed so far, in order.
    pub fn failed(&self) -> Vec<FileOp> {
        self.state().failed.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by a backend before it issues a call of kind `op`: an error means "do not
    /// issue it, fail as if the kernel had returned this".
    pub(crate) fn check(&self, op: FileOp) -> io::Result<()> {
        let mut s = self.state();
        if s.only.as_ref().is_some_and(|k| !k.contains(&op)) {
            return Ok(());
        }
        let i = s.calls;
        s.calls += 1;
        let fail = match s.fail_at {
            Some(n) if s.sticky => i >= n,
            Some(n) => i == n,
            None => false,
        };
        if fail {
            s.failed.push(op);
            return Err(io::Error::from_raw_os_error(s.errno));
        }
        Ok(())
    }
}

/// Asks `faults` (if any) before a call of kind `op`.
#[inline]
pub(crate) fn inject(faults: &Option<Faults>, op: FileOp) -> io::Result<()> {
    match faults {
        Some(f) => f.check(op),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_chosen_call_of_the_chosen_kinds() {
        let f = Faults::fail_nth(1, libc::ENOSPC).only(&[FileOp::Write]);
        let h = Some(f.clone());
        assert!(inject(&h, FileOp::Write).is_ok());
        assert!(inject(&h, FileOp::Sync).is_ok(), "not counted");
        let e = inject(&h, FileOp::Write).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(inject(&h, FileOp::Write).is_ok());
        assert_eq!(f.calls(), 3);
        assert_eq!(f.failed(), vec![FileOp::Write]);

        let f = Faults::fail_from(0, libc::EIO);
        let h = Some(f.clone());
        assert!(inject(&h, FileOp::Sync).is_err());
        assert!(inject(&h, FileOp::Fallocate).is_err());
        assert_eq!(f.failed(), vec![FileOp::Sync, FileOp::Fallocate]);
        assert!(inject(&None, FileOp::Write).is_ok());
    }
}
