//! qcow2 images (QEMU docs/interop/qcow2.txt): versions 2 and 3, 512 B to 2 MiB clusters,
//! refcounts of any width (read and write), backing chains (raw or qcow2, up to
//! `MAX_BACKING_DEPTH`, relative names resolved against the overlay's directory),
//! compressed clusters (deflate and zstd, read), allocating copy-on-write writes with exact
//! refcounts, discard / write-zeroes that free clusters (and punch holes), and a metadata
//! write order that keeps the image consistent across a crash.
//!
//! API: [`Qcow2::open`] (a [`DiskBackend`]), [`create`], [`info`], [`probe_format`].
//! Formats: a backing file whose format the overlay records is opened as that format and
//! never probed; only a backing file with no recorded format is probed. Callers should do
//! the same for top-level disks: use the format the user gave and probe only when none was
//! given.
//!
//! Refused: unknown incompatible features, the corrupt bit, external data files,
//! encryption, extended L2 entries, bad headers and tables; dirty images (lazy refcounts)
//! and images with internal snapshots are opened read-only only (no refcount rebuild).
//! Writers take an exclusive OFD lock on the image, readers (backing files) a shared one.
//!
//! Write ordering (each arrow is an fdatasync): data clusters and refcount blocks ->
//! refcount table entries -> L2 tables -> L1 entries. Refcount decrements are applied only
//! after the L2 entries that stopped pointing at the clusters are durable, so a crash can
//! leak clusters but never leave a reference to a cluster with refcount 0.
//!
//! Failures: an allocating write changes its L2 entry only after its data is written (a
//! failed one leaves the old data and frees its new cluster); a table stays dirty until
//! the sync after its write succeeded; after a failed metadata write or fdatasync every
//! later flush fails until the image is reopened (close still writes back what it can).
//! A writer refuses refcount blocks that are shared, outside the file or on other metadata,
//! and guest writes never reach metadata (QEMU's overlap checks).

mod buffers;
mod cache;
mod header;
mod info;
mod refcount;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use buffers::{Guest, ReadDest, WriteSrc};
use cache::TableCache;
pub use header::MAGIC;
use header::{Header, INCOMPAT_DIRTY};
pub use info::{info, ImageInfo, OpenVerdict, Qcow2Facts};

use vm_memory::VolatileSlice;

use super::fault::{inject, Faults, FileOp};
use super::open::{open_backing_file, open_image_file, resolve_backing};
pub use super::open::{BackingOpenError, BackingPolicy};
use super::raw::{pread_zero_fill, RawFile};
use super::DiskBackend;
use crate::cast::u64_to_usize;

/// Longest backing chain opened (the overlay itself not counted).
pub const MAX_BACKING_DEPTH: usize = 16;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const RT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
/// Host offsets must fit in bits 9..55 of table entries.
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// When a write extends the image file, this much space past it is reserved at once
/// (fallocate with FALLOC_FL_KEEP_SIZE): ext4 and xfs then write into reserved extents
/// instead of reserving delayed blocks page by page (about a quarter faster for allocating
/// writes on ext4), and the image fragments less. The reservation is past the end of the
/// file, so it changes no byte of the image; a clean close gives back what was not used.
const PREALLOC_CHUNK: u64 = 32 << 20;
/// Most refcounts one allocation looks at before it takes the end of the image: a bound on
/// the time one request can spend on a full or hostile refcount layout.
const ALLOC_SCAN_LIMIT: u64 = 1 << 16;

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("truncated qcow2 header: the file is only {len} bytes")]
    TruncatedHeader { len: u64 },
    #[error("not a qcow2 image: magic is {magic:#010x}, expected 0x514649fb (QFI\\xfb)")]
    BadMagic { magic: u32 },
    #[error("unsupported qcow2 version {version} (2 and 3 are supported)")]
    UnsupportedVersion { version: u32 },
    #[error("cluster_bits {cluster_bits} out of range (9..=21, 512 B to 2 MiB clusters)")]
    ClusterBits { cluster_bits: u32 },
    #[error("cluster size {cluster_size} is not a power of two between 512 and 2097152")]
    ClusterSize { cluster_size: u64 },
    #[error("refcount_order {refcount_order} out of range (0..=6)")]
    RefcountOrder { refcount_order: u32 },
    #[error("invalid v3 header_length {header_length}")]
    HeaderLength { header_length: u32 },
    #[error("header extension type {ext_type:#x} with length {len} runs past the header cluster")]
    BadHeaderExtension { ext_type: u32, len: u64 },
    #[error("encrypted images are not supported (crypt_method {method})")]
    Encrypted { method: u32 },
    #[error("the image has the corrupt bit set (incompatible feature bit 1); repair it with `qemu-img check -r all`")]
    CorruptBit,
    #[error("the image is dirty (incompatible feature bit 0: refcounts may be stale after lazy refcounts); wisp does not rebuild refcounts and opens it read-only only: repair it with `qemu-img check -r all`")]
    Dirty,
    #[error("images with an external data file (incompatible feature bit 2) are not supported")]
    ExternalDataFile,
    #[error("images with extended L2 entries / subclusters (incompatible feature bit 4) are not supported")]
    ExtendedL2,
    #[error("compression type {compression_type} is not supported (0 deflate and 1 zstd are)")]
    CompressionType { compression_type: u8 },
    #[error(
        "compression type field ({compression_type}) disagrees with incompatible feature bit 3"
    )]
    CompressionTypeMismatch { compression_type: u8 },
    #[error("unknown incompatible feature bit {bit} ({name}) is set")]
    UnknownIncompatibleFeature { bit: u32, name: String },
    #[error("{table} at offset {offset:#x} is not aligned to a cluster")]
    Misaligned { table: &'static str, offset: u64 },
    #[error("{table} at offset {offset:#x} overlaps the header cluster")]
    OverlapsHeader { table: &'static str, offset: u64 },
    #[error("{table} [{offset:#x}, +{len:#x}) lies outside the file ({file_size} bytes)")]
    TableOutsideFile {
        table: &'static str,
        offset: u64,
        len: u64,
        file_size: u64,
    },
    #[error("{what} too large: {value}")]
    TooLarge { what: &'static str, value: u64 },
    #[error("L1 table has {l1_size} entries but a virtual size of {size} needs {needed}")]
    L1TooSmall {
        l1_size: u32,
        needed: u64,
        size: u64,
    },
    #[error("invalid backing file name at offset {offset:#x}, length {len}")]
    BadBackingName { offset: u64, len: u32 },
    #[error("backing format {format:?} of {path} is not supported (raw and qcow2 are)")]
    BackingFormat { path: PathBuf, format: String },
    #[error("backing chain deeper than {limit} at {path}")]
    BackingTooDeep { path: PathBuf, limit: usize },
    #[error("backing chain loops: {path} is already in the chain")]
    BackingLoop { path: PathBuf },
    #[error("backing file {path}: {source}")]
    Backing { path: PathBuf, source: Box<Error> },
    #[error("{image} names the backing file {name:?}: {source}")]
    BackingOpen {
        image: PathBuf,
        name: String,
        #[source]
        source: BackingOpenError,
    },
    #[error("the image has internal snapshots ({count}); wisp opens it read-only only (it does not keep their refcounts)")]
    Snapshots { count: u32 },
    #[error(transparent)]
    Lock(#[from] super::raw::RawError),
    #[error("image size is required when there is no backing file")]
    NoSize,
    #[error("backing file name {name:?} does not fit in the header cluster")]
    BackingNameTooLong { name: String },
    #[error("refcount block {index} at {offset:#x} {problem}")]
    RefcountBlock {
        index: usize,
        offset: u64,
        problem: &'static str,
    },
    #[error("L2 table {index} at {offset:#x} {problem}")]
    L2Table {
        index: usize,
        offset: u64,
        problem: &'static str,
    },
}

/// Disk image formats wisp reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unknown disk format {other:?} (raw or qcow2)")),
        }
    }
}

/// qcow2 if the file starts with the qcow2 magic, raw otherwise. Only for files the user
/// did not give a format for: a file probed raw must stay raw (a guest can write a qcow2
/// header into a raw disk).
pub fn probe_format(file: &File) -> io::Result<Format> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if u32::from_be_bytes(magic) == MAGIC => Ok(Format::Qcow2),
        Ok(()) => Ok(Format::Raw),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Format::Raw),
        Err(e) => Err(e),
    }
}

