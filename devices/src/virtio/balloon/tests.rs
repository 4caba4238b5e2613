//! virtio-balloon driven through the virtio-mmio registers by the host-side driver harness.

use std::sync::atomic::Ordering::Relaxed;

use vm_memory::{Bytes, GuestAddress};

use super::{features as fb, Balloon, DEFLATE_QUEUE, INFLATE_QUEUE, STATS_QUEUE};
use crate::virtio::testing::{regs, Buf, Driver, EpollLoop, CANARY, MEM_SIZE};
use crate::virtio::{features, INT_CONFIG_CHANGE};

/// Pages of the harness's guest memory that nothing else uses (its rings and buffers are
/// below 1 MiB).
const FREE_PFN: u32 = (2 << 20) / 4096;

fn balloon(stats_interval_s: u16) -> Driver {
    let dev = Balloon::new(0, true, stats_interval_s).unwrap();
    Driver::new(Box::new(dev))
}

/// Puts `pfns` in one device-readable buffer on queue `q`, kicks; returns the used length.
fn send_pfns(d: &mut Driver, q: usize, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let addr = d.alloc(bytes.len() as u64);
    d.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    let before = d.used_idx_of(q as u32);
    let head = d.add_chain_to(
        q as u32,
        &[Buf {
            addr,
            len: bytes.len() as u32,
            writable: false,
        }],
    );
    d.publish_to(q as u32, head);
    d.kick(q as u32);
    assert_eq!(
        d.used_idx_of(q as u32),
        before.wrapping_add(1),
        "buffer returned"
    );
    d.used_elem_of(q as u32, before).1
}

fn page(d: &Driver, pfn: u32) -> Vec<u8> {
    d.read_bytes(u64::from(pfn) * 4096, 4096)
}

#[test]
fn inflated_pages_go_back_to_the_host_and_nothing_else_does() {
    let mut d = balloon(0);
    d.start_queues(features::VERSION_1, 2);
    let counters = d.device::<Balloon>().with(|b| b.counters());
    // Pages 0, 1 and 3 of the free area (0 and 1 contiguous, one madvise for both).
    let pfns = [FREE_PFN, FREE_PFN + 1, FREE_PFN + 3];
    assert!(page(&d, FREE_PFN).iter().all(|&b| b == CANARY));
    assert_eq!(send_pfns(&mut d, INFLATE_QUEUE, &pfns), 0);
    for p in pfns {
        assert!(page(&d, p).iter().all(|&b| b == 0), "page {p:#x} discarded");
    }
    // Its neighbour was not given: untouched.
    assert!(page(&d, FREE_PFN + 2).iter().all(|&b| b == CANARY));
    assert_eq!(counters.inflated_pages.load(Relaxed), 3);
    // Deflate gives them back: the guest may use them again (they read as zeros).
    assert_eq!(send_pfns(&mut d, DEFLATE_QUEUE, &pfns), 0);
    assert_eq!(counters.deflated_pages.load(Relaxed), 3);
    d.mem
        .write_slice(&[7u8; 16], GuestAddress(u64::from(FREE_PFN) * 4096))
        .unwrap();
    assert_eq!(page(&d, FREE_PFN)[..16], [7u8; 16]);
}

#[test]
fn page_frames_outside_guest_memory_are_counted_and_skipped() {
    let mut d = balloon(0);
    d.start_queues(features::VERSION_1, 2);
    let counters = d.device::<Balloon>().with(|b| b.counters());
    let beyond = (MEM_SIZE / 4096) as u32;
    send_pfns(&mut d, INFLATE_QUEUE, &[beyond, u32::MAX, FREE_PFN + 5]);
    assert_eq!(counters.invalid_pages.load(Relaxed), 2);
    assert!(page(&d, FREE_PFN + 5).iter().all(|&b| b == 0));
    // A page list that is itself outside guest memory, and a device-writable one.
    for (addr, writable) in [(1u64 << 40, false), (d.alloc(8), true)] {
        let head = d.add_chain_to(
            INFLATE_QUEUE as u32,
            &[Buf {
                addr,
                len: 8,
                writable,
            }],
        );
        d.publish_to(INFLATE_QUEUE as u32, head);
        d.kick(INFLATE_QUEUE as u32);
    }
    assert_eq!(
        d.used_idx_of(INFLATE_QUEUE as u32),
        3,
        "every buffer returned"
    );
    assert!(page(&d, FREE_PFN + 6).iter().all(|&b| b == CANARY));
}

