//! `wisp image info`: what a user needs to know before opening an image, images that wisp
//! refuses included (they are described, with the reason, not failed on).

use super::header::{
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_END,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAGIC, V2_HEADER_LEN,
};
use super::{open_image_file, probe_format, BackingPolicy, Error, Format, Qcow2};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What `wisp image info` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (st_blocks * 512).
    pub allocated_bytes: u64,
    /// The backing files, nearest first, with the path as resolved and the format used
    /// (empty when the image cannot be opened).
    pub backing_chain: Vec<(PathBuf, Format)>,
    /// The qcow2 header's facts (none for raw files).
    pub qcow2: Option<Qcow2Facts>,
    /// How wisp would open the image.
    pub open: OpenVerdict,
}

/// How wisp would open an image (before the disk's backing-file options are applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenVerdict {
    ReadWrite,
    /// Read-only only, and why.
    ReadOnly(String),
    /// Not at all, and why.
    Refused(String),
}

/// qcow2 header fields, read without judging them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Facts {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub refcount_order: u32,
    pub dirty: bool,
    pub corrupt: bool,
    pub lazy_refcounts: bool,
    pub snapshots: u32,
    /// Persistent dirty bitmaps (the bitmaps extension's count; 0 without it).
    pub bitmaps: u32,
    /// The autoclear bit that says the bitmaps are valid.
    pub bitmaps_valid: bool,
    /// 0: deflate, 1: zstd.
    pub compression_type: u8,
    pub backing_name: Option<String>,
    pub backing_format: Option<String>,
}

impl Qcow2Facts {
    /// qemu-img's name for the version ("compat").
    pub fn compat(&self) -> String {
        match self.version {
            2 => "0.10".into(),
            3 => "1.1".into(),
            v => format!("unknown (version {v})"),
        }
    }

    pub fn refcount_bits(&self) -> Option<u64> {
        1u64.checked_shl(self.refcount_order)
    }

    pub fn cluster_size(&self) -> Option<u64> {
        1u64.checked_shl(self.cluster_bits)
    }

