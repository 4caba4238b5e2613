//! The event loop on the main thread: console input, signals, device events, the API and
//! the end of the VM.

use crate::signals::*;
use crate::terminal;
use crate::vmm::*;
use crate::vstate::exit::VmExit;
use crate::vstate::vcpu::ThreadStart;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

impl Vmm {
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
    pub(crate) fn watch_queues(&self, epoll: &Epoll, on: bool) -> io::Result<()> {
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
    pub(crate) fn set_paused(
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
