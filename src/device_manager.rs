//! The VMM side of the devices: opens disk images, puts virtio devices on the MMIO bus with
//! their ioeventfds and irqfds, and says how the guest finds them (ACPI or command line).

use crate::arch::x86_64::acpi::MmioDevice;
use crate::arch::x86_64::layout::{VIRTIO_GSI_START, VIRTIO_MMIO_START};
use crate::config::balloon::mib_to_pages;
use crate::config::{
    BalloonConfig, DiskConfig, DiskFormat, MmdsConfig, NetConfig, RateLimiterConfig, VmConfig,
    VsockConfig,
};
use crate::vstate::vm::Vm;
use kvm_ioctls::IoEventAddress;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;
use wisp_devices::bus::{Bus, BusError};
use wisp_devices::disk::qcow2::{BackingPolicy, Qcow2};
use wisp_devices::disk::raw::RawFile;
use wisp_devices::events::EventSubscriber;
use wisp_devices::interrupt::IrqFd;
use wisp_devices::mmds::{Mmds, MmdsStack};
use wisp_devices::rate_limiter::RateLimiter;
use wisp_devices::tap::Tap;
use wisp_devices::virtio::balloon::{Balloon, BalloonCounters, BalloonStats};
use wisp_devices::virtio::block::{Block, BlockCounters, Disk};
use wisp_devices::virtio::net::{Net, NetCounters};
use wisp_devices::virtio::rng::{Rng, RngCounters};
use wisp_devices::virtio::vsock::{Vsock, VsockCounters};
use wisp_devices::virtio::{
    DeviceHandle, MmioTransport, VirtioDevice, VirtioEventHandler, MMIO_WINDOW_SIZE,
    NOTIFY_REG_OFFSET,
};

/// What went wrong underneath a device error (a disk format's, a tap's or a device's error).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("network interface {tap}: {source}")]
    Net {
        tap: String,
        #[source]
        source: Cause,
    },
    #[error("vsock: {0}")]
    Vsock(#[source] wisp_devices::virtio::vsock::MuxerError),
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("balloon statistics timer (timerfd_create): {0}")]
    Balloon(#[source] io::Error),
    #[error("rate limiter timer (timerfd_create): {0}")]
    RateLimiter(#[source] io::Error),
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] wisp_devices::virtio::MmioError),
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("mmds: {0}")]
    Mmds(#[source] wisp_devices::mmds::StoreError),
}

/// A virtio-blk disk of the VM, found by its drive id.
pub struct BlockDevice {
    /// The disk as configured, with the path of its current medium.
    pub config: DiskConfig,
    /// Read by metrics without the device's lock.
    pub counters: Arc<BlockCounters>,
    pub handle: DeviceHandle<Block>,
}

/// A virtio-net interface of the VM.
pub struct NetDevice {
    pub config: NetConfig,
    /// Read by metrics without the device's lock.
    pub counters: Arc<NetCounters>,
    pub handle: DeviceHandle<Net>,
}

/// The VM's virtio-vsock device.
pub struct VsockDevice {
    /// Read by metrics without the device's lock.
    pub counters: Arc<VsockCounters>,
    pub handle: DeviceHandle<Vsock>,
}

/// The VM's virtio-rng device.
pub struct EntropyDevice {
    /// Read by metrics without the device's lock.
    pub counters: Arc<RngCounters>,
    pub handle: DeviceHandle<Rng>,
}

/// The VM's virtio-balloon device.
pub struct BalloonDevice {
    /// As configured, with the current target.
    pub config: BalloonConfig,
    pub stats: Arc<std::sync::Mutex<BalloonStats>>,
    pub counters: Arc<BalloonCounters>,
    pub handle: DeviceHandle<Balloon>,
}

