//! One thread per vCPU, named `wisp-vcpu<N>`, running KVM_RUN and dispatching port and MMIO
//! exits to the buses. A vCPU never blocks on device I/O: devices do their work on the event
//! loop, reached through ioeventfds.

use super::control::{self, ExitKind, VcpuControl};
use super::exit::{ExitSignal, VmExit};
use super::state::VcpuState;
use crate::arch::x86_64::pvm;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use vm_memory::GuestMemoryMmap;
use wisp_devices::bus::Bus;

/// KVM_INTERNAL_ERROR_EMULATION (linux/kvm.h).
const INTERNAL_ERROR_EMULATION: u32 = 1;

/// Runs once on the vCPU thread, before its first KVM_RUN (cgroup placement).
pub type ThreadStart = Box<dyn FnOnce(u8, libc::pid_t) -> Result<(), String> + Send>;

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub mem: GuestMemoryMmap,
    pub exit: ExitSignal,
    pub pvm: bool,
    pub control: Arc<VcpuControl>,
    /// The MSRs a snapshot saves (`state::msrs_to_save`).
    pub msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn spawn(mut self, on_start: Option<ThreadStart>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("wisp-vcpu{}", self.id))
            .spawn(move || {
                control::register_kvm_run(self.fd.get_kvm_run());
                // SAFETY: pthread_self has no preconditions.
                self.control
                    .add_thread(self.id, unsafe { libc::pthread_self() });
                if let Some(end) = self.start_and_run(on_start) {
                    self.exit.report(end);
                }
                self.control.thread_exiting(self.id);
            })
    }

    /// Runs the start hook, then the guest; returns why the guest stopped (None when the VMM
    /// stopped it).
    fn start_and_run(&mut self, on_start: Option<ThreadStart>) -> Option<VmExit> {
        if let Some(f) = on_start {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            if let Err(e) = f(self.id, tid) {
                return Some(VmExit::KvmCall {
                    vcpu: self.id,
                    op: "vCPU thread setup",
                    error: e,
                });
            }
        }
        // After the start hook (its cgroup files are opened unfiltered), before the guest.
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
            return Some(VmExit::KvmCall {
                vcpu: self.id,
                op: "vCPU thread setup",
                error: e.to_string(),
            });
        }
        self.run()
    }

    /// Runs the guest until it stops; returns why (None when the VMM stopped it).
    fn run(&mut self) -> Option<VmExit> {
        let id = self.id;
        let mut dumped = self.control.dump_generation();
        let mut served_save = 0;
        if crate::startup_trace::enabled() {
            crate::startup_trace::mark(&format!("vcpu{id}: first KVM_RUN"));
        }
        loop {
            let (fd, msrs) = (&self.fd, &self.msr_indices);
            self.control.park_serving(id, &mut served_save, &mut || {
                VcpuState::save(fd, msrs).map_err(|e| e.to_string())
            });
            if self.control.stop_requested() {
                return None;
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    let generation = self.control.dump_generation();
                    if generation != dumped {
                        dumped = generation;
                        self.log_state();
                    }
                    continue;
                }
                Err(e) => {
                    return Some(VmExit::KvmCall {
                        vcpu: id,
                        op: "KVM_RUN",
                        error: e.to_string(),
                    })
                }
            };
            let counted = match exit {
                VcpuExit::IoIn(..) => Some(ExitKind::IoIn),
                VcpuExit::IoOut(..) => Some(ExitKind::IoOut),
                VcpuExit::MmioRead(..) => Some(ExitKind::MmioRead),
                VcpuExit::MmioWrite(..) => Some(ExitKind::MmioWrite),
                _ => None,
            };
            if let Some(kind) = counted {
                self.control.count_exit(kind);
            }
            match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.io_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    self.io_bus.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio_bus.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio_bus.write(addr, data);
                }
                VcpuExit::Intr => {}
                VcpuExit::Shutdown => return Some(VmExit::TripleFault { vcpu: id }),
                VcpuExit::SystemEvent(kind, _) => {
                    return Some(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                        KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                        KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanicked,
                        other => VmExit::UnexpectedExit {
                            vcpu: id,
                            exit: format!("system event {other}"),
                        },
                    })
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Some(VmExit::KvmInternal {
                        vcpu: id,
                        detail: format!("VM entry failed (reason {reason:#x}, host cpu {cpu})"),
                    })
                }
                VcpuExit::InternalError => {
                    if let Some(end) = self.internal_error() {
                        return Some(end);
                    }
                }
                other => {
                    return Some(VmExit::UnexpectedExit {
                        vcpu: id,
                        exit: format!("{other:?}"),
                    })
                }
            }
        }
    }

    fn log_state(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => log::warn!(
                "vcpu{}: rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} cr0 {:#x} cr3 {:#x} cs.dpl {} mp_state {:?}",
                self.id,
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                s.cr0,
                s.cr3,
                s.cs.dpl,
                self.fd.get_mp_state().map(|m| m.mp_state).ok()
            ),
            (Err(e), _) | (_, Err(e)) => log::warn!("vcpu{}: cannot read registers: {e}", self.id),
        }
    }

    /// None when the vCPU may continue.
    fn internal_error(&mut self) -> Option<VmExit> {
        // SAFETY: KVM filled the `internal` member of the union for KVM_EXIT_INTERNAL_ERROR.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let id = self.id;
        if internal.suberror == INTERNAL_ERROR_EMULATION {
            if self.pvm {
                return match pvm::complete_emulation_failure(&self.fd, &self.mem) {
                    Ok(_) => None,
                    Err(f) => Some(VmExit::EmulationFailure {
                        vcpu: id,
                        detail: f.to_string(),
                    }),
                };
            }
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            return Some(VmExit::EmulationFailure {
                vcpu: id,
                detail: format!("KVM could not emulate the instruction at rip {rip:#x}"),
            });
        }
        let n = (internal.ndata as usize).min(internal.data.len());
        Some(VmExit::KvmInternal {
            vcpu: id,
            detail: format!(
                "suberror {} data {:x?}",
                internal.suberror,
                &internal.data[..n]
            ),
        })
    }
}
