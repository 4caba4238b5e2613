//! The microVM metadata service (Firecracker's MMDS): a JSON document the host sets through
//! the API and the guest reads over HTTP at a link-local address (169.254.169.254 by
//! default) on the network interfaces the host names.
//!
//! - `store.rs`: the document, its size limit, the V1/V2 settings and the session tokens
//!   (`token.rs`); shared (`Arc<Mutex<Mmds>>`) by the API and every interface's responder.
//! - `http.rs`: the guest's requests and their answers.
//! - `stack.rs`: [`MmdsStack`], one per interface: the frames virtio-net's transmit path
//!   detours to it (ARP for the address, IPv4 to it) go through a minimal ARP/IPv4/TCP
//!   responder, and the frames it answers with wait until the receive path has a buffer
//!   for them. Everything it holds is bounded (connections, request and answer bytes,
//!   pending resets), so a guest flooding it costs wisp no more memory than that.

pub mod http;
mod stack;
mod store;
mod token;

use std::sync::atomic::{AtomicU64, Ordering};

pub use stack::{MmdsStack, DEFAULT_IPV4, MAX_CONNECTIONS, MAX_OUT_FRAME, MMDS_MAC};
pub use store::{merge_patch, GetError, Mmds, MmdsVersion, StoreError, DEFAULT_SIZE_LIMIT};
pub use token::{TokenError, MAX_TTL_SECONDS, MIN_TTL_SECONDS};

/// Firecracker's `mmds` metrics group.
#[derive(Debug, Default)]
pub struct MmdsCounters {
    /// Frames the transmit path detoured to the MMDS.
    pub rx_accepted: AtomicU64,
    /// Detoured frames that were malformed (bad lengths or checksums).
    pub rx_accepted_err: AtomicU64,
    /// Detoured frames of no use: not ARP requests or TCP, IP fragments.
    pub rx_accepted_unusual: AtomicU64,
    /// Detoured buffers that were not Ethernet frames.
    pub rx_bad_eth: AtomicU64,
    /// GETs with a token that is not valid, and without one.
    pub rx_invalid_token: AtomicU64,
    pub rx_no_token: AtomicU64,
    /// TCP segments the responder took.
    pub rx_count: AtomicU64,
    /// Frames (and their bytes) the MMDS gave the guest.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Answers the responder could not queue (no room) and sent 503 for instead.
    pub tx_errors: AtomicU64,
    pub connections_created: AtomicU64,
    pub connections_destroyed: AtomicU64,
}

impl MmdsCounters {
    /// (name, value) pairs under Firecracker's names.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_accepted", l(&self.rx_accepted)),
            ("rx_accepted_err", l(&self.rx_accepted_err)),
            ("rx_accepted_unusual", l(&self.rx_accepted_unusual)),
            ("rx_bad_eth", l(&self.rx_bad_eth)),
            ("rx_invalid_token", l(&self.rx_invalid_token)),
            ("rx_no_token", l(&self.rx_no_token)),
            ("rx_count", l(&self.rx_count)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("tx_count", l(&self.tx_frames)),
            ("tx_errors", l(&self.tx_errors)),
            ("tx_frames", l(&self.tx_frames)),
            ("connections_created", l(&self.connections_created)),
            ("connections_destroyed", l(&self.connections_destroyed)),
        ]
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
