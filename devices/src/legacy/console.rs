//! The console's output side: the UART puts each byte into a bounded buffer that a thread
//! of its own writes out. A vCPU writing to the UART never waits for the reader of stdout
//! (a full pipe, a stopped terminal, a reader that went away); when the buffer is full the
//! byte is dropped and counted. After a write error (EPIPE when the reader closed its end)
//! nothing more is written: the error is logged once and later bytes are only counted.
//!
//! When nothing is waiting in the buffer, a write first tries the output itself without
//! blocking (`pwritev2(RWF_NOWAIT)`, see [`ConsoleOutput::write_directly_to`]): the guest's
//! bytes reach the reader without waiting for the writer thread to be scheduled (several ms
//! on a loaded host), and the thread only takes what the reader is not ready for.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Bytes waiting for the writer thread at most: beyond a pipe's own 64 KiB, enough for a
/// burst of kernel messages while the reader catches up.
pub const CONSOLE_BUFFER: usize = 64 << 10;

/// Most bytes the writer thread takes per write call: PIPE_BUF, so that a write to a pipe
/// is all or nothing and the count of dropped bytes is exact.
const CHUNK: usize = 4096;

struct State {
    buf: VecDeque<u8>,
    /// Bytes the guest wrote that will never be written out.
    dropped: u64,
    /// The writer thread holds bytes it took from `buf` and has not written yet.
    writing: usize,
    /// Set by the first write error: nothing more is written.
    failed: bool,
    /// The last write found the buffer full (said once per episode).
    overflowing: bool,
    /// No more bytes come: the thread writes what is left and ends.
    finishing: bool,
    /// The output, for writes that do not block; `None` once it refused one (a terminal).
    direct: Option<OwnedFd>,
}

/// What a write that must not block did.
enum Direct {
    /// This many bytes were written (maybe fewer than asked: the reader's room).
    Wrote(usize),
    /// The reader has no room now: the writer thread waits for it.
    Full,
    /// This output cannot be written without blocking (a terminal, an old kernel).
    Unsupported,
    Failed(io::Error),
}

