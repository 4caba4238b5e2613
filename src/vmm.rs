//! The builder (a validated `VmConfig` becomes a running VM) and the event loop on the main
//! thread: console input, signals and the end of the VM.

use crate::api::{
    ActionType, ApiChannel, ApiFault, ApiRequest, ApiResponse, DriveUpdate, InstanceInfo,
    InstanceState, StartedDrive, VmState,
};
use crate::arch::x86_64::{acpi, boot, cpuid, layout::*, pvm, regs};
use crate::cgroup::VmCgroup;
use crate::config::{ConsoleConfig, VmConfig};
use crate::devices::{open_disk, open_net, DeviceError, VirtioDevices};
use crate::terminal;
use crate::vstate::control::{self, VcpuControl};
use crate::vstate::exit::{ExitSignal, VmExit};
use crate::vstate::vcpu::{ThreadStart, Vcpu};
use crate::vstate::vm::{Vm, VmError};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use wisp_devices::bus::{Bus, BusError};
use wisp_devices::interrupt::{InterruptLine, IrqFd};
use wisp_devices::legacy::{
    AcpiPm, PlatformEvent, PlatformEventSink, PvPanic, Serial, ACPI_PM_PORT_LEN, I8042,
};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("vcpu{vcpu}: {source}")]
    VcpuSetup { vcpu: u8, source: regs::RegsError },
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("console file {path}: {reason}")]
    ConsoleFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

/// Runs on each vCPU thread with its index and thread id, before the thread enters the guest.
type VcpuStartHook = Arc<dyn Fn(u8, libc::pid_t) -> Result<(), String> + Send + Sync>;

/// A VM built and ready to start.
pub struct Vmm {
    /// The VM fd and guest memory: never read here, owned so they outlive the vCPUs.
    _vm: Vm,
    vcpus: Vec<Vcpu>,
    exit: ExitSignal,
    serial: Arc<Mutex<Serial>>,
    serial_drained: EventFd,
    console_input: bool,
    virtio: VirtioDevices,
    control: Arc<VcpuControl>,
    cgroup: Option<Arc<VmCgroup>>,
    vcpu_start: Option<VcpuStartHook>,
    i8042: Arc<Mutex<I8042>>,
    vcpu_count: u8,
    mem_size_mib: u64,
    started: std::time::Instant,
    net_counters: Vec<(String, Arc<wisp_devices::virtio::net::NetCounters>)>,
}

/// What the control API needs once the VM runs.
pub struct ApiContext {
    pub channel: ApiChannel,
    pub id: String,
    /// `GET /vm/config`.
    pub vm_config: serde_json::Value,
    /// Where `FlushMetrics` appends a line of JSON (`PUT /metrics`).
    pub metrics_path: Option<std::path::PathBuf>,
}

