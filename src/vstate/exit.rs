//! How a VM ends, reported by whichever thread sees it first.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// ACPI S5 (or KVM's shutdown system event).
    PowerOff,
    /// The guest asked for a reboot: wisp ends the VM (a supervisor restarts it if wanted).
    Reset,
    /// pvpanic or KVM's crash system event.
    GuestPanicked,
    /// The vCPU hit a triple fault.
    TripleFault { vcpu: u8 },
    /// KVM could not run an instruction (see arch::x86_64::pvm).
    EmulationFailure { vcpu: u8, detail: String },
    /// KVM_EXIT_INTERNAL_ERROR of another kind, or KVM_EXIT_FAIL_ENTRY.
    KvmInternal { vcpu: u8, detail: String },
    /// A KVM call failed.
    KvmCall {
        vcpu: u8,
        op: &'static str,
        error: String,
    },
    /// An exit wisp does not handle.
    UnexpectedExit { vcpu: u8, exit: String },
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
}

impl VmExit {
    /// The process exit status: 0 when the guest asked to stop, non-zero otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::PowerOff | Self::Reset => 0,
            Self::Signal(sig) => 128 + sig,
            _ => 2,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::PowerOff => write!(f, "guest powered off"),
            Self::Reset => write!(f, "guest reset"),
            Self::GuestPanicked => write!(f, "guest kernel panicked"),
            Self::TripleFault { vcpu } => write!(f, "vcpu{vcpu}: triple fault, the guest crashed"),
            Self::EmulationFailure { vcpu, detail } => write!(f, "vcpu{vcpu}: {detail}"),
            Self::KvmInternal { vcpu, detail } => {
                write!(f, "vcpu{vcpu}: KVM internal error: {detail}")
            }
            Self::KvmCall { vcpu, op, error } => write!(f, "vcpu{vcpu}: {op} failed: {error}"),
            Self::UnexpectedExit { vcpu, exit } => {
                write!(f, "vcpu{vcpu}: unexpected KVM exit {exit}")
            }
            Self::Signal(sig) => write!(f, "stopped by signal {}", signal_name(*sig)),
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => n.to_string(),
    }
}

/// The first exit reported wins; the event loop wakes on `evt`.
#[derive(Clone)]
pub struct ExitSignal {
    inner: Arc<(Mutex<Option<VmExit>>, EventFd)>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new((Mutex::new(None), EventFd::new(libc::EFD_NONBLOCK)?)),
        })
    }

    pub fn report(&self, exit: VmExit) {
        let mut slot = self.inner.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            crate::startup_trace::mark(&format!("exit: reported ({exit})"));
            *slot = Some(exit);
            let _ = self.inner.1.write(1);
        }
    }

    /// The exit reported first, if any (it stays reported).
    pub fn reported(&self) -> Option<VmExit> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.inner.1
    }
}
