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

fn boot_linux(kernel: &str, cpus: &str, memory: &str, scenario: &str) -> Finished {
    let _slot = linux_boot_slot();
    let kernel = image(kernel);
    let initrd = image("initramfs.cpio");
    let cmdline = format!("console=ttyS0 panic=-1 wisp.scenario={scenario}");
    Wisp::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cpus",
        cpus,
        "--memory",
        memory,
        "--cmdline",
        &cmdline,
    ])
    .wait(BOOT)
}

#[test]
fn test_kernel_elf_boots_to_init_sees_cpus_and_memory_and_powers_off() {
    if !kvm_available("test_kernel_elf_boots_to_init_sees_cpus_and_memory_and_powers_off") {
        return;
    }
    let f = boot_linux("vmlinux", "2", "128M", "info,poweroff");
    assert!(
        f.stdout.contains("WISP-INIT: ready"),
        "no init:\n{}\n{}",
        f.stdout,
        f.stderr
    );
    assert_acpi_tables_accepted(&f.stdout);
    assert_eq!(lines_with(&f.stdout, "WISP-INIT: nproc="), vec!["2"]);
    // MemTotal is RAM less what the kernel keeps for itself: most of the 128 MiB.
    let kb = memtotal_kb(&f.stdout);
    assert!(
        (100 * 1024..=128 * 1024).contains(&kb),
        "MemTotal {kb} kB for 128 MiB"
    );
    assert!(f.stdout.contains("WISP-INIT: scenario info ok"));
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

#[test]
fn test_kernel_bzimage_boots_and_reboot_exits_zero() {
    if !kvm_available("test_kernel_bzimage_boots_and_reboot_exits_zero") {
        return;
    }
    let f = boot_linux("bzImage", "1", "192M", "info,reboot");
    assert!(
        f.stdout.contains("WISP-INIT: ready"),
        "no init:\n{}\n{}",
        f.stdout,
        f.stderr
    );
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
    let f = boot_linux("vmlinux", "1", "128M", "panic");
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
    let f = boot_linux("stock-vmlinux", "2", "256M", "info,poweroff");
    let out = &format!("{}\n--- wisp's stderr:\n{}", f.stdout, f.stderr);
    assert!(out.contains("Linux version 6.1"), "console:\n{out}");
    assert!(out.contains("Command line: console=ttyS0"), "{out}");
    assert_acpi_tables_accepted(out);
    assert!(out.contains("smpboot: Allowing 2 CPUs"), "{out}");
    assert!(out.contains("smp: Brought up 1 node, 2 CPUs"), "{out}");
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{out}"
    );
    if pvm_host() {
        // Its first system call fails on PVM (ENVIRONMENT.md): init dies, the kernel panics
        // and, with panic=-1, resets at once. Everything before that worked.
        assert!(out.contains("Run /init as init process"), "{out}");
        assert!(out.contains("Attempted to kill init"), "{out}");
        assert!(
            f.code() == Some(0) || f.stderr.contains("guest kernel panicked"),
            "{}",
            f.stderr
        );
    } else {
        assert_eq!(lines_with(out, "WISP-INIT: nproc="), vec!["2"]);
        assert!(out.contains("WISP-INIT: scenario info ok"));
        assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
    }
}