/// The virtio devices of a VM, once on the bus: the event loop's handlers, where the guest
/// finds each device, and typed handles for the VMM's own requests (media change, metrics).
#[derive(Default)]
pub struct DeviceManager {
    pub handlers: Vec<VirtioEventHandler>,
    pub windows: Vec<MmioDevice>,
    blocks: Vec<BlockDevice>,
    nets: Vec<NetDevice>,
    entropy: Option<EntropyDevice>,
    vsock: Option<VsockDevice>,
    balloon: Option<BalloonDevice>,
    /// The metadata service's document, shared by the API and the interfaces serving it.
    mmds: Option<Arc<Mutex<Mmds>>>,
    /// Every device's transport, in window order (what a snapshot saves and restores).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl DeviceManager {
    /// Makes the VM's MMDS store (its limit, its data at boot, its settings); the
    /// interfaces attached after serve it if the configuration names them.
    pub fn create_mmds(&mut self, config: &VmConfig) -> Result<(), DeviceError> {
        let mut store = Mmds::new(config.mmds_size_limit);
        if let Some(data) = &config.mmds_data {
            store.put(data.clone()).map_err(DeviceError::Mmds)?;
        }
        if let Some(m) = &config.mmds {
            store.set_version(m.version.to_device());
            store.set_imds_compat(m.imds_compat);
        }
        self.mmds = Some(Arc::new(Mutex::new(store)));
        Ok(())
    }

    /// The MMDS store (made by [`DeviceManager::create_mmds`]).
    pub fn mmds(&self) -> Option<&Arc<Mutex<Mmds>>> {
        self.mmds.as_ref()
    }

    /// Opens the disk image and attaches it as the next virtio-blk device.
    pub fn attach_disk(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        disk: &DiskConfig,
    ) -> Result<(), DeviceError> {
        let dev = open_disk(disk)?;
        let counters = dev.counters();
        let handle = self.attach(vm, mmio_bus, dev)?;
        self.blocks.push(BlockDevice {
            config: disk.clone(),
            counters,
            handle,
        });
        Ok(())
    }

    /// Opens the tap and attaches it as the next virtio-net device.
    pub fn attach_net(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        net: &NetConfig,
        mmds: Option<&MmdsConfig>,
    ) -> Result<(), DeviceError> {
        let mut dev = open_net(net)?;
        let serves = |m: &&MmdsConfig| {
            net.id
                .as_ref()
                .is_some_and(|id| m.network_interfaces.contains(id))
        };
        if let (Some(m), Some(store)) = (mmds.filter(serves), &self.mmds) {
            dev = dev.with_mmds(MmdsStack::new(store.clone(), m.ipv4_address));
        }
        let counters = dev.counters();
        let handle = self.attach(vm, mmio_bus, dev)?;
        self.nets.push(NetDevice {
            config: net.clone(),
            counters,
            handle,
        });
        Ok(())
    }

    /// Listens on the vsock's `uds_path` and attaches the virtio-vsock device (one per VM).
    pub fn attach_vsock(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        vsock: &VsockConfig,
    ) -> Result<(), DeviceError> {
        let dev =
            Vsock::new(u64::from(vsock.guest_cid), &vsock.uds_path).map_err(DeviceError::Vsock)?;
        let counters = dev.counters();
        let handle = self.attach(vm, mmio_bus, dev)?;
        self.vsock = Some(VsockDevice { counters, handle });
        Ok(())
    }

    pub fn vsock(&self) -> Option<&VsockDevice> {
        self.vsock.as_ref()
    }

    /// Attaches the virtio-rng device (one per VM).
    pub fn attach_entropy(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        limits: Option<&RateLimiterConfig>,
    ) -> Result<(), DeviceError> {
        let mut dev = Rng::new();
        if let Some(l) = limits.filter(|l| l.limits()) {
            let limiter = RateLimiter::new(l.bandwidth_params(), l.ops_params())
                .map_err(DeviceError::RateLimiter)?;
            dev = dev.with_rate_limiter(limiter);
        }
        let counters = dev.counters();
        let handle = self.attach(vm, mmio_bus, dev)?;
        self.entropy = Some(EntropyDevice { counters, handle });
        Ok(())
    }