/// Creates a qcow2 v3 image (refcount_order 4). `size` defaults to the backing file's
/// virtual size; `cluster_size` to 64 KiB. The backing path is recorded as given (a
/// relative one is resolved against the new image's directory) with its format.
pub fn create(
    path: &Path,
    size: Option<u64>,
    cluster_size: Option<u64>,
    backing: Option<(&Path, Format)>,
) -> Result<(), Error> {
    let cluster_size = cluster_size.unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::ClusterSize { cluster_size });
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let backing_size = match backing {
        Some((bpath, fmt)) => {
            let full = resolve_backing(path, bpath);
            let len = match fmt {
                Format::Raw => {
                    open_image_file(&full, false, true)
                        .map_err(|source| Error::Open {
                            path: full.clone(),
                            source,
                        })?
                        .1
                }
                Format::Qcow2 => {
                    Qcow2::open(&full, true)
                        .map_err(|e| Error::Backing {
                            path: full.clone(),
                            source: Box::new(e),
                        })?
                        .size
                }
            };
            Some(len)
        }
        None => None,
    };
    let size = size.or(backing_size).ok_or(Error::NoSize)?;
    let size = size.checked_next_multiple_of(512).ok_or(Error::TooLarge {
        what: "virtual size",
        value: size,
    })?;
    if size > 1 << 62 {
        return Err(Error::TooLarge {
            what: "virtual size",
            value: size,
        });
    }
    let l1_size = size.div_ceil(1u64 << (2 * cluster_bits - 3)).max(1);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(Error::TooLarge {
            what: "L1 table",
            value: l1_size * 8,
        });
    }
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
    let per_block = cluster_size * 8 / 16;
    // Layout: header | refcount table | refcount blocks | L1 table.
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + blocks + l1_clusters;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cluster_size);
        if b == blocks && t == rt_clusters {
            break;
        }
        blocks = b;
        rt_clusters = t;
    }
    let total = 1 + rt_clusters + blocks + l1_clusters;
    let rt_offset = cluster_size;
    let blocks_offset = rt_offset + rt_clusters * cluster_size;
    let l1_offset = blocks_offset + blocks * cluster_size;
    let backing_strs = backing.map(|(p, f)| (p.to_string_lossy().into_owned(), f.to_string()));
    // The L1 table is at most MAX_L1_BYTES (32 MiB) and the refcount table covers it and
    // itself: both counts fit the header's u32 fields.
    #[allow(clippy::cast_possible_truncation)]
    let (l1_size, rt_clusters32) = (l1_size as u32, rt_clusters as u32);
    let hdr = header::build(
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters32,
        backing_strs.as_ref().map(|(p, f)| (p.as_str(), f.as_str())),
    )
    .ok_or_else(|| Error::BackingNameTooLong {
        name: backing_strs.clone().unwrap_or_default().0,
    })?;
    let mut rt = vec![0u8; u64_to_usize(rt_clusters * cluster_size)];
    for b in 0..blocks {
        let off = blocks_offset + b * cluster_size;
        rt[u64_to_usize(b * 8)..u64_to_usize(b * 8 + 8)].copy_from_slice(&off.to_be_bytes());
    }
    let mut rblocks = vec![0u8; u64_to_usize(blocks * cluster_size)];
    for c in 0..u64_to_usize(total) {
        refcount::set(&mut rblocks, 4, c, 1);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let write = || -> io::Result<()> {
        file.write_all_at(&hdr, 0)?;
        file.write_all_at(&rt, rt_offset)?;
        file.write_all_at(&rblocks, blocks_offset)?;
        file.set_len(total * cluster_size)?;
        file.sync_all()
    };
    write().map_err(|source| {
        let _ = fs::remove_file(path);
        Error::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// Fuzzing entry point (for a `cargo fuzz` target): `data` is written to a scratch file,
/// opened as an image read-only and read-write, and driven through every operation.
/// Errors are expected; a panic, a hang or an unbounded allocation is a bug.
#[doc(hidden)]
pub fn fuzz_image(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("wisp-qcow2-fuzz-{}.img", std::process::id()));
    if fs::write(&path, data).is_err() {
        return;
    }
    for read_only in [true, false] {
        // No backing files: the fuzzer's input must not reach host files.
        let Ok(mut q) = Qcow2::open_with(&path, read_only, &BackingPolicy::off()) else {
            continue;
        };
        let len = q.len();
        let span = len.min(8 << 20);
        let mut buf = vec![0u8; 70_000];
        for i in 0..4u64 {
            let off = span / 4 * i;
            let n = u64_to_usize((buf.len() as u64).min(len - off));
            let _ = q.read_at(off, &mut buf[..n]);
            if !read_only {
                let _ = q.write_at(off + n as u64 / 2, &buf[..n / 2]);
            }
        }
        if !read_only {
            let _ = q.discard(0, span / 2);
            let _ = q.write_zeroes(span / 2, span / 4, true);
            let _ = q.flush();
        }
    }
    let _ = fs::remove_file(&path);
}

fn corrupt(path: &Path, msg: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt qcow2 image {}: {msg}", path.display()),
    )
}

/// Raw deflate (no zlib header), as QEMU writes compressed clusters; the data must fill
/// `out` exactly (trailing sector padding is ignored).
fn inflate_deflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut state = DecompressorOxide::new();
    let (status, _, written) = decompress(
        &mut state,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    if matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput) && written == out.len() {
        Ok(())
    } else {
        Err(format!("deflate: {status:?} after {written} bytes"))
    }
}

/// zstd frames until `out` is full (QEMU may write more than one frame per cluster).
fn inflate_zstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    let mut src: &[u8] = input;
    let mut pos = 0;
    while pos < out.len() {
        let before = pos;
        // QEMU compresses one cluster (at most 2 MiB) per frame; refuse bigger windows.
        let mut dec =
            ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, 8 << 20)
                .map_err(|e| format!("zstd frame at {pos}: {e}"))?;
        while pos < out.len() {
            let n = dec
                .read(&mut out[pos..])
                .map_err(|e| format!("zstd: {e}"))?;
            if n == 0 {
                break;
            }
            pos += n;
        }
        if pos == before {
            return Err(format!("zstd: no progress after {pos} bytes"));
        }
    }
    Ok(())
}

enum BackingDisk {
    /// A read-only raw file at the bottom of a backing chain.
    Raw(RawFile),
    Qcow2(Box<Qcow2>),
}

impl BackingDisk {
    fn len(&self) -> u64 {
        match self {
            BackingDisk::Raw(r) => r.len(),
            BackingDisk::Qcow2(q) => q.size,
        }
    }

    /// Reads guest data of the overlay; bytes past the backing file's end read as zero.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = self.len();
        let avail = u64_to_usize(len.saturating_sub(offset).min(buf.len() as u64));
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            BackingDisk::Raw(r) => r.read_at(offset, inside),
            BackingDisk::Qcow2(q) => q.read_at(offset, inside),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Reads from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster kept by the entry, if any.
    Zero {
        host: Option<u64>,
    },
    Data {
        host: u64,
        copied: bool,
    },
    /// `host` is a byte offset; `sectors` 512-byte sectors hold the compressed data.
    Compressed {
        host: u64,
        sectors: u64,
    },
}

/// Metadata written but not yet covered by a successful sync (still dirty).
#[derive(Default)]
struct Written {
    rc: Vec<u64>,
    rt: Vec<usize>,
    l2: Vec<u64>,
    l1: Vec<usize>,
    data: bool,
}

/// A run of guest-contiguous bytes going to host-contiguous clusters, written with one
/// pwrite.
struct WriteRun {
    host: u64,
    start: usize,
    end: usize,
    /// Clusters allocated for the run: (guest cluster, new host offset, old mapping). Their
    /// L2 entries change only once the data is written.
    allocs: Vec<(u64, u64, Mapping)>,
}

