//! The builder: a validated `VmConfig` becomes a VM ready to start.

use crate::arch::x86_64::{acpi, boot, cpuid, layout::*, mptable, pvm, regs};
use crate::cgroup::VmCgroup;
use crate::config::{cmdline, ConsoleConfig, VmConfig};
use crate::device_manager::DeviceManager;
use crate::snapshot::devices::DevicesState;
use crate::snapshot::persist::{self, RestoreError};
use crate::snapshot::Snapshot;
use crate::startup_trace;
use crate::vmm::*;
use crate::vstate::control::{self, VcpuControl};
use crate::vstate::exit::{ExitSignal, VmExit};
use crate::vstate::state;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;
use wisp_devices::bus::Bus;
use wisp_devices::interrupt::{InterruptLine, IrqFd};
use wisp_devices::legacy::{
    AcpiPm, PlatformEvent, PlatformEventSink, PvPanic, Serial, ACPI_PM_PORT_LEN, I8042,
};

/// Builds the VM described by `config` (already validated), in the order the machine needs:
/// memory, legacy devices, virtio devices, the kernel (whose command line and ACPI tables
/// describe the devices), vCPUs and their cgroup.
pub fn build(config: &VmConfig) -> Result<Vmm, VmmError> {
    let vm = Vm::without_pit(config.memory.0, config.huge_pages)?;
    // Creating the PIT mostly waits on the kernel: a helper thread does it while this one
    // builds the rest, and it exists before any vCPU runs.
    let (built, pit) = std::thread::scope(|s| {
        let pit = std::thread::Builder::new()
            .name("wisp-pit".into())
            .stack_size(PIT_THREAD_STACK)
            .spawn_scoped(s, || vm.create_pit());
        let built = build_devices_and_vcpus(&vm, config);
        let pit = match pit {
            // The call does not panic, and a panic would abort the process (panic=abort).
            Ok(thread) => thread.join().expect("the PIT thread does not panic"),
            Err(_) => vm.create_pit(),
        };
        (built, pit)
    });
    let Built {
        exit,
        serial,
        serial_drained,
        i8042,
        devices,
        control,
        vcpus,
    } = built?;
    pit?;
    startup_trace::mark("pit: created beside the build");
    assemble(
        vm,
        config,
        Built {
            exit,
            serial,
            serial_drained,
            i8042,
            devices,
            control,
            vcpus,
        },
        false,
    )
}

/// Builds the VM a snapshot describes (its config, with any overrides applied by the caller)
/// on its memory file, every device and vCPU in the state recorded. Nothing is loaded into
/// guest memory: the kernel and everything else are in the memory file. `resume`: the vCPUs
/// run once the VM starts, else they wait for a resume.
pub fn restore(snapshot: &Snapshot, mem_file: &Path, resume: bool) -> Result<Vmm, VmmError> {
    let config = &snapshot.config;
    let file = persist::open_memory_file(mem_file, config.memory.0)?;
    let vm = Vm::from_memory_file(config.memory.0, &file)?;
    let pvm = pvm::is_pvm_host();
    let exit = ExitSignal::new().map_err(io_err("eventfd"))?;
    let legacy = attach_legacy_devices(&vm, config, &exit, Some(&snapshot.devices))?;
    let mut mmio_bus = Bus::new();
    let devices = attach_virtio_devices(&vm, config, &mut mmio_bus)?;
    restore_virtio_devices(&devices, &snapshot.devices)?;
    startup_trace::mark("devices: restored");
    snapshot.vm.restore(&vm.fd).map_err(RestoreError::from)?;
    let control = Arc::new(VcpuControl::default());
    control::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
    let msr_indices = Arc::new(state::msrs_to_save(&vm.kvm).map_err(RestoreError::from)?);
    let mut vcpus = Vec::with_capacity(snapshot.vcpus.len());
    for (id, saved) in (0..config.cpus).zip(&snapshot.vcpus) {
        let fd = vm
            .fd
            .create_vcpu(id.into())
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        saved.restore(&fd).map_err(RestoreError::from)?;
        vcpus.push(Vcpu {
            id,
            fd,
            io_bus: legacy.io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            mem: vm.mem.clone(),
            exit: exit.clone(),
            pvm,
            control: control.clone(),
            msr_indices: msr_indices.clone(),
        });
    }
    startup_trace::mark("vcpus: restored");
    let built = Built {
        exit,
        serial: legacy.serial,
        serial_drained: legacy.serial_drained,
        i8042: legacy.i8042,
        devices,
        control,
        vcpus,
    };
    assemble(vm, config, built, !resume)
}

