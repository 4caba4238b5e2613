//! The virtio-rng device: activation and the request queue.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{BYTES_PER_TURN, CHAINS_PER_TURN, MAX_BYTES_PER_CHAIN, QUEUE_SIZE};
use crate::rate_limiter::{self, RateLimiter};
use crate::virtio::queue::{collect_chain, pop_chain, undo_pop, ChainEnd};
use crate::virtio::{
    device_type, features, ActivateError, Activation, VirtioDevice, VirtioInterrupt,
};

/// Request counters (Firecracker's `entropy` metrics). Bumped with relaxed adds on the
/// event loop; read without the device's lock.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests answered with random bytes.
    pub requests: AtomicU64,
    /// Random bytes written to guest memory.
    pub bytes: AtomicU64,
    /// Requests the driver malformed, returned unwritten.
    pub invalid_requests: AtomicU64,
    /// getrandom(2) failures (the request is returned unwritten).
    pub host_rng_fails: AtomicU64,
    /// Queue notifications handled (including the device's own reschedules).
    pub queue_events: AtomicU64,
    /// Times the rate limiter held a request back (it stayed in the ring).
    pub rate_limiter_throttled: AtomicU64,
    /// Times the rate limiter's timer woke the queue up.
    pub rate_limiter_events: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: VirtioInterrupt,
    queue_evts: Arc<Vec<EventFd>>,
    /// A ring became unusable (DEVICE_NEEDS_RESET): nothing more is done until reset.
    failed: bool,
}

/// Why a request got no bytes.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("descriptor chain is broken (loop, bad index or unreadable table)")]
    BrokenChain,
    #[error("descriptor {index} of the chain is driver-readable; virtio-rng buffers are device-writable only")]
    ReadOnlyDescriptor { index: usize },
    #[error("buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: usize },
    #[error("getrandom: {0}")]
    HostRng(#[source] std::io::Error),
}

/// A virtio-rng device with one request queue.
pub struct Rng {
    counters: Arc<RngCounters>,
    /// Where getrandom writes before the bytes are copied to the guest's buffers.
    scratch: Vec<u8>,
    descs: Vec<Descriptor>,
    active: Option<Active>,
    limiter: Option<RateLimiter>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl Rng {
    pub fn new() -> Rng {
        Rng {
            counters: Arc::default(),
            scratch: Vec::new(),
            descs: Vec::new(),
            active: None,
            limiter: None,
        }
    }

    /// Requests (ops) and their bytes go through `limiter` (Firecracker's entropy
    /// `rate_limiter`); a request held back stays in the ring until the limiter's timer.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Rng {
        self.limiter = Some(limiter);
        self
    }

    /// The device's counters; they survive resets.
    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }
}

/// Fills `buf` from the host's random pool (blocking only until the host's pool is first
/// initialised, long past on any host that runs VMs).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most rest.len() bytes into rest, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Reads above 256 bytes may return short (a signal); go on from there.
        done += n as usize;
    }
    Ok(())
}

/// The bytes a request of these descriptors would get (what the rate limiter charges).
fn request_len(descs: &[Descriptor]) -> u64 {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    total.min(MAX_BYTES_PER_CHAIN as u64)
}

