//! The qcow2 header and its extensions (QEMU docs/interop/qcow2.txt, "Header").

use super::Error;
use crate::cast::u64_to_usize;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE); larger tables are refused.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Header offsets of fields that are rewritten in place.
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_AUTOCLEAR: u64 = 88;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// A parsed, validated header. Every offset in it has been checked against the file size.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    /// 0: deflate, 1: zstd.
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

/// Checks that a table `[offset, offset+len)` is cluster aligned, lies inside the file
/// and does not overlap the header cluster.
fn check_table(
    table: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_size: u64,
) -> Result<(), Error> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(Error::Misaligned { table, offset });
    }
    if offset == 0 && len > 0 {
        return Err(Error::OverlapsHeader { table, offset });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(Error::TableOutsideFile {
            table,
            offset,
            len,
            file_size,
        }),
    }
}

impl Header {
    /// Parses the first cluster of an image (`buf` holds at most one cluster; shorter if the
    /// file is shorter). `file_size` is the image file's length.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header, Error> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::TruncatedHeader { len: file_size });
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic { magic });
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion { version });
        }
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::ClusterBits { cluster_bits });
        }
        let cluster_size = 1u64 << cluster_bits;
        // Extensions and the backing file name live in the first cluster.
        let buf = &buf[..buf.len().min(u64_to_usize(cluster_size))];
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return Err(Error::Encrypted {
                method: crypt_method,
            });
        }
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);

        let (incompatible, autoclear, refcount_order, header_length, compression_type) =
            if version == 3 {
                if buf.len() < V3_HEADER_LEN as usize {
                    return Err(Error::TruncatedHeader { len: file_size });
                }
                let header_length = be32(buf, 100);
                if header_length < V3_HEADER_LEN
                    || header_length as usize > buf.len()
                    || u64::from(header_length) > cluster_size
                {
                    return Err(Error::HeaderLength { header_length });
                }
                let compression_type = if header_length > 104 { buf[104] } else { 0 };
                (
                    be64(buf, 72),
                    be64(buf, 88),
                    be32(buf, 96),
                    header_length,
                    compression_type,
                )
            } else {
                (0, 0, 4, V2_HEADER_LEN, 0)
            };
        if refcount_order > 6 {
            return Err(Error::RefcountOrder { refcount_order });
        }

        // Header extensions: from the end of the header to the end of the first cluster.
        let mut feature_names: Vec<(u8, u8, String)> = Vec::new();
        let mut backing_format = None;
        let mut has_crypto = false;
        let mut has_data_file = false;
        let mut pos = header_length as usize;
        let ext_end = if backing_file_offset > 0 {
            u64_to_usize(backing_file_offset.min(buf.len() as u64))
        } else {
            buf.len()
        };
        loop {
            if pos + 8 > ext_end {
                // v2 images from old tools may end the header without an end marker.
                break;
            }
            let ty = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            pos += 8;
            if ty == EXT_END {
                break;
            }
            let end = pos.checked_add(len).filter(|&e| e <= ext_end).ok_or(
                Error::BadHeaderExtension {
                    ext_type: ty,
                    len: len as u64,
                },
            )?;
            let data = &buf[pos..end];
            match ty {
                EXT_BACKING_FORMAT => {
                    backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_NAMES => {
                    for entry in data.chunks_exact(48) {
                        let name_end = entry[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&entry[2..2 + name_end]).into_owned();
                        feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_CRYPTO => has_crypto = true,
                EXT_DATA_FILE => has_data_file = true,
                _ => {}
            }
            // Extension data is padded to a multiple of 8 bytes.
            pos = end.div_ceil(8) * 8;
        }

        // Incompatible features, most specific reason first.
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::CorruptBit);
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 || has_data_file {
            return Err(Error::ExternalDataFile);
        }
        if has_crypto {
            return Err(Error::Encrypted { method: 0 });
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::ExtendedL2);
        }
        if (incompatible & INCOMPAT_COMPRESSION != 0) != (compression_type != 0) {
            return Err(Error::CompressionTypeMismatch { compression_type });
        }
        if compression_type > 1 {
            return Err(Error::CompressionType { compression_type });
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = incompatible & !known;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = feature_names
                .iter()
                .find(|(ty, b, _)| *ty == 0 && u32::from(*b) == bit)
                .map(|(_, _, n)| n.clone())
                .unwrap_or_else(|| "unnamed".to_string());
            return Err(Error::UnknownIncompatibleFeature { bit, name });
        }

        // Backing file name.
        let backing_file = if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > 1023 {
                return Err(Error::BadBackingName {
                    offset: backing_file_offset,
                    len: backing_file_size,
                });
            }
            let end = backing_file_offset
                .checked_add(u64::from(backing_file_size))
                .filter(|&e| e <= buf.len() as u64)
                .ok_or(Error::BadBackingName {
                    offset: backing_file_offset,
                    len: backing_file_size,
                })?;
            let name = &buf[u64_to_usize(backing_file_offset)..u64_to_usize(end)];
            Some(String::from_utf8_lossy(name).into_owned())
        } else {
            None
        };

        // Tables.
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::TooLarge {
                what: "L1 table",
                value: l1_bytes,
            });
        }
        check_table(
            "L1 table",
            l1_table_offset,
            l1_bytes,
            cluster_size,
            file_size,
        )?;
        let rt_bytes = u64::from(refcount_table_clusters) << cluster_bits;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge {
                what: "refcount table",
                value: rt_bytes,
            });
        }
        if refcount_table_clusters == 0 {
            return Err(Error::TooLarge {
                what: "refcount table (empty)",
                value: 0,
            });
        }
        check_table(
            "refcount table",
            refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_size,
        )?;
        // Each L1 entry maps cluster_size * (cluster_size / 8) bytes.
        let l2_bits = cluster_bits - 3;
        let bytes_per_l1 = 1u64 << (cluster_bits + l2_bits);
        let needed = size.div_ceil(bytes_per_l1);
        if size > (1u64 << 62) {
            return Err(Error::TooLarge {
                what: "virtual size",
                value: size,
            });
        }
        if u64::from(l1_size) < needed {
            return Err(Error::L1TooSmall {
                l1_size,
                needed,
                size,
            });
        }

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            autoclear,
            refcount_order,
            compression_type,
            backing_file,
            backing_format,
        })
    }
}

/// Builds the first cluster of a new v3 image (header, backing format extension, end
/// marker, backing file name).
#[allow(clippy::too_many_arguments)]
pub fn build(
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    backing: Option<(&str, &str)>,
) -> Option<Vec<u8>> {
    let cluster_size = 1usize << cluster_bits;
    let mut h = vec![0u8; 112];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&l1_size.to_be_bytes());
    h[40..48].copy_from_slice(&l1_table_offset.to_be_bytes());
    h[48..56].copy_from_slice(&refcount_table_offset.to_be_bytes());
    h[56..60].copy_from_slice(&refcount_table_clusters.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    if let Some((_, fmt)) = backing {
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&u32::try_from(fmt.len()).ok()?.to_be_bytes());
        h.extend_from_slice(fmt.as_bytes());
        h.resize(h.len().div_ceil(8) * 8, 0);
    }
    h.extend_from_slice(&[0u8; 8]); // end of extensions
    if let Some((name, _)) = backing {
        let off = h.len() as u64;
        h[8..16].copy_from_slice(&off.to_be_bytes());
        h[16..20].copy_from_slice(&u32::try_from(name.len()).ok()?.to_be_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    if h.len() > cluster_size {
        return None;
    }
    h.resize(cluster_size, 0);
    Some(h)
}