/// Checks each disk against the image the snapshot recorded, then puts every virtio
/// transport into its recorded state.
fn restore_virtio_devices(devices: &DeviceManager, saved: &DevicesState) -> Result<(), VmmError> {
    let (blocks, transports) = (devices.blocks(), devices.transports());
    if blocks.len() != saved.disks.len() || transports.len() != saved.virtio.len() {
        return Err(RestoreError::Layout {
            recorded: saved.disks.len(),
            devices: saved.virtio.len(),
            disks: blocks.len(),
            windows: transports.len(),
        }
        .into());
    }
    for (block, was) in blocks.iter().zip(&saved.disks) {
        let path = &block.config.path;
        let format = persist::image_format(path).map_err(|source| RestoreError::MemoryFile {
            path: path.clone(),
            source,
        })?;
        let size = block
            .handle
            .with(|b| b.capacity_sectors())
            .saturating_mul(512);
        if format != was.format || size != was.size {
            return Err(RestoreError::DiskChanged {
                path: path.clone(),
                was_format: was.format.clone(),
                was_size: was.size,
                format: format.to_string(),
                size,
            }
            .into());
        }
    }
    for (transport, state) in transports.iter().zip(&saved.virtio) {
        transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .restore(state)
            .map_err(|e| RestoreError::Device(e.to_string()))?;
    }
    Ok(())
}

/// The last steps of a build or a restore: the vCPU cgroup, and the `Vmm`.
fn assemble(vm: Vm, config: &VmConfig, built: Built, start_paused: bool) -> Result<Vmm, VmmError> {
    let cgroup = create_cgroup(config)?;
    if cgroup.is_some() {
        startup_trace::mark("cgroup: created");
    }
    let vcpu_start = cgroup.clone().map(|cg| -> VcpuStartHook {
        Arc::new(move |id, tid| {
            cg.add_vcpu_thread(id.into(), tid)
                .map_err(|e| e.to_string())
        })
    });
    Ok(Vmm {
        _vm: vm,
        vcpus: built.vcpus,
        vcpu_threads: Vec::new(),
        exit: built.exit,
        serial: built.serial,
        serial_drained: built.serial_drained,
        console_input: config.console == ConsoleConfig::Stdio,
        devices: built.devices,
        control: built.control,
        cgroup,
        vcpu_start,
        i8042: built.i8042,
        vcpu_count: config.cpus,
        mem_size_mib: config.memory.0 >> 20,
        started: std::time::Instant::now(),
        config: config.clone(),
        start_paused,
    })
}

/// The helper thread that creates the PIT: one ioctl (only the pages touched are resident).
const PIT_THREAD_STACK: usize = 64 << 10;

/// What [`build_devices_and_vcpus`] made, for the [`Vmm`].
struct Built {
    exit: ExitSignal,
    serial: Arc<Mutex<Serial>>,
    serial_drained: EventFd,
    i8042: Arc<Mutex<I8042>>,
    devices: DeviceManager,
    control: Arc<VcpuControl>,
    vcpus: Vec<Vcpu>,
}

/// Devices, the kernel and its tables, and the vCPUs: everything but the PIT.
fn build_devices_and_vcpus(vm: &Vm, config: &VmConfig) -> Result<Built, VmmError> {
    let pvm = pvm::is_pvm_host();
    if pvm {
        log::info!("PVM host: completing the instructions its emulator cannot run");
    }
    let exit = ExitSignal::new().map_err(io_err("eventfd"))?;
    let legacy = attach_legacy_devices(vm, config, &exit, None)?;
    let mut mmio_bus = Bus::new();
    let devices = attach_virtio_devices(vm, config, &mut mmio_bus)?;
    startup_trace::mark("devices: legacy and virtio devices attached");
    let entry = load_kernel(vm, config, &devices, pvm)?;
    let control = Arc::new(VcpuControl::default());
    let vcpus = create_vcpus(
        vm,
        config,
        entry,
        pvm,
        Buses {
            io: legacy.io_bus,
            mmio: mmio_bus,
        },
        &exit,
        &control,
    )?;
    startup_trace::mark("vcpus: created, CPUID, MSRs and registers set");
    Ok(Built {
        exit,
        serial: legacy.serial,
        serial_drained: legacy.serial_drained,
        i8042: legacy.i8042,
        devices,
        control,
        vcpus,
    })
}

/// The port-I/O devices and what the VMM keeps of them.
struct Legacy {
    io_bus: Bus,
    serial: Arc<Mutex<Serial>>,
    serial_drained: EventFd,
    i8042: Arc<Mutex<I8042>>,
}

