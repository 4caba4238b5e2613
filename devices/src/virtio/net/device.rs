//! The virtio-net device: features, config space, counters, activation and reset. The
//! receive path (tap -> guest) is in `rx.rs`, the transmit path (guest -> tap) in `tx.rs`.
//!
//! Receive: a frame is read from the tap only when the tap is readable and the driver has
//! posted a receive buffer; a frame the posted buffers cannot hold yet waits in one reused
//! buffer, everything else waits in the tap's own queue, so wisp's memory stays flat whatever
//! the guest does. Transmit: each chain is checked, then written to the tap in one writev;
//! the tap does checksumming and segmentation as the header asks.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::rx::Rx;
use super::{features as net, HDR_LEN, QUEUE_SIZE, RX_QUEUE, STATUS_LINK_UP, TX_QUEUE};
use crate::mmds::MmdsStack;
use crate::rate_limiter::{BucketUpdate, RateLimiter};
use crate::tap::{offload, Tap, TapError};
use crate::virtio::{
    device_type, features, read_config_bytes, ActivateError, Activation, VirtioDevice,
    VirtioInterrupt,
};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("MAC address {mac} is multicast; a NIC needs a unicast address")]
    MulticastMac { mac: String },
    #[error("MTU {mtu} is out of range 68..=65535")]
    BadMtu { mtu: u16 },
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Frames handled per queue per call before yielding to the event loop.
pub(super) const BUDGET: u32 = 256;
/// struct virtio_net_config up to mtu (virtio 1.2 §5.1.4).
const CONFIG_LEN: usize = 12;

/// Traffic counters, shared with whoever exposes them (e.g. as metrics).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames (and their bytes, without the virtio-net header) delivered to the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap that could not be delivered (larger than every buffer the
    /// driver can post, shorter than a header, or pending when the driver reset the device).
    pub rx_dropped: AtomicU64,
    /// Receive chains the driver malformed (device-readable descriptors, outside guest
    /// memory, broken chain); returned with length 0.
    pub rx_bad_chains: AtomicU64,
    /// Frames (and their bytes, without the virtio-net header) written to the tap.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains the driver malformed, dropped without reaching the tap.
    pub tx_malformed: AtomicU64,
    /// Well-formed frames the tap refused (e.g. link down, a header the kernel rejects).
    pub tx_errors: AtomicU64,
    /// Times the rx rate limiter stopped reads from the tap (its frames waited there).
    pub rx_rate_limiter_throttled: AtomicU64,
    /// Times the rx rate limiter's timer resumed reads.
    pub rx_rate_limiter_events: AtomicU64,
    /// Times the tx rate limiter held a frame back in the ring.
    pub tx_rate_limiter_throttled: AtomicU64,
    /// Times the tx rate limiter's timer resumed transmission.
    pub tx_rate_limiter_events: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCountersSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_bad_chains: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_malformed: u64,
    pub tx_errors: u64,
    pub rx_rate_limiter_throttled: u64,
    pub rx_rate_limiter_events: u64,
    pub tx_rate_limiter_throttled: u64,
    pub tx_rate_limiter_events: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetCountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCountersSnapshot {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            rx_bad_chains: l(&self.rx_bad_chains),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_malformed: l(&self.tx_malformed),
            tx_errors: l(&self.tx_errors),
            rx_rate_limiter_throttled: l(&self.rx_rate_limiter_throttled),
            rx_rate_limiter_events: l(&self.rx_rate_limiter_events),
            tx_rate_limiter_throttled: l(&self.tx_rate_limiter_throttled),
            tx_rate_limiter_events: l(&self.tx_rate_limiter_events),
        }
    }
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A stable locally-administered unicast MAC for a tap name (FNV-1a of the name).
pub(super) fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) interrupt: VirtioInterrupt,
    pub(super) queue_evts: Arc<Vec<EventFd>>,
    pub(super) acked: u64,
    /// A ring became unusable; nothing more is done until reset.
    pub(super) failed: bool,
}

/// Every checksum and segmentation offload the device offers.
pub const OFFLOAD_FEATURES: u64 = net::CSUM
    | net::GUEST_CSUM
    | net::GUEST_TSO4
    | net::GUEST_TSO6
    | net::GUEST_ECN
    | net::HOST_TSO4
    | net::HOST_TSO6
    | net::HOST_ECN;