/// One `pwritev2(RWF_NOWAIT)` at the file's position: never waits for the reader.
fn write_nowait(fd: &OwnedFd, data: &[u8]) -> Direct {
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: one iovec over `data`, which outlives the call; the kernel only reads it.
    let r = unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if let Ok(n) = usize::try_from(r) {
        return Direct::Wrote(n);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Direct::Full,
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ESPIPE) => Direct::Unsupported,
        _ => Direct::Failed(e),
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bytes arrived, or finishing.
    ready: Condvar,
    /// The buffer became empty (or writing failed).
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The guest's side of the console output: a `Write` that never blocks and never fails.
/// Clones share the buffer.
#[derive(Clone)]
pub struct ConsoleOutput {
    shared: Arc<Shared>,
    capacity: usize,
}

impl ConsoleOutput {
    /// Starts the thread (`wisp-console`) that writes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> io::Result<Self> {
        Self::with_capacity(out, CONSOLE_BUFFER)
    }

    pub fn with_capacity(out: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: VecDeque::new(),
                dropped: 0,
                writing: 0,
                failed: false,
                overflowing: false,
                finishing: false,
                direct: None,
            }),
            ready: Condvar::new(),
            drained: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("wisp-console".into())
            .spawn(move || {
                crate::thread_started(crate::DeviceThread::Console);
                write_out(&s, out)
            })?;
        Ok(Self { shared, capacity })
    }

    /// Lets writes go straight to `out` (the file the writer thread writes to) while nothing
    /// is buffered, as long as it takes them without blocking.
    pub fn write_directly_to(&self, out: OwnedFd) {
        self.shared.lock().direct = Some(out);
    }

    /// Bytes dropped so far (buffer full, or the output failed).
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Writes what is buffered, waiting at most `timeout` for the reader, and says how many
    /// bytes were dropped over the VM's life (those not written by then included). For the
    /// VMM's way out; the guest's later bytes are dropped.
    pub fn finish(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        s.finishing = true;
        self.shared.ready.notify_all();
        while !s.failed && (!s.buf.is_empty() || s.writing > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .shared
                .drained
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        // What the reader did not take in time is lost with the process.
        let pending = (s.buf.len() + s.writing) as u64;
        s.buf.clear();
        s.dropped = s.dropped.saturating_add(pending);
        s.dropped
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, all: &[u8]) -> io::Result<usize> {
        let mut s = self.shared.lock();
        let mut data = all;
        // Straight out only when the thread holds nothing, so the order is kept; under the
        // lock, so the thread does not start writing meanwhile.
        if s.buf.is_empty() && s.writing == 0 && !s.failed && !s.finishing {
            if let Some(fd) = &s.direct {
                match write_nowait(fd, data) {
                    Direct::Wrote(n) => data = &data[n.min(data.len())..],
                    Direct::Full => {}
                    Direct::Unsupported => s.direct = None,
                    Direct::Failed(e) => {
                        write_failed(&self.shared, &mut s, data.len(), &e);
                        return Ok(all.len());
                    }
                }
                if data.is_empty() {
                    return Ok(all.len());
                }
            }
        }
        let room = if s.failed {
            0
        } else {
            self.capacity.saturating_sub(s.buf.len()).min(data.len())
        };
        s.buf.extend(&data[..room]);
        let lost = (data.len() - room) as u64;
        // Once the VMM is on its way out, what vCPUs still write is past the VM's end: not
        // counted (it would make every stop of a chatty guest look like a loss).
        if lost > 0 && !s.finishing {
            s.dropped = s.dropped.saturating_add(lost);
            if !s.failed && !s.overflowing {
                rate_limited_warn!(
                    "console: output buffer full (its reader is not keeping up); the guest's \
                     output is dropped until it does"
                );
            }
        }
        s.overflowing = lost > 0;
        if room > 0 {
            self.shared.ready.notify_one();
        }
        // Never an error: the UART cannot tell the guest, and a vCPU must not log per byte.
        Ok(all.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread: moves buffered bytes to `out` until finishing and empty, or the first
/// write error.
fn write_out(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut s = shared.lock();
            s.writing = 0;
            if s.buf.is_empty() {
                shared.drained.notify_all();
            }
            while s.buf.is_empty() && !s.finishing {
                s = shared.ready.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            if s.buf.is_empty() {
                return;
            }
            let n = s.buf.len().min(CHUNK);
            chunk.clear();
            chunk.extend(s.buf.drain(..n));
            s.writing = n;
        }
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            let mut s = shared.lock();
            write_failed(shared, &mut s, 0, &e);
            return;
        }
    }
}

/// The output failed (EPIPE: its reader went away): `lost` bytes of this write and all
/// that is buffered are dropped, and so is everything after.
fn write_failed(shared: &Shared, s: &mut State, lost: usize, e: &io::Error) {
    let lost = (lost + s.writing + s.buf.len()) as u64;
    s.dropped = s.dropped.saturating_add(lost);
    s.buf = VecDeque::new();
    s.writing = 0;
    s.failed = true;
    s.direct = None;
    shared.drained.notify_all();
    log::warn!("console: writing the guest's output failed ({e}); it is dropped from now on");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and owned from here on.
        unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
                std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    #[test]
    fn a_reader_that_never_reads_blocks_no_writer_and_memory_stays_bounded() {
        let (rd, wr) = pipe();
        let mut out = ConsoleOutput::with_capacity(Box::new(wr), 4096).unwrap();
        // Far more than the pipe and the buffer hold; each write returns at once.
        for _ in 0..1_000_000 {
            out.write_all(b"x").unwrap();
        }
        assert!(out.shared.lock().buf.len() <= 4096);
        let dropped = out.finish(Duration::from_millis(100));
        let mut queued: libc::c_int = 0;
        assert_eq!(
            // SAFETY: FIONREAD stores the bytes waiting in the pipe into an int.
            unsafe { libc::ioctl(rd.as_raw_fd(), libc::FIONREAD, &mut queued) },
            0
        );
        assert_eq!(dropped + queued as u64, 1_000_000);
        assert!(dropped > 0);
    }

    #[test]
    fn a_closed_reader_stops_the_writing_and_every_byte_is_counted() {
        let (rd, wr) = pipe();
        let mut out = ConsoleOutput::new(Box::new(wr)).unwrap();
        drop(rd);
        for _ in 0..100_000 {
            out.write_all(b"y").unwrap();
        }
        assert_eq!(out.finish(Duration::from_secs(10)), 100_000);
        assert!(out.shared.lock().failed);
    }

    #[test]
    fn output_after_the_finish_is_not_counted_as_a_loss() {
        let (_rd, wr) = pipe();
        let mut out = ConsoleOutput::with_capacity(Box::new(wr), 16).unwrap();
        assert_eq!(out.finish(Duration::from_secs(10)), 0);
        // vCPUs still running while the VMM exits.
        out.write_all(&[b'z'; 100]).unwrap();
        assert_eq!(out.dropped(), 0);
    }

    #[test]
    fn everything_reaches_a_reader_that_keeps_up() {
        let (mut rd, wr) = pipe();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            io::Read::read_to_end(&mut rd, &mut all).unwrap();
            all
        });
        let mut out = ConsoleOutput::with_capacity(Box::new(wr), 1 << 20).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for b in &data {
            out.write_all(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(out.finish(Duration::from_secs(60)), 0);
        // The thread ended with its end of the pipe.
        assert_eq!(reader.join().unwrap(), data);
    }

    #[test]
    fn a_write_reaches_a_ready_reader_before_it_returns() {
        let (rd, wr) = pipe();
        // The writer thread's own output goes nowhere: only the direct write can deliver.
        let mut out = ConsoleOutput::new(Box::new(io::sink())).unwrap();
        out.write_directly_to(wr.into());
        out.write_all(b"probe: hello\n").unwrap();
        let mut got = [0u8; 13];
        // SAFETY: reads into the local buffer; O_NONBLOCK is not set, but the bytes are
        // already in the pipe when write_all returned.
        let n = unsafe { libc::read(rd.as_raw_fd(), got.as_mut_ptr().cast(), got.len()) };
        assert_eq!(n, 13);
        assert_eq!(&got, b"probe: hello\n");
        assert_eq!(out.finish(Duration::from_secs(10)), 0);
    }

    #[test]
    fn direct_and_buffered_writes_keep_the_order_for_a_slow_reader() {
        let (mut rd, wr) = pipe();
        let direct = wr.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut chunk = [0u8; 512];
            loop {
                match io::Read::read(&mut rd, &mut chunk).unwrap() {
                    0 => return all,
                    n => all.extend_from_slice(&chunk[..n]),
                }
                // Slow enough that the pipe fills and the writer thread takes over at times.
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let mut out = ConsoleOutput::with_capacity(Box::new(wr), 1 << 20).unwrap();
        out.write_directly_to(direct.into());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(7) {
            out.write_all(piece).unwrap();
        }
        assert_eq!(out.finish(Duration::from_secs(60)), 0);
        // Both ends of the pipe's write side close with the output.
        drop(out);
        assert_eq!(reader.join().unwrap(), data);
    }

    #[test]
    fn a_closed_reader_fails_a_direct_write_and_every_byte_is_counted() {
        let (rd, wr) = pipe();
        let mut out = ConsoleOutput::new(Box::new(io::sink())).unwrap();
        out.write_directly_to(wr.into());
        drop(rd);
        for _ in 0..1000 {
            out.write_all(b"y").unwrap();
        }
        assert_eq!(out.finish(Duration::from_secs(10)), 1000);
        assert!(out.shared.lock().failed);
    }
}
