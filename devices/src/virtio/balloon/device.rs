//! The virtio-balloon device: config space, the inflate and deflate queues, the statistics
//! queue and its timer.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{features as fb, DEFLATE_QUEUE, INFLATE_QUEUE, PAGE_SIZE, QUEUE_SIZE, STATS_QUEUE};
use crate::cast::u64_to_usize;
use crate::rate_limiter::Timer;
use crate::virtio::queue::{collect_chain, pop_chain, ChainEnd};
use crate::virtio::{
    device_type, features, read_config_bytes, ActivateError, Activation, VirtioDevice,
    VirtioInterrupt,
};

/// struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_LEN: usize = 16;
const NUM_PAGES: usize = 0;
const ACTUAL: usize = 4;
/// Page frame numbers looked at in one event-loop turn; the rest wait for the next.
const PFNS_PER_TURN: u64 = 1 << 16;
/// Page frame numbers taken from one chain (Linux sends 256); more are ignored.
const MAX_PFNS_PER_CHAIN: u64 = 4096;
/// Statistics entries taken from one buffer (virtio 1.2 defines 10 tags).
const MAX_STATS: usize = 64;
/// struct virtio_balloon_stat: le16 tag, le64 val, packed.
const STAT_LEN: u64 = 10;

/// Counters (Firecracker's `balloon` metrics). Relaxed adds on the event loop.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// Inflate and deflate buffers handled.
    pub inflate_count: AtomicU64,
    pub deflate_count: AtomicU64,
    /// Pages whose host memory was returned (MADV_DONTNEED), and those given back.
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    /// Page frame numbers outside guest memory, or that madvise refused.
    pub invalid_pages: AtomicU64,
    /// Statistics buffers taken, and ones the driver malformed.
    pub stats_updates_count: AtomicU64,
    pub stats_update_fails: AtomicU64,
}

/// The guest's last memory statistics, by tag (see [`super::STAT_NAMES`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BalloonStats {
    pub values: BTreeMap<u16, u64>,
    /// Buffers received so far (0: the guest has sent none).
    pub updates: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: VirtioInterrupt,
    queue_evts: Arc<Vec<EventFd>>,
    failed: bool,
    /// The statistics buffer the device holds until it wants new figures.
    stats_head: Option<u16>,
}

/// A virtio-balloon device.
pub struct Balloon {
    features: u64,
    queue_sizes: Vec<u16>,
    target_pages: u32,
    actual_pages: u32,
    /// How often the device asks for statistics (None: no statistics queue).
    stats_interval: Option<Duration>,
    stats_timer: Option<Timer>,
    stats: Arc<Mutex<BalloonStats>>,
    counters: Arc<BalloonCounters>,
    descs: Vec<Descriptor>,
    active: Option<Active>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error(
        "statistics were on at boot; only their interval can change at run time (at least 1 s)"
    )]
    StatisticsAlwaysOn,
    #[error("statistics were off at boot (stats_polling_interval_s 0); they cannot be turned on at run time")]
    StatisticsOff,
}

impl Balloon {
    /// A balloon asking for `target_pages` 4 KiB pages at start; `stats_interval_s` > 0
    /// offers the statistics queue and asks for new figures that often.
    pub fn new(
        target_pages: u32,
        deflate_on_oom: bool,
        stats_interval_s: u16,
    ) -> io::Result<Balloon> {
        let mut features = features::VERSION_1;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        if deflate_on_oom {
            features |= fb::DEFLATE_ON_OOM;
        }
        let (stats_interval, stats_timer) = if stats_interval_s > 0 {
            features |= fb::STATS_VQ;
            queue_sizes.push(QUEUE_SIZE);
            (
                Some(Duration::from_secs(u64::from(stats_interval_s))),
                Some(Timer::new()?),
            )
        } else {
            (None, None)
        };
        Ok(Balloon {
            features,
            queue_sizes,
            target_pages,
            actual_pages: 0,
            stats_interval,
            stats_timer,
            stats: Arc::default(),
            counters: Arc::default(),
            descs: Vec::new(),
            active: None,
        })
    }