struct Buses {
    io: Bus,
    mmio: Bus,
}

/// COM1, the i8042 (reset and Ctrl+Alt+Del), pvpanic and the ACPI PM block: each reports
/// the guest's power-off, reset or panic through `exit`.
fn attach_legacy_devices(
    vm: &Vm,
    config: &VmConfig,
    exit: &ExitSignal,
    restored: Option<&DevicesState>,
) -> Result<Legacy, VmmError> {
    let events: PlatformEventSink = {
        let exit = exit.clone();
        Arc::new(move |e| {
            exit.report(match e {
                PlatformEvent::PowerOff => VmExit::PowerOff,
                PlatformEvent::Reset => VmExit::Reset,
                PlatformEvent::Panicked => VmExit::GuestPanicked,
            })
        })
    };
    let mut io_bus = Bus::new();
    let com1_irq = irq_line(vm, COM1_GSI)?;
    let (serial, serial_drained) = Serial::with_state(
        com1_irq,
        console_output(&config.console)?,
        restored.map(|d| &d.serial),
    )
    .map_err(io_err("serial"))?;
    if let Some(fd) = console_direct(&config.console)? {
        serial.output().write_directly_to(fd);
    }
    let serial = Arc::new(Mutex::new(serial));
    io_bus.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
    let kbd_irq = irq_line(vm, I8042_GSI)?;
    let mut kbd = I8042::new(events.clone(), Some(kbd_irq));
    if let Some(d) = restored {
        kbd.restore(&d.i8042).map_err(RestoreError::Device)?;
    }
    let i8042 = Arc::new(Mutex::new(kbd));
    io_bus.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
    io_bus.insert(
        Arc::new(Mutex::new(PvPanic::new(events.clone()))),
        PVPANIC_PORT,
        1,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(AcpiPm::new(events))),
        ACPI_PM_PORT,
        ACPI_PM_PORT_LEN,
    )?;
    Ok(Legacy {
        io_bus,
        serial,
        serial_drained,
        i8042,
    })
}

/// Disks first (vda, vdb, ...), then network interfaces, each in the order configured, then
/// the vsock device, then the entropy device and the balloon: adding or removing them moves
/// no disk's or interface's window.
fn attach_virtio_devices(
    vm: &Vm,
    config: &VmConfig,
    mmio_bus: &mut Bus,
) -> Result<DeviceManager, VmmError> {
    let mut devices = DeviceManager::default();
    devices.create_mmds(config)?;
    for disk in &config.disks {
        devices.attach_disk(vm, mmio_bus, disk)?;
    }
    for net in &config.nets {
        devices.attach_net(vm, mmio_bus, net, config.mmds.as_ref())?;
    }
    if let Some(vsock) = &config.vsock {
        devices.attach_vsock(vm, mmio_bus, vsock)?;
    }
    if config.entropy {
        devices.attach_entropy(vm, mmio_bus, config.entropy_rate_limiter.as_ref())?;
    }
    if let Some(balloon) = &config.balloon {
        devices.attach_balloon(vm, mmio_bus, balloon)?;
    }
    Ok(devices)
}

/// Loads the kernel (and initrd) and writes the ACPI tables; returns the entry point.
fn load_kernel(
    vm: &Vm,
    config: &VmConfig,
    virtio: &DeviceManager,
    pvm: bool,
) -> Result<regs::EntryMode, VmmError> {
    let mut added = Vec::new();
    if pvm && boot::is_linux(&config.kernel) {
        if let Some(words) = pvm::linux_cmdline_additions(&config.cmdline) {
            log::info!("PVM host: adding `{words}` to the Linux command line");
            added.push(words.to_string());
        }
    }
    // Each virtio device is described once: in the DSDT, or on the command line.
    let acpi_virtio = if config.virtio_mmio_cmdline {
        added.extend(virtio.cmdline());
        &[][..]
    } else {
        &virtio.windows[..]
    };
    let added: Vec<&str> = added.iter().map(String::as_str).collect();
    let cmdline = cmdline::with_kernel_args(&config.cmdline, &added);
    // WISP_NO_MPTABLE=1: a debug switch for measuring what the table saves a Linux boot
    // (scripts/bench/boot.sh --linux-mptable); without it Linux scans for one.
    if std::env::var_os("WISP_NO_MPTABLE").is_none() {
        mptable::write(&vm.mem, config.cpus)?;
    }
    let rsdp = acpi::write(
        &vm.mem,
        &acpi::Platform {
            vcpus: config.cpus,
            virtio_mmio: acpi_virtio,
        },
    )?;
    startup_trace::mark("tables: MP table and ACPI written");
    let kernel = boot::load(
        &vm.mem,
        config.memory.0,
        &config.kernel,
        config.initrd.as_deref(),
        &cmdline,
        rsdp,
    )?;
    startup_trace::mark("kernel: loaded, command line and boot info written");
    Ok(kernel.entry)
}

