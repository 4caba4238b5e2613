//! The one event loop of the process, on the main thread, from start to exit. Before
//! InstanceStart it serves the pre-boot API; once the VM runs, it serves the runtime API,
//! device events, console input, signals and the end of the VM.
//!
//! Every fd the loop watches is level-triggered unless said otherwise, and each has a fixed
//! token; virtio devices' fds are handed out by [`DeviceEvents`].

use crate::api::{ApiChannel, Preboot, PrebootApiController, RuntimeApiController};
use crate::signals::{read_signal, signal_fd};
use crate::terminal;
use crate::vmm::{Vmm, VmmError};
use crate::vstate::exit::VmExit;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use wisp_devices::virtio::VirtioEventHandler;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A configuration refused before the VM started (the API's fault message).
    #[error("{}", .0.fault_message)]
    Config(crate::api::ApiFault),
    #[error(transparent)]
    Vmm(#[from] VmmError),
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
        terminal::restore();
        // The socket file goes with the VM; clients still connected get 503.
        if let Some(api) = self.api.as_mut() {
            api.shutdown();
        }
        if let State::Running(r) = &mut state {
            r.vmm.shutdown();
        }
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
        let devices = DeviceEvents::new(vmm.devices.handlers.clone());
        devices.watch(&self.epoll, true).map_err(io_err("epoll"))?;
        let console = if vmm.console_input {
            ConsoleInput::open(self)
        } else {
            None
        };
        vmm.start_vcpus()?;
        let vm_config = api.as_ref().map(|a| a.config().to_json());
        let nets: Vec<_> = vmm
            .devices
            .nets()
            .iter()
            .map(|n| (n.config.tap.clone(), n.counters.clone()))
            .collect();
        let mut sources = crate::metrics::VmSources::new(vm_config.as_ref(), &nets);
        sources.vcpus = Some(vmm.control.clone());
        crate::metrics::register_vm(sources);
        Ok(Box::new(Running {
            vmm,
            api,
            devices,
            console,
        }))
    }

    fn serve(&mut self, state: &mut State) -> Result<VmExit, RunError> {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            if let State::Running(r) = state {
                if let Some(exit) = r.vmm.exit.take() {
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
                    (token, State::Running(r)) => r.devices.process(&self.epoll, token),
                    (_, State::Preboot(_)) => {}
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
                        responder.respond(Ok(None));
                        // Requests queued behind InstanceStart are served by the running VM.
                        *state = State::Running(self.start(vmm, Some(Box::new(api)))?);
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

/// The virtio devices' events: queue notifications, "device fds changed" and the devices'
/// own fds (re-registered when a device activates or resets).
struct DeviceEvents {
    handlers: Vec<VirtioEventHandler>,
    /// The device fds watched now, per device.
    fds: Vec<Vec<RawFd>>,
    paused: bool,
}

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

impl DeviceEvents {
    fn new(handlers: Vec<VirtioEventHandler>) -> Self {
        let fds = vec![Vec::new(); handlers.len()];
        Self {
            handlers,
            fds,
            paused: false,
        }
    }

    /// Adds (or removes) the queue eventfds and "device fds changed" eventfds to the loop.
    fn watch(&self, epoll: &Epoll, on: bool) -> io::Result<()> {
        for (dev, h) in self.handlers.iter().enumerate() {
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

    /// Stops or resumes device work (no fd of a device is watched while paused).
    fn set_paused(&mut self, epoll: &Epoll, paused: bool) {
        if paused == self.paused {
            return;
        }
        self.paused = paused;
        if let Err(e) = self.watch(epoll, !paused) {
            log::error!("virtio device events: {e}");
        }
        if paused {
            for fd in self.fds.iter_mut().flat_map(|v| v.drain(..)) {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        } else {
            for h in &self.handlers {
                // Re-sync the device fds, and look at every queue once: notifications that
                // came while paused are still counted in the eventfds, tap data is not.
                let _ = h.fds_changed_evt().write(1);
                for evt in h.queue_evts() {
                    let _ = evt.write(1);
                }
            }
        }
    }

    fn process(&mut self, epoll: &Epoll, token: u64) {
        match Source::from_token(token) {
            Some(Source::Queue(dev, q)) => self.handlers[dev].process_queue(q),
            Some(Source::DeviceFd(dev, j)) => self.handlers[dev].process_device_fd(j),
            Some(Source::FdsChanged(dev)) => {
                let h = &self.handlers[dev];
                let _ = h.fds_changed_evt().read();
                for fd in self.fds[dev].drain(..) {
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                for (j, fd) in h.device_fds().into_iter().enumerate() {
                    let token = Source::DeviceFd(dev, j).token();
                    let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token);
                    if let Err(e) = epoll.ctl(ControlOperation::Add, fd, ev) {
                        log::error!("cannot watch device fd {fd}: {e}");
                        continue;
                    }
                    self.fds[dev].push(fd);
                }
            }
            None => {}
        }
    }
}
