//! Driving a virtio device as a hostile guest driver would: the devices crate's harness
//! (`wisp_devices::virtio::testing::Driver`, a real `MmioTransport` over real guest memory)
//! with descriptor chains, ring indexes and register writes chosen by the input.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_devices::virtio::testing::{
    avail_ring, desc_table, regs, Driver, DATA_START, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use wisp_devices::virtio::{features, status, VirtioDevice};

use crate::Input;

/// Guest memory of the fuzzed driver: the harness's rings below `DATA_START`, buffers above.
pub const MEM_SIZE: u64 = 1 << 20;

/// A driver over `device` with `MEM_SIZE` bytes of zeroed guest memory.
pub fn driver<D: VirtioDevice>(device: D) -> Driver {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    Driver::with_memory(Box::new(device), mem)
}

/// Negotiates features chosen by the input (mostly a subset of the offered ones with
/// VERSION_1), sets up `queues` queues of an input-chosen size and sets DRIVER_OK. Returns
/// whether the device took it (it may rightly refuse).
pub fn start(d: &mut Driver, input: &mut Input, queues: u32) -> bool {
    let offered = d.device_features();
    let accepted = match input.u8() % 8 {
        0 => input.u64(),
        1 => offered,
        _ => (offered & input.u64()) | features::VERSION_1,
    };
    d.queue_size = 1 << (input.u8() % 9);
    let s = d.negotiate(accepted);
    for q in 0..queues {
        d.setup_queue(q);
    }
    let s = if s & status::FEATURES_OK != 0 {
        d.driver_ok()
    } else {
        s
    };
    s & status::DRIVER_OK != 0
}

/// Where a descriptor points: mostly into the data area, sometimes anywhere.
pub fn addr(input: &mut Input) -> u64 {
    match input.u8() % 16 {
        0 => input.u64(),
        1 => MEM_SIZE - u64::from(input.u8()),
        2 => u64::from(input.u16()) * 16 % DATA_START,
        _ => DATA_START + u64::from(input.u16()) * 8 % (MEM_SIZE - DATA_START),
    }
}

/// A descriptor length: small, header-sized, sector multiples or anything.
pub fn len(input: &mut Input) -> u32 {
    match input.u8() % 8 {
        0 => input.u32(),
        1 => u32::from(input.u8() % 20),
        2 => 16,
        3 => 1,
        _ => 512 * u32::from(1 + input.u8() % 8),
    }
}

/// Writes a chain of 1..=8 descriptors into queue `q`'s table; the input picks each
/// address, length, flags and (now and then) a wild `next`. Returns the head and the
/// descriptors' (address, length, flags).
pub fn chain(d: &mut Driver, input: &mut Input, q: u32) -> (u16, Vec<(u64, u32, u16)>) {
    let n = 1 + u16::from(input.u8() % 8);
    let head = d.reserve_descs_in(q, n);
    let mut descs = Vec::new();
    for i in 0..n {
        let idx = (head + i) % d.queue_size;
        let a = addr(input);
        let l = len(input);
        let f = input.u8();
        let mut flags = 0;
        if f & 1 != 0 {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        // Linked as a driver links them, except when the input says otherwise.
        if (i + 1 < n) != (f & 2 != 0) {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        if f & 0x1c == 0x1c {
            flags |= VIRTQ_DESC_F_INDIRECT;
        }
        let next = if f & 0xe0 == 0xe0 {
            input.u16()
        } else {
            (idx + 1) % d.queue_size
        };
        d.write_desc(desc_table(q), idx, a, l, flags, next);
        descs.push((a, l, flags));
    }
    (head, descs)
}

/// Writes up to 64 input bytes at `addr` (if it is in guest memory). Returns whether that
/// may have changed the rings (then the device may rightly see any avail index).
pub fn poke(d: &Driver, input: &mut Input, addr: u64) -> bool {
    let n = usize::from(input.u8() % 65);
    let b = input.bytes(n);
    let _ = d.mem.write_slice(b, GuestAddress(addr));
    addr < DATA_START
}

/// Whether the device may write the rings through these descriptors (they point there, or
/// at an indirect table whose descriptors may): the driver made its own avail ring garbage.
pub fn touches_rings(descs: &[(u64, u32, u16)]) -> bool {
    descs.iter().any(|&(a, l, f)| {
        f & VIRTQ_DESC_F_INDIRECT != 0 || a < DATA_START || a.checked_add(u64::from(l)).is_none()
    })
}

/// What a guest does through QueueNotify, then what the event loop does: process the queue
/// while its eventfd is signalled (a device that yields re-arms it), a bounded number of
/// times.
pub fn kick(d: &mut Driver, q: u32) {
    d.write32(regs::QUEUE_NOTIFY, q);
    service(d, q);
}

/// The event loop's turn for queue `q`.
pub fn service(d: &mut Driver, q: u32) {
    let Some(evt) = d.handler.queue_evts().get(q as usize) else {
        return;
    };
    for _ in 0..64 {
        if evt.read().is_err() {
            return;
        }
        d.handler.process_queue(q as usize);
    }
    panic!("queue {q} still signalled after 64 turns of the event loop");
}

/// Garbage in queue `q`'s avail ring: an index or an entry chosen by the input.
pub fn scribble_avail(d: &mut Driver, input: &mut Input, q: u32) {
    let slot = u64::from(input.u16() % 260);
    let v = input.u16();
    let _ = d
        .mem
        .write_obj(v, GuestAddress(avail_ring(q) + 2 + 2 * slot));
}
