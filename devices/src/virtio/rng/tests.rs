//! virtio-rng driven through the virtio-mmio registers by the host-side driver harness.

use std::sync::atomic::Ordering;

use super::{Rng, BYTES_PER_TURN, MAX_BYTES_PER_CHAIN};
use crate::virtio::testing::{regs, Buf, Driver, CANARY, DESC_TABLE, MEM_SIZE, VIRTQ_DESC_F_NEXT};
use crate::virtio::{device_type, features};

fn rng_driver(queue_size: u16) -> Driver {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.queue_size = queue_size;
    d.start();
    d
}

fn counters(d: &Driver) -> std::sync::Arc<super::RngCounters> {
    d.device::<Rng>().with(|r| r.counters())
}

/// Bytes that look random: not one value repeated, and few left as the canary was.
fn assert_random(bytes: &[u8]) {
    assert!(bytes.len() >= 256);
    let canaries = bytes.iter().filter(|&&b| b == CANARY).count();
    assert!(
        canaries < bytes.len() / 16,
        "{canaries} of {} bytes still hold the canary",
        bytes.len()
    );
    let zeros = bytes.iter().filter(|&&b| b == 0).count();
    assert!(zeros < bytes.len() / 16, "{zeros} zero bytes");
    let mut seen = [false; 256];
    bytes.iter().for_each(|&b| seen[usize::from(b)] = true);
    assert!(
        seen.iter().filter(|&&s| s).count() > 64,
        "too few distinct values"
    );
}

#[test]
fn is_an_entropy_device_with_no_config_space_and_the_ring_features() {
    let mut d = Driver::new(Box::new(Rng::new()));
    assert_eq!(d.read32(regs::DEVICE_ID), device_type::RNG);
    assert_eq!(d.read32(regs::DEVICE_ID), 4);
    assert_eq!(
        d.device_features(),
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    );
    assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 256);
    assert_eq!(d.read32(regs::CONFIG), 0);
}