impl Vmm {
    /// Builds the VM described by `config` (already validated).
    pub fn build(config: &VmConfig) -> Result<Self, VmmError> {
        let mem_size = config.memory.0;
        let vm = Vm::new(mem_size)?;
        let pvm = pvm::is_pvm_host();
        if pvm {
            log::info!("PVM host: completing the instructions its emulator cannot run");
        }
        let exit = ExitSignal::new().map_err(io_err("eventfd"))?;

        let events: PlatformEventSink = {
            let exit = exit.clone();
            Arc::new(move |e| {
                exit.report(match e {
                    PlatformEvent::PowerOff => VmExit::PowerOff,
                    PlatformEvent::Reset => VmExit::Reset,
                    PlatformEvent::Panicked => VmExit::GuestPanicked,
                })
            })
        };

        let mut io_bus = Bus::new();
        let com1_irq = irq_line(&vm, COM1_GSI)?;
        let (serial, serial_drained) =
            Serial::new(com1_irq, console_output(&config.console)?).map_err(io_err("serial"))?;
        let serial = Arc::new(Mutex::new(serial));
        io_bus.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
        let kbd_irq = irq_line(&vm, I8042_GSI)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone(), Some(kbd_irq))));
        io_bus.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
        io_bus.insert(
            Arc::new(Mutex::new(PvPanic::new(events.clone()))),
            PVPANIC_PORT,
            1,
        )?;
        io_bus.insert(
            Arc::new(Mutex::new(AcpiPm::new(events))),
            ACPI_PM_PORT,
            ACPI_PM_PORT_LEN,
        )?;
        let mut mmio_bus = Bus::new();
        let mut virtio = VirtioDevices::default();
        for disk in &config.disks {
            virtio.attach(&vm, &mut mmio_bus, Box::new(open_disk(disk)?))?;
        }
        let mut net_counters = Vec::new();
        for net in &config.nets {
            let dev = open_net(net)?;
            net_counters.push((net.tap.clone(), dev.counters()));
            virtio.attach(&vm, &mut mmio_bus, Box::new(dev))?;
        }

        // Each virtio device is described once: in the DSDT, or on the command line.
        let mut cmdline = config.cmdline.clone();
        if pvm && boot::is_linux(&config.kernel) {
            if let Some(words) = pvm::linux_cmdline_additions(&cmdline) {
                log::info!("PVM host: adding `{words}` to the Linux command line");
                cmdline.push(' ');
                cmdline.push_str(words);
            }
        }
        let acpi_virtio = if config.virtio_mmio_cmdline {
            cmdline.push_str(&virtio.cmdline());
            &[][..]
        } else {
            &virtio.windows[..]
        };
        let rsdp = acpi::write(
            &vm.mem,
            &acpi::Platform {
                vcpus: config.cpus,
                virtio_mmio: acpi_virtio,
            },
        )?;
        let kernel = boot::load(
            &vm.mem,
            mem_size,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
            rsdp,
        )?;

        let supported = vm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let control = Arc::new(VcpuControl::default());
        control::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        let mut vcpus = Vec::with_capacity(config.cpus.into());
        for id in 0..config.cpus {
            let fd = vm
                .fd
                .create_vcpu(id.into())
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::normalize(&mut cpuid, id, config.cpus);
            if pvm {
                cpuid::hide_kvm_features(&mut cpuid, cpuid::PVM_BROKEN_KVM_FEATURES);
            }
            fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
            let setup = |fd: &kvm_ioctls::VcpuFd| -> Result<(), regs::RegsError> {
                regs::setup_msrs(fd)?;
                regs::setup_fpu(fd)?;
                regs::setup_lapic(fd)?;
                if id == 0 {
                    regs::setup_boot_vcpu(fd, &vm.mem, kernel.entry)?;
                }
                Ok(())
            };
            setup(&fd).map_err(|source| VmmError::VcpuSetup { vcpu: id, source })?;
            vcpus.push(Vcpu {
                id,
                fd,
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                mem: vm.mem.clone(),
                exit: exit.clone(),
                pvm,
                control: control.clone(),
            });
        }

        // The vCPU cgroup exists before any vCPU thread: each moves itself in before its
        // first KVM_RUN. Groups left by a wisp that was killed are removed first.
        let cgroup = match &config.cgroup {
            Some(spec) => {
                let name = config
                    .id
                    .clone()
                    .unwrap_or_else(|| std::process::id().to_string());
                let cg = VmCgroup::create(spec, &name)?;
                match VmCgroup::cleanup_stale(&spec.parent) {
                    Ok(n) if n > 0 => {
                        log::info!("removed {n} stale cgroup(s) of dead wisp processes")
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("cleaning up stale cgroups: {e}"),
                }
                Some(Arc::new(cg))
            }
            None => None,
        };
        let vcpu_start = cgroup.clone().map(|cg| -> VcpuStartHook {
            Arc::new(move |id, tid| {
                cg.add_vcpu_thread(id.into(), tid)
                    .map_err(|e| e.to_string())
            })
        });

        Ok(Self {
            _vm: vm,
            vcpus,
            exit,
            serial,
            serial_drained,
            console_input: config.console == ConsoleConfig::Stdio,
            virtio,
            control,
            cgroup,
            vcpu_start,
            i8042,
            vcpu_count: config.cpus,
            mem_size_mib: mem_size >> 20,
            started: std::time::Instant::now(),
            net_counters,
        })
    }

    /// Starts the vCPUs and runs the event loop until the VM ends.
    pub fn run(mut self, mut api: Option<ApiContext>) -> Result<VmExit, VmmError> {
        let signals = block_stop_signals().map_err(io_err("signalfd"))?;
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.exit.event_fd().as_raw_fd(), TOKEN_EXIT).map_err(io_err("epoll"))?;
        add(signals.as_raw_fd(), TOKEN_SIGNAL).map_err(io_err("epoll"))?;
        add(self.serial_drained.as_raw_fd(), TOKEN_SERIAL_DRAINED).map_err(io_err("epoll"))?;
        if let Some(api) = &api {
            add(api.channel.event_fd(), TOKEN_API).map_err(io_err("epoll"))?;
        }
        // Device events: one token per queue eventfd, per "device fds changed" eventfd and
        // per device fd (re-registered when a device activates or resets).
        self.watch_queues(&epoll, true).map_err(io_err("epoll"))?;
        let mut device_fds: Vec<Vec<RawFd>> = vec![Vec::new(); self.virtio.handlers.len()];
        // Console input: our own descriptor for stdin. Regular files and /dev/null cannot be
        // watched (there is no input to wait for); EOF or an error ends input for good.
        let mut stdin = if self.console_input {
            io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(File::from)
        } else {
            None
        };
        let mut stdin_watched = stdin.is_some() && add(0, TOKEN_STDIN).is_ok();
        if stdin_watched {
            terminal::enter_raw_mode();
        } else {
            stdin = None;
        }

        for vcpu in self.vcpus.drain(..) {
            let start: Option<ThreadStart> = self.vcpu_start.clone().map(|f| {
                let b: ThreadStart = Box::new(move |id, tid| f(id, tid));
                b
            });
            vcpu.spawn(start)
                .map_err(io_err("spawning a vCPU thread"))?;
        }
        log::info!(
            "VM started: {} vCPU(s), {} MiB, {} virtio device(s)",
            self.vcpu_count,
            self.mem_size_mib,
            self.virtio.handlers.len()
        );

        let mut events = vec![EpollEvent::default(); 16];
        let result = loop {
            if let Some(exit) = self.exit.take() {
                break Ok(exit);
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Err(VmmError::Io {
                        what: "epoll",
                        source: e,
                    })
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit.event_fd().read();
                    }
                    TOKEN_API => {
                        if let Some(api) = api.as_mut() {
                            while let Some((req, responder)) = api.channel.try_recv() {
                                let answer = self.handle_api(req, api, &epoll, &mut device_fds);
                                responder.respond(answer);
                            }
                        }
                    }
                    TOKEN_SIGNAL => match read_signal(&signals) {
                        Some(libc::SIGUSR1) => self.control.request_dump(),
                        Some(sig) => self.exit.report(VmExit::Signal(sig)),
                        None => {}
                    },
                    TOKEN_STDIN => {
                        let state = match stdin.as_mut() {
                            Some(f) => self.forward_input(f),
                            None => Input::Ended,
                        };
                        if state != Input::More {
                            let _ = epoll.ctl(ControlOperation::Delete, 0, EpollEvent::default());
                            stdin_watched = false;
                        }
                        if state == Input::Ended {
                            stdin = None;
                        }
                    }
                    TOKEN_SERIAL_DRAINED => {
                        let _ = self.serial_drained.read();
                        // Input waits while the UART's FIFO is full; resume once it drained.
                        if stdin.is_some() && !stdin_watched {
                            stdin_watched = add(0, TOKEN_STDIN).is_ok();
                        }
                    }
                    token => match Source::from_token(token) {
                        Some(Source::Queue(dev, q)) => self.virtio.handlers[dev].process_queue(q),
                        Some(Source::DeviceFd(dev, j)) => {
                            self.virtio.handlers[dev].process_device_fd(j)
                        }
                        Some(Source::FdsChanged(dev)) => {
                            let h = &self.virtio.handlers[dev];
                            let _ = h.fds_changed_evt().read();
                            for fd in device_fds[dev].drain(..) {
                                let _ =
                                    epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            }
                            for (j, fd) in h.device_fds().into_iter().enumerate() {
                                let token = Source::DeviceFd(dev, j).token();
                                let ev =
                                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token);
                                if let Err(e) = epoll.ctl(ControlOperation::Add, fd, ev) {
                                    log::error!("cannot watch device fd {fd}: {e}");
                                    continue;
                                }
                                device_fds[dev].push(fd);
                            }
                        }
                        None => {}
                    },
                }
            }
        };
        terminal::restore();
        // The socket file goes with the VM; clients still connected get 503.
        if let Some(mut api) = api.take() {
            api.channel.shutdown();
        }
        // Leave no cgroup behind on any way out (process::exit runs no destructors). The
        // vCPU start hooks hold the last other references.
        self.vcpu_start = None;
        if let Some(cg) = self.cgroup.take() {
            match Arc::try_unwrap(cg) {
                Ok(cg) => {
                    if let Err(e) = cg.remove() {
                        log::warn!("removing the VM's cgroups: {e}");
                    }
                }
                Err(_) => {
                    log::warn!("the VM's cgroups are still in use; the next start removes them")
                }
            }
        }
        result
    }

    /// Adds (or removes) the queue eventfds and "device fds changed" eventfds to the loop.
    fn watch_queues(&self, epoll: &Epoll, on: bool) -> io::Result<()> {
        for (dev, h) in self.virtio.handlers.iter().enumerate() {
            let fds = h
                .queue_evts()
                .iter()
                .enumerate()
                .map(|(q, evt)| (evt.as_raw_fd(), Source::Queue(dev, q).token()))
                .chain(std::iter::once((
                    h.fds_changed_evt().as_raw_fd(),
                    Source::FdsChanged(dev).token(),
                )));
            for (fd, token) in fds {
                if on {
                    epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )?;
                } else {
                    epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
                }
            }
        }
        Ok(())
    }

    /// Pauses or resumes the VM: every vCPU out of KVM_RUN and parked, and no device work
    /// (queue notifications and device fds are not watched while paused).
    fn set_paused(
        &mut self,
        paused: bool,
        epoll: &Epoll,
        device_fds: &mut [Vec<RawFd>],
    ) -> io::Result<()> {
        if paused == self.control.is_paused() {
            return Ok(());
        }
        if paused {
            self.control.pause(self.vcpu_count.into());
            self.watch_queues(epoll, false)?;
            for fd in device_fds.iter_mut().flat_map(|v| v.drain(..)) {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        } else {
            self.watch_queues(epoll, true)?;
            for h in &self.virtio.handlers {
                // Re-sync the device fds, and look at every queue once: notifications that
                // came while paused are still counted in the eventfds, tap data is not.
                let _ = h.fds_changed_evt().write(1);
                for evt in h.queue_evts() {
                    let _ = evt.write(1);
                }
            }
            self.control.resume();
        }
        Ok(())
    }

    fn state(&self) -> InstanceState {
        if self.control.is_paused() {
            InstanceState::Paused
        } else {
            InstanceState::Running
        }
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "state": self.state(),
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "vcpu_exits": self.control.exits(),
            "cgroup_usage_usec": self.cgroup.as_ref().and_then(|c| c.usage_usec().ok()),
            "net": self
                .net_counters
                .iter()
                .map(|(tap, c)| {
                    let n = c.snapshot();
                    let v = serde_json::json!({
                        "rx_frames": n.rx_frames, "rx_bytes": n.rx_bytes,
                        "rx_dropped": n.rx_dropped, "rx_bad_chains": n.rx_bad_chains,
                        "tx_frames": n.tx_frames, "tx_bytes": n.tx_bytes,
                        "tx_malformed": n.tx_malformed, "tx_errors": n.tx_errors,
                    });
                    (tap.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// `PATCH /drives/{id}`: the drive gets the new file as its medium (the guest sees the
    /// new size and contents). Opened here, on the event loop, between two requests.
    fn change_drive_medium(
        &self,
        update: &DriveUpdate,
        api: &mut ApiContext,
    ) -> Result<(), ApiFault> {
        let started = StartedDrive::find(&api.vm_config, &update.drive_id)?;
        let path = &update.path_on_host;
        if let Some((other, _)) = started
            .others
            .iter()
            .find(|(_, p)| p == path || same_file(p, path))
        {
            return Err(ApiFault::bad_request(format!(
                "path_on_host: {} is drive {other:?}'s file",
                path.display()
            )));
        }
        // A read-write image is locked exclusively: its own drive cannot open it a second
        // time (a read-only drive can, which re-reads its size).
        if !started.drive.is_read_only && same_file(&started.drive.path_on_host, path) {
            return Err(ApiFault::bad_request(format!(
                "path_on_host: {} is already drive {:?}'s file; a read-write drive cannot \
                 reopen it (give another file)",
                path.display(),
                update.drive_id
            )));
        }
        let handler = self
            .virtio
            .handlers
            .get(started.device_index)
            .ok_or_else(|| {
                ApiFault::internal(format!("drive {:?} has no device", update.drive_id))
            })?;
        let mut disk = started.drive.disk_config();
        disk.path = path.clone();
        let sectors = crate::devices::change_medium(handler, &disk).map_err(|e| {
            ApiFault::bad_request(format!("drive {:?} keeps its medium: {e}", update.drive_id))
        })?;
        StartedDrive::set_path(&mut api.vm_config, &update.drive_id, path);
        log::info!(
            "drive {}: new medium {} ({sectors} sectors)",
            update.drive_id,
            path.display()
        );
        Ok(())
    }

    /// Answers an API request once the VM has started.
    fn handle_api(
        &mut self,
        req: ApiRequest,
        api: &mut ApiContext,
        epoll: &Epoll,
        device_fds: &mut [Vec<RawFd>],
    ) -> ApiResponse {
        let internal = |e: io::Error| ApiFault::internal(e.to_string());
        match req {
            ApiRequest::GetInstanceInfo => Ok(Some(
                serde_json::to_value(InstanceInfo::new(&api.id, self.state()))
                    .map_err(|e| ApiFault::internal(e.to_string()))?,
            )),
            ApiRequest::GetVmConfig => Ok(Some(api.vm_config.clone())),
            ApiRequest::GetMachineConfig => Ok(Some(
                api.vm_config
                    .get("machine-config")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null),
            )),
            ApiRequest::GetVmMetrics => Ok(Some(self.metrics())),
            ApiRequest::PatchVm(VmState::Paused) => {
                self.set_paused(true, epoll, device_fds).map_err(internal)?;
                Ok(None)
            }
            ApiRequest::PatchVm(VmState::Resumed) => {
                self.set_paused(false, epoll, device_fds)
                    .map_err(internal)?;
                Ok(None)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.i8042
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send_ctrl_alt_del();
                Ok(None)
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                let path = api.metrics_path.as_ref().ok_or_else(|| {
                    ApiFault::bad_request(
                        "metrics are not configured: PUT /metrics before InstanceStart",
                    )
                })?;
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(internal)?;
                writeln!(f, "{}", self.metrics()).map_err(internal)?;
                Ok(None)
            }
            ApiRequest::PatchCgroup(update) => {
                let cg = self.cgroup.as_ref().ok_or_else(|| {
                    ApiFault::bad_request("the VM has no cgroup: start it with a cgroup parent")
                })?;
                let cpu_max = update
                    .cpu_max
                    .map(|m| m.unwrap_or(crate::cgroup::CpuMax::UNLIMITED));
                let cpuset = match update.cpuset {
                    Some(Some(list)) => Some(list),
                    Some(None) => Some(
                        crate::cgroup::CpuList::online()
                            .map_err(|e| ApiFault::bad_request(e.to_string()))?,
                    ),
                    None => None,
                };
                cg.set_limits(cpu_max, cpuset)
                    .map_err(|e| ApiFault::bad_request(e.to_string()))?;
                Ok(None)
            }
            ApiRequest::PatchDrive(update) => {
                self.change_drive_medium(&update, api)?;
                Ok(None)
            }
            other => Err(ApiFault::wrong_state(&other, true)),
        }
    }

    /// Moves console input into the UART's FIFO (no input is read while the FIFO is full).
    fn forward_input(&self, stdin: &mut File) -> Input {
        let mut serial = self
            .serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = serial.input_capacity();
        if room == 0 {
            return Input::Full;
        }
        let mut buf = [0u8; 64];
        match stdin.read(&mut buf[..room.min(64)]) {
            Ok(0) => Input::Ended,
            Ok(n) => {
                if let Err(e) = serial.enqueue_input(&buf[..n]) {
                    log::warn!("console input dropped: {e}");
                }
                Input::More
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Input::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Input::More,
            Err(e) => {
                log::warn!("console input: {e}");
                Input::Ended
            }
        }
    }
}

/// Whether two paths name the same file (both exist and have the same device and inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// What became of console input after a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Keep reading.
    More,
    /// The UART's FIFO is full: wait until the guest drains it.
    Full,
    /// EOF or an error: no more input.
    Ended,
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_SERIAL_DRAINED: u64 = 3;
const TOKEN_API: u64 = 4;

/// What a device's epoll token stands for: (device index, queue or fd index), encoded as
/// kind << 32 | device << 16 | index, so tokens never need a table that a guest could grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Queue(usize, usize),
    FdsChanged(usize),
    DeviceFd(usize, usize),
}

impl Source {
    fn token(self) -> u64 {
        let (kind, dev, idx) = match self {
            Source::Queue(d, q) => (1u64, d, q),
            Source::FdsChanged(d) => (2, d, 0),
            Source::DeviceFd(d, j) => (3, d, j),
        };
        (kind << 32) | ((dev as u64 & 0xffff) << 16) | (idx as u64 & 0xffff)
    }

    fn from_token(token: u64) -> Option<Source> {
        let dev = ((token >> 16) & 0xffff) as usize;
        let idx = (token & 0xffff) as usize;
        match token >> 32 {
            1 => Some(Source::Queue(dev, idx)),
            2 => Some(Source::FdsChanged(dev)),
            3 => Some(Source::DeviceFd(dev, idx)),
            _ => None,
        }
    }
}

fn irq_line(vm: &Vm, gsi: u32) -> Result<Arc<dyn InterruptLine>, VmmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.fd.register_irqfd(&evt, gsi).map_err(kvm("KVM_IRQFD"))?;
    Ok(Arc::new(IrqFd(evt)))
}

/// The console's output side: written byte by byte by the UART, so unbuffered.
fn console_output(console: &ConsoleConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match console {
        ConsoleConfig::Stdio => {
            let fd = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("stdout"))?;
            Box::new(File::from(fd))
        }
        ConsoleConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| VmmError::ConsoleFile {
                    path: path.clone(),
                    reason: crate::config::io_reason(&e),
                })?,
        ),
        ConsoleConfig::None => Box::new(io::sink()),
    })
}

/// Blocks SIGINT, SIGTERM, SIGHUP (stop) and SIGUSR1 (log vCPU registers) in this thread (and so in the vCPU threads spawned
/// after) and returns a signalfd that receives them, for a clean stop from the event loop.
pub fn block_stop_signals() -> io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a local, zero-initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

pub(crate) fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: reads one signalfd_siginfo into a properly sized, zeroed buffer.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        );
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}
