//! Getting vCPU threads out of KVM_RUN: a real-time signal kicks a thread, and its handler
//! sets `kvm_run.immediate_exit` so that a kick racing with the entry into KVM_RUN is not
//! lost (KVM returns EINTR at once). The thread then looks at what was asked of it.

use super::state::VcpuState;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The signal that kicks vCPU threads out of the guest.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's kvm_run, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only an async-signal-safe store: the pointer is this thread's own mapping.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, valid while its VcpuFd lives,
            // which outlives the thread's registration (see `register_kvm_run`).
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: installs a handler that only performs a volatile store; SA_RESTART is not set
    // so KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Called on the vCPU thread with its kvm_run mapping.
pub fn register_kvm_run(run: *mut kvm_bindings::kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

/// What the VMM asks of all vCPUs, and the vCPUs' acknowledgements.
pub struct VcpuControl {
    paused: Mutex<bool>,
    /// Mirrors `paused` for the vCPUs' lock-free check after each exit.
    pause_requested: AtomicBool,
    /// The VM is ending: every vCPU leaves its loop at its next look.
    stop_requested: AtomicBool,
    changed: Condvar,
    /// vCPUs currently parked (out of KVM_RUN and waiting).
    parked: AtomicUsize,
    parked_changed: Condvar,
    parked_lock: Mutex<()>,
    threads: Mutex<Vec<VcpuThread>>,
    /// Bumped to ask every vCPU to log its registers (SIGUSR1).
    dump_generation: AtomicU64,
    /// Port I/O and MMIO exits handled by the vCPU threads, by [`ExitKind`], for metrics.
    exits: [AtomicU64; 4],
    /// Bumped (under `paused`) to ask every parked vCPU for its state: a vCPU's fd is its
    /// thread's, so the thread itself reads it.
    save_generation: AtomicU64,
    /// The states the parked vCPUs gave for the last request.
    saved: Mutex<Vec<(u8, Result<VcpuState, String>)>>,
}

/// A vCPU thread as the kicker knows it.
struct VcpuThread {
    id: u8,
    pthread: libc::pthread_t,
    /// Cleared by the thread itself, under the `threads` lock, before it ends: a thread
    /// marked running is alive, so signalling it is defined.
    running: bool,
}

/// Why a pause did not take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("the VM is not paused")]
    NotPaused,
    #[error("only {saved} of {vcpus} vCPUs gave their state within {secs} s")]
    SaveTimeout {
        saved: usize,
        vcpus: usize,
        secs: u64,
    },
    #[error("vcpu{vcpu}: {error}")]
    SaveFailed { vcpu: u8, error: String },
    #[error("vcpu{vcpu} has stopped: the VM is ending")]
    VcpuExited { vcpu: u8 },
    #[error("only {parked} of {vcpus} vCPUs stopped within {secs} s; the VM keeps running")]
    Timeout {
        parked: usize,
        vcpus: usize,
        secs: u64,
    },
}

/// The exits counted for metrics (Firecracker's `vcpu.exit_io_in`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    IoIn = 0,
    IoOut = 1,
    MmioRead = 2,
    MmioWrite = 3,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            paused: Mutex::new(false),
            pause_requested: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            changed: Condvar::new(),
            parked: AtomicUsize::new(0),
            parked_changed: Condvar::new(),
            parked_lock: Mutex::new(()),
            threads: Mutex::new(Vec::new()),
            dump_generation: AtomicU64::new(0),
            exits: Default::default(),
            save_generation: AtomicU64::new(0),
            saved: Mutex::new(Vec::new()),
        }
    }
}

impl VcpuControl {
    /// On the vCPU thread, before its first KVM_RUN.
    pub fn add_thread(&self, id: u8, pthread: libc::pthread_t) {
        self.lock_threads().push(VcpuThread {
            id,
            pthread,
            running: true,
        });
    }