/// Serves one request: checks every descriptor, then fills the buffers in order with up to
/// [`MAX_BYTES_PER_CHAIN`] random bytes. Returns the bytes written.
fn serve(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    end: ChainEnd,
    scratch: &mut Vec<u8>,
) -> Result<usize, RequestError> {
    if end == ChainEnd::Broken {
        return Err(RequestError::BrokenChain);
    }
    // virtio 1.2 §5.4.6.1: the driver places only device-writable buffers. All checks come
    // before the first byte is written, so a refused request leaves guest memory untouched.
    let mut plan = Vec::with_capacity(descs.len());
    let mut total = 0usize;
    for (index, d) in descs.iter().enumerate() {
        if !d.is_write_only() {
            return Err(RequestError::ReadOnlyDescriptor { index });
        }
        let len = (d.len() as usize).min(MAX_BYTES_PER_CHAIN - total);
        if len == 0 {
            continue;
        }
        let addr = d.addr();
        if addr.0.checked_add(len as u64).is_none()
            || !mem.check_range(addr, len, Permissions::Write)
        {
            return Err(RequestError::OutsideMemory { addr: addr.0, len });
        }
        plan.push((addr, len));
        total += len;
    }
    scratch.resize(total, 0);
    fill_random(&mut scratch[..total]).map_err(RequestError::HostRng)?;
    let mut at = 0;
    for (addr, len) in plan {
        mem.write_slice(&scratch[at..at + len], addr)
            .map_err(|_| RequestError::OutsideMemory { addr: addr.0, len })?;
        at += len;
    }
    Ok(total)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    /// virtio 1.2 §5.4.4: no config space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, mut activation: Activation) -> Result<(), ActivateError> {
        let [queue] = activation.take_ready_queues()?;
        self.active = Some(Active {
            mem: activation.mem,
            queue,
            interrupt: activation.interrupt,
            queue_evts: activation.queue_evts,
            failed: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn device_fds(&self) -> Vec<RawFd> {
        rate_limiter::device_fds(self.limiter.as_ref())
    }

    /// The rate limiter's timer: tokens are back.
    fn process_device_fd(&mut self, index: usize) {
        if rate_limiter::device_fd_fired(self.limiter.as_mut(), index) {
            self.counters
                .rate_limiter_events
                .fetch_add(1, Ordering::Relaxed);
            self.process_queue(0);
        }
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        if index != 0 {
            rate_limited_warn!("virtio-rng: notification for queue {} ignored", index);
            return;
        }
        let counters = &*self.counters;
        counters.queue_events.fetch_add(1, Ordering::Relaxed);
        let Active {
            mem,
            queue,
            interrupt,
            queue_evts,
            failed,
        } = active;
        let needs_reset = |failed: &mut bool, why: &dyn std::fmt::Display| {
            rate_limited_warn!("virtio-rng: {}; the device needs a reset", why);
            *failed = true;
            interrupt.set_needs_reset();
        };
        let mut chains = 0u32;
        let mut bytes = 0usize;
        let mut completed = false;
        // virtio 1.2 §2.7.10: notifications disabled while we work, then re-enabled and the
        // ring checked once more so that no request slips between the two.
        'work: loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                return needs_reset(failed, &format_args!("used ring unusable: {e}"));
            }
            loop {
                if chains >= CHAINS_PER_TURN || bytes >= BYTES_PER_TURN {
                    // Come back through the event loop; notifications stay disabled.
                    if let Err(e) = queue_evts[0].write(1) {
                        rate_limited_warn!("virtio-rng: cannot reschedule the queue: {}", e);
                    }
                    break 'work;
                }
                let chain = match pop_chain(queue, &*mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => return needs_reset(failed, &e),
                };
                chains += 1;
                let head = chain.head_index();
                let end = collect_chain(chain, &mut self.descs);
                if let Some(limiter) = self.limiter.as_mut() {
                    if !limiter.try_consume(1, request_len(&self.descs)) {
                        // It stays in the ring, notifications stay off, until the
                        // limiter's timer brings us back.
                        undo_pop(queue);
                        counters
                            .rate_limiter_throttled
                            .fetch_add(1, Ordering::Relaxed);
                        break 'work;
                    }
                }
                let used_len = match serve(mem, &self.descs, end, &mut self.scratch) {
                    Ok(n) => {
                        counters.requests.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        bytes += n;
                        n
                    }
                    Err(e) => {
                        let counter = match e {
                            RequestError::HostRng(_) => &counters.host_rng_fails,
                            _ => &counters.invalid_requests,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        rate_limited_warn!("virtio-rng: request refused: {}", e);
                        0
                    }
                };
                // At most MAX_BYTES_PER_CHAIN (64 KiB).
                #[allow(clippy::cast_possible_truncation)]
                let used_len = used_len as u32;
                if let Err(e) = queue.add_used(&*mem, head, used_len) {
                    return needs_reset(failed, &format_args!("used ring unusable: {e}"));
                }
                completed = true;
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return needs_reset(failed, &format_args!("used ring unusable: {e}")),
            }
        }
        if completed {
            match queue.needs_notification(&*mem) {
                Ok(false) => {}
                Ok(true) => interrupt.signal_used_queue(0),
                Err(e) => {
                    rate_limited_warn!("virtio-rng: cannot read used_event: {}", e);
                    interrupt.signal_used_queue(0);
                }
            }
        }
    }
}
