//! The KVM VM: guest memory, the in-kernel irqchip and PIT, irqfds and ioeventfds.

use crate::arch::x86_64::layout::*;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use wisp_devices::cast::u64_to_usize;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: {} (is KVM available, and may this user open /dev/kvm?)",
        crate::config::io_reason(.0)
    )]
    OpenKvm(#[source] std::io::Error),
    #[error("KVM API version {0} is not supported (12 is needed)")]
    ApiVersion(i32),
    #[error("this KVM lacks {0:?}, which wisp needs")]
    MissingCap(Cap),
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} MiB of guest memory: {reason}")]
    Memory { size: u64, reason: String },
    #[error(
        "cannot back {size} MiB of guest memory with 2 MiB huge pages: {reason} (the host's \
         pool is /proc/sys/vm/nr_hugepages; /proc/meminfo shows HugePages_Free)"
    )]
    HugePages { size: u64, reason: String },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// The CPUID helper's stack: the call's buffer is on the heap.
const CPUID_THREAD_STACK: usize = 64 << 10;

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
    /// KVM_GET_SUPPORTED_CPUID: what each vCPU's CPUID starts from.
    pub supported_cpuid: CpuId,
}

impl Vm {
    /// A VM with `mem_size` bytes of RAM, on the host's 2 MiB huge pages if `huge_pages`.
    pub fn new(mem_size: u64, huge_pages: bool) -> Result<Self, VmError> {
        let vm = Self::without_pit(mem_size, huge_pages)?;
        vm.create_pit()?;
        Ok(vm)
    }

    /// [`Vm::new`] but for the PIT: [`Vm::create_pit`] must follow before any vCPU runs.
    /// Its creation waits on the kernel (an SRCU grace period for each of its two I/O-bus
    /// devices: 0.1-4 ms here under load), so the builder runs it beside its own work.
    pub fn without_pit(mem_size: u64, huge_pages: bool) -> Result<Self, VmError> {
        Self::with_backing(
            mem_size,
            if huge_pages {
                Backing::HugePages
            } else {
                Backing::Anonymous
            },
        )
    }

    /// A VM whose RAM is a snapshot's memory file, mapped copy-on-write (MAP_PRIVATE): the
    /// guest's writes stay in this process, the file is never written, and clones restored
    /// from one file share its unwritten pages.
    pub fn from_memory_file(mem_size: u64, file: &std::fs::File) -> Result<Self, VmError> {
        let vm = Self::with_backing(mem_size, Backing::File(file))?;
        vm.create_pit()?;
        Ok(vm)
    }

    /// [`Vm::without_pit`] with its RAM from `backing`.
    fn with_backing(mem_size: u64, backing: Backing) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::OpenKvm(e.into()))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        // KVM_GET_SUPPORTED_CPUID takes 0.3 ms here, all of it in the kernel: it runs on a
        // helper thread while this one sets the VM up.
        let (fd, mem, supported) = std::thread::scope(|s| {
            let cpuid = std::thread::Builder::new()
                .name("wisp-cpuid".into())
                .stack_size(CPUID_THREAD_STACK)
                .spawn_scoped(s, || kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES));
            let vm = Self::create_vm(&kvm, mem_size, backing);
            let supported = match cpuid {
                // The call does not panic, and a panic would abort the process (panic=abort).
                Ok(thread) => thread.join().expect("the CPUID thread does not panic"),
                Err(_) => kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
            };
            vm.map(|(fd, mem)| (fd, mem, supported))
        })?;
        let supported_cpuid = supported.map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Self {
            kvm,
            fd,
            mem,
            supported_cpuid,
        })
    }

    /// The VM fd with its memory and irqchip, in the order that is fastest here.
    fn create_vm(
        kvm: &Kvm,
        mem_size: u64,
        backing: Backing,
    ) -> Result<(VmFd, GuestMemoryMmap), VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(u64_to_usize(KVM_TSS_ADDRESS))
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if let Err(e) = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
            // Only Intel's real-mode emulation needs it; some backends refuse it.
            log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        crate::startup_trace::mark("kvm: /dev/kvm opened, VM created");
        // Memory before the irqchip, as Cloud Hypervisor does: once KVM has an in-kernel
        // irqchip, registering a 128 MiB slot took 8-10 ms here (two of the host's 4 ms
        // ticks), against 0.1 ms before it.
        let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), u64_to_usize(len)))
            .collect();
        let mem = match backing {
            Backing::HugePages => huge_page_memory(&ranges, mem_size)?,
            Backing::Anonymous => {
                GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
                    size: mem_size >> 20,
                    reason: e.to_string(),
                })?
            }
            Backing::File(file) => file_memory(&ranges, mem_size, file)?,
        };
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("a few memory regions"),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: mem.get_host_address(region.start_addr()).map_err(|e| {
                    VmError::Memory {
                        size: mem_size >> 20,
                        reason: e.to_string(),
                    }
                })? as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped for the lifetime of `mem`, which the Vm owns and
            // which outlives the VM fd's use of it (fields drop in declaration order: fd first).
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        crate::startup_trace::mark("memory: guest RAM mapped and registered");
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        crate::startup_trace::mark("irqchip: in-kernel PIC and IOAPIC");
        Ok((fd, mem))
    }

    /// The in-kernel PIT (needs the irqchip).
    pub fn create_pit(&self) -> Result<(), VmError> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
    }
}

/// Where guest RAM comes from.
#[derive(Clone, Copy)]
enum Backing<'a> {
    Anonymous,
    HugePages,
    /// A snapshot's memory file: the regions one after the other.
    File(&'a std::fs::File),
}

/// Guest memory mapped privately from `file`, region after region.
fn file_memory(
    ranges: &[(GuestAddress, usize)],
    mem_size: u64,
    file: &std::fs::File,
) -> Result<GuestMemoryMmap, VmError> {
    let err = |reason: String| VmError::Memory {
        size: mem_size >> 20,
        reason,
    };
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let file = file
            .try_clone()
            .map_err(|e| err(format!("memory file: {e}")))?;
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(vm_memory::FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| err(format!("mapping the memory file: {e}")))?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| err(format!("region at {:#x} overflows", start.0)))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// Guest memory from the host's hugetlbfs pool. The pages are reserved when mapped (no
/// MAP_NORESERVE), so a pool that is too small fails here, with the numbers, rather than with
/// a SIGBUS when the guest first touches a page.
fn huge_page_memory(
    ranges: &[(GuestAddress, usize)],
    mem_size: u64,
) -> Result<GuestMemoryMmap, VmError> {
    let err = |reason: String| VmError::HugePages {
        size: mem_size >> 20,
        reason,
    };
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let region = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            )
            .with_hugetlbfs(true)
            .build()
            .map_err(|e| {
                let free = free_huge_pages().map_or("unknown".to_string(), |n| n.to_string());
                err(format!(
                    "{e}; {} pages needed, {free} free",
                    mem_size / crate::config::HUGE_PAGE_SIZE
                ))
            })?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| err(format!("region at {:#x} overflows", start.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// HugePages_Free of /proc/meminfo.
fn free_huge_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))?
        .trim()
        .parse()
        .ok()
}
