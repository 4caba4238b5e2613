//! Tier 3: real Linux kernels booted by wisp. Each boot costs one to two minutes on a
//! software KVM (ENVIRONMENT.md), so each test boots once and checks many things.
//!
//! The test kernel (images/: Debian's 6.1 source, tinyconfig plus virtio, with the PVM
//! system-call patch) reaches user space here; Debian's stock cloud kernel dies at its first
//! system call on PVM, so on PVM its test checks what happens before.

mod common;
use common::*;
use std::time::Duration;

/// A Linux boot to init and back, with the machine's two cores shared by two boots.
const BOOT: Duration = Duration::from_secs(900);

fn memtotal_kb(console: &str) -> u64 {
    lines_with(console, "WISP-INIT: memtotal_kb=")
        .first()
        .unwrap_or_else(|| panic!("no memtotal line:\n{console}"))
        .trim()
        .parse()
        .unwrap()
}

fn assert_acpi_tables_accepted(console: &str) {
    for sig in ["RSDP", "XSDT", "FACP", "APIC", "DSDT"] {
        assert!(
            console.contains(&format!("ACPI: {sig} ")),
            "ACPI {sig} not accepted:\n{console}"
        );
    }
    assert!(!console.contains("ACPI Error"), "ACPI errors:\n{console}");
}

/// Boots `kernel` with the initramfs, or, with `root_disk`, from partition 1 of that disk
/// (`root=/dev/vda1`, no initramfs).
fn boot_linux(
    kernel: &str,
    cpus: &str,
    memory: &str,
    scenario: &str,
    root_disk: Option<&std::path::Path>,
) -> Finished {
    let _slot = linux_boot_slot();
    let kernel = image(kernel);
    let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), path_arg(&kernel)];
    let mut cmdline = format!("{LINUX_CMDLINE} wisp.scenario={scenario}");
    match root_disk {
        Some(disk) => {
            args.extend([
                "--disk".into(),
                format!("path={},format=raw", disk.display()),
            ]);
            cmdline.push_str(" root=/dev/vda1 rw");
        }
        None => args.extend(["--initrd".into(), path_arg(&image("initramfs.cpio"))]),
    }
    args.extend([
        "--cpus".into(),
        cpus.into(),
        "--memory".into(),
        memory.into(),
    ]);
    args.extend(["--cmdline".into(), cmdline]);
    Wisp::spawn(&args).wait_guest(BOOT)
}

/// Linux found wisp's MP table where it looks second (the EBDA) and did not scan the BIOS area.
fn assert_mp_table_found(console: &str) {
    assert!(
        console.contains("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"),
        "no MP table found:\n{console}"
    );
}

