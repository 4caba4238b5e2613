//! The qcow2 image parser and its read/write/discard paths on an arbitrary file: the header,
//! the L1/L2 tables, refcounts, compressed clusters and extensions are all attacker-chosen
//! (an image is untrusted input). Errors are fine; a panic, a hang or an unbounded allocation
//! is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wisp_devices::disk::qcow2::fuzz_image(data);
});