/// An open qcow2 image.
pub struct Qcow2 {
    path: PathBuf,
    file: File,
    read_only: bool,
    version: u32,
    size: u64,
    /// 0: deflate, 1: zstd.
    compression_type: u8,
    cluster_bits: u32,
    cluster_size: u64,
    l2_bits: u32,
    l1_offset: u64,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2_cache: TableCache<Vec<u64>>,
    refcount_order: u32,
    /// log2 of the number of refcounts in one refcount block.
    rcb_bits: u32,
    rt_offset: u64,
    rt: Vec<u64>,
    rt_dirty: BTreeSet<usize>,
    /// The header's refcount table fields were written but their sync failed.
    rt_header_dirty: bool,
    /// Entries of the refcount table as it is on disk (the in-memory one is longer while
    /// the table is being grown).
    rt_disk_entries: usize,
    rc_cache: TableCache<Vec<u8>>,
    backing: Option<BackingDisk>,
    chain: Vec<(PathBuf, Format)>,
    /// Length of the image file as far as this process knows (reads of metadata beyond it
    /// are corruption).
    file_size: u64,
    /// Space is reserved (see `PREALLOC_CHUNK`) up to here; 0 once reserving failed or
    /// for files that are not regular files.
    prealloc_end: u64,
    prealloc: bool,
    /// The most file bytes the whole image can need (every cluster allocated, with its
    /// metadata): never reserve past it.
    prealloc_cap: u64,
    /// Every cluster index at or past this one is unused by anything we know of.
    end_cluster: u64,
    /// No cluster below this index has refcount 0 (allocation scan start).
    free_hint: u64,
    /// Cluster indexes of the L2 tables and refcount blocks, sorted (read-write opens):
    /// guest data never goes there.
    meta_clusters: Vec<u64>,
    /// Host byte ranges whose refcounts drop once the L2 entries that referenced them
    /// are durable.
    pending_frees: Vec<(u64, u64)>,
    data_dirty: bool,
    /// Why the image is broken: a metadata write or an fdatasync failed. Every later
    /// flush fails until the image is reopened.
    broken: Option<String>,
    /// The last decompressed cluster: (L2 entry, contents).
    compressed_cache: Option<(u64, Vec<u8>)>,
    /// A page-aligned cluster buffer for copy-on-write (the kernel copies from the page
    /// cache several times faster into page-aligned memory).
    scratch: AlignedBuf,
    /// Backing-file data on its way to guest memory.
    bounce: Vec<u8>,
    /// Tests and fuzzing: injected I/O faults (see `disk::fault`).
    faults: Option<Faults>,
    /// Test hook: writes allowed before a simulated crash (every later write fails and
    /// nothing is written back on drop), and the number of writes issued.
    #[cfg(test)]
    crash_after: Option<u64>,
    #[cfg(test)]
    writes_issued: u64,
}

/// A page-aligned byte buffer.
#[derive(Default)]
struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let mem = vec![0u8; len + 4096];
        let start = mem.as_ptr().align_offset(4096);
        AlignedBuf { mem, start, len }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

