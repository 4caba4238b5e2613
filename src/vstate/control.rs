//! Getting vCPU threads out of KVM_RUN: a real-time signal kicks a thread, and its handler
//! sets `kvm_run.immediate_exit` so that a kick racing with the entry into KVM_RUN is not
//! lost (KVM returns EINTR at once). The thread then looks at what was asked of it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

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
    changed: Condvar,
    /// vCPUs currently parked (out of KVM_RUN and waiting).
    parked: AtomicUsize,
    parked_changed: Condvar,
    parked_lock: Mutex<()>,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Bumped to ask every vCPU to log its registers (SIGUSR1).
    dump_generation: AtomicU64,
    /// Port I/O and MMIO exits handled by the vCPU threads, by [`ExitKind`], for metrics.
    exits: [AtomicU64; 4],
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
            changed: Condvar::new(),
            parked: AtomicUsize::new(0),
            parked_changed: Condvar::new(),
            parked_lock: Mutex::new(()),
            threads: Mutex::new(Vec::new()),
            dump_generation: AtomicU64::new(0),
            exits: Default::default(),
        }
    }
}

impl VcpuControl {
    pub fn add_thread(&self, t: libc::pthread_t) {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(t);
    }

    fn kick_all(&self) {
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            // SAFETY: `t` is a live vCPU thread: they run until the process exits.
            unsafe {
                libc::pthread_kill(t, kick_signal());
            }
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns once all `n` are parked.
    pub fn pause(&self, n: usize) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.pause_requested.store(true, Ordering::Release);
        self.kick_all();
        let mut g = self
            .parked_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while self.parked.load(Ordering::SeqCst) < n {
            g = self
                .parked_changed
                .wait_timeout(g, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            // A vCPU that was not in KVM_RUN when kicked sees the flag on its next exit;
            // kick again in case it entered KVM_RUN between the flag and the signal.
            self.kick_all();
        }
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

    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.pause_requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On the vCPU thread after an exit: parks while paused.
    pub fn park_if_paused(&self) {
        // The common case on every exit: one atomic load, no lock.
        if !self.pause_requested.load(Ordering::Acquire) {
            return;
        }
        let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
        if !*paused {
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
        while *paused {
            paused = self
                .changed
                .wait(paused)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}