#[test]
fn every_request_of_a_full_queue_gets_random_bytes() {
    let mut d = rng_driver(256);
    let mut chains = Vec::new();
    for _ in 0..256 {
        let bufs = vec![Buf::writable(d.alloc(512), 512)];
        let head = d.add_chain(&bufs);
        d.publish(head);
        chains.push((head, bufs));
    }
    let before = d.snapshot();
    d.kick(0);
    assert_eq!(d.used_idx(), 256);
    assert!(d.take_interrupts() > 0, "the driver was not interrupted");
    let mut after = d.snapshot();
    for (i, (head, bufs)) in chains.iter().enumerate() {
        assert_eq!(d.used_elem(i as u16), (u32::from(*head), 512), "chain {i}");
        let mut data = Vec::new();
        for b in bufs {
            data.extend(d.read_bytes(b.addr, b.len as usize));
            // Compare the rest of memory below: mark the buffers as expected to change.
            let r = b.addr as usize..(b.addr + u64::from(b.len)) as usize;
            after[r.clone()].copy_from_slice(&before[r]);
        }
        assert_random(&data);
    }
    // Two requests never get the same bytes.
    let first = d.read_bytes(chains[1].1[0].addr, 512);
    let second = d.read_bytes(chains[2].1[0].addr, 512);
    assert_ne!(first, second);
    // Nothing outside the buffers changed but the used ring (and its avail_event).
    let used = crate::virtio::testing::USED_RING as usize;
    after[used..used + 6 + 8 * 256].copy_from_slice(&before[used..used + 6 + 8 * 256]);
    assert!(after == before, "bytes outside the request buffers changed");
    let c = counters(&d);
    assert_eq!(c.requests.load(Ordering::Relaxed), 256);
    assert_eq!(c.bytes.load(Ordering::Relaxed), 256 * 512);
    assert_eq!(c.invalid_requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_driver_readable_descriptor_is_refused_and_nothing_is_written() {
    let mut d = rng_driver(16);
    let a = d.alloc(64);
    let b = d.alloc(64);
    let head = d.add_chain(&[Buf::writable(a, 64), Buf::readable(b, 64)]);
    d.publish(head);
    let c = d.alloc(64);
    let ok = d.add_chain(&[Buf::writable(c, 64)]);
    d.publish(ok);
    d.kick(0);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used_elem(0), (u32::from(head), 0));
    assert_eq!(
        d.read_bytes(a, 128),
        vec![CANARY; 128],
        "refused buffers written"
    );
    // The device goes on with the next request.
    assert_eq!(d.used_elem(1), (u32::from(ok), 64));
    assert_ne!(d.read_bytes(c, 64), vec![CANARY; 64]);
    assert_eq!(counters(&d).invalid_requests.load(Ordering::Relaxed), 1);
}

#[test]
fn a_request_larger_than_the_cap_gets_the_cap_and_the_rest_stays_untouched() {
    let mut d = rng_driver(16);
    // One 1 MiB buffer: only its first 64 KiB are written.
    let big = d.alloc(1 << 20);
    let head = d.add_chain(&[Buf::writable(big, 1 << 20)]);
    d.publish(head);
    // Three 40 KiB buffers: 40 KiB, 24 KiB, nothing.
    let parts: Vec<u64> = (0..3).map(|_| d.alloc(40 << 10)).collect();
    let bufs: Vec<Buf> = parts.iter().map(|&a| Buf::writable(a, 40 << 10)).collect();
    let spread = d.add_chain(&bufs);
    d.publish(spread);
    d.kick(0);
    let cap = MAX_BYTES_PER_CHAIN as u32;
    assert_eq!(d.used_elem(0), (u32::from(head), cap));
    assert_random(&d.read_bytes(big, MAX_BYTES_PER_CHAIN));
    let rest = d.read_bytes(big + u64::from(cap), (1 << 20) - MAX_BYTES_PER_CHAIN);
    assert!(
        rest.iter().all(|&b| b == CANARY),
        "bytes past the cap written"
    );
    assert_eq!(d.used_elem(1), (u32::from(spread), cap));
    assert_random(&d.read_bytes(parts[0], 40 << 10));
    assert_random(&d.read_bytes(parts[1], 24 << 10));
    let untouched = d.read_bytes(parts[1] + (24 << 10), 16 << 10);
    assert!(untouched.iter().all(|&b| b == CANARY));
    assert!(d
        .read_bytes(parts[2], 40 << 10)
        .iter()
        .all(|&b| b == CANARY));
}

#[test]
fn one_turn_serves_at_most_its_byte_budget_then_comes_back() {
    let mut d = rng_driver(64);
    // 40 requests of the cap each, all into the same buffer: 2.5 MiB asked for at once.
    let buf = d.alloc(MAX_BYTES_PER_CHAIN as u64);
    for _ in 0..40 {
        let head = d.add_chain(&[Buf::writable(buf, MAX_BYTES_PER_CHAIN as u32)]);
        d.publish(head);
    }
    d.kick(0);
    let per_turn = (BYTES_PER_TURN / MAX_BYTES_PER_CHAIN) as u16;
    assert_eq!(
        d.used_idx(),
        per_turn,
        "the first turn went past its budget"
    );
    // It asked to be called again, and finishes over the next turns.
    assert_eq!(d.run_turns(0, 10), 2);
    assert_eq!(d.used_idx(), 40);
    assert_eq!(d.run_turns(0, 10), 0);
}

#[test]
fn malformed_chains_get_no_bytes_and_the_device_goes_on() {
    let mut d = rng_driver(16);
    // A buffer running past the end of guest memory.
    let outside = d.add_chain(&[Buf::writable(MEM_SIZE as u64 - 16, 64)]);
    d.publish(outside);
    // A buffer at an address that wraps around.
    let wraps = d.add_chain(&[Buf::writable(u64::MAX - 8, 64)]);
    d.publish(wraps);
    // A chain that loops on itself: descriptor 5 -> 5.
    let looped = d.reserve_descs(1);
    let a = d.alloc(64);
    d.write_desc(
        DESC_TABLE,
        looped,
        a,
        64,
        VIRTQ_DESC_F_NEXT | crate::virtio::testing::VIRTQ_DESC_F_WRITE,
        looped,
    );
    d.publish(looped);
    let b = d.alloc(64);
    let ok = d.add_chain(&[Buf::writable(b, 64)]);
    d.publish(ok);
    let tail = d.read_bytes(MEM_SIZE as u64 - 16, 16);
    d.kick(0);
    assert_eq!(d.used_idx(), 4);
    assert_eq!(d.used_elem(0), (u32::from(outside), 0));
    assert_eq!(d.used_elem(1), (u32::from(wraps), 0));
    assert_eq!(d.used_elem(2), (u32::from(looped), 0));
    assert_eq!(d.used_elem(3), (u32::from(ok), 64));
    assert_eq!(d.read_bytes(MEM_SIZE as u64 - 16, 16), tail);
    assert_eq!(d.read_bytes(a, 64), vec![CANARY; 64]);
    assert_eq!(counters(&d).invalid_requests.load(Ordering::Relaxed), 3);
    assert_eq!(d.status() & crate::virtio::status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn requests_after_a_reset_are_served_again() {
    let mut d = rng_driver(16);
    let a = d.alloc(256);
    let head = d.add_chain(&[Buf::writable(a, 256)]);
    d.publish(head);
    d.kick(0);
    assert_eq!(d.used_elem(0), (u32::from(head), 256));
    d.write32(regs::STATUS, 0);
    assert_eq!(d.status(), 0);
    d.start();
    let b = d.alloc(256);
    let head = d.add_chain(&[Buf::writable(b, 256)]);
    d.publish(head);
    d.kick(0);
    assert_eq!(d.used_elem(0), (u32::from(head), 256));
    assert_random(&d.read_bytes(b, 256));
    assert_eq!(counters(&d).requests.load(Ordering::Relaxed), 2);
}

fn limited(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> Rng {
    let params = |b: Option<(u64, u64)>| {
        b.map(|(size, refill_time_ms)| crate::rate_limiter::BucketParams {
            size,
            one_time_burst: 0,
            refill_time_ms,
        })
    };
    let limiter = crate::rate_limiter::RateLimiter::new(params(bandwidth), params(ops)).unwrap();
    Rng::new().with_rate_limiter(limiter)
}

#[test]
fn the_rate_limiter_holds_requests_in_the_ring_by_their_bytes() {
    // 8 KiB at once, then a minute for more.
    let mut d = Driver::new(Box::new(limited(Some((8192, 60_000)), None)));
    d.queue_size = 16;
    d.start();
    let bufs: Vec<u64> = (0..3).map(|_| d.alloc(4096)).collect();
    for &b in &bufs {
        let head = d.add_chain(&[Buf::writable(b, 4096)]);
        d.publish(head);
    }
    d.kick(0);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.read_bytes(bufs[2], 4096), vec![CANARY; 4096]);
    // Another notification while throttled: still held, nothing dropped or answered empty.
    d.kick(0);
    assert_eq!(d.used_idx(), 2);
    let c = counters(&d);
    assert_eq!(c.bytes.load(Ordering::Relaxed), 8192);
    assert!(c.rate_limiter_throttled.load(Ordering::Relaxed) >= 2);
}

#[test]
fn a_throttled_request_is_served_when_the_limiters_timer_fires() {
    // Two requests at once, then one every 50 ms.
    let dev = limited(None, Some((2, 100)));
    let mut d = Driver::new(Box::new(dev));
    let mut h = d.handler.clone();
    let mut ev = crate::virtio::testing::EpollLoop::new(&mut h);
    d.queue_size = 16;
    d.start();
    for _ in 0..4 {
        let b = d.alloc(64);
        let head = d.add_chain(&[Buf::writable(b, 64)]);
        d.publish(head);
    }
    d.handler.queue_evts()[0].write(1).unwrap();
    let t = std::time::Duration::from_secs(10);
    assert!(ev.run_until(&mut h, t, || d.used_idx() >= 2));
    // Nothing but the limiter's timer wakes the queue from here.
    assert!(
        ev.run_until(&mut h, t, || d.used_idx() == 4),
        "requests lost"
    );
    let c = counters(&d);
    assert_eq!(c.requests.load(Ordering::Relaxed), 4);
    assert!(c.rate_limiter_events.load(Ordering::Relaxed) >= 1);
}

#[test]
fn a_restored_transport_goes_on_from_the_rings_and_answers_only_new_requests() {
    let mut d = rng_driver(16);
    for _ in 0..3 {
        let buf = d.alloc(16);
        let head = d.add_chain(&[Buf::writable(buf, 16)]);
        d.publish(head);
    }
    d.kick(0);
    assert_eq!(d.used_idx(), 3);
    let state = d.transport.state();
    assert_eq!(state.queues[0].size, 16);
    assert!(state.queues[0].ready);

    // A new process: a new device and transport over the same guest memory.
    let mut r = d.restored(Box::new(Rng::new())).unwrap();
    assert_eq!(r.status(), d.status(), "the driver's status carries over");
    assert_eq!(r.transport.state(), state);
    // The restore looks at the queue once: nothing new there, nothing answered.
    r.run_turns(0, 4);
    assert_eq!(r.used_idx(), 3);
    let buf = r.alloc(256);
    let head = r.add_chain(&[Buf::writable(buf, 256)]);
    r.publish(head);
    r.kick(0);
    assert_eq!(r.used_idx(), 4, "only the new request was answered");
    assert_eq!(r.used_elem(3), (u32::from(head), 256));
    assert_random(&r.read_bytes(buf, 256));
}

#[test]
fn a_restore_refuses_a_state_of_another_device_or_rings_outside_memory() {
    let d = rng_driver(16);
    let good = d.transport.state();
    let fresh = || Driver::new(Box::new(Rng::new()));

    let mut other = good.clone();
    other.device_type = 2;
    let mut r = fresh();
    assert!(r.transport.restore(&other).is_err());
    assert_eq!(r.status(), 0, "nothing restored");

    let mut other = good.clone();
    other.device_features ^= 1 << 40;
    assert!(fresh().transport.restore(&other).is_err());

    let mut other = good.clone();
    other.queues.push(other.queues[0]);
    assert!(fresh().transport.restore(&other).is_err());

    let mut other = good.clone();
    other.queues[0].desc = u64::MAX - 8;
    let mut r = fresh();
    let e = r.transport.restore(&other).unwrap_err();
    assert!(e.to_string().contains("queue 0"), "{e}");
    assert_eq!(r.status(), 0, "nothing restored");

    let mut other = good;
    other.queues[0].size = 3;
    assert!(fresh().transport.restore(&other).is_err());
}
