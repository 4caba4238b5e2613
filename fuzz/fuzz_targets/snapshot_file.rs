//! The snapshot state file (src/snapshot/): a file a user hands to `PUT /snapshot/load`. The
//! first input byte chooses whether the rest is resealed with its own checksum first, so that
//! the body's decoder is reached as well as the header's checks.
//!
//! Checked: no panic, no overflow (debug assertions), no allocation beyond the file's bound;
//! every refusal is one line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    if let Err(e) = wisp::snapshot::fuzz_decode(file, mode & 1 == 1) {
        assert!(!e.to_string().contains('\n'), "{e}");
    }
});
