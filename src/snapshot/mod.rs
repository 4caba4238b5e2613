//! Snapshot files: a paused VM's state (KVM's, the devices', the config) in one versioned,
//! checksummed file beside a memory file of the guest's RAM. This module reads and writes the
//! state file; `crate::vmm` takes a snapshot and `crate::builder` restores one.
//!
//! The file: `WISPSNAP`, the format version (u32), the wisp version that wrote it (a
//! length-prefixed string), the body's length (u64), the body, then CRC-64/Jones (as
//! Firecracker's snapshots) of everything before it. The body: the `VmConfig` and the devices'
//! state as JSON, then the VM's and each vCPU's KVM state in `codec`'s encoding. A file that is
//! truncated, altered, of another format or wisp version, or inconsistent with itself is
//! refused with one line, before anything is built from it.

pub mod codec;
pub mod devices;
pub mod persist;

use crate::config::VmConfig;
use crate::vstate::state::{VcpuState, VmState};
use codec::{DecodeError, Reader, Writer};
pub use devices::DevicesState;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"WISPSNAP";
/// Bumped whenever the body's layout changes.
pub const FORMAT_VERSION: u32 = 1;
/// The wisp that writes and reads snapshots: device models change between versions, so a
/// snapshot is restored only by the version that took it.
pub const WISP_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest state file read. Guest RAM is in the memory file; the state of 32 vCPUs is
/// about 250 KiB.
pub const MAX_FILE_SIZE: u64 = 16 << 20;
const MAX_VERSION_LEN: usize = 64;
const MAX_JSON_LEN: usize = 1 << 20;
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
const MAX_MSRS: usize = 4096;
/// Magic, format version, the version's length, the body's length; the CRC after the body.
const FIXED_HEADER: usize = 8 + 4 + 4 + 8;
const CRC_LEN: usize = 8;
/// Where the wisp version's bytes start.
const VERSION_AT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot file {}: {}", path.display(), crate::config::io_reason(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {}: {size} bytes is more than the {MAX_FILE_SIZE} a snapshot has", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("snapshot file {}: not a wisp snapshot (no WISPSNAP magic)", path.display())]
    NotASnapshot { path: PathBuf },
    #[error("snapshot file {}: truncated ({size} bytes, {needed} expected)", path.display())]
    Truncated {
        path: PathBuf,
        size: usize,
        needed: usize,
    },
    #[error(
        "snapshot file {}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): \
         the file is damaged", path.display()
    )]
    Checksum {
        path: PathBuf,
        stored: u64,
        computed: u64,
    },
    #[error(
        "snapshot file {}: format version {found}, this wisp reads version {FORMAT_VERSION}",
        path.display()
    )]
    FormatVersion { path: PathBuf, found: u32 },
    #[error(
        "snapshot file {}: taken by wisp {found:?}; this is wisp {WISP_VERSION}, which restores \
         only its own snapshots", path.display()
    )]
    WispVersion { path: PathBuf, found: String },
    #[error("snapshot file {}: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
}

/// Everything of a paused VM but its RAM.
pub struct Snapshot {
    pub config: VmConfig,
    pub devices: DevicesState,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
}

impl Snapshot {
    /// The whole file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Writer::default();
        body.bytes(
            &serde_json::to_vec(&self.config).expect("a VmConfig always serializes to JSON"),
        );
        body.bytes(
            &serde_json::to_vec(&self.devices).expect("device state always serializes to JSON"),
        );
        body.pod(&self.vm.pic_master);
        body.pod(&self.vm.pic_slave);
        body.pod(&self.vm.ioapic);
        body.pod(&self.vm.pit);
        body.pod(&self.vm.clock);
        body.len(self.vcpus.len());
        for v in &self.vcpus {
            body.len(v.cpuid.len());
            for e in &v.cpuid {
                body.pod(e);
            }
            body.pod(&v.mp_state);
            body.pod(&v.regs);
            body.pod(&v.sregs);
            body.pod(&*v.xsave);
            body.pod(&v.xcrs);
            body.pod(&v.debugregs);
            body.pod(&v.lapic);
            body.len(v.msrs.len());
            for e in &v.msrs {
                body.pod(e);
            }
            body.pod(&v.events);
            body.option_u32(v.tsc_khz);
        }
        let body = body.into_bytes();
        let mut out = Vec::with_capacity(FIXED_HEADER + WISP_VERSION.len() + body.len() + 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let version_len =
            u32::try_from(WISP_VERSION.len()).expect("wisp's version string is a few bytes");
        out.extend_from_slice(&version_len.to_le_bytes());
        out.extend_from_slice(WISP_VERSION.as_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc64::crc64(0, &out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a whole file (`path` only names it in errors). Checks, in order: magic, length,
    /// checksum, format version, wisp version, then the body.
    pub fn decode(path: &Path, file: &[u8]) -> Result<Self, SnapshotError> {
        let path = path.to_path_buf();
        if file.len() < MAGIC.len() || file[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::NotASnapshot { path });
        }
        let truncated = |needed: usize| SnapshotError::Truncated {
            path: path.clone(),
            size: file.len(),
            needed,
        };
        let le32 =
            |at: usize| u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
        if file.len() < VERSION_AT {
            return Err(truncated(FIXED_HEADER + CRC_LEN));
        }
        let version_len = le32(VERSION_AT - 4) as usize;
        if version_len > MAX_VERSION_LEN {
            return Err(SnapshotError::Malformed {
                path,
                source: DecodeError {
                    what: format!("a wisp version of {version_len} bytes"),
                    at: 12,
                },
            });
        }
        let body_at = FIXED_HEADER + version_len;
        if file.len() < body_at {
            return Err(truncated(body_at + CRC_LEN));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&file[body_at - 8..body_at]);
        let body_len = u64::from_le_bytes(len);
        let needed = usize::try_from(body_len)
            .ok()
            .and_then(|n| n.checked_add(body_at + CRC_LEN))
            .filter(|&n| n as u64 <= MAX_FILE_SIZE)
            .ok_or_else(|| SnapshotError::Malformed {
                path: path.clone(),
                source: DecodeError {
                    what: format!("a body of {body_len} bytes"),
                    at: body_at - 8,
                },
            })?;
        if file.len() < needed {
            return Err(truncated(needed));
        }
        if file.len() > needed {
            return Err(SnapshotError::Malformed {
                path,
                source: DecodeError {
                    what: format!("{} bytes after the checksum", file.len() - needed),
                    at: needed,
                },
            });
        }
        let crc_at = needed - CRC_LEN;
        let mut stored = [0u8; 8];
        stored.copy_from_slice(&file[crc_at..]);
        let stored = u64::from_le_bytes(stored);
        let computed = crc64::crc64(0, &file[..crc_at]);
        if stored != computed {
            return Err(SnapshotError::Checksum {
                path,
                stored,
                computed,
            });
        }
        let found = le32(8);
        if found != FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion { path, found });
        }
        let version = &file[VERSION_AT..body_at - 8];
        if version != WISP_VERSION.as_bytes() {
            return Err(SnapshotError::WispVersion {
                path,
                found: String::from_utf8_lossy(version).into_owned(),
            });
        }
        Self::decode_body(&file[body_at..crc_at])
            .map_err(|source| SnapshotError::Malformed { path, source })
    }

    fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let json = r.bytes(MAX_JSON_LEN, "config")?;
        let config: VmConfig =
            serde_json::from_slice(json).map_err(|e| r.error(format!("config: {e}")))?;
        let json = r.bytes(MAX_JSON_LEN, "device state")?;
        let devices: DevicesState =
            serde_json::from_slice(json).map_err(|e| r.error(format!("device state: {e}")))?;
        let vm = VmState {
            pic_master: r.pod("PIC master")?,
            pic_slave: r.pod("PIC slave")?,
            ioapic: r.pod("IOAPIC")?,
            pit: r.pod("PIT")?,
            clock: r.pod("clock")?,
        };
        let count = r.count(crate::config::MAX_VCPUS.into(), "vCPU count")?;
        if count != usize::from(config.cpus) {
            return Err(r.error(format!(
                "{count} vCPU states for a VM of {} vCPUs",
                config.cpus
            )));
        }
        let mut vcpus = Vec::with_capacity(count);
        for _ in 0..count {
            let n = r.count(MAX_CPUID_ENTRIES, "CPUID entries")?;
            let cpuid = (0..n)
                .map(|_| r.pod("CPUID entry"))
                .collect::<Result<_, _>>()?;
            let mp_state = r.pod("MP state")?;
            let regs = r.pod("registers")?;
            let sregs = r.pod("segment registers")?;
            let xsave = Box::new(r.pod("XSAVE area")?);
            let xcrs = r.pod("XCRs")?;
            let debugregs = r.pod("debug registers")?;
            let lapic = r.pod("LAPIC")?;
            let n = r.count(MAX_MSRS, "MSR count")?;
            let msrs = (0..n).map(|_| r.pod("MSR")).collect::<Result<_, _>>()?;
            vcpus.push(VcpuState {
                cpuid,
                mp_state,
                regs,
                sregs,
                xsave,
                xcrs,
                debugregs,
                lapic,
                msrs,
                events: r.pod("vCPU events")?,
                tsc_khz: r.option_u32("TSC frequency")?,
            });
        }
        r.finish()?;
        Ok(Self {
            config,
            devices,
            vm,
            vcpus,
        })
    }

    /// Writes the state file and syncs it.
    pub fn write_file(&self, path: &Path) -> Result<(), SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::create(path).map_err(io)?;
        f.write_all(&self.encode()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Reads and checks a state file, reading no more than a snapshot can be.
    pub fn read_file(path: &Path) -> Result<Self, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let mut buf = Vec::new();
        f.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut buf)
            .map_err(io)?;
        if buf.len() as u64 > MAX_FILE_SIZE {
            return Err(SnapshotError::TooLarge {
                path: path.to_path_buf(),
                size: buf.len() as u64,
            });
        }
        Self::decode(path, &buf)
    }
}

#[cfg(test)]
mod tests;

/// For the fuzz target: decodes `data`, first resealing it with its own checksum when
/// `reseal` (so the fuzzer reaches the body's decoder, which a checksum would otherwise
/// guard).
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8], reseal: bool) -> Result<Snapshot, SnapshotError> {
    let mut file = data.to_vec();
    if reseal && file.len() >= CRC_LEN {
        let at = file.len() - CRC_LEN;
        let crc = crc64::crc64(0, &file[..at]);
        file[at..].copy_from_slice(&crc.to_le_bytes());
    }
    Snapshot::decode(Path::new("fuzz"), &file)
}