    /// Attaches the virtio-balloon device (one per VM).
    pub fn attach_balloon(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        config: &BalloonConfig,
    ) -> Result<(), DeviceError> {
        let dev = Balloon::new(
            mib_to_pages(config.amount_mib),
            config.deflate_on_oom,
            config.stats_polling_interval_s,
        )
        .map_err(DeviceError::Balloon)?;
        let (stats, counters) = (dev.stats(), dev.counters());
        let handle = self.attach(vm, mmio_bus, dev)?;
        self.balloon = Some(BalloonDevice {
            config: *config,
            stats,
            counters,
            handle,
        });
        Ok(())
    }

    pub fn balloon_mut(&mut self) -> Option<&mut BalloonDevice> {
        self.balloon.as_mut()
    }

    pub fn entropy(&self) -> Option<&EntropyDevice> {
        self.entropy.as_ref()
    }

    pub fn blocks(&self) -> &[BlockDevice] {
        &self.blocks
    }

    pub fn nets(&self) -> &[NetDevice] {
        &self.nets
    }

    /// The disk whose drive id is `id`.
    pub fn block_mut(&mut self, id: &str) -> Option<&mut BlockDevice> {
        self.blocks
            .iter_mut()
            .find(|b| b.config.id.as_deref() == Some(id))
    }

    /// The interface whose id is `id`.
    pub fn net_mut(&mut self, id: &str) -> Option<&mut NetDevice> {
        self.nets
            .iter_mut()
            .find(|n| n.config.id.as_deref() == Some(id))
    }

    /// Puts `device` at the next virtio-mmio window with the next GSI.
    fn attach<D: VirtioDevice>(
        &mut self,
        vm: &Vm,
        mmio_bus: &mut Bus,
        device: D,
    ) -> Result<DeviceHandle<D>, DeviceError> {
        let index = self.windows.len();
        let base = VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE;
        let gsi = VIRTIO_GSI_START + u32::try_from(index).expect("a few devices");
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.fd
            .register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Kvm {
                op: "KVM_IRQFD",
                source,
            })?;
        let (transport, handle) =
            MmioTransport::with_handle(device, vm.mem.clone(), Arc::new(IrqFd(irq)))?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            // A QueueNotify write of this queue's index signals its eventfd inside KVM:
            // no exit to wisp, and the device's work runs on the event loop.
            vm.fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                    u32::try_from(queue).expect("a device has a few queues"),
                )
                .map_err(|source| DeviceError::Kvm {
                    op: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        self.handlers.push(transport.event_handler());
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        mmio_bus.insert(transport, base, MMIO_WINDOW_SIZE)?;
        self.windows.push(MmioDevice {
            base,
            size: MMIO_WINDOW_SIZE,
            gsi,
        });
        Ok(handle)
    }

    /// Every device's transport, in window order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// The devices' handles for the event loop.
    pub fn subscribers(&self) -> Vec<Box<dyn EventSubscriber>> {
        self.handlers
            .iter()
            .map(|h| Box::new(h.clone()) as Box<dyn EventSubscriber>)
            .collect()
    }

    /// `virtio_mmio.device=` entries for kernels that find devices on the command line.
    pub fn cmdline(&self) -> Vec<String> {
        self.windows
            .iter()
            .map(|w| format!("virtio_mmio.device=4K@{:#x}:{}", w.base, w.gsi))
            .collect()
    }
}

/// Opens (or creates) the tap and wraps it in a virtio-net device.
pub fn open_net(net: &NetConfig) -> Result<Net, DeviceError> {
    let err = |source: Cause| DeviceError::Net {
        tap: net.tap.clone(),
        source,
    };
    let tap = Tap::open(&net.tap).map_err(|e| err(e.into()))?;
    if let Some(mtu) = net.mtu {
        tap.set_mtu(mtu).map_err(|e| err(e.into()))?;
    }
    let limiter = |l: &Option<RateLimiterConfig>| {
        let l = l.unwrap_or_default();
        RateLimiter::new(l.bandwidth_params(), l.ops_params()).map_err(DeviceError::RateLimiter)
    };
    let dev = Net::new(tap, net.mac_bytes(), net.mtu)
        .map_err(|e| err(e.into()))?
        .with_rate_limiters(
            limiter(&net.rx_rate_limiter)?,
            limiter(&net.tx_rate_limiter)?,
        );
    Ok(if net.offload {
        dev
    } else {
        dev.without_offloads()
    })
}