impl Qcow2 {
    /// Opens an image the caller trusts (one it made) and its backing chain, which may
    /// name regular files anywhere (backing files are always read-only). Images from
    /// others go through [`Qcow2::open_with`] and the operator's policy.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Qcow2, Error> {
        Self::open_with(path, read_only, &BackingPolicy::any_file())
    }

    /// Opens an image (a regular file or a block device) and the backing files `backing`
    /// allows.
    pub fn open_with(
        path: impl AsRef<Path>,
        read_only: bool,
        backing: &BackingPolicy,
    ) -> Result<Qcow2, Error> {
        let path = path.as_ref();
        let (file, file_size) =
            open_image_file(path, !read_only, true).map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::open_chain(path, file, file_size, read_only, backing, &mut Vec::new())
    }

    /// Opens the image in `file` (named `path`), following its chain; `seen` holds the
    /// (device, inode) of every image above it.
    fn open_chain(
        path: &Path,
        file: File,
        file_size: u64,
        read_only: bool,
        policy: &BackingPolicy,
        seen: &mut Vec<(u64, u64)>,
    ) -> Result<Qcow2, Error> {
        let open_err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(open_err)?;
        if seen.contains(&(meta.dev(), meta.ino())) {
            return Err(Error::BackingLoop {
                path: path.to_owned(),
            });
        }
        if seen.len() > MAX_BACKING_DEPTH {
            return Err(Error::BackingTooDeep {
                path: path.to_owned(),
                limit: MAX_BACKING_DEPTH,
            });
        }
        seen.push((meta.dev(), meta.ino()));
        let regular_file = meta.is_file();
        // Exclusive for a writer, shared for readers (backing files), like raw images.
        super::raw::lock_file(&file, path, !read_only)?;
        let io_err = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let mut first = vec![0u8; file_size.min(2 << 20) as usize];
        file.read_exact_at(&mut first, 0).map_err(io_err)?;
        let h = Header::parse(&first, file_size)?;
        if !read_only {
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(Error::Dirty);
            }
            if h.nb_snapshots != 0 {
                return Err(Error::Snapshots {
                    count: h.nb_snapshots,
                });
            }
        }
        let cluster_bits = h.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;

        let read_table = |offset: u64, entries: usize| -> Result<Vec<u64>, Error> {
            let mut raw = vec![0u8; entries * 8];
            file.read_exact_at(&mut raw, offset).map_err(io_err)?;
            Ok(raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunk")))
                .collect())
        };
        let l1 = read_table(h.l1_table_offset, h.l1_size as usize)?;
        let rt_entries = ((h.refcount_table_clusters as u64) << cluster_bits) / 8;
        let rt = read_table(h.refcount_table_offset, rt_entries as usize)?;

        let mut chain = Vec::new();
        let backing = match &h.backing_file {
            None => None,
            Some(name) => {
                let (bpath, bfile, blen) = open_backing_file(path, &file, Path::new(name), policy)
                    .map_err(|source| Error::BackingOpen {
                        image: path.to_owned(),
                        name: name.clone(),
                        source,
                    })?;
                let wrap = |e: Error| Error::Backing {
                    path: bpath.clone(),
                    source: Box::new(e),
                };
                let format = match h.backing_format.as_deref() {
                    Some("raw") => Format::Raw,
                    Some("qcow2") => Format::Qcow2,
                    Some(other) => {
                        return Err(Error::BackingFormat {
                            path: bpath,
                            format: other.to_string(),
                        })
                    }
                    None => probe_format(&bfile).map_err(|source| {
                        wrap(Error::Io {
                            path: bpath.clone(),
                            source,
                        })
                    })?,
                };
                chain.push((bpath.clone(), format));
                Some(match format {
                    Format::Raw => {
                        super::raw::lock_file(&bfile, &bpath, false).map_err(|e| wrap(e.into()))?;
                        BackingDisk::Raw(RawFile::from_locked_file(bfile, blen, true))
                    }
                    Format::Qcow2 => {
                        let q = Qcow2::open_chain(&bpath, bfile, blen, true, policy, seen)
                            .map_err(|e| match e {
                                // Report chain errors once, not wrapped at every level.
                                e @ (Error::BackingLoop { .. }
                                | Error::BackingTooDeep { .. }
                                | Error::BackingOpen { .. }) => e,
                                e => wrap(e),
                            })?;
                        chain.extend(q.chain.iter().cloned());
                        BackingDisk::Qcow2(Box::new(q))
                    }
                })
            }
        };

        if !read_only && h.autoclear != 0 {
            if h.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
                log::warn!(
                    "{}: its persistent dirty bitmaps are dropped: wisp does not keep them up to \
                     date, so it marks them stale",
                    path.display()
                );
            }
            // We maintain none of the autoclear features (e.g. bitmaps): clearing the bits
            // tells other tools their data is stale (qcow2.txt, autoclear_features).
            file.write_all_at(&0u64.to_be_bytes(), header::OFF_AUTOCLEAR)
                .and_then(|()| file.sync_data())
                .map_err(io_err)?;
        }

        let l2_cap = ((16u64 << 20) >> cluster_bits).clamp(8, 16384) as usize;
        let rc_cap = ((4u64 << 20) >> cluster_bits).clamp(8, 8192) as usize;
        let mut q = Qcow2 {
            path: path.to_owned(),
            file,
            read_only,
            version: h.version,
            size: h.size,
            compression_type: h.compression_type,
            cluster_bits,
            cluster_size,
            l2_bits: cluster_bits - 3,
            l1_offset: h.l1_table_offset,
            l1,
            l1_dirty: BTreeSet::new(),
            l2_cache: TableCache::new(l2_cap),
            refcount_order: h.refcount_order,
            rcb_bits: cluster_bits + 3 - h.refcount_order,
            rt_offset: h.refcount_table_offset,
            rt_disk_entries: rt.len(),
            rt,
            rt_dirty: BTreeSet::new(),
            rt_header_dirty: false,
            rc_cache: TableCache::new(rc_cap),
            backing,
            chain,
            file_size,
            prealloc_end: file_size,
            prealloc: regular_file && !read_only,
            prealloc_cap: 0,
            end_cluster: file_size.div_ceil(cluster_size),
            free_hint: 0,
            meta_clusters: Vec::new(),
            pending_frees: Vec::new(),
            data_dirty: false,
            broken: None,
            compressed_cache: None,
            scratch: AlignedBuf::new(u64_to_usize(cluster_size)),
            bounce: Vec::new(),
            faults: None,
            #[cfg(test)]
            crash_after: None,
            #[cfg(test)]
            writes_issued: 0,
        };
        if !read_only {
            q.index_metadata()?;
            q.prealloc_cap = q.full_image_bytes();
        }
        Ok(q)
    }

    /// Backing files, nearest first.
    pub fn backing_chain(&self) -> &[(PathBuf, Format)] {
        &self.chain
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn corrupt(&self, msg: String) -> io::Error {
        corrupt(&self.path, msg)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "request [{offset}, +{len}) beyond the virtual size {} of {}",
                    self.size,
                    self.path.display()
                ),
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is open read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    fn crash_point(&mut self) -> io::Result<()> {
        self.writes_issued += 1;
        match &mut self.crash_after {
            Some(0) => Err(io::Error::other("simulated crash")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// fdatasync of the image file. A failure breaks the image (see `flush_metadata`).
    fn sync(&mut self) -> io::Result<()> {
        let r = inject(&self.faults, FileOp::Sync).and_then(|()| self.file.sync_data());
        if let Err(e) = &r {
            self.note_broken(e);
        }
        r
    }

    /// Records the first metadata write or sync failure: every later flush fails.
    fn note_broken(&mut self, e: &io::Error) {
        if self.broken.is_none() {
            self.broken = Some(e.to_string());
        }
    }

    /// Writes metadata; a failure breaks the image (see `flush_metadata`).
    fn pwrite_meta(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.pwrite(buf, offset);
        if let Err(e) = &r {
            self.note_broken(e);
        }
        r
    }

    fn pwrite(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pwrite_from(buf, 0, buf.len(), offset)
    }

    /// Writes bytes `start..start + n` of `src` at file offset `offset`.
    fn pwrite_from<S: WriteSrc + ?Sized>(
        &mut self,
        src: &S,
        start: usize,
        n: usize,
        offset: u64,
    ) -> io::Result<()> {
        #[cfg(test)]
        self.crash_point()?;
        inject(&self.faults, FileOp::Write)?;
        let end = offset + n as u64;
        if end > self.prealloc_end && self.prealloc {
            self.preallocate(offset, end);
        }
        src.write_file(&self.file, offset, start, n)?;
        self.file_size = self.file_size.max(end);
        Ok(())
    }

    /// Reserves space from the end of the file (or of the last reservation) to at least
    /// `PREALLOC_CHUNK` past `end`, for a write of `[offset, end)`. Best effort: a file
    /// system that cannot reserve is written as usual, and a full one fails the write
    /// itself.
    fn preallocate(&mut self, offset: u64, end: u64) {
        let start = self.prealloc_end.max(self.file_size);
        if offset > start.saturating_add(PREALLOC_CHUNK) {
            // Far past the end (a damaged image's wild offset): never reserve the gap.
            return;
        }
        let new_end = ((end / PREALLOC_CHUNK + 1) * PREALLOC_CHUNK).min(self.prealloc_cap.max(end));
        if new_end <= start {
            return;
        }
        let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(start),
            libc::off_t::try_from(new_end - start),
        ) else {
            self.prealloc = false;
            return;
        };
        let r = inject(&self.faults, FileOp::Fallocate).and_then(|()| {
            // SAFETY: fallocate on our own fd with plain integer arguments.
            let r = unsafe {
                libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, len)
            };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
        match r {
            Ok(()) => self.prealloc_end = new_end,
            // Full now; a later write may find room again.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
            Err(_) => self.prealloc = false,
        }
    }

    /// Bytes of file a fully allocated image needs: header, L1, refcount table (twice: it
    /// may move as it grows), L2 tables, data clusters and their refcount blocks.
    fn full_image_bytes(&self) -> u64 {
        let cs = self.cluster_size;
        let data = self.size.div_ceil(cs);
        let l2 = data.div_ceil(cs / 8);
        let l1 = (self.l1.len() as u64 * 8).div_ceil(cs);
        let rt = (self.rt.len() as u64 * 8).div_ceil(cs);
        let clusters = 1 + l1 + 2 * rt + l2 + data;
        let blocks = clusters.div_ceil(1 << self.rcb_bits) + 1;
        (clusters + blocks).saturating_mul(cs)
    }

    /// Gives back space reserved past the end of the file (truncating to the same size
    /// frees blocks past it on ext4 and xfs).
    fn release_preallocation(&mut self) -> io::Result<()> {
        if self.prealloc_end <= self.file_size {
            return Ok(());
        }
        let len = self.file.metadata()?.len();
        inject(&self.faults, FileOp::Fallocate)?;
        self.file.set_len(len)?;
        self.prealloc_end = len;
        Ok(())
    }

    /// Checks that a metadata cluster read from a table lies in the file and is aligned.
    fn check_metadata_cluster(&self, what: &str, offset: u64) -> io::Result<()> {
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(self.corrupt(format!("{what} offset {offset:#x} is not cluster aligned")));
        }
        if offset == 0 || offset.saturating_add(self.cluster_size) > self.file_size {
            return Err(self.corrupt(format!(
                "{what} offset {offset:#x} outside the file ({} bytes)",
                self.file_size
            )));
        }
        Ok(())
    }

    fn is_fixed_metadata(&self, cluster: u64) -> bool {
        let off = cluster << self.cluster_bits;
        let in_table = |start: u64, bytes: u64| off >= start && off < start + bytes;
        cluster == 0
            || in_table(self.l1_offset, self.l1.len() as u64 * 8)
            || in_table(self.rt_offset, self.rt.len() as u64 * 8)
    }

    /// Whether a host cluster holds metadata: header, L1, refcount table, an L2 table or a
    /// refcount block (QEMU's overlap check).
    fn is_metadata(&self, cluster: u64) -> bool {
        self.is_fixed_metadata(cluster) || self.meta_clusters.binary_search(&cluster).is_ok()
    }

    fn note_metadata(&mut self, cluster: u64) {
        if let Err(i) = self.meta_clusters.binary_search(&cluster) {
            // New tables usually go at the end of the file: the insert moves little.
            self.meta_clusters.insert(i, cluster);
        }
    }

    /// For a writer: checks that the refcount blocks are aligned, inside the file, distinct
    /// and clear of the header, L1 and refcount table, and that no L2 table is fixed
    /// metadata or a refcount block; indexes both for `is_metadata`. (A refcount table
    /// whose entries all share one block made every allocation scan 2^35 clusters.)
    fn index_metadata(&mut self) -> Result<(), Error> {
        let cb = self.cluster_bits;
        let mut blocks: Vec<(u64, usize)> = Vec::new();
        for (index, &e) in self.rt.iter().enumerate() {
            let offset = e & RT_OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            let bad = |problem| Error::RefcountBlock {
                index,
                offset,
                problem,
            };
            if !offset.is_multiple_of(self.cluster_size) {
                return Err(bad("is not aligned to a cluster"));
            }
            if offset
                .checked_add(self.cluster_size)
                .is_none_or(|end| end > self.file_size)
            {
                return Err(bad("lies outside the file"));
            }
            if self.is_fixed_metadata(offset >> cb) {
                return Err(bad(
                    "overlaps the header, the L1 table or the refcount table",
                ));
            }
            blocks.push((offset >> cb, index));
        }
        blocks.sort_unstable();
        if let Some(w) = blocks.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::RefcountBlock {
                index: w[1].1,
                offset: w[1].0 << cb,
                problem: "is also the block of another refcount table entry",
            });
        }
        let mut meta: Vec<u64> = blocks.iter().map(|b| b.0).collect();
        for (index, &e) in self.l1.iter().enumerate() {
            let offset = e & L1E_OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            let c = offset >> cb;
            let bad = |problem| Error::L2Table {
                index,
                offset,
                problem,
            };
            if self.is_fixed_metadata(c) {
                return Err(bad(
                    "overlaps the header, the L1 table or the refcount table",
                ));
            }
            if blocks.binary_search_by_key(&c, |b| b.0).is_ok() {
                return Err(bad("is also a refcount block"));
            }
            meta.push(c);
        }
        meta.sort_unstable();
        meta.dedup();
        self.meta_clusters = meta;
        Ok(())
    }

    // ---- L2 tables ----

    fn load_l2(&mut self, offset: u64) -> io::Result<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        self.check_metadata_cluster("L2 table", offset)?;
        let mut raw = vec![0u8; u64_to_usize(self.cluster_size)];
        self.file.read_exact_at(&mut raw, offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunk")))
            .collect();
        self.l2_cache.insert(offset, table, false);
        Ok(())
    }

    fn l2_table(&mut self, offset: u64) -> &mut Vec<u64> {
        &mut self
            .l2_cache
            .get_mut(offset)
            .expect("L2 table loaded before use")
            .table
    }

    fn l2_entry(&mut self, guest_cluster: u64) -> io::Result<u64> {
        let l1i = u64_to_usize(guest_cluster >> self.l2_bits);
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok(0);
        };
        let l2off = l1e & L1E_OFFSET_MASK;
        if l2off == 0 {
            return Ok(0);
        }
        let idx = u64_to_usize(guest_cluster & ((1 << self.l2_bits) - 1));
        if let Some(e) = self.l2_cache.get_mut(l2off) {
            return Ok(e.table[idx]);
        }
        self.load_l2(l2off)?;
        Ok(self.l2_table(l2off)[idx])
    }

    fn decode(&self, entry: u64) -> io::Result<Mapping> {
        if entry & OFLAG_COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let extra = (entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
            return Ok(Mapping::Compressed {
                host,
                sectors: extra + 1,
            });
        }
        let host = entry & L2E_OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size) {
            return Err(self.corrupt(format!(
                "data cluster offset {host:#x} is not cluster aligned (L2 entry {entry:#x})"
            )));
        }
        if entry & OFLAG_ZERO != 0 {
            if self.version < 3 {
                return Err(self.corrupt(format!(
                    "zero cluster flag in a v2 image (L2 entry {entry:#x})"
                )));
            }
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host,
            copied: entry & OFLAG_COPIED != 0,
        })
    }

    fn mapping(&mut self, guest_cluster: u64) -> io::Result<Mapping> {
        let e = self.l2_entry(guest_cluster)?;
        self.decode(e)
    }

    // ---- refcounts ----

    fn rc_block_offset(&self, block_index: u64) -> io::Result<Option<u64>> {
        let Some(&e) = self.rt.get(u64_to_usize(block_index)) else {
            return Ok(None);
        };
        let off = e & RT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cluster_size) {
            return Err(self.corrupt(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(Some(off))
    }

    fn load_rc(&mut self, offset: u64) -> io::Result<()> {
        if self.rc_cache.contains(offset) {
            return Ok(());
        }
        self.check_metadata_cluster("refcount block", offset)?;
        let mut raw = vec![0u8; u64_to_usize(self.cluster_size)];
        self.file.read_exact_at(&mut raw, offset)?;
        self.rc_cache.insert(offset, raw, false);
        Ok(())
    }

    fn get_refcount(&mut self, cluster: u64) -> io::Result<u64> {
        let Some(off) = self.rc_block_offset(cluster >> self.rcb_bits)? else {
            return Ok(0);
        };
        let idx = u64_to_usize(cluster & ((1 << self.rcb_bits) - 1));
        let order = self.refcount_order;
        if let Some(e) = self.rc_cache.get_mut(off) {
            return Ok(refcount::get(&e.table, order, idx));
        }
        self.load_rc(off)?;
        let block = &self
            .rc_cache
            .get_mut(off)
            .expect("refcount block loaded")
            .table;
        Ok(refcount::get(block, order, idx))
    }

    /// Adds `delta` to a cluster's refcount, creating its refcount block if needed.
    fn update_refcount(&mut self, cluster: u64, delta: i64) -> io::Result<u64> {
        self.change_refcount(cluster, delta, None)
    }

    /// Sets a cluster's refcount (creating its refcount block if needed).
    fn set_refcount(&mut self, cluster: u64, value: u64) -> io::Result<u64> {
        self.change_refcount(cluster, 1, Some(value))
    }

    fn change_refcount(&mut self, cluster: u64, delta: i64, set: Option<u64>) -> io::Result<u64> {
        if (cluster << self.cluster_bits) >> self.cluster_bits != cluster
            || cluster << self.cluster_bits >= MAX_HOST_OFFSET
        {
            return Err(self.corrupt(format!(
                "cluster index {cluster} beyond the host offset limit"
            )));
        }
        let off = if delta < 0 {
            // A cluster without a refcount block has refcount 0: nothing to drop.
            self.rc_block_offset(cluster >> self.rcb_bits)?
                .ok_or_else(|| {
                    self.corrupt(format!(
                        "refcount of free cluster {cluster} would drop below 0"
                    ))
                })?
        } else {
            self.ensure_rc_block(cluster)?
        };
        self.load_rc(off)?;
        let idx = u64_to_usize(cluster & ((1 << self.rcb_bits) - 1));
        let order = self.refcount_order;
        let entry = self.rc_cache.get_mut(off).expect("refcount block loaded");
        let old = refcount::get(&entry.table, order, idx);
        let Some(new) = set
            .or_else(|| old.checked_add_signed(delta))
            .filter(|&v| v <= refcount::max(order))
        else {
            return Err(self.corrupt(format!(
                "refcount of cluster {cluster} would go from {old} by {delta}"
            )));
        };
        refcount::set(&mut entry.table, order, idx, new);
        entry.dirty = true;
        Ok(new)
    }

    /// Returns the offset of the refcount block covering `cluster`, allocating it (and
    /// growing the refcount table) if needed. New metadata goes past the end of everything
    /// in use, laid out so that the new blocks also cover their own clusters.
    fn ensure_rc_block(&mut self, cluster: u64) -> io::Result<u64> {
        let k = cluster >> self.rcb_bits;
        if let Some(off) = self.rc_block_offset(k)? {
            return Ok(off);
        }
        let per_block = 1u64 << self.rcb_bits;
        let entries_per_cluster = self.cluster_size / 8;
        let mut e = self.end_cluster.max(cluster + 1);
        for _attempt in 0..64 {
            let mut table_clusters = 0u64;
            let mut blocks: Vec<u64> = vec![k];
            for _ in 0..16 {
                let total = table_clusters + blocks.len() as u64;
                let mut need = vec![k];
                for r in (e / per_block)..=((e + total - 1) / per_block) {
                    if r != k && self.rc_block_offset(r)?.is_none() {
                        need.push(r);
                    }
                }
                let max_r = *need.iter().max().expect("need holds k");
                let t = if max_r >= self.rt.len() as u64 {
                    (max_r + 1)
                        .max(self.rt.len() as u64 * 2)
                        .div_ceil(entries_per_cluster)
                } else {
                    0
                };
                if t.saturating_mul(self.cluster_size) > header::MAX_REFTABLE_BYTES {
                    return Err(io::Error::other(format!(
                        "{}: refcount table would exceed {} bytes (cluster {cluster})",
                        self.path.display(),
                        header::MAX_REFTABLE_BYTES
                    )));
                }
                if need == blocks && t == table_clusters {
                    break;
                }
                blocks = need;
                table_clusters = t;
            }
            let total = table_clusters + blocks.len() as u64;
            if (e + total) << self.cluster_bits >= MAX_HOST_OFFSET {
                return Err(self.corrupt("no room left for refcount blocks".into()));
            }
            if table_clusters * self.cluster_size > header::MAX_REFTABLE_BYTES {
                return Err(io::Error::other(format!(
                    "{}: refcount table would exceed {} bytes",
                    self.path.display(),
                    header::MAX_REFTABLE_BYTES
                )));
            }
            let mut busy = None;
            // Clusters past the end of the image are free whatever their refcount says.
            for x in e..(e + total).min(self.end_cluster) {
                if self.is_metadata(x) || self.get_refcount(x)? != 0 {
                    busy = Some(x);
                }
            }
            if let Some(x) = busy {
                e = x + 1;
                continue;
            }
            return self.place_refcount_metadata(k, e, table_clusters, &blocks);
        }
        Err(self.corrupt("cannot find room for a refcount block".into()))
    }

    fn place_refcount_metadata(
        &mut self,
        k: u64,
        start: u64,
        table_clusters: u64,
        blocks: &[u64],
    ) -> io::Result<u64> {
        let cb = self.cluster_bits;
        let blocks_start = start + table_clusters;
        let total = table_clusters + blocks.len() as u64;
        let new_rt_offset = start << cb;
        let old_rt = (self.rt_offset, self.rt.len() as u64 * 8);
        let old_rt_len = self.rt.len();
        let old_end = self.end_cluster;
        if table_clusters > 0 {
            // The new table's entries point at blocks that must be on disk first.
            self.write_rc_blocks_synced()?;
            self.rt
                .resize((table_clusters * self.cluster_size / 8) as usize, 0);
        }
        for (i, &r) in blocks.iter().enumerate() {
            let off = (blocks_start + i as u64) << cb;
            self.rc_cache
                .insert(off, vec![0u8; u64_to_usize(self.cluster_size)], true);
            self.rt[u64_to_usize(r)] = off;
            self.rt_dirty.insert(u64_to_usize(r));
            self.note_metadata(off >> cb);
        }
        self.end_cluster = self.end_cluster.max(start + total);
        if table_clusters == 0 {
            // Past the old end of the image: free whatever a block may claim.
            for x in start..start + total {
                self.set_refcount(x, 1)?;
            }
            return Ok(self.rt[u64_to_usize(k)]);
        }
        // blocks -> new table -> header -> old table freed. Until the header names the new
        // table, a failure puts everything back as it was (the old table on disk stays
        // the truth) and a later allocation tries again.
        let new_table = |q: &mut Qcow2| -> io::Result<()> {
            for x in start..start + total {
                q.set_refcount(x, 1)?;
            }
            q.write_rc_blocks_synced()?;
            let raw: Vec<u8> = q.rt.iter().flat_map(|e| e.to_be_bytes()).collect();
            q.pwrite_meta(&raw, new_rt_offset)?;
            q.sync()?;
            q.pwrite_meta(
                &q.rt_header(new_rt_offset, table_clusters),
                header::OFF_REFCOUNT_TABLE,
            )
        };
        if let Err(e) = new_table(self) {
            for (i, &r) in blocks.iter().enumerate() {
                let off = (blocks_start + i as u64) << cb;
                self.rc_cache.remove(off);
                if let Ok(j) = self.meta_clusters.binary_search(&(off >> cb)) {
                    self.meta_clusters.remove(j);
                }
                self.rt[u64_to_usize(r)] = 0;
                self.rt_dirty.remove(&u64_to_usize(r));
            }
            self.rt.truncate(old_rt_len);
            // Clusters the old blocks cover were set to 1: past the old end, free again.
            for x in start..start + total {
                if self
                    .rc_block_offset(x >> self.rcb_bits)
                    .ok()
                    .flatten()
                    .is_some()
                {
                    let _ = self.set_refcount(x, 0);
                }
            }
            self.end_cluster = old_end;
            return Err(e);
        }
        // The header names the new table (at least in the page cache): switch to it. If
        // the sync fails, the next write-back writes the header again.
        self.rt_offset = new_rt_offset;
        self.rt_disk_entries = self.rt.len();
        self.rt_dirty.clear();
        self.rt_header_dirty = true;
        self.sync()?;
        self.rt_header_dirty = false;
        let first = old_rt.0 >> cb;
        let count = old_rt.1.div_ceil(self.cluster_size);
        for c in first..first + count {
            self.update_refcount(c, -1)?;
        }
        self.free_hint = self.free_hint.min(first);
        Ok(self.rt[u64_to_usize(k)])
    }

    /// The header's refcount table fields (offset, clusters).
    fn rt_header(&self, offset: u64, clusters: u64) -> [u8; 12] {
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&offset.to_be_bytes());
        // At most MAX_REFTABLE_BYTES (8 MiB) of table: the count fits the u32 field.
        #[allow(clippy::cast_possible_truncation)]
        let clusters = clusters as u32;
        hdr[8..].copy_from_slice(&clusters.to_be_bytes());
        hdr
    }

    /// Allocates one cluster (refcount 0 -> 1) and returns its host offset. Scans at most
    /// `ALLOC_SCAN_LIMIT` refcounts from the hint, then takes the end of the image, where
    /// every cluster is free whatever a (hostile) refcount block says.
    fn alloc_cluster(&mut self) -> io::Result<u64> {
        let start = self.free_hint.max(1);
        let scan_end = self.end_cluster.min(start.saturating_add(ALLOC_SCAN_LIMIT));
        let mut found = None;
        for c in start..scan_end {
            if self.is_metadata(c) {
                continue;
            }
            match self.get_refcount(c) {
                Ok(0) => {
                    found = Some(c);
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    self.free_hint = c;
                    return Err(e);
                }
            }
        }
        let c = match found {
            Some(c) => {
                self.free_hint = c + 1;
                c
            }
            None => {
                let end = self.end_cluster.max(start);
                // The clusters not scanned yet wait for the next allocation.
                self.free_hint = if scan_end >= self.end_cluster {
                    end + 1
                } else {
                    scan_end
                };
                end
            }
        };
        if (c + 1) << self.cluster_bits > MAX_HOST_OFFSET {
            return Err(io::Error::other(format!(
                "{}: no free cluster below the 64 PiB host offset limit",
                self.path.display()
            )));
        }
        if c >= self.end_cluster {
            self.set_refcount(c, 1)?;
        } else {
            self.update_refcount(c, 1)?;
        }
        self.end_cluster = self.end_cluster.max(c + 1);
        Ok(c << self.cluster_bits)
    }

    /// Undoes `alloc_cluster` for a cluster nothing points at yet.
    fn unalloc_cluster(&mut self, host: u64) {
        let c = host >> self.cluster_bits;
        if self.update_refcount(c, -1).is_ok() {
            self.free_hint = self.free_hint.min(c);
        }
    }

    // ---- write-back ----

    /// Writes one dirty refcount block; it stays dirty until a sync covers it.
    fn write_rc_block(&mut self, off: u64) -> io::Result<()> {
        let entry = self.rc_cache.get_mut(off).expect("dirty block cached");
        let raw = std::mem::take(&mut entry.table);
        let res = self.pwrite_meta(&raw, off);
        self.rc_cache
            .get_mut(off)
            .expect("dirty block cached")
            .table = raw;
        res
    }

    /// Writes every dirty refcount block and makes them durable.
    fn write_rc_blocks_synced(&mut self) -> io::Result<()> {
        let mut w = Written::default();
        for off in self.rc_cache.dirty_offsets() {
            self.write_rc_block(off)?;
            w.rc.push(off);
        }
        self.sync_written(&mut w)
    }

    /// Syncs the file and marks what `w` lists clean: a table is clean only once its
    /// write is durable, so a failed write or sync leaves it dirty for the next flush.
    fn sync_written(&mut self, w: &mut Written) -> io::Result<()> {
        if w.rc.is_empty() && w.rt.is_empty() && w.l2.is_empty() && w.l1.is_empty() && !w.data {
            return Ok(());
        }
        self.sync()?;
        for off in w.rc.drain(..) {
            self.rc_cache.mark_clean(off);
        }
        for i in w.rt.drain(..) {
            self.rt_dirty.remove(&i);
        }
        for off in w.l2.drain(..) {
            self.l2_cache.mark_clean(off);
        }
        for i in w.l1.drain(..) {
            self.l1_dirty.remove(&i);
        }
        if std::mem::take(&mut w.data) {
            self.data_dirty = false;
        }
        Ok(())
    }

    /// Writes back all dirty metadata in crash-safe order and makes it and all data
    /// written so far durable; then applies deferred refcount decrements. Does not look at
    /// `broken`: this is also the best-effort write-back of a broken image.
    fn write_back(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut w = Written {
            data: self.data_dirty,
            ..Written::default()
        };
        for off in self.rc_cache.dirty_offsets() {
            self.write_rc_block(off)?;
            w.rc.push(off);
        }
        if self.rt_header_dirty {
            // The new table and its blocks were synced before the header was written.
            self.sync_written(&mut w)?;
            let clusters = (self.rt.len() as u64 * 8).div_ceil(self.cluster_size);
            self.pwrite_meta(
                &self.rt_header(self.rt_offset, clusters),
                header::OFF_REFCOUNT_TABLE,
            )?;
            self.sync()?;
            self.rt_header_dirty = false;
        }
        if !self.rt_dirty.is_empty() {
            self.sync_written(&mut w)?;
            for i in self.rt_dirty.iter().copied().collect::<Vec<_>>() {
                if i >= self.rt_disk_entries {
                    // A refcount table growth failed half way; never write past the table.
                    return Err(self.corrupt(format!(
                        "refcount table entry {i} beyond the on-disk table ({} entries) after a failed table growth",
                        self.rt_disk_entries
                    )));
                }
                let e = self.rt[i];
                self.pwrite_meta(&e.to_be_bytes(), self.rt_offset + i as u64 * 8)?;
                w.rt.push(i);
            }
        }
        let dirty_l2 = self.l2_cache.dirty_offsets();
        if !dirty_l2.is_empty() {
            self.sync_written(&mut w)?;
            for off in dirty_l2 {
                let entry = self.l2_cache.get_mut(off).expect("dirty L2 cached");
                let raw: Vec<u8> = entry.table.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.pwrite_meta(&raw, off)?;
                w.l2.push(off);
            }
        }
        if !self.l1_dirty.is_empty() {
            self.sync_written(&mut w)?;
            for i in self.l1_dirty.iter().copied().collect::<Vec<_>>() {
                let e = self.l1[i];
                self.pwrite_meta(&e.to_be_bytes(), self.l1_offset + i as u64 * 8)?;
                w.l1.push(i);
            }
        }
        self.sync_written(&mut w)?;
        // Every L2 entry that stopped pointing at these is durable now (a table is clean
        // only after its write was synced).
        for (off, len) in std::mem::take(&mut self.pending_frees) {
            let first = off >> self.cluster_bits;
            let last = (off + len - 1) >> self.cluster_bits;
            for c in first..=last {
                if self.update_refcount(c, -1)? == 0 {
                    self.free_hint = self.free_hint.min(c);
                    self.punch_hole(c << self.cluster_bits);
                }
            }
        }
        Ok(())
    }

    /// `write_back`, failing if any metadata write or sync ever failed on this image: what
    /// reached the disk before such a failure is unknown (the kernel may drop dirty pages
    /// whose writeback failed and report success to the next fdatasync), so no later flush
    /// may report success.
    fn flush_metadata(&mut self) -> io::Result<()> {
        self.write_back()?;
        // What the next allocating writes would have used is reserved again then; a VMM
        // killed later leaves no reservation behind (best effort: it changes no byte).
        if let Err(e) = self.release_preallocation() {
            log::debug!(
                "qcow2 {}: giving back reserved space: {e}",
                self.path.display()
            );
        }
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(io::Error::other(format!(
                "{}: an earlier metadata write or sync failed ({why}); data written before it may be lost; reopen the image",
                self.path.display()
            ))),
        }
    }

    fn punch_hole(&mut self, offset: u64) {
        #[cfg(test)]
        if self.crash_point().is_err() {
            return;
        }
        if inject(&self.faults, FileOp::Fallocate).is_err() {
            return;
        }
        // SAFETY: fallocate on our own fd with plain integer arguments.
        let _ = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                self.cluster_size as libc::off_t,
            )
        };
    }

    /// Keeps the caches near their capacity; called where no cache reference is held.
    fn trim_caches(&mut self) -> io::Result<()> {
        let l2_ok = self.l2_cache.evict_clean();
        let rc_ok = self.rc_cache.evict_clean();
        if !(l2_ok && rc_ok) {
            self.write_back()?;
            self.l2_cache.evict_clean();
            self.rc_cache.evict_clean();
        }
        Ok(())
    }

    // ---- reads ----

    fn read_backing(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.backing {
            Some(b) => b.read(offset, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads backing data for guest bytes `[offset, offset + n)` into `dest` at `start`;
    /// guest memory goes through a bounce buffer, a megabyte at a time.
    fn read_backing_into<D: ReadDest + ?Sized>(
        &mut self,
        offset: u64,
        dest: &mut D,
        start: usize,
        n: usize,
    ) -> io::Result<()> {
        if self.backing.is_none() {
            return dest.zero(start, n);
        }
        if let Some(buf) = dest.bytes(start, n) {
            return self.read_backing(offset, buf);
        }
        let mut bounce = std::mem::take(&mut self.bounce);
        let mut done = 0;
        let mut r = Ok(());
        while done < n && r.is_ok() {
            let k = (n - done).min(1 << 20);
            bounce.resize(k, 0);
            r = self
                .read_backing(offset + done as u64, &mut bounce[..k])
                .and_then(|()| dest.copy_in(start + done, &bounce[..k]));
            done += k;
        }
        self.bounce = bounce;
        r
    }

    fn decompress(&mut self, entry_host: u64, sectors: u64) -> io::Result<()> {
        let key = entry_host ^ (sectors << 56);
        if matches!(&self.compressed_cache, Some((k, _)) if *k == key) {
            return Ok(());
        }
        let len = sectors * 512 - (entry_host & 511);
        if entry_host.saturating_add(len) > self.file_size.saturating_add(self.cluster_size) {
            return Err(self.corrupt(format!(
                "compressed cluster at {entry_host:#x} (+{len}) beyond the end of the file"
            )));
        }
        let mut input = vec![0u8; u64_to_usize(len)];
        pread_zero_fill(&self.file, &mut input, entry_host)?;
        let mut out = vec![0u8; u64_to_usize(self.cluster_size)];
        let r = if self.compression_type == 1 {
            inflate_zstd(&input, &mut out)
        } else {
            inflate_deflate(&input, &mut out)
        };
        if let Err(why) = r {
            return Err(self.corrupt(format!(
                "compressed cluster at {entry_host:#x} does not decompress to a cluster: {why}"
            )));
        }
        self.compressed_cache = Some((key, out));
        Ok(())
    }

    /// Reads the current contents of guest bytes `[offset, offset+buf.len())`, all inside
    /// one cluster whose mapping is `m`.
    fn read_mapped(&mut self, m: Mapping, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let inoff = offset & (self.cluster_size - 1);
        match m {
            Mapping::Unallocated => self.read_backing(offset, buf),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => pread_zero_fill(&self.file, buf, host + inoff),
            Mapping::Compressed { host, sectors } => {
                self.decompress(host, sectors)?;
                let data = &self.compressed_cache.as_ref().expect("just decompressed").1;
                buf.copy_from_slice(&data[u64_to_usize(inoff)..u64_to_usize(inoff) + buf.len()]);
                Ok(())
            }
        }
    }

    fn read_inner<D: ReadDest + ?Sized>(&mut self, offset: u64, buf: &mut D) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            self.trim_caches()?;
            let off = offset + done as u64;
            let g = off >> self.cluster_bits;
            let m = self.mapping(g)?;
            let mut n = (u64_to_usize(cs - (off & (cs - 1)))).min(buf.len() - done);
            // Extend over following clusters with the same kind of contiguous mapping.
            if !matches!(m, Mapping::Compressed { .. }) {
                let mut k = 1u64;
                while done + n < buf.len() {
                    let next = self.mapping(g + k)?;
                    let contiguous = match (m, next) {
                        (Mapping::Unallocated, Mapping::Unallocated) => true,
                        (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                        (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. }) => {
                            b == a + k * cs
                        }
                        _ => false,
                    };
                    if !contiguous {
                        break;
                    }
                    n += (u64_to_usize(cs)).min(buf.len() - done - n);
                    k += 1;
                }
            }
            let inoff = off & (cs - 1);
            match m {
                Mapping::Compressed { host, sectors } => {
                    self.decompress(host, sectors)?;
                    let data = &self.compressed_cache.as_ref().expect("just decompressed").1;
                    buf.copy_in(done, &data[u64_to_usize(inoff)..u64_to_usize(inoff) + n])?;
                }
                Mapping::Unallocated => self.read_backing_into(off, buf, done, n)?,
                Mapping::Zero { .. } => buf.zero(done, n)?,
                Mapping::Data { host, .. } => buf.read_file(&self.file, host + inoff, done, n)?,
            }
            done += n;
        }
        Ok(())
    }

    // ---- writes ----

    /// Makes sure the L2 table for `guest_cluster` exists and is ours to modify; returns
    /// its offset.
    fn l2_for_write(&mut self, guest_cluster: u64) -> io::Result<u64> {
        let l1i = u64_to_usize(guest_cluster >> self.l2_bits);
        let Some(&l1e) = self.l1.get(l1i) else {
            return Err(self.corrupt(format!("L1 index {l1i} beyond the L1 table")));
        };
        let off = l1e & L1E_OFFSET_MASK;
        if off == 0 {
            let t = self.alloc_cluster()?;
            self.note_metadata(t >> self.cluster_bits);
            self.l2_cache.insert(t, vec![0u64; 1 << self.l2_bits], true);
            self.l1[l1i] = t | OFLAG_COPIED;
            self.l1_dirty.insert(l1i);
            return Ok(t);
        }
        if l1e & OFLAG_COPIED == 0 {
            let rc = self.get_refcount(off >> self.cluster_bits)?;
            if rc != 1 {
                return Err(self.corrupt(format!(
                    "L2 table at {off:#x} is shared (refcount {rc}); writing to it is not supported"
                )));
            }
            self.l1[l1i] |= OFLAG_COPIED;
            self.l1_dirty.insert(l1i);
        }
        self.load_l2(off)?;
        Ok(off)
    }

    fn set_l2_entry(&mut self, guest_cluster: u64, entry: u64) -> io::Result<()> {
        let l2off = self.l2_for_write(guest_cluster)?;
        let idx = u64_to_usize(guest_cluster & ((1 << self.l2_bits) - 1));
        let e = self.l2_cache.get_mut(l2off).expect("L2 table loaded");
        e.table[idx] = entry;
        e.dirty = true;
        Ok(())
    }

    /// Refuses to drop the refcount of metadata a (hostile) L2 entry points at: freed, it
    /// would be handed out as a data cluster.
    fn check_freeable(&self, m: Mapping) -> io::Result<()> {
        let (host, len) = match m {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                (host, self.cluster_size)
            }
            Mapping::Compressed { host, sectors } => (host & !511, sectors * 512),
            Mapping::Unallocated | Mapping::Zero { host: None } => return Ok(()),
        };
        let first = host >> self.cluster_bits;
        let last = host.saturating_add(len - 1) >> self.cluster_bits;
        if (first..=last.min(first + 2)).any(|c| self.is_metadata(c)) {
            return Err(self.corrupt(format!(
                "an L2 entry points at metadata ({host:#x}, {len} bytes)"
            )));
        }
        Ok(())
    }

    /// Defers the refcount drop of what `m` pointed to until the new L2 entry is durable.
    fn free_later(&mut self, m: Mapping) {
        match m {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                self.pending_frees.push((host, self.cluster_size))
            }
            Mapping::Compressed { host, sectors } => {
                self.pending_frees.push((host & !511, sectors * 512))
            }
            Mapping::Unallocated | Mapping::Zero { host: None } => {}
        }
    }

    fn flush_run<S: WriteSrc + ?Sized>(
        &mut self,
        run: &mut Option<WriteRun>,
        buf: &S,
    ) -> io::Result<()> {
        let Some(r) = run.take() else {
            return Ok(());
        };
        let mut res = self.pwrite_from(buf, r.start, r.end - r.start, r.host);
        self.data_dirty = true;
        // The new clusters' L2 entries change only once their data is written; a failed
        // write leaves the old mapping and frees the new clusters.
        for (g, new, old) in r.allocs {
            if res.is_ok() {
                res = self.set_l2_entry(g, new | OFLAG_COPIED);
                if res.is_ok() {
                    self.free_later(old);
                    continue;
                }
            }
            self.unalloc_cluster(new);
        }
        res
    }

    fn write_inner<S: WriteSrc + ?Sized>(&mut self, offset: u64, buf: &S) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        let mut run: Option<WriteRun> = None;
        while done < buf.len() {
            if self.l2_cache.over_capacity() || self.rc_cache.over_capacity() {
                self.flush_run(&mut run, buf)?;
                self.trim_caches()?;
            }
            let off = offset + done as u64;
            let g = off >> self.cluster_bits;
            let inoff = off & (cs - 1);
            let n = (u64_to_usize(cs - inoff)).min(buf.len() - done);
            let m = self.mapping(g)?;
            let (host, alloc) = match m {
                Mapping::Data { host, copied: true } => {
                    if self.is_metadata(host >> self.cluster_bits) || host >= self.file_size {
                        return Err(self.corrupt(format!(
                            "data cluster {host:#x} overlaps metadata or lies past the end of the file"
                        )));
                    }
                    (host + inoff, None)
                }
                _ if n as u64 == cs => {
                    self.check_freeable(m)?;
                    // The L2 table exists before the data is written.
                    self.l2_for_write(g)?;
                    let new = self.alloc_cluster()?;
                    (new, Some((g, new, m)))
                }
                _ => {
                    // Partial cluster: copy the rest from what is there now.
                    self.flush_run(&mut run, buf)?;
                    self.check_freeable(m)?;
                    self.l2_for_write(g)?;
                    let mut scratch = std::mem::take(&mut self.scratch);
                    let cluster = scratch.as_mut_slice();
                    let r = self
                        .read_mapped(m, g << self.cluster_bits, cluster)
                        .and_then(|()| {
                            buf.copy_out(
                                done,
                                &mut cluster[u64_to_usize(inoff)..u64_to_usize(inoff) + n],
                            )
                        });
                    let r = r.and_then(|()| {
                        let new = self.alloc_cluster()?;
                        self.data_dirty = true;
                        match self.pwrite_from(cluster, 0, cluster.len(), new) {
                            Ok(()) => Ok(new),
                            Err(e) => {
                                self.unalloc_cluster(new);
                                Err(e)
                            }
                        }
                    });
                    self.scratch = scratch;
                    let new = r?;
                    if let Err(e) = self.set_l2_entry(g, new | OFLAG_COPIED) {
                        self.unalloc_cluster(new);
                        return Err(e);
                    }
                    self.free_later(m);
                    done += n;
                    continue;
                }
            };
            match &mut run {
                Some(r) if r.host + (r.end - r.start) as u64 == host && r.end == done => {
                    r.end += n;
                    r.allocs.extend(alloc);
                }
                _ => {
                    if let Err(e) = self.flush_run(&mut run, buf) {
                        if let Some((_, new, _)) = alloc {
                            self.unalloc_cluster(new);
                        }
                        return Err(e);
                    }
                    run = Some(WriteRun {
                        host,
                        start: done,
                        end: done + n,
                        allocs: alloc.into_iter().collect(),
                    });
                }
            }
            done += n;
        }
        self.flush_run(&mut run, buf)?;
        if self.compressed_cache.is_some() {
            // A compressed cluster may have been freed and its space reused.
            self.compressed_cache = None;
        }
        Ok(())
    }

    /// Drops whole clusters in `[offset, offset+len)`: `zero` makes them read as zeros,
    /// otherwise they may read as anything they read before or zeros.
    fn deallocate(&mut self, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        let cs = self.cluster_size;
        let has_backing = self.backing.is_some();
        let mut off = offset;
        let end = offset + len;
        while off < end {
            self.trim_caches()?;
            let inoff = off & (cs - 1);
            let n = (cs - inoff).min(end - off);
            let g = off >> self.cluster_bits;
            let m = self.mapping(g)?;
            let reads_zero = match m {
                Mapping::Zero { host: None } => true,
                Mapping::Unallocated => !has_backing,
                _ => false,
            };
            if n < cs {
                if zero && !reads_zero {
                    let zeros = vec![0u8; u64_to_usize(n)];
                    self.write_inner(off, &zeros[..])?;
                }
            } else if zero {
                if reads_zero {
                } else if !has_backing {
                    self.check_freeable(m)?;
                    self.set_l2_entry(g, 0)?;
                    self.free_later(m);
                } else if self.version >= 3 {
                    self.check_freeable(m)?;
                    self.set_l2_entry(g, OFLAG_ZERO)?;
                    self.free_later(m);
                } else {
                    let zeros = vec![0u8; u64_to_usize(n)];
                    self.write_inner(off, &zeros[..])?;
                }
            } else if !reads_zero {
                // Discard of a whole cluster: v3 makes it read zeros (a zero cluster hides
                // the backing file); v2 with a backing file keeps the old contents.
                if !has_backing {
                    self.check_freeable(m)?;
                    self.set_l2_entry(g, 0)?;
                    self.free_later(m);
                } else if self.version >= 3 {
                    self.check_freeable(m)?;
                    self.set_l2_entry(g, OFLAG_ZERO)?;
                    self.free_later(m);
                }
            }
            off += n;
        }
        Ok(())
    }
}

impl DiskBackend for Qcow2 {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_inner(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_inner(offset, buf)
    }

    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.read_inner(offset, &mut Guest::new(bufs)?)
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.write_inner(offset, &Guest::new(bufs)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_metadata()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.deallocate(offset, len, false)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.deallocate(offset, len, true)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn set_faults(&mut self, faults: Option<Faults>) {
        self.faults = faults;
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crash_after == Some(0) {
            return;
        }
        // The second pass writes the refcount drops the first one applied. A broken image
        // is written back too: its metadata is then as consistent as the disk allows.
        for _ in 0..2 {
            if let Err(e) = self.write_back() {
                log::error!(
                    "qcow2 {}: flushing metadata on close: {e}",
                    self.path.display()
                );
                break;
            }
        }
        if let Some(why) = &self.broken {
            log::error!(
                "qcow2 {}: closed after a failed metadata write or sync ({why}); data written before it may be lost",
                self.path.display()
            );
        }
        if let Err(e) = self.release_preallocation() {
            log::warn!(
                "qcow2 {}: giving back reserved space on close: {e}",
                self.path.display()
            );
        }
    }
}