#[test]
fn a_new_target_is_a_config_change_and_the_driver_reports_actual() {
    let mut d = balloon(0);
    // DEFLATE_ON_OOM offered as asked; no statistics queue without an interval.
    let f = d.device_features();
    assert_eq!(f & (fb::DEFLATE_ON_OOM | fb::STATS_VQ), fb::DEFLATE_ON_OOM);
    d.start_queues(features::VERSION_1 | fb::DEFLATE_ON_OOM, 2);
    d.take_interrupts();
    d.device::<Balloon>()
        .change_config(|b| {
            b.set_target(1000);
            Ok::<_, ()>(())
        })
        .unwrap();
    assert_eq!(d.read32(regs::CONFIG), 1000);
    assert_eq!(
        d.read32(regs::INTERRUPT_STATUS) & INT_CONFIG_CHANGE,
        INT_CONFIG_CHANGE
    );
    assert_eq!(d.take_interrupts(), 1);
    d.write32(regs::CONFIG + 4, 600);
    assert_eq!(d.device::<Balloon>().with(|b| b.actual_pages()), 600);
    // num_pages is the device's: a write to it is ignored.
    d.write32(regs::CONFIG, 5);
    assert_eq!(d.read32(regs::CONFIG), 1000);
}

#[test]
fn statistics_are_kept_and_the_buffer_goes_back_when_the_timer_asks() {
    let mut d = balloon(1);
    assert_ne!(d.device_features() & fb::STATS_VQ, 0);
    let mut h = d.handler.clone();
    let mut ev = EpollLoop::new(&mut h);
    d.start_queues(features::VERSION_1 | fb::STATS_VQ, 3);
    let stats = d.device::<Balloon>().with(|b| b.stats());
    // free_memory (4) and total_memory (5).
    let mut buf = Vec::new();
    for (tag, val) in [(4u16, 100u64 << 20), (5, 128 << 20)] {
        buf.extend(tag.to_le_bytes());
        buf.extend(val.to_le_bytes());
    }
    let addr = d.alloc(buf.len() as u64);
    d.mem.write_slice(&buf, GuestAddress(addr)).unwrap();
    let head = d.add_chain_to(
        STATS_QUEUE as u32,
        &[Buf {
            addr,
            len: buf.len() as u32,
            writable: false,
        }],
    );
    d.publish_to(STATS_QUEUE as u32, head);
    d.kick(STATS_QUEUE as u32);
    {
        let s = stats.lock().unwrap();
        assert_eq!(s.updates, 1);
        assert_eq!(s.values.get(&4), Some(&(100 << 20)));
        assert_eq!(s.values.get(&5), Some(&(128 << 20)));
    }
    // Held until the interval has passed; then returned, which asks for new figures.
    assert_eq!(d.used_idx_of(STATS_QUEUE as u32), 0);
    let t = std::time::Duration::from_secs(10);
    assert!(ev.run_until(&mut h, t, || d.used_idx_of(STATS_QUEUE as u32) == 1));
    assert_eq!(d.used_elem_of(STATS_QUEUE as u32, 0).0, u32::from(head));
    // Statistics cannot be turned off at run time, only their interval changed.
    d.device::<Balloon>().with(|b| {
        assert!(b.set_stats_interval(0).is_err());
        assert!(b.set_stats_interval(5).is_ok());
        assert_eq!(b.stats_interval_s(), 5);
    });
    let mut off = Balloon::new(0, false, 0).unwrap();
    assert!(off.set_stats_interval(1).is_err());
}
