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

/// A workload of requests and a model of what the disk may hold after them, shared by the
/// backends' fault-injection tests.
#[cfg(test)]
pub(crate) mod workload {
    use super::{Faults, FileOp};

    /// One request of the fault-injection workload.
    #[derive(Clone, Copy, Debug)]
    pub enum FaultReq {
        Write(u64, usize, u8),
        Zero(u64, u64),
        Discard(u64, u64),
        Flush,
    }

    /// What the disk may hold: `cur` per byte, or one of `alt` where a failed request or a
    /// discard left a choice.
    #[derive(Clone)]
    pub struct FaultModel {
        cur: Vec<u8>,
        alt: std::collections::HashMap<usize, Vec<u8>>,
    }

    impl FaultModel {
        pub fn new(data: Vec<u8>) -> FaultModel {
            FaultModel {
                cur: data,
                alt: Default::default(),
            }
        }

        fn set(&mut self, from: u64, len: u64, v: u8, maybe: bool) {
            for i in from as usize..(from + len) as usize {
                if maybe {
                    let old = self.cur[i];
                    self.alt.entry(i).or_default().push(old);
                } else {
                    self.alt.remove(&i);
                }
                self.cur[i] = v;
            }
        }

        /// Applies `req`; `done` says whether it succeeded. `cluster`: discard of a qcow2
        /// (whole clusters read zero afterwards); `None`: raw, where discard is a hint.
        pub fn apply(&mut self, req: FaultReq, done: bool, cluster: Option<u64>) {
            match req {
                FaultReq::Write(off, len, v) => self.set(off, len as u64, v, !done),
                FaultReq::Zero(off, len) => self.set(off, len, 0, !done),
                FaultReq::Discard(off, len) => match cluster {
                    Some(cs) => {
                        let start = off.next_multiple_of(cs);
                        let end = (off + len) / cs * cs;
                        if end > start {
                            self.set(start, end - start, 0, !done);
                        }
                    }
                    None => self.set(off, len, 0, true),
                },
                FaultReq::Flush => {}
            }
        }

        pub fn check(&self, actual: &[u8], what: &str) {
            assert_eq!(actual.len(), self.cur.len(), "{what}: disk size");
            for (i, (&a, &c)) in actual.iter().zip(&self.cur).enumerate() {
                if a != c && !self.alt.get(&i).is_some_and(|v| v.contains(&a)) {
                    panic!(
                        "{what}: byte {i} is {a:#x}, expected {c:#x} (or {:x?})",
                        self.alt.get(&i)
                    );
                }
            }
        }
    }

    /// Runs `reqs` on a backend whose write-side call `n` fails (one shot) and checks what the
    /// guest would see: every request before the fault succeeds; the request during which it
    /// fired fails (unless the call was a best-effort reservation or hole punch); requests
    /// after it succeed, except flushes once the backend is broken: those all fail. A failed
    /// sync or a failed flush always breaks it (a failed metadata write inside another
    /// request may). Returns whether a fault fired.
    pub fn run_fault_workload(
        disk: &mut dyn crate::disk::DiskBackend,
        reqs: &[FaultReq],
        faults: &Faults,
        model: &mut FaultModel,
        cluster: Option<u64>,
        what: &str,
    ) -> bool {
        let mut fired = false;
        let mut must_break = false;
        let mut later_flushes: Option<bool> = None;
        for (i, &req) in reqs.iter().enumerate() {
            let before = faults.failed().len();
            let r = match req {
                FaultReq::Write(off, len, v) => disk.write_at(off, &vec![v; len]),
                FaultReq::Zero(off, len) => disk.write_zeroes(off, len, true),
                FaultReq::Discard(off, len) => disk.discard(off, len),
                FaultReq::Flush => disk.flush(),
            };
            let failed_now = faults.failed()[before..].to_vec();
            if !failed_now.is_empty() {
                assert!(!fired, "{what}: a second fault fired");
                fired = true;
                let kind = failed_now[0];
                if r.is_ok() {
                    assert_eq!(
                        kind,
                        FileOp::Fallocate,
                        "{what}: request {i} {req:?} hid a failed {kind:?}"
                    );
                } else if kind == FileOp::Sync || matches!(req, FaultReq::Flush) {
                    must_break = true;
                }
            } else if fired && matches!(req, FaultReq::Flush) {
                if must_break {
                    assert!(
                        r.is_err(),
                        "{what}: request {i} (flush) succeeded after a failed flush or sync"
                    );
                }
                let ok = r.is_ok();
                assert!(
                    later_flushes.is_none_or(|prev| prev == ok),
                    "{what}: request {i} (flush): a flush failed and a later one succeeded"
                );
                later_flushes = Some(ok);
            } else {
                r.as_ref()
                    .unwrap_or_else(|e| panic!("{what}: request {i} {req:?} failed: {e}"));
            }
            model.apply(req, r.is_ok(), cluster);
        }
        fired
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
