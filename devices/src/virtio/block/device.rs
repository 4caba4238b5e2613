//! The virtio-blk device: features, config space, activation and the queue loop.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::request::{Disk, RequestHandler, SECTOR_SIZE, SERIAL_LEN};
use super::{
    features as blk, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SEG_MAX,
};
use crate::disk::raw::RawFile;
use crate::rate_limiter::{self, BucketUpdate, RateLimiter};
use crate::virtio::queue::{pop_chain, undo_pop};
use crate::virtio::{
    device_type, features, read_config_bytes, ActivateError, Activation, VirtioDevice,
    VirtioInterrupt,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("disk serial {serial:?} is {len} bytes; virtio-blk allows at most 20")]
    SerialTooLong { serial: String, len: usize },
    #[error(
        "the new medium is read-only but the guest was offered a writable disk; open it \
         read-write or give the drive is_read_only at boot"
    )]
    MediumReadOnly,
    #[error("flushing the old medium failed ({reason}); it stays in place")]
    FlushOldMedium { reason: String },
}

/// Request counters, shared with whoever exposes them (Firecracker's `block_<id>` metrics).
/// Bumped with relaxed adds on the event loop; read without the device's lock.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// IN / OUT requests that completed with OK, and their data bytes.
    pub read_count: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_count: AtomicU64,
    pub write_bytes: AtomicU64,
    /// FLUSH requests that reached the disk.
    pub flush_count: AtomicU64,
    /// Requests the driver malformed (bad layout, range or direction, unsupported type, no
    /// status byte, broken chain).
    pub invalid_reqs_count: AtomicU64,
    /// Well-formed requests the disk failed (IOERR).
    pub execute_fails: AtomicU64,
    /// Queue notifications handled (including the device's own reschedules).
    pub queue_event_count: AtomicU64,
    /// Times the rate limiter held a request back (it stayed in the ring).
    pub rate_limiter_throttled_events: AtomicU64,
    /// Times the rate limiter's timer woke the queue up.
    pub rate_limiter_event_count: AtomicU64,
}

/// struct virtio_blk_config up to write_zeroes_may_unmap and its padding (virtio 1.2 §5.2.4).
const CONFIG_LEN: usize = 0x3c;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: VirtioInterrupt,
    queue_evts: Arc<Vec<EventFd>>,
    /// A ring became unusable (DEVICE_NEEDS_RESET): nothing more is done until reset.
    failed: bool,
}

/// Chains taken in one `process_queue` call (one event-loop turn) before yielding to the
/// event loop, so that a driver that keeps the queue full cannot starve the VMM's other
/// work. Malformed chains count too.
const BUDGET: u32 = 4 * QUEUE_SIZE as u32;

/// Data bytes moved in one turn. A larger request is split and goes on over the next turns
/// (no other request starts meanwhile), so that one request of gigabytes (or 16 x 4 GiB of
/// WRITE_ZEROES on a file system that must write the zeros) cannot hold the event loop.
pub const BYTES_PER_TURN: u64 = 16 << 20;

/// A virtio-blk device with one request queue.
pub struct Block {
    handler: RequestHandler,
    features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    /// Requests wait in the ring while it refuses them; its timer is the device's fd.
    limiter: Option<RateLimiter>,
}

impl Block {
    /// `read_only` exposes the disk read-only (VIRTIO_BLK_F_RO); a read-only backend makes
    /// the device read-only whatever is asked. `serial` is GET_ID's answer (at most 20
    /// bytes).
    pub fn new(disk: Disk, serial: Option<String>, read_only: bool) -> Result<Block, BlockError> {
        Block::with_disk(disk, serial, read_only)
    }

    /// [`Block::new`] for a raw file.
    pub fn new_raw(
        raw: RawFile,
        serial: Option<String>,
        read_only: bool,
    ) -> Result<Block, BlockError> {
        Block::new(Box::new(raw), serial, read_only)
    }

