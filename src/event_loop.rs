//! The one event loop of the process, on the main thread, from start to exit. Before
//! InstanceStart it serves the pre-boot API; once the VM runs, it serves the runtime API,
//! device events, console input, signals and the end of the VM.
//!
//! The loop's own fds (signals, API, the VM's end, console) have fixed tokens; devices add
//! and remove their own fds as [`EventSubscriber`]s and are called back with them.

use crate::api::{ApiChannel, Preboot, PrebootApiController, RuntimeApiController};
use crate::signals::{read_signal, signal_fd};
use crate::terminal;
use crate::vmm::{Vmm, VmmError};
use crate::vstate::exit::VmExit;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// How long the start waits for every vCPU thread to be filtered and held.
const VCPU_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
use wisp_devices::events::{EventOps, EventSubscriber};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A configuration refused before the VM started (the API's fault message).
    #[error("{}", .0.fault_message)]
    Config(crate::api::ApiFault),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl From<crate::api::ApiFault> for RunError {
    fn from(f: crate::api::ApiFault) -> Self {
        RunError::Config(f)
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> RunError {
    move |source| RunError::Io { what, source }
}

/// Where the process starts.
pub enum Phase {
    /// `wisp --api-sock`: wait for the configuration and InstanceStart.
    Preboot(Box<PrebootApiController>),
    /// A VM built from a configuration given at start (`wisp run`, `--config-file`); the
    /// controller serves the API, if there is one.
    Start(Box<Vmm>, Option<Box<RuntimeApiController>>),
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_SERIAL_DRAINED: u64 = 3;
const TOKEN_API: u64 = 4;

/// The loop's fds that live as long as the process.
pub struct EventLoop {
    epoll: Epoll,
    signals: OwnedFd,
    api: Option<ApiChannel>,
}

/// A running VM and what the loop keeps for it.
struct Running {
    vmm: Vmm,
    api: Option<Box<RuntimeApiController>>,
    devices: DeviceEvents,
    console: Option<ConsoleInput>,
}

/// What the loop is serving.
enum State {
    Preboot(Box<PrebootApiController>),
    Running(Box<Running>),
}

impl EventLoop {
    /// The loop's epoll, with the signals and the API (when there is one) watched.
    pub fn new(api: Option<ApiChannel>) -> Result<Self, RunError> {
        let signals = signal_fd().map_err(io_err("signalfd"))?;
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        let this = Self {
            epoll,
            signals,
            api,
        };
        this.add(this.signals.as_raw_fd(), TOKEN_SIGNAL)
            .map_err(io_err("epoll"))?;
        if let Some(api) = &this.api {
            this.add(api.event_fd(), TOKEN_API)
                .map_err(io_err("epoll"))?;
        }
        Ok(this)
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Runs until the VM ends (or, before it started, until a signal stops wisp).
    pub fn run(mut self, phase: Phase) -> Result<VmExit, RunError> {
        let mut state = match phase {
            Phase::Preboot(p) => State::Preboot(p),
            Phase::Start(vmm, api) => State::Running(self.start(*vmm, api)?),
        };
        let result = self.serve(&mut state);
        crate::startup_trace::mark("exit: the loop saw the VM's end");
        terminal::restore();
        // The socket file goes with the VM; clients still connected get 503.
        if let Some(api) = self.api.as_mut() {
            api.shutdown();
        }
        if let State::Running(r) = &mut state {
            r.vmm.shutdown();
            r.vmm.hand_off_teardown();
        }
        drop(state);
        crate::startup_trace::mark("exit: devices closed, guest memory unmapped");
        result
    }

    /// Starts the VM's vCPUs and watches its events.
    fn start(
        &mut self,
        mut vmm: Vmm,
        api: Option<Box<RuntimeApiController>>,
    ) -> Result<Box<Running>, RunError> {
        self.add(vmm.exit.event_fd().as_raw_fd(), TOKEN_EXIT)
            .map_err(io_err("epoll"))?;
        self.add(vmm.serial_drained.as_raw_fd(), TOKEN_SERIAL_DRAINED)
            .map_err(io_err("epoll"))?;
        let devices = DeviceEvents::new(&self.epoll, vmm.devices.subscribers());
        let console = if vmm.console_input {
            ConsoleInput::open(self)
        } else {
            None
        };
        if let Err(e) = vmm.start_vcpus() {
            // vCPUs that did start are stopped, and the disks written back, as on any end.
            vmm.shutdown();
            return Err(e.into());
        }
        crate::startup_trace::mark("threads: vCPU threads started");
        let vm_config = api.as_ref().map(|a| a.config().to_json());
        let nets: Vec<_> = vmm
            .devices
            .nets()
            .iter()
            .map(|n| (n.config.tap.clone(), n.counters.clone()))
            .collect();
        let blocks: Vec<_> = vmm
            .devices
            .blocks()
            .iter()
            .map(|b| (b.config.id.clone(), b.counters.clone()))
            .collect();
        let mut sources = crate::metrics::VmSources::new(vm_config.as_ref(), &blocks, &nets);
        sources.vcpus = Some(vmm.control.clone());
        sources.entropy = vmm.devices.entropy().map(|e| e.counters.clone());
        sources.vsock = vmm.devices.vsock().map(|v| v.counters.clone());
        sources.balloon = vmm.devices.balloon_mut().map(|b| b.counters.clone());
        sources.mmds = vmm.devices.mmds().map(|m| {
            m.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .counters()
        });
        crate::metrics::register_vm(sources);
        // Every thread of the VM now exists: the main thread's filter goes on before any
        // vCPU enters the guest.
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Main) {
            vmm.shutdown();
            return Err(e.into());
        }
        // Every vCPU thread is filtered before the VM counts as started (and InstanceStart is
        // answered): each installs its filter, then parks, held, before its first KVM_RUN. A
        // loaded run found a vCPU thread not yet scheduled, unfiltered, after the answer.
        if !vmm
            .control
            .wait_held(vmm.vcpu_count.into(), VCPU_START_TIMEOUT)
        {
            log::warn!(
                "not every vCPU thread started within {} s; the VM starts anyway",
                VCPU_START_TIMEOUT.as_secs()
            );
        }
        let running = vmm.release_vcpus();
        crate::startup_trace::mark("loop: serving");
        let mut running_vm = Box::new(Running {
            vmm,
            api,
            devices,
            console,
        });
        if !running {
            // Restored paused: no device work until the resume.
            running_vm.devices.set_paused(&self.epoll, true);
        }
        Ok(running_vm)
    }

    fn serve(&mut self, state: &mut State) -> Result<VmExit, RunError> {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            if let State::Running(r) = state {
                if let Some(exit) = r.vmm.exit.reported() {
                    return Ok(exit);
                }
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("epoll")(e)),
            };
            for ev in &events[..n] {
                match (ev.data(), &mut *state) {
                    (TOKEN_SIGNAL, State::Preboot(_)) => match read_signal(&self.signals) {
                        Some(libc::SIGUSR1) | None => {}
                        Some(sig) => return Ok(VmExit::Signal(sig)),
                    },
                    (TOKEN_SIGNAL, State::Running(r)) => match read_signal(&self.signals) {
                        Some(libc::SIGUSR1) => r.vmm.control.request_dump(),
                        Some(sig) => r.vmm.exit.report(VmExit::Signal(sig)),
                        None => {}
                    },
                    (TOKEN_API, _) => self.serve_api(state)?,
                    (TOKEN_EXIT, State::Running(r)) => {
                        let _ = r.vmm.exit.event_fd().read();
                    }
                    (TOKEN_STDIN, State::Running(r)) => {
                        if let Some(console) = r.console.as_mut() {
                            if !console.forward(&self.epoll, &r.vmm) {
                                r.console = None;
                            }
                        }
                    }
                    (TOKEN_SERIAL_DRAINED, State::Running(r)) => {
                        let _ = r.vmm.serial_drained.read();
                        if let Some(console) = r.console.as_mut() {
                            console.resume(&self.epoll);
                        }
                    }
                    (token, State::Running(r)) if token & TOKEN_DEVICE != 0 => {
                        r.devices.process(&self.epoll, token)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Answers every queued API request for the phase the VM is in.
    fn serve_api(&mut self, state: &mut State) -> Result<(), RunError> {
        loop {
            let Some((req, responder)) = self.api.as_ref().and_then(|a| a.try_recv()) else {
                return Ok(());
            };
            match state {
                State::Preboot(p) => match p.handle(req) {
                    Preboot::Answer(answer) => responder.respond(answer),
                    Preboot::Start(started) => {
                        let (vmm, api) = *started;
                        // Answered once the VM runs, as Firecracker answers: by the time the
                        // client hears 204, every thread exists and has its seccomp filter.
                        // Requests queued behind InstanceStart are served by the running VM.
                        match self.start(vmm, Some(Box::new(api))) {
                            Ok(running) => {
                                responder.respond(Ok(None));
                                *state = State::Running(running);
                            }
                            Err(e) => {
                                responder.respond(Err(crate::api::ApiFault::bad_request(format!(
                                    "the VM could not start: {e}"
                                ))));
                                return Err(e);
                            }
                        }
                    }
                },
                State::Running(r) => {
                    let answer = match r.api.as_mut() {
                        Some(api) => api.handle(&mut r.vmm, req),
                        None => Err(crate::api::ApiFault::internal("no API controller")),
                    };
                    // No device work while paused: the vCPUs parked first, and resume
                    // looks at every queue once.
                    r.devices.set_paused(&self.epoll, r.vmm.is_paused());
                    responder.respond(answer);
                }
            }
        }
    }
}

/// Console input: our own descriptor for stdin. Regular files and /dev/null cannot be
/// watched (there is no input to wait for); EOF or an error ends input for good.
struct ConsoleInput {
    stdin: File,
    /// Not watched while the UART's FIFO is full.
    watched: bool,
}

impl ConsoleInput {
    fn open(event_loop: &EventLoop) -> Option<Self> {
        let stdin = File::from(io::stdin().as_fd().try_clone_to_owned().ok()?);
        event_loop.add(0, TOKEN_STDIN).ok()?;
        terminal::enter_raw_mode();
        Some(Self {
            stdin,
            watched: true,
        })
    }

    /// Moves input into the UART's FIFO; false once input has ended.
    fn forward(&mut self, epoll: &Epoll, vmm: &Vmm) -> bool {
        let state = self.read_into(vmm);
        if state != Input::More {
            let _ = epoll.ctl(ControlOperation::Delete, 0, EpollEvent::default());
            self.watched = false;
        }
        state != Input::Ended
    }

    /// The guest drained the UART's FIFO: read input again.
    fn resume(&mut self, epoll: &Epoll) {
        if !self.watched {
            self.watched = epoll
                .ctl(
                    ControlOperation::Add,
                    0,
                    EpollEvent::new(EventSet::IN, TOKEN_STDIN),
                )
                .is_ok();
        }
    }

    /// Reads no more than the UART's FIFO has room for.
    fn read_into(&mut self, vmm: &Vmm) -> Input {
        let mut serial = vmm
            .serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = serial.input_capacity();
        if room == 0 {
            return Input::Full;
        }
        let mut buf = [0u8; 64];
        match self.stdin.read(&mut buf[..room.min(64)]) {
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

/// Tokens of device fds: the fd with this bit set.
const TOKEN_DEVICE: u64 = 1 << 32;

/// The devices on the loop: each adds and removes its own fds ([`EventSubscriber`]); the
/// loop only remembers which device added which fd, to call it back.
struct DeviceEvents {
    subscribers: Vec<Box<dyn EventSubscriber>>,
    owner: HashMap<RawFd, usize>,
    paused: bool,
}

/// The loop's [`EventOps`] for one subscriber.
struct Ops<'a> {
    epoll: &'a Epoll,
    owner: &'a mut HashMap<RawFd, usize>,
    subscriber: usize,
}

impl EventOps for Ops<'_> {
    fn add(&mut self, fd: RawFd, edge_triggered: bool) -> io::Result<()> {
        let mut set = EventSet::IN;
        if edge_triggered {
            set |= EventSet::EDGE_TRIGGERED;
        }
        let token = TOKEN_DEVICE | u64::from(fd as u32);
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))?;
        self.owner.insert(fd, self.subscriber);
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) {
        if self.owner.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }
}

impl DeviceEvents {
    /// Every subscriber adds its fds.
    fn new(epoll: &Epoll, subscribers: Vec<Box<dyn EventSubscriber>>) -> Self {
        let mut this = Self {
            subscribers,
            owner: HashMap::new(),
            paused: false,
        };
        this.init_all(epoll);
        this
    }

    fn init_all(&mut self, epoll: &Epoll) {
        for (i, s) in self.subscribers.iter_mut().enumerate() {
            s.init(&mut Ops {
                epoll,
                owner: &mut self.owner,
                subscriber: i,
            });
        }
    }

    /// Stops or resumes device work: no fd of a device is watched while paused.
    fn set_paused(&mut self, epoll: &Epoll, paused: bool) {
        if paused == self.paused {
            return;
        }
        self.paused = paused;
        if paused {
            for (fd, _) in self.owner.drain() {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        } else {
            self.init_all(epoll);
        }
    }

    fn process(&mut self, epoll: &Epoll, token: u64) {
        // The fd is the token's low 32 bits.
        #[allow(clippy::cast_possible_truncation)]
        let fd = token as u32 as RawFd;
        let Some(&i) = self.owner.get(&fd) else {
            return;
        };
        self.subscribers[i].process(
            fd,
            &mut Ops {
                epoll,
                owner: &mut self.owner,
                subscriber: i,
            },
        );
    }
}