/// One vCPU per configured CPU, with CPUID, MSRs, FPU and LAPIC set; vCPU 0 starts at
/// `entry`.
fn create_vcpus(
    vm: &Vm,
    config: &VmConfig,
    entry: regs::EntryMode,
    pvm: bool,
    buses: Buses,
    exit: &ExitSignal,
    control: &Arc<VcpuControl>,
) -> Result<Vec<Vcpu>, VmmError> {
    let supported = &vm.supported_cpuid;
    control::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
    let msr_indices = Arc::new(
        state::msrs_to_save(&vm.kvm)
            .map_err(|e| io_err("KVM_GET_MSR_INDEX_LIST")(io::Error::other(e.to_string())))?,
    );
    let mut vcpus = Vec::with_capacity(config.cpus.into());
    for id in 0..config.cpus {
        let fd = vm
            .fd
            .create_vcpu(id.into())
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::normalize(&mut cpuid, id, config.cpus, config.smt);
        if pvm {
            cpuid::hide_kvm_features(&mut cpuid, cpuid::PVM_BROKEN_KVM_FEATURES);
        }
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        let setup = |fd: &kvm_ioctls::VcpuFd| -> Result<(), regs::RegsError> {
            regs::setup_msrs(fd)?;
            regs::setup_fpu(fd)?;
            regs::setup_lapic(fd)?;
            if id == 0 {
                regs::setup_boot_vcpu(fd, &vm.mem, entry)?;
            }
            Ok(())
        };
        setup(&fd).map_err(|source| VmmError::VcpuSetup { vcpu: id, source })?;
        vcpus.push(Vcpu {
            id,
            fd,
            io_bus: buses.io.clone(),
            mmio_bus: buses.mmio.clone(),
            mem: vm.mem.clone(),
            exit: exit.clone(),
            pvm,
            control: control.clone(),
            msr_indices: msr_indices.clone(),
        });
    }
    Ok(vcpus)
}

/// The vCPU cgroup exists before any vCPU thread: each moves itself in before its first
/// KVM_RUN. Groups left by a wisp that was killed are removed first.
fn create_cgroup(config: &VmConfig) -> Result<Option<Arc<VmCgroup>>, VmmError> {
    let Some(spec) = &config.cgroup else {
        return Ok(None);
    };
    if crate::jail::inside() {
        return Err(VmmError::CgroupInJail);
    }
    let name = config
        .id
        .clone()
        .unwrap_or_else(|| std::process::id().to_string());
    let cg = VmCgroup::create(spec, &name)?;
    match VmCgroup::cleanup_stale(&spec.parent) {
        Ok(n) if n > 0 => log::info!("removed {n} stale cgroup(s) of dead wisp processes"),
        Ok(_) => {}
        Err(e) => log::warn!("cleaning up stale cgroups: {e}"),
    }
    Ok(Some(Arc::new(cg)))
}

fn irq_line(vm: &Vm, gsi: u32) -> Result<Arc<dyn InterruptLine>, VmmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.fd.register_irqfd(&evt, gsi).map_err(kvm("KVM_IRQFD"))?;
    Ok(Arc::new(IrqFd(evt)))
}

/// Where the console output goes (written by the serial device's own thread).
/// The console's output once more, for the vCPUs' writes that do not wait (see
/// `ConsoleOutput::write_directly_to`): stdout's file, not a copy of its position.
fn console_direct(console: &ConsoleConfig) -> Result<Option<OwnedFd>, VmmError> {
    Ok(match console {
        ConsoleConfig::Stdio => Some(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("stdout"))?,
        ),
        ConsoleConfig::File(_) | ConsoleConfig::None => None,
    })
}

fn console_output(console: &ConsoleConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match console {
        ConsoleConfig::Stdio => {
            let fd = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("stdout"))?;
            Box::new(File::from(fd))
        }
        // A named pipe is opened without waiting for a reader (Firecracker's PUT /serial).
        ConsoleConfig::File(path) => Box::new(crate::logger::open_file_or_pipe(path).map_err(
            |e| VmmError::ConsoleFile {
                path: path.clone(),
                source: e,
            },
        )?),
        ConsoleConfig::None => Box::new(io::sink()),
    })
}