    fn with_disk(disk: Disk, serial: Option<String>, read_only: bool) -> Result<Block, BlockError> {
        let backend = disk.as_ref();
        let mut id = [0u8; SERIAL_LEN];
        if let Some(serial) = serial {
            let bytes = serial.as_bytes();
            if bytes.len() > SERIAL_LEN {
                return Err(BlockError::SerialTooLong {
                    len: bytes.len(),
                    serial,
                });
            }
            id[..bytes.len()].copy_from_slice(bytes);
        }
        let read_only = read_only || backend.read_only();
        warn_partial_sector(backend.len());
        let handler = RequestHandler::new(disk, read_only, id);

        let mut features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | blk::SEG_MAX
            | blk::BLK_SIZE
            | blk::FLUSH;
        if read_only {
            features |= blk::RO;
        } else {
            features |= blk::DISCARD | blk::WRITE_ZEROES;
        }

        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes)
        };
        put(CAPACITY, &(handler.capacity / SECTOR_SIZE).to_le_bytes());
        put(0x0c, &SEG_MAX.to_le_bytes()); // seg_max
        put(
            0x14,
            &u32::try_from(SECTOR_SIZE).expect("512").to_le_bytes(),
        ); // blk_size
        put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x28, &MAX_DISCARD_SEG.to_le_bytes());
        put(0x2c, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(0x30, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(0x34, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
        put(0x38, &[1]); // write_zeroes_may_unmap

        Ok(Block {
            handler,
            features,
            config,
            active: None,
            limiter: None,
        })
    }

    /// Limits the requests' rate (one op per request, its data bytes against bandwidth).
    /// Give every device that may be limited at run time a limiter now, even one that limits
    /// nothing: its timer is an fd the event loop must watch from activation.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Block {
        self.limiter = Some(limiter);
        self
    }

    /// Changes the rate limits at run time, effective from the next request; requests held
    /// back so far are looked at again at once. False (and nothing changes) for a device
    /// made without a limiter.
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        let Some(limiter) = self.limiter.as_mut() else {
            return false;
        };
        limiter.update(bandwidth, ops);
        if let Some(active) = &self.active {
            if let Err(e) = active.queue_evts[0].write(1) {
                rate_limited_warn!("virtio-blk: cannot reschedule the queue: {}", e);
            }
        }
        true
    }

    /// Capacity in 512-byte sectors, as the guest sees it.
    pub fn capacity_sectors(&self) -> u64 {
        self.handler.capacity / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.handler.read_only
    }

    /// The device's request counters; they survive media changes and resets.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.handler.counters.clone()
    }

    /// Writes everything the medium holds back (data and image metadata) to its file, as a
    /// guest FLUSH does. The VMM calls it on its way out: a guest that did not flush before
    /// it powered off keeps its writes.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.handler.disk.as_mut().flush()
    }

    /// Media change: `disk` replaces the current medium, whose writes are flushed before it
    /// is closed (and its lock released). Call it between requests (the event loop runs them
    /// synchronously), through [`DeviceHandle::change_config`] so that the driver is
    /// told the capacity changed. Features and serial stay as offered at boot, so a
    /// read-only medium cannot replace a writable one. On an error the old medium stays and
    /// `disk` is dropped.
    ///
    /// [`DeviceHandle::change_config`]: crate::virtio::DeviceHandle::change_config
    pub fn change_medium(&mut self, mut disk: Disk) -> Result<(), BlockError> {
        if disk.as_ref().read_only() && !self.handler.read_only {
            return Err(BlockError::MediumReadOnly);
        }
        self.handler
            .disk
            .as_mut()
            .flush()
            .map_err(|e| BlockError::FlushOldMedium {
                reason: e.to_string(),
            })?;
        // A request split over turns does not go on with another medium.
        if let Some(active) = self.active.as_mut() {
            if let Some((head, used_len)) = self.handler.fail_in_flight(&active.mem) {
                if active.queue.add_used(&active.mem, head, used_len).is_ok() {
                    active.interrupt.signal_used_queue(0);
                }
            }
        }
        warn_partial_sector(disk.as_ref().len());
        std::mem::swap(&mut self.handler.disk, &mut disk);
        drop(disk);
        self.handler.capacity = self.handler.disk.as_ref().len() / SECTOR_SIZE * SECTOR_SIZE;
        let sectors = self.handler.capacity / SECTOR_SIZE;
        self.config[CAPACITY..CAPACITY + 8].copy_from_slice(&sectors.to_le_bytes());
        Ok(())
    }
}