/// Opens a disk image as its format says (probing when none was given) and wraps it in a
/// virtio-blk device, with its rate limiter (one that limits nothing when none is asked:
/// `PATCH /drives` may add limits).
pub fn open_disk(disk: &DiskConfig) -> Result<Block, DeviceError> {
    let limits = disk.rate_limiter.unwrap_or_default();
    let limiter = RateLimiter::new(limits.bandwidth_params(), limits.ops_params())
        .map_err(DeviceError::RateLimiter)?;
    let block = Block::new(open_medium(disk)?, disk.serial.clone(), disk.readonly);
    Ok(block
        .map_err(|e| disk_error(disk, e))?
        .with_rate_limiter(limiter))
}

fn disk_error(disk: &DiskConfig, source: impl Into<Cause>) -> DeviceError {
    DeviceError::Disk {
        path: disk.path.clone(),
        source: source.into(),
    }
}

/// Opens the image `disk` names, with the rules of boot time: raw unless the format given
/// is qcow2, backing files only as the disk's options allow, read-only as the drive is,
/// locked against other writers.
fn open_medium(disk: &DiskConfig) -> Result<Disk, DeviceError> {
    let err = |source: Cause| disk_error(disk, source);
    match disk.format.unwrap_or(DiskFormat::Raw) {
        DiskFormat::Raw => {
            let raw = RawFile::open(&disk.path, disk.readonly).map_err(|e| err(e.into()))?;
            if disk.format.is_none() && raw.starts_with_qcow2_magic() {
                log::warn!(
                    "disk {}: starts like a qcow2 image but is used raw; give format=qcow2 if it is one",
                    disk.path.display()
                );
            }
            Ok(Box::new(raw))
        }
        DiskFormat::Qcow2 => {
            let backing = BackingPolicy {
                enabled: disk.backing_files || disk.backing_dir.is_some(),
                beneath: disk.backing_dir.clone(),
                block_devices: disk.backing_devices,
            };
            // Qcow2 takes the image lock (and shared locks on its backing files).
            let image =
                Qcow2::open_with(&disk.path, disk.readonly, &backing).map_err(|e| err(e.into()))?;
            Ok(Box::new(image))
        }
    }
}

