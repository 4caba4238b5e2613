//! virtio-net (virtio 1.2 §5.1) over a [`Tap`](crate::tap::Tap): one receive queue (0) and
//! one transmit queue (1), no control queue.
//!
//! # How the VMM wires it
//!
//! ```text
//! let tap = Tap::open("tap0")?;                  // in wisp's network namespace; or Tap::from_fd(fd)
//! let net = Net::new(tap, mac, mtu)?;            // mac None: stable, derived from the tap name
//! let counters = net.counters();                 // Arc<NetCounters>: rx/tx frames, bytes, drops
//! let (transport, handle) = MmioTransport::with_handle(net, mem.clone(), irq)?;
//! // then as every virtio device (crate::virtio docs): two queue ioeventfds (datamatch 0
//! // and 1) and the handler on the event loop, which watches the tap (EPOLLIN | EPOLLET)
//! // from DRIVER_OK until reset.
//! ```
//!
//! The tap must be up (and addressed, bridged, ...) on the host side for traffic to flow;
//! a tap that wisp created is down until someone sets it up. While it is down, frames the
//! guest sends are counted in `tx_errors`.

mod device;
mod rx;
#[cfg(test)]
mod tests;
mod tx;

pub use device::{Net, NetCounters, NetCountersSnapshot, NetError};

/// Feature bits (virtio 1.2 §5.1.3).
pub mod features {
    use virtio_bindings::virtio_net as n;
    pub const CSUM: u64 = 1 << n::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << n::VIRTIO_NET_F_GUEST_CSUM;
    pub const MTU: u64 = 1 << n::VIRTIO_NET_F_MTU;
    pub const MAC: u64 = 1 << n::VIRTIO_NET_F_MAC;
    pub const GUEST_TSO4: u64 = 1 << n::VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << n::VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_ECN: u64 = 1 << n::VIRTIO_NET_F_GUEST_ECN;
    pub const HOST_TSO4: u64 = 1 << n::VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << n::VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_ECN: u64 = 1 << n::VIRTIO_NET_F_HOST_ECN;
    pub const MRG_RXBUF: u64 = 1 << n::VIRTIO_NET_F_MRG_RXBUF;
    pub const STATUS: u64 = 1 << n::VIRTIO_NET_F_STATUS;
}

/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers. VERSION_1 devices always use all 12 bytes.
pub const HDR_LEN: usize = std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();
/// Offset of num_buffers in the header.
pub const HDR_NUM_BUFFERS: usize = 10;

/// virtio_net_hdr.flags
pub mod hdr_flags {
    use crate::virtio::byte;
    use virtio_bindings::virtio_net as n;
    pub const NEEDS_CSUM: u8 = byte(n::VIRTIO_NET_HDR_F_NEEDS_CSUM);
    pub const DATA_VALID: u8 = byte(n::VIRTIO_NET_HDR_F_DATA_VALID);
}

/// virtio_net_hdr.gso_type
pub mod gso {
    use crate::virtio::byte;
    use virtio_bindings::virtio_net as n;
    pub const NONE: u8 = byte(n::VIRTIO_NET_HDR_GSO_NONE);
    pub const TCPV4: u8 = byte(n::VIRTIO_NET_HDR_GSO_TCPV4);
    pub const UDP: u8 = byte(n::VIRTIO_NET_HDR_GSO_UDP);
    pub const TCPV6: u8 = byte(n::VIRTIO_NET_HDR_GSO_TCPV6);
    pub const ECN: u8 = byte(n::VIRTIO_NET_HDR_GSO_ECN);
}

/// Config space status bit (virtio 1.2 §5.1.4).
pub const STATUS_LINK_UP: u16 =
    crate::virtio::byte(virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP) as u16;

/// Largest frame the device moves, without the virtio-net header: a 64 KiB GSO packet
/// with its Ethernet and VLAN headers (as Firecracker and QEMU).
pub const MAX_FRAME_LEN: usize = 65550;
/// Smallest frame the tap accepts: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
