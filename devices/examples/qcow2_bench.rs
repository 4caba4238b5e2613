//! Drives a disk backend the way `qemu-img bench -d 1` does: `count` requests of
//! `buffer_size` bytes, starting at 0, each `step` bytes after the previous one, wrapping
//! at the image size. Prints the seconds the requests took (open and close excluded).
//!
//! usage: qcow2_bench <raw|qcow2> <read|write> <buffer_size> <step> <count> <file>

use std::time::Instant;

use wisp_devices::disk::qcow2::Qcow2;
use wisp_devices::disk::raw::RawFile;
use wisp_devices::disk::DiskBackend;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        eprintln!(
            "usage: {} <raw|qcow2> <read|write> <buffer_size> <step> <count> <file>",
            args[0]
        );
        std::process::exit(2);
    }
    let num = |s: &str| -> u64 {
        s.parse().unwrap_or_else(|_| {
            eprintln!("not a number: {s}");
            std::process::exit(2)
        })
    };
    let write = match args[2].as_str() {
        "read" => false,
        "write" => true,
        other => {
            eprintln!("mode must be read or write, not {other}");
            std::process::exit(2)
        }
    };
    let (bs, step, count, path) = (num(&args[3]), num(&args[4]), num(&args[5]), &args[6]);
    let mut disk: Box<dyn DiskBackend> = match args[1].as_str() {
        "raw" => Box::new(RawFile::open(path, !write).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        })),
        "qcow2" => Box::new(Qcow2::open(path, !write).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        })),
        other => {
            eprintln!("format must be raw or qcow2, not {other}");
            std::process::exit(2)
        }
    };
    let size = disk.len();
    // Page-aligned like QEMU's bounce buffers: an unaligned destination makes the
    // kernel's copy from the page cache several times slower on some hosts.
    let mut backing = vec![0xa5u8; bs as usize + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + bs as usize];
    let mut offset = 0u64;
    let start = Instant::now();
    for _ in 0..count {
        let r = if write {
            disk.write_at(offset, buf)
        } else {
            disk.read_at(offset, buf)
        };
        if let Err(e) = r {
            eprintln!("request at {offset}: {e}");
            std::process::exit(1);
        }
        offset = (offset + step) % size;
        if offset + bs > size {
            offset = 0;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{secs:.6}");
}