/// Media change on a running VM (`PATCH /drives`), on the event loop between two requests:
/// opens `disk` with the rules of [`open_disk`], flushes and closes the old medium, and tells
/// the driver (new capacity, ConfigGeneration, configuration change interrupt). On any error
/// the old medium stays in place. Returns the new capacity in 512-byte sectors.
pub fn change_medium(device: &mut BlockDevice, disk: &DiskConfig) -> Result<u64, DeviceError> {
    let medium = open_medium(disk)?;
    let sectors = device.handle.change_config(|block| {
        block
            .change_medium(medium)
            .map_err(|e| disk_error(disk, e))?;
        Ok::<_, DeviceError>(block.capacity_sectors())
    })?;
    device.config = disk.clone();
    Ok(sectors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempdir::TempDir;
    use wisp_devices::bus::BusDevice;
    use wisp_devices::disk::qcow2;

    fn raw(dir: &Path, name: &str, len: usize) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![0x5a; len]).unwrap();
        p
    }

    fn disk(path: &Path, format: Option<DiskFormat>) -> DiskConfig {
        DiskConfig {
            id: None,
            path: path.to_path_buf(),
            format,
            ..DiskConfig::default()
        }
    }

    /// The disk's virtio-mmio window, without KVM (the interrupt line is a plain eventfd).
    fn transport(config: &DiskConfig) -> (MmioTransport, BlockDevice) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let line = Arc::new(IrqFd(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let dev = open_disk(config).unwrap();
        let counters = dev.counters();
        let (t, handle) = MmioTransport::with_handle(dev, mem, line).unwrap();
        (
            t,
            BlockDevice {
                config: config.clone(),
                counters,
                handle,
            },
        )
    }

    /// (capacity in sectors, ConfigGeneration) as the driver reads them.
    fn capacity_and_generation(t: &mut MmioTransport) -> (u64, u32) {
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        let mut g = [0u8; 4];
        t.read(0xfc, &mut g);
        (u64::from_le_bytes(b), u32::from_le_bytes(g))
    }

    #[test]
    fn media_change_opens_with_the_boot_rules_and_keeps_the_old_medium_on_error() {
        let dir = TempDir::new().unwrap();
        let dir = dir.as_path();
        let old = raw(dir, "old.img", 1 << 20);
        let (mut t, mut h) = transport(&disk(&old, None));
        let base = raw(dir, "base.img", 2 << 20);
        let overlay = dir.join("overlay.qcow2");
        qcow2::create(&overlay, None, None, Some((&base, qcow2::Format::Raw))).unwrap();
        let dir_path = dir.to_path_buf();
        let fifo = dir.join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path in our temporary directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let cases: [(DiskConfig, &str); 6] = [
            (disk(&dir.join("missing.img"), None), "No such file"),
            (disk(&dir_path, None), "directory"),
            // Opening a pipe would block the event loop until a writer came.
            (disk(&fifo, None), "named pipe"),
            (disk(&fifo, Some(DiskFormat::Raw)), "named pipe"),
            // An image naming a backing file, without backing_files=on: refused, as at boot.
            (
                disk(&overlay, Some(DiskFormat::Qcow2)),
                "backing files are off for this disk",
            ),
            // The format given is the format used.
            (disk(&base, Some(DiskFormat::Qcow2)), ""),
        ];
        for (config, why) in cases {
            let e = change_medium(&mut h, &config).unwrap_err().to_string();
            assert!(
                e.contains(&*config.path.to_string_lossy()) && e.contains(why),
                "{e}"
            );
            assert_eq!(capacity_and_generation(&mut t), (2048, 0), "after {e}");
        }
        // With backing_files=on, the overlay is trusted: 2 MiB from its backing file.
        let trusted = DiskConfig {
            backing_files: true,
            ..disk(&overlay, Some(DiskFormat::Qcow2))
        };
        assert_eq!(change_medium(&mut h, &trusted).unwrap(), 4096);
        assert_eq!(capacity_and_generation(&mut t), (4096, 1));
        // The old file was closed: its lock is free again (allowing a moment for a child
        // that another test thread forked with the fd, until it execs).
        let reopened = (0..100).find_map(|_| {
            RawFile::open(&old, false).ok().or_else(|| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            })
        });
        assert!(reopened.is_some(), "the old medium is still locked");
        let other = raw(dir, "other.img", 512 * 3);
        assert_eq!(change_medium(&mut h, &disk(&other, None)).unwrap(), 3);
        assert_eq!(capacity_and_generation(&mut t), (3, 2));
    }

    #[test]
    fn a_disk_without_a_format_is_raw_whatever_its_first_sector_says() {
        let dir = TempDir::new().unwrap();
        // What a guest can leave in its raw disk: a qcow2 header claiming 1 TiB.
        let img = dir.as_path().join("disk.img");
        qcow2::create(&img, Some(1 << 40), None, None).unwrap();
        let file_len = std::fs::metadata(&img).unwrap().len();
        let read_only = |format| DiskConfig {
            readonly: true,
            ..disk(&img, format)
        };
        let (mut t, _) = transport(&read_only(None));
        assert_eq!(capacity_and_generation(&mut t), (file_len / 512, 0));
        // It is a qcow2 image only when the operator says so.
        let (mut t, _) = transport(&read_only(Some(DiskFormat::Qcow2)));
        assert_eq!(capacity_and_generation(&mut t), ((1 << 40) / 512, 0));
    }
}