/// Offset of `capacity` (le64, 512-byte sectors) in the config space.
const CAPACITY: usize = 0x00;

fn warn_partial_sector(len: u64) {
    if !len.is_multiple_of(SECTOR_SIZE) {
        log::warn!(
            "virtio-blk: disk size {} is not a multiple of 512; the last {} bytes are not visible to the guest",
            len,
            len % SECTOR_SIZE
        );
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut activation: Activation) -> Result<(), ActivateError> {
        let [queue] = activation.take_ready_queues()?;
        self.handler.acked_features = activation.acked_features;
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
        self.handler.abandon();
        self.handler.acked_features = 0;
    }

    fn device_fds(&self) -> Vec<RawFd> {
        rate_limiter::device_fds(self.limiter.as_ref())
    }

    /// The rate limiter's timer: tokens are back.
    fn process_device_fd(&mut self, index: usize) {
        if rate_limiter::device_fd_fired(self.limiter.as_mut(), index) {
            self.handler
                .counters
                .rate_limiter_event_count
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
            rate_limited_warn!("virtio-blk: notification for queue {} ignored", index);
            return;
        }
        self.handler
            .counters
            .queue_event_count
            .fetch_add(1, Ordering::Relaxed);
        let Active {
            mem,
            queue,
            interrupt,
            queue_evts,
            failed,
        } = active;
        let needs_reset = |failed: &mut bool, why: &dyn std::fmt::Display| {
            rate_limited_warn!("virtio-blk: {}; the device needs a reset", why);
            *failed = true;
            interrupt.set_needs_reset();
        };
        let reschedule = || {
            if let Err(e) = queue_evts[0].write(1) {
                rate_limited_warn!("virtio-blk: cannot reschedule the queue: {}", e);
            }
        };
        let mut chains = 0u32;
        let mut bytes = BYTES_PER_TURN;
        let mut completed = false;
        // A request split over turns goes first: requests complete one after the other.
        if self.handler.in_flight() {
            let Some((head, used_len)) = self.handler.resume(mem, &mut bytes) else {
                reschedule();
                return;
            };
            if let Err(e) = queue.add_used(&*mem, head, used_len) {
                return needs_reset(failed, &format_args!("used ring unusable: {e}"));
            }
            completed = true;
        }
        // virtio 1.2 §2.7.10: with notifications disabled while we work, then re-enabled and
        // the ring checked once more so that no request slips between the two.
        'work: loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                return needs_reset(failed, &format_args!("used ring unusable: {e}"));
            }
            loop {
                if chains >= BUDGET || bytes == 0 {
                    // Come back through the event loop; notifications stay disabled.
                    reschedule();
                    break 'work;
                }
                let chain = match pop_chain(queue, &*mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => return needs_reset(failed, &e),
                };
                // Every chain counts, malformed ones too.
                chains += 1;
                let collected = self.handler.collect(chain);
                if let Some(limiter) = self.limiter.as_mut() {
                    if !limiter.try_consume(1, self.handler.data_len()) {
                        // The request stays in the ring, and notifications stay off, until
                        // the limiter's timer brings us back.
                        undo_pop(queue);
                        self.handler
                            .counters
                            .rate_limiter_throttled_events
                            .fetch_add(1, Ordering::Relaxed);
                        break 'work;
                    }
                }
                let head = collected.head;
                let Some(used_len) = self.handler.handle_collected(mem, collected, &mut bytes)
                else {
                    // Larger than what is left of this turn: it goes on next turn.
                    reschedule();
                    break 'work;
                };
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
                    rate_limited_warn!("virtio-blk: cannot read used_event: {}", e);
                    interrupt.signal_used_queue(0);
                }
            }
        }
    }
}