/// A virtio-net device over a tap.
pub struct Net {
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) features: u64,
    pub(super) config: [u8; CONFIG_LEN],
    pub(super) counters: Arc<NetCounters>,
    pub(super) active: Option<Active>,
    pub(super) rx: Rx,
    pub(super) descs: Vec<Descriptor>,
    /// Limit frames from the tap (while refused, the tap is not read) and to it (while
    /// refused, frames wait in the ring). Their timers are device fds after the tap.
    pub(super) rx_limiter: Option<RateLimiter>,
    pub(super) tx_limiter: Option<RateLimiter>,
    /// The metadata service's responder when this interface serves it: the transmit path
    /// hands it the frames for its address, the receive path gives the guest its answers
    /// (taking turns with the tap).
    pub(super) mmds: Option<MmdsStack>,
    /// A detoured frame, copied out of guest memory (grows to one frame at most).
    pub(super) mmds_frame: Vec<u8>,
}

/// What `device_fds()[index]` is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DeviceFd {
    Tap,
    RxTimer,
    TxTimer,
}

impl Net {
    /// A NIC on `tap`. Without `mac`, a stable locally-administered address derived from
    /// the tap's name. `mtu` is advertised to the driver (VIRTIO_NET_F_MTU); the tap's own
    /// MTU is the host's business.
    pub fn new(tap: Tap, mac: Option<[u8; 6]>, mtu: Option<u16>) -> Result<Net, NetError> {
        let mac = mac.unwrap_or_else(|| mac_from_name(tap.name()));
        if mac[0] & 1 != 0 {
            return Err(NetError::MulticastMac {
                mac: format_mac(&mac),
            });
        }
        if let Some(m) = mtu {
            if m < 68 {
                return Err(NetError::BadMtu { mtu: m });
            }
        }
        let mut features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | net::MAC
            | net::STATUS
            | OFFLOAD_FEATURES
            | net::MRG_RXBUF;
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        if let Some(m) = mtu {
            features |= net::MTU;
            config[10..12].copy_from_slice(&m.to_le_bytes());
        }
        Ok(Net {
            tap,
            mac,
            features,
            config,
            counters: Arc::new(NetCounters::default()),
            active: None,
            rx: Rx::new(),
            descs: Vec::new(),
            rx_limiter: None,
            tx_limiter: None,
            mmds: None,
            mmds_frame: Vec::new(),
        })
    }

    /// Limits the frames received (`rx`) and sent (`tx`): one op per frame, its bytes
    /// (without the virtio-net header) against bandwidth. Give a device that may be limited
    /// at run time its limiters now, even ones that limit nothing: their timers are fds the
    /// event loop watches from activation.
    pub fn with_rate_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Net {
        self.rx_limiter = Some(rx);
        self.tx_limiter = Some(tx);
        self
    }

    /// Serves the metadata service on this interface: ARP requests for the stack's address
    /// and IPv4 frames to it are answered by `stack` instead of going to the tap. MMDS
    /// frames are not counted against the rate limiters (as in Firecracker).
    pub fn with_mmds(mut self, stack: MmdsStack) -> Net {
        self.mmds = Some(stack);
        self
    }

