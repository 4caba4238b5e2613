//! Integer conversions that lose nothing on the targets wisp builds for (64-bit x86), so
//! that `clippy::cast_possible_truncation` stays on for the casts that can.

const _: () = assert!(usize::BITS == 64, "wisp builds for 64-bit targets only");

/// `v` as a usize: the same width (asserted above).
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits
pub const fn u64_to_usize(v: u64) -> usize {
    v as usize
}
