//! virtio-balloon as a hostile guest driver drives it: through the virtio-mmio registers of
//! a real transport (the devices crate's `virtio::testing` harness) over real guest memory,
//! whose pages the device really returns to the host (MADV_DONTNEED). The input chooses the
//! features, the queue size, every descriptor, the page frame numbers (mostly inside guest
//! memory, sometimes anywhere), statistics buffers, config writes and avail-ring garbage.
//!
//! Checked: no panic; the event loop is never kept busy forever; no more chains answered on
//! the page queues than published; guest memory stays mapped (a page the device dropped
//! reads as zeros, and only pages the input named are dropped).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wisp_devices::virtio::balloon::Balloon;
use wisp_devices::virtio::testing::DATA_START;
use wisp_fuzz::virtio::{self, MEM_SIZE};
use wisp_fuzz::Input;

/// A page the input never names in a page list: it must keep its contents.
const WITNESS_PFN: u32 = (MEM_SIZE / 4096 - 1) as u32;
const WITNESS: [u8; 8] = *b"witness!";

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let stats = input.bool();
    let Ok(dev) = Balloon::new(input.u32(), input.bool(), u16::from(stats)) else {
        return;
    };
    let mut d = virtio::driver(dev);
    let witness = u64::from(WITNESS_PFN) * 4096;
    d.mem.write_slice(&WITNESS, GuestAddress(witness)).unwrap();
    virtio::start(&mut d, &mut input, if stats { 3 } else { 2 });

    let mut published = [0u16; 2];
    let start = [d.used_idx_of(0), d.used_idx_of(1)];
    let mut scribbled = false;
    while !input.is_empty() {
        match input.u8() % 8 {
            // A page list on the inflate or deflate queue.
            0..=4 => {
                let q = u32::from(input.u8() % 2);
                let (head, descs) = virtio::chain(&mut d, &mut input, q);
                scribbled |= virtio::touches_rings(&descs);
                let n = usize::from(input.u8() % 64);
                let pfns: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        let pfn = match input.u8() % 8 {
                            0 => input.u32(),
                            // Never the witness page.
                            _ => u32::from(input.u8()) % WITNESS_PFN,
                        };
                        pfn.to_le_bytes()
                    })
                    .collect();
                if pfns.chunks(4).any(|p| p == WITNESS_PFN.to_le_bytes()) {
                    return;
                }
                let _ = d.mem.write_slice(&pfns, GuestAddress(descs[0].0));
                scribbled |= descs[0].0 < DATA_START;
                d.publish_to(q, head);
                published[q as usize] = published[q as usize].wrapping_add(1);
                virtio::kick(&mut d, q);
            }
            5 if stats => {
                let (head, descs) = virtio::chain(&mut d, &mut input, 2);
                scribbled |= virtio::touches_rings(&descs);
                scribbled |= virtio::poke(&d, &mut input, descs[0].0);
                d.publish_to(2, head);
                virtio::kick(&mut d, 2);
            }
            6 => {
                // A config write: `actual`, or anywhere in config space.
                let off = u64::from(input.u8() % 20);
                d.write32(wisp_devices::virtio::testing::regs::CONFIG + off, input.u32());
            }
            _ => {
                let q = u32::from(input.u8() % 3);
                virtio::scribble_avail(&mut d, &mut input, q);
                scribbled = true;
                virtio::kick(&mut d, q);
            }
        }
    }
    if !scribbled {
        for q in 0..2 {
            let answered = d.used_idx_of(q as u32).wrapping_sub(start[q]);
            assert!(answered <= published[q], "queue {q}: {answered} answered, {} published", published[q]);
        }
    }
    let mut w = [0u8; 8];
    d.mem.read_slice(&mut w, GuestAddress(witness)).unwrap();
    assert!(w == WITNESS || scribbled, "a page nobody named was dropped");
});
