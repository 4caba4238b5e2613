//! Taking a snapshot of a paused VM (`Vmm::snapshot`), and the checks of a restore that
//! look at the host (the memory file, the disks).

use super::devices::{DevicesState, DiskImage};
use super::{Snapshot, SnapshotError};
use crate::vmm::{Vmm, PAUSE_TIMEOUT};
use crate::vstate::control::PauseError;
use crate::vstate::state::{StateError, VmState};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("a snapshot is taken of a paused VM: PATCH /vm {{\"state\": \"Paused\"}} first")]
    NotPaused,
    #[error(
        "wisp cannot snapshot a VM with a {0} yet: its state lives outside the VM (host \
         sockets or guest pages the host gave back)"
    )]
    Unsupported(&'static str),
    #[error("disk {}: writing back before the snapshot failed: {source}", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the vCPUs' state: {0}")]
    Vcpus(#[source] PauseError),
    #[error("reading the VM's state: {0}")]
    Vm(#[source] StateError),
    #[error("memory file {}: {}", path.display(), crate::config::io_reason(source))]
    MemoryFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] SnapshotError),
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("memory file {}: {}", path.display(), crate::config::io_reason(source))]
    MemoryFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "memory file {}: {size} bytes, the snapshot's VM has {expected} bytes of RAM",
        path.display()
    )]
    MemorySize {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error(
        "disk {}: the snapshot was taken with a {was_format} image of {was_size} bytes, it is \
         now a {format} image of {size} bytes", path.display()
    )]
    DiskChanged {
        path: PathBuf,
        was_format: String,
        was_size: u64,
        format: String,
        size: u64,
    },
    #[error("the snapshot records {recorded} disks and {devices} virtio devices; this VM has {disks} disks and {windows} devices")]
    Layout {
        recorded: usize,
        devices: usize,
        disks: usize,
        windows: usize,
    },
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Kvm(#[from] StateError),
}

/// "qcow2" when the file starts with the qcow2 magic, else "raw".
pub fn image_format(path: &Path) -> std::io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

impl Vmm {
    /// Writes a Full snapshot of the paused VM: guest RAM to `mem_path`, the rest to
    /// `snapshot_path`. The disks are written back first, so that their images and the
    /// snapshot agree; a device never holds a request half done here, since the event loop
    /// that runs them is the thread taking the snapshot.
    pub fn snapshot(&mut self, snapshot_path: &Path, mem_path: &Path) -> Result<(), CreateError> {
        if !self.is_paused() {
            return Err(CreateError::NotPaused);
        }
        if self.devices.vsock().is_some() {
            return Err(CreateError::Unsupported("vsock device"));
        }
        if self.devices.balloon_mut().is_some() {
            return Err(CreateError::Unsupported("balloon device"));
        }
        let mut disks = Vec::with_capacity(self.devices.blocks().len());
        for block in self.devices.blocks() {
            let path = block.config.path.clone();
            let (flushed, sectors) = block.handle.with(|b| (b.flush(), b.capacity_sectors()));
            flushed.map_err(|source| CreateError::Flush {
                path: path.clone(),
                source,
            })?;
            let format = image_format(&path).map_err(|source| CreateError::Flush {
                path: path.clone(),
                source,
            })?;
            disks.push(DiskImage {
                path,
                format: format.to_string(),
                size: sectors.saturating_mul(512),
            });
        }
        let vcpus = self
            .control
            .save_vcpus(self.vcpu_count.into(), PAUSE_TIMEOUT)
            .map_err(CreateError::Vcpus)?;
        let vm = VmState::save(&self._vm.fd).map_err(CreateError::Vm)?;
        let devices = DevicesState {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .state(),
            i8042: self
                .i8042
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .state(),
            virtio: self
                .devices
                .transports()
                .iter()
                .map(|t| t.lock().unwrap_or_else(PoisonError::into_inner).state())
                .collect(),
            disks,
        };
        write_memory(&self._vm.mem, mem_path)?;
        let snapshot = Snapshot {
            config: self.config.clone(),
            devices,
            vm,
            vcpus,
        };
        snapshot.write_file(snapshot_path)?;
        Ok(())
    }
}

/// Guest RAM, region after region, as one file. Pages the guest never touched are left as
/// holes (they read as zeros): the file of a 1 GiB guest that used 50 MiB is written in the
/// time of 50 MiB.
fn write_memory(mem: &vm_memory::GuestMemoryMmap, path: &Path) -> Result<(), CreateError> {
    let err = |source| CreateError::MemoryFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::create(path).map_err(err)?;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len();
        // Only anonymous memory is asked which pages it has: in a file mapping (a VM restored
        // from a snapshot) a page never touched here still holds the file's data.
        let resident = if region.file_offset().is_none() && region.is_hugetlbfs() != Some(true) {
            resident_pages(mem, region.start_addr(), len)
        } else {
            None
        };
        let runs = match &resident {
            Some(pages) => page_runs(pages),
            None => vec![(0, len)],
        };
        for (start, run) in runs {
            file.seek(SeekFrom::Start(offset + start)).map_err(err)?;
            let run =
                usize::try_from(run).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
            mem.write_all_volatile_to(region.start_addr().unchecked_add(start), &mut file, run)
                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        }
        offset += len;
    }
    file.set_len(offset).map_err(err)?;
    file.sync_all().map_err(err)
}

const PAGE: u64 = 4096;

/// One byte per page of a region, 1 where the page was ever given to the guest: present or
/// swapped out, from /proc/self/pagemap (bits 63 and 62). None if pagemap cannot be read
/// (no /proc in a jail): then everything is written.
fn resident_pages(
    mem: &vm_memory::GuestMemoryMmap,
    start: vm_memory::GuestAddress,
    len: u64,
) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let host = mem.get_host_address(start).ok()? as u64;
    let pages = usize::try_from(len.div_ceil(PAGE)).ok()?;
    let mut entries = vec![0u8; pages.checked_mul(8)?];
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    pagemap
        .read_exact_at(&mut entries, (host / PAGE).checked_mul(8)?)
        .ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| {
                let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                u8::from(v >> 62 != 0)
            })
            .collect(),
    )
}

/// The byte ranges (start, length) of the runs of resident pages.
fn page_runs(pages: &[u8]) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut run_start = None;
    for (i, &p) in pages.iter().chain(std::iter::once(&0)).enumerate() {
        let i = i as u64;
        match (p & 1 == 1, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                runs.push((s * PAGE, (i - s) * PAGE));
                run_start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Opens the memory file of a restore, read-only (guest writes go to private pages), and
/// checks that it holds exactly the snapshot's RAM.
pub fn open_memory_file(path: &Path, mem_size: u64) -> Result<File, RestoreError> {
    let err = |source| RestoreError::MemoryFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    if size != mem_size {
        return Err(RestoreError::MemorySize {
            path: path.to_path_buf(),
            size,
            expected: mem_size,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::page_runs;

    #[test]
    fn runs_of_resident_pages_become_byte_ranges() {
        assert_eq!(page_runs(&[]), vec![]);
        assert_eq!(page_runs(&[0, 0]), vec![]);
        assert_eq!(page_runs(&[1, 1, 0, 1]), vec![(0, 8192), (12288, 4096)]);
        assert_eq!(page_runs(&[0, 3, 1]), vec![(4096, 8192)]);
    }
}