    /// Changes the receive limits at run time; frames held back are looked at again at
    /// once. False (and nothing changes) for a device made without limiters.
    pub fn update_rx_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        self.update_limiter(RX_QUEUE, bandwidth, ops)
    }

    /// As [`Net::update_rx_rate_limiter`], for transmit.
    pub fn update_tx_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        self.update_limiter(TX_QUEUE, bandwidth, ops)
    }

    fn update_limiter(&mut self, queue: usize, bandwidth: BucketUpdate, ops: BucketUpdate) -> bool {
        let limiter = if queue == RX_QUEUE {
            &mut self.rx_limiter
        } else {
            &mut self.tx_limiter
        };
        let Some(limiter) = limiter.as_mut() else {
            return false;
        };
        limiter.update(bandwidth, ops);
        if let Some(active) = &self.active {
            if let Err(e) = active.queue_evts[queue].write(1) {
                rate_limited_warn!("virtio-net: cannot reschedule queue {}: {}", queue, e);
            }
        }
        true
    }

    /// The device's fds, in `device_fds` order.
    fn fd_kinds(&self) -> impl Iterator<Item = (DeviceFd, RawFd)> + '_ {
        let timer = |kind, l: &Option<RateLimiter>| l.as_ref().map(|l| (kind, l.as_raw_fd()));
        [
            Some((DeviceFd::Tap, self.tap.as_raw_fd())),
            timer(DeviceFd::RxTimer, &self.rx_limiter),
            timer(DeviceFd::TxTimer, &self.tx_limiter),
        ]
        .into_iter()
        .flatten()
    }

    /// Offers no checksum or segmentation offload: the guest then sends and receives only
    /// complete, checksummed frames no larger than the MTU, and the tap's offloads stay off.
    /// For guests whose offload paths are suspect, and to measure what offloads buy.
    pub fn without_offloads(mut self) -> Net {
        self.features &= !OFFLOAD_FEATURES;
        self
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The device's counters; they live as long as any holder.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

/// virtio 1.2 §5.1.3.1: offloads depend on others.
fn check_feature_dependencies(f: u64) -> Result<(), String> {
    let has = |b: u64| f & b != 0;
    let rules = [
        (
            net::GUEST_TSO4 | net::GUEST_TSO6,
            net::GUEST_CSUM,
            "GUEST_TSO4/6 need GUEST_CSUM",
        ),
        (
            net::GUEST_ECN,
            net::GUEST_TSO4 | net::GUEST_TSO6,
            "GUEST_ECN needs GUEST_TSO4 or GUEST_TSO6",
        ),
        (
            net::HOST_TSO4 | net::HOST_TSO6,
            net::CSUM,
            "HOST_TSO4/6 need CSUM",
        ),
        (
            net::HOST_ECN,
            net::HOST_TSO4 | net::HOST_TSO6,
            "HOST_ECN needs HOST_TSO4 or HOST_TSO6",
        ),
    ];
    for (feature, needs, what) in rules {
        if has(feature) && !has(needs) {
            return Err(format!(
                "driver accepted inconsistent features {f:#x}: {what}"
            ));
        }
    }
    Ok(())
}

/// The tap offloads that mirror the receive offloads the driver accepted.
fn tap_offloads(acked: u64) -> u32 {
    let mut o = 0;
    for (feature, bit) in [
        (net::GUEST_CSUM, offload::CSUM),
        (net::GUEST_TSO4, offload::TSO4),
        (net::GUEST_TSO6, offload::TSO6),
        (net::GUEST_ECN, offload::TSO_ECN),
    ] {
        if acked & feature != 0 {
            o |= bit;
        }
    }
    o
}

/// Signals the driver for `queue` if any chain was used and suppression allows it.
pub(super) fn notify_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    index: usize,
) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used_queue(index),
        Err(e) => {
            rate_limited_warn!(
                "virtio-net: cannot read used_event of queue {}: {}",
                index,
                e
            );
            interrupt.signal_used_queue(index);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut activation: Activation) -> Result<(), ActivateError> {
        let acked_features = activation.acked_features;
        check_feature_dependencies(acked_features).map_err(ActivateError::Other)?;
        const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1);
        let [rx, tx] = activation.take_ready_queues()?;
        self.tap
            .set_vnet_hdr_size(i32::try_from(HDR_LEN).expect("12 bytes"))
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        self.tap
            .set_offload(tap_offloads(acked_features))
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        self.active = Some(Active {
            mem: activation.mem,
            rx,
            tx,
            interrupt: activation.interrupt,
            queue_evts: activation.queue_evts,
            acked: acked_features,
            failed: false,
        });
        // The tap may already hold frames; the first read tells.
        self.rx.tap_readable = true;
        self.rx.notify = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx.reset(&self.counters);
        // The guest that had connections is gone.
        if let Some(stack) = self.mmds.as_mut() {
            stack.reset();
        }
        // Frames queued from now on must not carry offloads the next driver may refuse.
        if let Err(e) = self.tap.set_offload(0) {
            rate_limited_warn!("virtio-net: {}", e);
        }
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => rate_limited_warn!("virtio-net: notification for queue {} ignored", index),
        }
    }

    fn device_fds(&self) -> Vec<RawFd> {
        self.fd_kinds().map(|(_, fd)| fd).collect()
    }

    fn process_device_fd(&mut self, index: usize) {
        let kind = self.fd_kinds().nth(index).map(|(kind, _)| kind);
        match kind {
            Some(DeviceFd::Tap) => {
                self.rx.tap_readable = true;
                self.process_rx();
            }
            // A timer that fired: its tokens are back.
            Some(DeviceFd::RxTimer)
                if self.rx_limiter.as_mut().is_some_and(|l| l.timer_fired()) =>
            {
                bump(&self.counters.rx_rate_limiter_events, 1);
                self.process_rx();
            }
            Some(DeviceFd::TxTimer)
                if self.tx_limiter.as_mut().is_some_and(|l| l.timer_fired()) =>
            {
                bump(&self.counters.tx_rate_limiter_events, 1);
                self.process_tx();
            }
            _ => {}
        }
    }
}