    /// The new target; call through `DeviceHandle::change_config` so that the driver is told.
    pub fn set_target(&mut self, pages: u32) {
        self.target_pages = pages;
    }

    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// What the driver last said it holds (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    pub fn stats(&self) -> Arc<Mutex<BalloonStats>> {
        self.stats.clone()
    }

    pub fn counters(&self) -> Arc<BalloonCounters> {
        self.counters.clone()
    }

    /// The statistics interval, in seconds (0: no statistics).
    pub fn stats_interval_s(&self) -> u64 {
        self.stats_interval.map_or(0, |d| d.as_secs())
    }

    /// A new statistics interval, the first request for figures at once (Firecracker's rule:
    /// statistics cannot be turned on or off at run time, only their interval changed).
    pub fn set_stats_interval(&mut self, seconds: u16) -> Result<(), BalloonError> {
        match (self.stats_interval.is_some(), seconds > 0) {
            (true, false) => return Err(BalloonError::StatisticsAlwaysOn),
            (false, true) => return Err(BalloonError::StatisticsOff),
            _ => {}
        }
        if self.stats_interval.is_some() {
            self.stats_interval = Some(Duration::from_secs(u64::from(seconds)));
            if self.active.is_some() {
                self.arm_stats_timer(Some(Duration::ZERO));
            }
        }
        Ok(())
    }

    /// Arms the statistics timer for `after`, or the interval.
    fn arm_stats_timer(&self, after: Option<Duration>) {
        if let (Some(timer), Some(interval)) = (&self.stats_timer, self.stats_interval) {
            if let Err(e) = timer.arm(after.unwrap_or(interval)) {
                rate_limited_warn!("virtio-balloon: cannot arm the statistics timer: {}", e);
            }
        }
    }

    fn process_pages(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        let inflate = index == INFLATE_QUEUE;
        let mut budget = PFNS_PER_TURN;
        let mut used = false;
        let queue = &mut active.queues[index];
        loop {
            if budget == 0 {
                if let Err(e) = active.queue_evts[index].write(1) {
                    rate_limited_warn!("virtio-balloon: cannot reschedule: {}", e);
                }
                break;
            }
            let chain = match pop_chain(&mut *queue, &active.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    rate_limited_warn!("virtio-balloon: {}; the device needs a reset", e);
                    active.failed = true;
                    active.interrupt.set_needs_reset();
                    return;
                }
            };
            let head = chain.head_index();
            let end = collect_chain(chain, &mut self.descs);
            let pages = walk_pfns(
                &active.mem,
                &self.descs,
                end,
                &mut budget,
                inflate,
                &self.counters,
            );
            let (count, total) = if inflate {
                (&self.counters.inflate_count, &self.counters.inflated_pages)
            } else {
                (&self.counters.deflate_count, &self.counters.deflated_pages)
            };
            count.fetch_add(1, Ordering::Relaxed);
            total.fetch_add(pages, Ordering::Relaxed);
            if let Err(e) = queue.add_used(&active.mem, head, 0) {
                rate_limited_warn!("virtio-balloon: used ring unusable: {}", e);
                active.failed = true;
                active.interrupt.set_needs_reset();
                return;
            }
            used = true;
        }
        if used {
            notify(queue, &active.mem, &active.interrupt, index);
        }
    }

    fn process_stats(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        let queue = &mut active.queues[STATS_QUEUE];
        let mut returned = false;
        loop {
            let chain = match pop_chain(&mut *queue, &active.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    rate_limited_warn!("virtio-balloon: stats {}; the device needs a reset", e);
                    active.failed = true;
                    active.interrupt.set_needs_reset();
                    return;
                }
            };
            let head = chain.head_index();
            let end = collect_chain(chain, &mut self.descs);
            match read_stats(&active.mem, &self.descs, end) {
                Ok(values) => {
                    let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
                    s.values.extend(values);
                    s.updates += 1;
                    self.counters
                        .stats_updates_count
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    self.counters
                        .stats_update_fails
                        .fetch_add(1, Ordering::Relaxed);
                    rate_limited_warn!("virtio-balloon: statistics buffer {}: {}", head, why);
                }
            }
            // One buffer is held; an older one the driver sent again goes back.
            if let Some(old) = active.stats_head.replace(head) {
                if let Err(e) = queue.add_used(&active.mem, old, 0) {
                    rate_limited_warn!("virtio-balloon: stats used ring unusable: {}", e);
                    active.failed = true;
                    active.interrupt.set_needs_reset();
                    return;
                }
                returned = true;
            }
        }
        if returned {
            notify(queue, &active.mem, &active.interrupt, STATS_QUEUE);
        }
    }

    /// The statistics timer fired: the held buffer goes back, which asks the driver for new
    /// figures (virtio 1.2 §5.5.6.3).
    fn request_stats(&mut self) {
        self.arm_stats_timer(None);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(head) = active.stats_head.take() else {
            return;
        };
        let queue = &mut active.queues[STATS_QUEUE];
        if let Err(e) = queue.add_used(&active.mem, head, 0) {
            rate_limited_warn!("virtio-balloon: stats used ring unusable: {}", e);
            active.failed = true;
            active.interrupt.set_needs_reset();
            return;
        }
        notify(queue, &active.mem, &active.interrupt, STATS_QUEUE);
    }
}

fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt, index: usize) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used_queue(index),
        Err(e) => {
            rate_limited_warn!("virtio-balloon: cannot read used_event: {}", e);
            interrupt.signal_used_queue(index);
        }
    }
}

/// Returns host memory to the host, a run of contiguous host pages at a time.
struct Discarder<'a> {
    counters: &'a BalloonCounters,
    run: Option<(*mut u8, usize)>,
}

impl Discarder<'_> {
    fn page(&mut self, ptr: *mut u8) {
        if let Some((start, len)) = self.run.as_mut() {
            if start.wrapping_add(*len) == ptr {
                *len += u64_to_usize(PAGE_SIZE);
                return;
            }
        }
        self.flush();
        self.run = Some((ptr, u64_to_usize(PAGE_SIZE)));
    }

    fn flush(&mut self) {
        let Some((start, len)) = self.run.take() else {
            return;
        };
        // SAFETY: [start, start + len) is inside one guest memory region (each page was
        // checked against it and the run is contiguous in the host mapping), which stays
        // mapped while the device holds `mem`. MADV_DONTNEED on that private anonymous
        // mapping only drops its pages: the guest reads zeros there from now on, which is
        // what a driver that gave the pages away expects.
        let r = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
        if r != 0 {
            self.counters
                .invalid_pages
                .fetch_add((len as u64) / PAGE_SIZE, Ordering::Relaxed);
            rate_limited_warn!(
                "virtio-balloon: madvise(MADV_DONTNEED) of {} bytes: {}",
                len,
                io::Error::last_os_error()
            );
        }
    }
}

/// Reads the page frame numbers of one inflate or deflate chain (device-readable
/// descriptors holding le32 PFNs, virtio 1.2 §5.5.6), at most `budget` of them (taken off
/// it). Inflated pages are discarded. Returns the pages handled.
fn walk_pfns(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    end: ChainEnd,
    budget: &mut u64,
    inflate: bool,
    counters: &BalloonCounters,
) -> u64 {
    if end == ChainEnd::Broken {
        rate_limited_warn!("virtio-balloon: broken chain (loop, bad index or unreadable table)");
        return 0;
    }
    let mut taken = 0u64;
    let mut discard = Discarder {
        counters,
        run: None,
    };
    let mut buf = [0u8; 1024];
    'descs: for d in descs {
        if d.is_write_only() {
            rate_limited_warn!(
                "virtio-balloon: device-writable descriptor in a page list; skipped"
            );
            continue;
        }
        let len = u64::from(d.len()) / 4 * 4;
        if !mem.check_range(d.addr(), u64_to_usize(len), Permissions::Read) {
            rate_limited_warn!(
                "virtio-balloon: page list {:#x}+{:#x} is outside guest memory",
                d.addr().0,
                len
            );
            continue;
        }
        let mut off = 0u64;
        while off < len {
            let n = u64_to_usize((len - off).min(buf.len() as u64));
            let Some(addr) = d.addr().checked_add(off) else {
                break;
            };
            if mem.read_slice(&mut buf[..n], addr).is_err() {
                break;
            }
            for pfn in buf[..n].chunks_exact(4) {
                if taken == MAX_PFNS_PER_CHAIN || *budget == 0 {
                    break 'descs;
                }
                taken += 1;
                *budget -= 1;
                let pfn = u32::from_le_bytes(pfn.try_into().expect("4 bytes"));
                let gpa = GuestAddress(u64::from(pfn) * PAGE_SIZE);
                // The page must be guest RAM, in one piece of the host mapping.
                match vm_memory::GuestMemoryBackend::get_slice(mem, gpa, u64_to_usize(PAGE_SIZE)) {
                    Ok(s) if inflate => discard.page(s.ptr_guard_mut().as_ptr()),
                    Ok(_) => {}
                    Err(_) => {
                        counters.invalid_pages.fetch_add(1, Ordering::Relaxed);
                        rate_limited_warn!(
                            "virtio-balloon: page frame {:#x} is outside guest memory",
                            pfn
                        );
                    }
                }
            }
            off += n as u64;
        }
    }
    discard.flush();
    taken
}