    /// On the vCPU thread, last: it runs no more guest code and is no longer signalled.
    pub fn thread_exiting(&self, id: u8) {
        register_kvm_run(std::ptr::null_mut());
        for t in self.lock_threads().iter_mut().filter(|t| t.id == id) {
            t.running = false;
        }
        let _g = self
            .parked_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.parked_changed.notify_all();
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<VcpuThread>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kick_all(&self) {
        for t in self.lock_threads().iter().filter(|t| t.running) {
            // SAFETY: a thread marked running is alive: it clears the mark under this lock
            // before it ends (`thread_exiting`), and its pthread_t stays valid until then.
            unsafe {
                libc::pthread_kill(t.pthread, kick_signal());
            }
        }
    }

    /// The vCPUs whose thread has ended.
    fn exited(&self) -> Option<u8> {
        self.lock_threads()
            .iter()
            .find(|t| !t.running)
            .map(|t| t.id)
    }

    fn running(&self) -> usize {
        self.lock_threads().iter().filter(|t| t.running).count()
    }

    /// Stops all `n` vCPUs outside KVM_RUN. Fails at once if a vCPU has ended, and after
    /// `deadline` if one does not stop (e.g. blocked outside the guest); the vCPUs then run
    /// on.
    pub fn pause(&self, n: usize, deadline: Duration) -> Result<(), PauseError> {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.pause_requested.store(true, Ordering::Release);
        self.kick_all();
        let until = Instant::now() + deadline;
        let result = self.wait_parked(|parked| {
            if parked >= n {
                return Some(Ok(()));
            }
            let error = match self.exited() {
                Some(vcpu) => Some(PauseError::VcpuExited { vcpu }),
                None if Instant::now() >= until => Some(PauseError::Timeout {
                    parked,
                    vcpus: n,
                    secs: deadline.as_secs(),
                }),
                None => None,
            };
            if error.is_none() {
                // A vCPU that was not in KVM_RUN when kicked sees the flag on its next exit;
                // kick again in case it entered KVM_RUN between the flag and the signal.
                self.kick_all();
            }
            error.map(Err)
        });
        if result.is_err() {
            self.resume();
        }
        result
    }

    /// At start, with the vCPUs held ([`VcpuControl::hold`]): waits until all `n` have parked
    /// before their first KVM_RUN (each installs its seccomp filter first), one has ended, or
    /// `deadline` has passed (false). On a busy host a new thread can wait tens of
    /// milliseconds to run at all.
    pub fn wait_held(&self, n: usize, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        self.wait_parked(|parked| {
            if parked >= n || self.exited().is_some() {
                Some(true)
            } else {
                (Instant::now() >= until).then_some(false)
            }
        })
    }

    /// Waits on `parked_changed` (10 ms at most each time) until `done`, given the number of
    /// parked vCPUs, returns a value.
    fn wait_parked<T>(&self, mut done: impl FnMut(usize) -> Option<T>) -> T {
        let mut g = self
            .parked_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(v) = done(self.parked.load(Ordering::SeqCst)) {
                return v;
            }
            g = self
                .parked_changed
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Asks every vCPU to leave its loop (parked ones too); true once every vCPU thread
    /// that started has ended, false if some did not within `deadline`.
    pub fn stop(&self, deadline: Duration) -> bool {
        self.stop_requested.store(true, Ordering::SeqCst);
        self.resume();
        let until = Instant::now() + deadline;
        let mut g = self
            .parked_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            self.kick_all();
            if self.running() == 0 {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            g = self
                .parked_changed
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// On the vCPU thread after each exit: whether the VM is ending.
    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::Acquire)
    }

    /// Asks every vCPU to log where it is.
    pub fn request_dump(&self) {
        self.dump_generation.fetch_add(1, Ordering::SeqCst);
        self.kick_all();
    }

    /// The current dump request generation (a vCPU dumps when it differs from its last).
    pub fn dump_generation(&self) -> u64 {
        self.dump_generation.load(Ordering::SeqCst)
    }

    pub fn count_exit(&self, kind: ExitKind) {
        self.exits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// All counted exits.
    pub fn exits(&self) -> u64 {
        self.exits_by_kind().iter().sum()
    }

    /// Counted exits by [`ExitKind`] (indexed by its value).
    pub fn exits_by_kind(&self) -> [u64; 4] {
        self.exits.each_ref().map(|e| e.load(Ordering::Relaxed))
    }

    /// Before the vCPU threads start: each parks before its first KVM_RUN until
    /// [`VcpuControl::resume`] (or a stop).
    pub fn hold(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.pause_requested.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.pause_requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state of each of the `n` paused vCPUs, by index, each read on its own thread.
    pub fn save_vcpus(&self, n: usize, deadline: Duration) -> Result<Vec<VcpuState>, PauseError> {
        if !self.is_paused() {
            return Err(PauseError::NotPaused);
        }
        self.saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        {
            // Under `paused`: a vCPU checks the generation under it before it waits.
            let _paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
            self.save_generation.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_all();
        }
        let until = Instant::now() + deadline;
        let mut g = self
            .parked_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let got = self
                .saved
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            if got >= n {
                break;
            }
            if let Some(vcpu) = self.exited() {
                return Err(PauseError::VcpuExited { vcpu });
            }
            if Instant::now() >= until {
                return Err(PauseError::SaveTimeout {
                    saved: got,
                    vcpus: n,
                    secs: deadline.as_secs(),
                });
            }
            g = self
                .parked_changed
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(g);
        let mut saved =
            std::mem::take(&mut *self.saved.lock().unwrap_or_else(PoisonError::into_inner));
        saved.sort_by_key(|(id, _)| *id);
        saved
            .into_iter()
            .map(|(vcpu, r)| r.map_err(|error| PauseError::SaveFailed { vcpu, error }))
            .collect()
    }

    /// On the vCPU thread after an exit: parks while paused.
    pub fn park_if_paused(&self) {
        self.park_serving(0, &mut 0, &mut || {
            Err("this vCPU cannot save its state".into())
        });
    }

    /// [`VcpuControl::park_if_paused`] that also answers [`VcpuControl::save_vcpus`] while
    /// parked: `served` is the last request this vCPU answered, `save` reads its state.
    pub fn park_serving(
        &self,
        id: u8,
        served: &mut u64,
        save: &mut dyn FnMut() -> Result<VcpuState, String>,
    ) {
        // The common case on every exit: one atomic load, no lock.
        if !self.pause_requested.load(Ordering::Acquire) {
            return;
        }
        let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
        if !*paused || self.stop_requested() {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        {
            let _g = self
                .parked_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.parked_changed.notify_all();
        }
        while *paused && !self.stop_requested() {
            let generation = self.save_generation.load(Ordering::SeqCst);
            if generation != *served {
                *served = generation;
                drop(paused);
                let state = save();
                self.saved
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((id, state));
                {
                    let _g = self
                        .parked_lock
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    self.parked_changed.notify_all();
                }
                paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            paused = self
                .changed
                .wait(paused)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    /// A stand-in for a vCPU thread: it registers as one and parks when asked, until the VM
    /// stops. The kick signal finds no kvm_run here and does nothing.
    fn vcpu_thread(control: &Arc<VcpuControl>, id: u8) -> std::thread::JoinHandle<()> {
        let control = control.clone();
        std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            control.add_thread(id, unsafe { libc::pthread_self() });
            while !control.stop_requested() {
                control.park_if_paused();
                std::thread::yield_now();
            }
            control.thread_exiting(id);
        })
    }

    /// Waits until `n` threads have registered.
    fn registered(control: &VcpuControl, n: usize) {
        while control.lock_threads().len() < n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_start_waits_for_every_held_vcpu_to_park() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        control.hold();
        // No vCPU thread has run yet: the wait runs out.
        assert!(!control.wait_held(2, Duration::from_millis(50)));
        let threads: Vec<_> = (0..2).map(|id| vcpu_thread(&control, id)).collect();
        // An hour: only both threads parking can make this return.
        assert!(control.wait_held(2, Duration::from_secs(3600)));
        assert_eq!(control.parked.load(Ordering::SeqCst), 2);
        assert!(control.stop(Duration::from_secs(60)));
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn pause_parks_every_vcpu_and_stop_ends_them() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let threads: Vec<_> = (0..2).map(|id| vcpu_thread(&control, id)).collect();
        registered(&control, 2);
        control.pause(2, Duration::from_secs(60)).unwrap();
        assert!(control.is_paused());
        // Parked vCPUs are woken to end.
        assert!(control.stop(Duration::from_secs(60)));
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn pause_fails_at_once_when_a_vcpu_has_ended() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let live = vcpu_thread(&control, 1);
        let ended = {
            let control = control.clone();
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                control.add_thread(0, unsafe { libc::pthread_self() });
                control.thread_exiting(0);
            })
        };
        ended.join().unwrap();
        registered(&control, 2);
        // An hour: only the ended vCPU can make this return.
        assert_eq!(
            control.pause(2, Duration::from_secs(3600)),
            Err(PauseError::VcpuExited { vcpu: 0 })
        );
        assert!(!control.is_paused(), "the VM runs on");
        assert!(control.stop(Duration::from_secs(60)));
        live.join().unwrap();
    }

    #[test]
    fn pause_gives_up_at_its_deadline_on_a_vcpu_that_never_parks() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let (release, blocked) = mpsc::channel::<()>();
        let stuck = {
            let control = control.clone();
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                control.add_thread(0, unsafe { libc::pthread_self() });
                // Blocked outside the guest (as in a write to a full pipe): kicks do not help.
                let _ = blocked.recv();
                control.thread_exiting(0);
            })
        };
        registered(&control, 1);
        let e = control.pause(1, Duration::from_millis(50)).unwrap_err();
        assert_eq!(
            e,
            PauseError::Timeout {
                parked: 0,
                vcpus: 1,
                secs: 0
            }
        );
        assert!(!control.is_paused(), "the VM runs on");
        release.send(()).unwrap();
        stuck.join().unwrap();
        // Once it ended, nothing signals it any more.
        assert!(control.stop(Duration::from_secs(60)));
    }
}