    /// Reads the facts of a header (`buf`: the start of the file) with every field bounds
    /// checked and none judged; `None` if it is not a qcow2 header at all.
    pub fn read(buf: &[u8]) -> Option<Qcow2Facts> {
        let be32 = |off: usize| {
            buf.get(off..off + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        };
        let be64 = |off: usize| {
            buf.get(off..off + 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        };
        if be32(0)? != MAGIC || buf.len() < V2_HEADER_LEN as usize {
            return None;
        }
        let version = be32(4)?;
        let v3 = version >= 3;
        let incompatible = if v3 { be64(72).unwrap_or(0) } else { 0 };
        let compatible = if v3 { be64(80).unwrap_or(0) } else { 0 };
        let autoclear = if v3 { be64(88).unwrap_or(0) } else { 0 };
        let refcount_order = if v3 { be32(96).unwrap_or(4) } else { 4 };
        let header_length = if v3 {
            be32(100).unwrap_or(104) as usize
        } else {
            V2_HEADER_LEN as usize
        };
        let compression_type = if v3 && header_length > 104 {
            buf.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        let cluster_bits = be32(20)?;
        let first_cluster = 1usize
            .checked_shl(cluster_bits)
            .map_or(buf.len(), |c| c.min(buf.len()));
        let backing_offset = be64(8)?;
        let backing_len = be32(16)?;
        let backing_name = usize::try_from(backing_offset)
            .ok()
            .filter(|&o| o != 0)
            .and_then(|o| buf.get(o..o.checked_add(backing_len as usize)?))
            .map(|b| String::from_utf8_lossy(b).into_owned());
        // Extensions: 8-byte aligned records from the header's end to the backing name.
        let ext_end = match usize::try_from(backing_offset) {
            Ok(o) if o != 0 => o.min(first_cluster),
            _ => first_cluster,
        };
        let (mut bitmaps, mut backing_format) = (0, None);
        let mut pos = header_length;
        while let (Some(ty), Some(len)) = (be32(pos), be32(pos + 4)) {
            let start = pos + 8;
            let Some(end) = start.checked_add(len as usize).filter(|&e| e <= ext_end) else {
                break;
            };
            match ty {
                EXT_END => break,
                EXT_BITMAPS => bitmaps = be32(start).unwrap_or(0),
                EXT_BACKING_FORMAT => {
                    backing_format = Some(String::from_utf8_lossy(&buf[start..end]).into_owned())
                }
                _ => {}
            }
            pos = end.div_ceil(8) * 8;
        }
        Some(Qcow2Facts {
            version,
            cluster_bits,
            virtual_size: be64(24)?,
            refcount_order,
            dirty: incompatible & INCOMPAT_DIRTY != 0,
            corrupt: incompatible & INCOMPAT_CORRUPT != 0,
            lazy_refcounts: compatible & COMPAT_LAZY_REFCOUNTS != 0,
            snapshots: be32(60)?,
            bitmaps,
            bitmaps_valid: autoclear & AUTOCLEAR_BITMAPS != 0,
            compression_type,
            backing_name,
            backing_format,
        })
    }
}

/// Describes an image file (raw or qcow2, probed: the user asks about a file of their own).
/// Fails only when the file cannot be read; a qcow2 image wisp would refuse is described,
/// with the reason. The backing chain is followed as far as it opens (regular files and
/// block devices, read-only), to show where it really leads.
pub fn info(path: &Path) -> Result<ImageInfo, Error> {
    let (file, len) = open_image_file(path, false, true).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    let io_err = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    let format = probe_format(&file).map_err(io_err)?;
    let allocated_bytes = meta.blocks() * 512;
    if format == Format::Raw {
        return Ok(ImageInfo {
            format,
            virtual_size: len,
            allocated_bytes,
            backing_chain: Vec::new(),
            qcow2: None,
            open: OpenVerdict::ReadWrite,
        });
    }
    let mut first = vec![0u8; len.min(2 << 20) as usize];
    file.read_exact_at(&mut first, 0).map_err(io_err)?;
    let facts = Qcow2Facts::read(&first);
    let follow = BackingPolicy {
        enabled: true,
        beneath: None,
        block_devices: true,
    };
    let (virtual_size, backing_chain, open) = match Qcow2::open_with(path, true, &follow) {
        Ok(q) => {
            let open = if facts.as_ref().is_some_and(|f| f.dirty || f.snapshots != 0) {
                let why = if facts.as_ref().is_some_and(|f| f.dirty) {
                    Error::Dirty
                } else {
                    Error::Snapshots {
                        count: facts.as_ref().map_or(0, |f| f.snapshots),
                    }
                };
                OpenVerdict::ReadOnly(why.to_string())
            } else {
                OpenVerdict::ReadWrite
            };
            (q.size, q.chain.clone(), open)
        }
        Err(e) => (
            facts.as_ref().map_or(0, |f| f.virtual_size),
            Vec::new(),
            OpenVerdict::Refused(e.to_string()),
        ),
    };
    Ok(ImageInfo {
        format,
        virtual_size,
        allocated_bytes,
        backing_chain,
        qcow2: facts,
        open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::TempDir;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        match Command::new("qemu-img").args(args).output() {
            Ok(o) if o.status.success() => true,
            Ok(o) => panic!("qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(_) => {
                eprintln!("SKIPPED: qemu-img not found (apt-get install qemu-utils)");
                false
            }
        }
    }

    fn create(dir: &TempDir, name: &str, opts: &str) -> Option<PathBuf> {
        let p = dir.path().join(name);
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-f", "qcow2", "-o", opts, ps, "1M"]).then_some(p)
    }

    #[test]
    fn info_tells_the_features_a_user_needs_before_opening() {
        let dir = TempDir::new();
        let Some(old) = create(&dir, "old.qcow2", "compat=0.10,cluster_size=4096") else {
            return;
        };
        let i = info(&old).unwrap();
        let f = i.qcow2.clone().unwrap();
        assert_eq!(
            (f.compat(), f.cluster_size(), f.refcount_bits()),
            ("0.10".into(), Some(4096), Some(16))
        );
        assert_eq!(i.open, OpenVerdict::ReadWrite);

        let snap = create(&dir, "snap.qcow2", "refcount_bits=1,lazy_refcounts=on").unwrap();
        let sp = snap.to_str().unwrap();
        qemu_img(&["snapshot", "-c", "s1", sp]);
        qemu_img(&["bitmap", "--add", sp, "b0"]);
        qemu_img(&["bitmap", "--add", sp, "b1"]);
        let i = info(&snap).unwrap();
        let f = i.qcow2.clone().unwrap();
        assert_eq!((f.compat(), f.refcount_bits()), ("1.1".into(), Some(1)));
        assert!(f.lazy_refcounts && !f.dirty && !f.corrupt);
        assert_eq!((f.snapshots, f.bitmaps, f.bitmaps_valid), (1, 2, true));
        let OpenVerdict::ReadOnly(why) = &i.open else {
            panic!("{:?}", i.open)
        };
        assert!(why.contains("internal snapshots (1)"), "{why}");
    }

    #[test]
    fn info_describes_images_wisp_refuses_instead_of_failing() {
        let dir = TempDir::new();
        let Some(ext) = create(&dir, "ext.qcow2", "extended_l2=on") else {
            return;
        };
        let data = dir.path().join("data.raw");
        let data_opt = format!("data_file={}", data.display());
        let external = create(&dir, "external.qcow2", &data_opt).unwrap();
        for (img, why) in [(&ext, "extended L2"), (&external, "external data file")] {
            let i = info(img).unwrap();
            assert_eq!(i.format, Format::Qcow2);
            assert_eq!(i.virtual_size, 1 << 20);
            assert_eq!(i.qcow2.as_ref().unwrap().version, 3);
            match &i.open {
                OpenVerdict::Refused(r) => assert!(r.contains(why), "{r}"),
                v => panic!("{v:?}"),
            }
        }
    }

    #[test]
    fn facts_of_a_hostile_header_are_read_without_panicking() {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // backing name offset
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        h[20..24].copy_from_slice(&200u32.to_be_bytes()); // cluster_bits
        h[96..100].copy_from_slice(&99u32.to_be_bytes()); // refcount_order
        h[100..104].copy_from_slice(&u32::MAX.to_be_bytes()); // header_length
        let f = Qcow2Facts::read(&h).unwrap();
        assert_eq!(
            (f.cluster_size(), f.refcount_bits(), f.backing_name),
            (None, None, None)
        );
        for n in 0..h.len() {
            let _ = Qcow2Facts::read(&h[..n]);
        }
    }
}