fn path_arg(p: &std::path::Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

#[test]
fn test_kernel_elf_boots_to_init_sees_cpus_and_memory_and_powers_off() {
    if !kvm_available("test_kernel_elf_boots_to_init_sees_cpus_and_memory_and_powers_off") {
        return;
    }
    let f = boot_linux("vmlinux", "2", "128M", "info,nmi,entropy,poweroff", None);
    assert!(
        f.stdout.contains("WISP-INIT: ready"),
        "no init:\n{}\n{}",
        f.stdout,
        f.stderr
    );
    assert_acpi_tables_accepted(&f.stdout);
    assert_mp_table_found(&f.stdout);
    // sysrq l: each CPU's backtrace through an NMI (the paranoid entry, with `lsl` under
    // FSGSBASE, which wisp completes on PVM), then the task dumps of sysrq t and w.
    assert!(
        f.stdout.contains("WISP-INIT: scenario nmi ok"),
        "{}\n{}",
        f.stdout,
        f.stderr
    );
    assert_eq!(
        lines_with(&f.stdout, "WISP-INIT: nmi_backtraces="),
        vec!["2"]
    );
    assert_eq!(lines_with(&f.stdout, "WISP-INIT: nproc="), vec!["2"]);
    // MemTotal is RAM less what the kernel keeps for itself: most of the 128 MiB.
    let kb = memtotal_kb(&f.stdout);
    assert!(
        (100 * 1024..=128 * 1024).contains(&kb),
        "MemTotal {kb} kB for 128 MiB"
    );
    assert!(f.stdout.contains("WISP-INIT: scenario info ok"));
    // `wisp run` gives the guest its entropy device: the kernel's hw_random core uses it
    // and /dev/hwrng reads from it.
    assert_eq!(
        lines_with(&f.stdout, "WISP-INIT: rng_current="),
        vec!["virtio_rng.0"],
        "{}",
        f.stdout
    );
    assert_eq!(lines_with(&f.stdout, "WISP-INIT: hwrng_bytes="), vec!["64"]);
    assert!(
        f.stdout.contains("WISP-INIT: scenario entropy ok"),
        "{}",
        f.stdout
    );
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

/// The bzImage, with its root filesystem on partition 1 of a disk (no initramfs): init on
/// the disk runs, writes a file there, and reboots.
#[test]
fn test_kernel_bzimage_boots_from_a_disk_partition_and_reboot_exits_zero() {
    if !kvm_available("test_kernel_bzimage_boots_from_a_disk_partition_and_reboot_exits_zero") {
        return;
    }
    let dir = TestDir::new("linux-root");
    let rootfs = image("rootfs.ext4");
    let disk = dir.join("root.raw");
    mbr_disk(&rootfs, &disk, 0x1234_5678);
    let f = boot_linux(
        "bzImage",
        "1",
        "192M",
        "info,rootfs,fpu,reboot",
        Some(&disk),
    );
    assert!(
        f.stdout.contains("WISP-INIT: ready"),
        "no init:\n{}\n{}",
        f.stdout,
        f.stderr
    );
    assert!(f.stdout.contains(" vda: vda1"), "{}", f.stdout);
    assert!(
        f.stdout.contains("WISP-INIT: scenario rootfs ok"),
        "{}",
        f.stdout
    );
    assert_eq!(lines_with(&f.stdout, "WISP-INIT: root_dev="), vec!["vda1"]);
    assert_eq!(lines_with(&f.stdout, "WISP-INIT: root_mode="), vec!["rw"]);
    // User space's XMM registers survive context switches (images/init/fpucheck.c).
    assert!(
        f.stdout.contains("WISP-INIT: scenario fpu ok"),
        "{}",
        f.stdout
    );
    let part = dir.join("root.ext4");
    assert_guest_root_file(&disk, &rootfs, &part);
    assert_acpi_tables_accepted(&f.stdout);
    assert_eq!(lines_with(&f.stdout, "WISP-INIT: nproc="), vec!["1"]);
    let kb = memtotal_kb(&f.stdout);
    assert!(
        (160 * 1024..=192 * 1024).contains(&kb),
        "MemTotal {kb} kB for 192 MiB"
    );
    assert!(f.stdout.contains("WISP-INIT: rebooting"));
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

#[test]
fn guest_kernel_panic_ends_wisp_nonzero_through_pvpanic() {
    if !kvm_available("guest_kernel_panic_ends_wisp_nonzero_through_pvpanic") {
        return;
    }
    let f = boot_linux("vmlinux", "1", "128M", "panic", None);
    assert!(
        f.stdout.contains("WISP-INIT: triggering panic"),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("Kernel panic"), "{}", f.stdout);
    assert_eq!(f.code(), Some(2));
    assert!(
        f.stderr.contains("wisp: guest kernel panicked"),
        "{}",
        f.stderr
    );
}

#[test]
fn stock_debian_kernel_boots_with_acpi_cpus_memory_and_console() {
    if !kvm_available("stock_debian_kernel_boots_with_acpi_cpus_memory_and_console") {
        return;
    }
    if !pvm_host() {
        // Hardware KVM: the stock kernel runs the same scenario as the test kernel.
        let f = boot_linux("stock-vmlinux", "2", "256M", "info,poweroff", None);
        let out = &format!("{}\n--- wisp's stderr:\n{}", f.stdout, f.stderr);
        assert_stock_platform(out);
        assert_eq!(
            lines_with(&f.stdout, "WISP-INIT: nproc="),
            vec!["2"],
            "{out}"
        );
        assert!(f.stdout.contains("WISP-INIT: scenario info ok"), "{out}");
        assert_eq!(f.code(), Some(0), "{out}");
        return;
    }
    // PVM: Debian's kernel is unmodified, so it cannot pass its first system call here
    // (ENVIRONMENT.md), and its boot before that runs interpreted for well over ten minutes
    // (ftrace's boot-time kallsyms walk alone trips the soft-lockup watchdog). The test checks
    // what wisp provides — ACPI, both CPUs up, the memory map, the console — then stops it.
    let _slot = linux_boot_slot();
    let kernel = image("stock-vmlinux");
    let initrd = image("initramfs.cpio");
    let mut w = Wisp::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--cmdline",
        "console=ttyS0 panic=-1 wisp.scenario=info,poweroff",
    ]);
    w.wait_for_guest("smp: Brought up 1 node, 2 CPUs", BOOT);
    w.signal(libc::SIGTERM);
    let f = w.wait(Duration::from_secs(30));
    let out = &format!("{}\n--- wisp's stderr:\n{}", f.stdout, f.stderr);
    assert_stock_platform(out);
    assert!(out.contains("printk: console [ttyS0] enabled"), "{out}");
    assert_eq!(f.code(), Some(128 + libc::SIGTERM), "{out}");
}

fn assert_stock_platform(out: &str) {
    assert!(out.contains("Linux version 6.1"), "console:\n{out}");
    assert!(out.contains("Command line: console=ttyS0"), "{out}");
    assert_acpi_tables_accepted(out);
    assert!(out.contains("smpboot: Allowing 2 CPUs"), "{out}");
    assert!(out.contains("smp: Brought up 1 node, 2 CPUs"), "{out}");
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{out}"
    );
    // Most of the 256 MiB is there for the kernel ("Memory: 212664K/261752K available").
    let total_kb: u64 = out
        .lines()
        .find_map(|l| l.split("Memory: ").nth(1))
        .and_then(|m| m.split('/').nth(1))
        .and_then(|t| t.split('K').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no Memory: line:\n{out}"));
    assert!(
        (250 * 1024..=256 * 1024).contains(&total_kb),
        "{total_kb} kB of 256 MiB"
    );
}