/// The entries of one statistics buffer (device-readable, struct virtio_balloon_stat each).
fn read_stats(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    end: ChainEnd,
) -> Result<Vec<(u16, u64)>, String> {
    if end == ChainEnd::Broken {
        return Err("broken chain".into());
    }
    let mut bytes = Vec::new();
    for d in descs {
        if d.is_write_only() {
            return Err("a device-writable descriptor".into());
        }
        let want = (MAX_STATS as u64 * STAT_LEN).saturating_sub(bytes.len() as u64);
        let n = u64_to_usize(u64::from(d.len()).min(want));
        let start = bytes.len();
        bytes.resize(start + n, 0);
        mem.read_slice(&mut bytes[start..], d.addr())
            .map_err(|_| format!("{:#x}+{:#x} is outside guest memory", d.addr().0, n))?;
    }
    Ok(bytes
        .chunks_exact(u64_to_usize(STAT_LEN))
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u64::from_le_bytes(e[2..10].try_into().expect("8 bytes")),
            )
        })
        .collect())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[NUM_PAGES..NUM_PAGES + 4].copy_from_slice(&self.target_pages.to_le_bytes());
        config[ACTUAL..ACTUAL + 4].copy_from_slice(&self.actual_pages.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// Only `actual` is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (4, &[a, b, c, d]) => self.actual_pages = u32::from_le_bytes([a, b, c, d]),
            _ => rate_limited_warn!(
                "virtio-balloon: driver wrote {} bytes at config offset {:#x}; only actual (4 bytes at 0x4) is writable",
                data.len(),
                offset
            ),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let stats = activation.acked_features & fb::STATS_VQ != 0;
        activation.require_ready(if stats { 3 } else { 2 })?;
        let Activation {
            mem,
            queues,
            interrupt,
            queue_evts,
            ..
        } = activation;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            queue_evts,
            failed: false,
            stats_head: None,
        });
        if stats {
            // Linux adds its first statistics buffer and notifies before DRIVER_OK, when
            // notifications are not acted on: look at the queue once now.
            if let Some(a) = &self.active {
                if let Err(e) = a.queue_evts[STATS_QUEUE].write(1) {
                    rate_limited_warn!("virtio-balloon: cannot schedule the stats queue: {}", e);
                }
            }
            self.arm_stats_timer(None);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        if let Some(timer) = &self.stats_timer {
            let _ = timer.disarm();
        }
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            INFLATE_QUEUE | DEFLATE_QUEUE => self.process_pages(index),
            STATS_QUEUE if self.stats_interval.is_some() => self.process_stats(),
            _ => rate_limited_warn!("virtio-balloon: notification for queue {} ignored", index),
        }
    }

    fn device_fds(&self) -> Vec<RawFd> {
        self.stats_timer.iter().map(|t| t.as_raw_fd()).collect()
    }

    fn process_device_fd(&mut self, index: usize) {
        if index == 0 && self.stats_timer.as_ref().is_some_and(|t| t.clear()) {
            self.request_stats();
        }
    }
}
