//! Tier 2: probe guests (tests/guests) booted by wisp on /dev/kvm. They run their checks at
//! CPL3, at native speed even on a software KVM, and report on the serial console.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn assert_clean_run(f: &Finished, scenario: &str) {
    assert!(
        !f.stdout.contains("probe: FAIL"),
        "{scenario} reported a failure:\n{}",
        f.stdout
    );
    assert!(
        f.stdout.contains(&format!("probe: done {scenario}")),
        "{scenario} did not finish:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

#[test]
fn hello_prints_and_poweroff_exits_zero() {
    if !kvm_available("hello_prints_and_poweroff_exits_zero") {
        return;
    }
    let f = Wisp::spawn(&[
        "run",
        "--memory",
        "64M",
        "--kernel",
        probes().hello.to_str().unwrap(),
    ])
    .wait(T);
    assert!(f.stdout.contains("probe: hello"), "console: {}", f.stdout);
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
    assert!(
        f.stderr.is_empty(),
        "a clean poweroff prints nothing: {}",
        f.stderr
    );
}

#[test]
fn acpi_and_i8042_reset_exit_zero() {
    if !kvm_available("acpi_and_i8042_reset_exit_zero") {
        return;
    }
    for scenario in ["reset-acpi", "reset-i8042"] {
        let f = run_probe(scenario, 1, "64M", &["--log-level", "info"], T);
        assert!(f.stdout.contains(&format!("probe: start {scenario}")));
        assert_eq!(f.code(), Some(0), "{scenario}: {}", f.stderr);
        assert!(f.stderr.contains("guest reset"), "{scenario}: {}", f.stderr);
    }
}

#[test]
fn triple_fault_exits_nonzero_with_reason() {
    if !kvm_available("triple_fault_exits_nonzero_with_reason") {
        return;
    }
    let f = run_probe("triplefault", 1, "64M", &[], T);
    assert_eq!(f.code(), Some(2));
    assert_eq!(
        f.stderr.trim(),
        "wisp: vcpu0: triple fault, the guest crashed"
    );
}

#[test]
fn pvpanic_exits_nonzero_saying_guest_panicked() {
    if !kvm_available("pvpanic_exits_nonzero_saying_guest_panicked") {
        return;
    }
    let f = run_probe("panic", 1, "64M", &[], T);
    assert_eq!(f.code(), Some(2));
    assert_eq!(f.stderr.trim(), "wisp: guest kernel panicked");
}

#[test]
fn every_vcpu_reports_its_apic_id() {
    if !kvm_available("every_vcpu_reports_its_apic_id") {
        return;
    }
    for n in [1u8, 2, 4, 8] {
        let f = run_probe("smp", n, "128M", &[], T);
        assert_clean_run(&f, "smp");
        let mut ids: Vec<u32> = lines_with(&f.stdout, "probe: cpu ")
            .iter()
            .map(|s| s.trim().parse().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, (0..u32::from(n)).collect::<Vec<_>>(), "--cpus {n}");
        assert_eq!(lines_with(&f.stdout, "probe: cpus "), vec![n.to_string()]);
    }
}

#[test]
fn lapic_timer_and_serial_interrupts_are_delivered() {
    if !kvm_available("lapic_timer_and_serial_interrupts_are_delivered") {
        return;
    }
    let f = run_probe("irq", 1, "64M", &[], T);
    assert_clean_run(&f, "irq");
    assert!(f.stdout.contains("probe: lapic-timer ok"), "{}", f.stdout);
    assert!(f.stdout.contains("probe: serial-irq ok"), "{}", f.stdout);
}

/// RAM the guest should see for `mem` bytes: everything but the EBDA..1 MiB hole.
fn expected_ram(mem: u64) -> u64 {
    mem - (0x10_0000 - 0x9fc00)
}

#[test]
fn guest_sees_the_memory_it_was_given() {
    if !kvm_available("guest_sees_the_memory_it_was_given") {
        return;
    }
    for (flag, bytes) in [("128M", 128u64 << 20), ("1G", 1 << 30), ("5G", 5 << 30)] {
        let f = run_probe("info", 1, flag, &[], T);
        assert_clean_run(&f, "info");
        let ram: u64 = lines_with(&f.stdout, "probe: ram ")[0]
            .trim()
            .parse()
            .unwrap();
        assert_eq!(ram, expected_ram(bytes), "--memory {flag}");
        // The probe wrote and read back the first and last page of each RAM range.
        let tested = lines_with(&f.stdout, "probe: memtest ");
        assert!(tested.iter().all(|l| l.ends_with(" ok")), "{tested:?}");
        if bytes > 3 << 30 {
            assert!(
                f.stdout.contains("probe: e820 0x100000000 0x80000000 1"),
                "RAM above 4 GiB: {}",
                f.stdout
            );
        }
    }
}

#[test]
fn acpi_tables_are_found_and_checksummed() {
    if !kvm_available("acpi_tables_are_found_and_checksummed") {
        return;
    }
    let f = run_probe("info", 4, "128M", &[], T);
    assert_clean_run(&f, "info");
    for sig in ["RSDP", "XSDT", "FACP", "APIC", "DSDT"] {
        assert!(
            f.stdout.contains(&format!("probe: acpi {sig} ")),
            "{sig}: {}",
            f.stdout
        );
    }
    assert_eq!(lines_with(&f.stdout, "probe: madt-cpus "), vec!["4"]);
    assert_eq!(
        lines_with(&f.stdout, "probe: cmdline "),
        vec!["probe.scenario=info"]
    );
}

#[test]
fn int3_and_fwait_at_cpl0_complete() {
    if !kvm_available("int3_and_fwait_at_cpl0_complete") {
        return;
    }
    for scenario in ["int3", "fwait"] {
        let f = run_probe(scenario, 1, "64M", &["--log-level", "info"], T);
        assert_clean_run(&f, scenario);
        assert!(
            f.stdout.contains(&format!("probe: {scenario} ok")),
            "{}",
            f.stdout
        );
        if pvm_host() {
            // On PVM the instruction ends KVM_RUN and wisp completes it, saying so.
            assert!(
                f.stderr.contains(&format!("pvm: completed {scenario}")),
                "{scenario}: {}",
                f.stderr
            );
        }
    }
}

#[test]
fn lsl_verr_and_verw_at_cpl0_complete_as_linux_needs_them() {
    if !kvm_available("lsl_verr_and_verw_at_cpl0_complete_as_linux_needs_them") {
        return;
    }
    // Linux's NMI/#DB/#MC entry reads its CPU number with `lsl` when FSGSBASE is on; PVM's
    // emulator cannot run it at CPL0, so wisp completes it.
    let f = run_probe("lsl", 1, "64M", &["--log-level", "info"], T);
    assert_clean_run(&f, "lsl");
    assert!(f.stdout.contains("probe: lsl ok 2005 "), "{}", f.stdout);
    // verw/verr: Linux's idle path runs verw (MDS / MMIO stale data) on Intel hosts.
    assert!(f.stdout.contains("probe: verw ok"), "{}", f.stdout);
    if pvm_host() {
        assert!(f.stderr.contains("pvm: completed lsl"), "{}", f.stderr);
        assert!(
            f.stderr.contains("pvm: completed verr/verw"),
            "{}",
            f.stderr
        );
    }
}

#[test]
fn xmm_registers_survive_exits_interrupts_and_fxsave_at_cpl0() {
    if !kvm_available("xmm_registers_survive_exits_interrupts_and_fxsave_at_cpl0") {
        return;
    }
    // FXSAVE/FXRSTOR at CPL0 (interpreted on PVM), then XMM0-15 held at CPL3 across port
    // exits to wisp and LAPIC timer interrupts for 3 s.
    let f = run_probe("sse", 1, "64M", &[], T);
    assert_clean_run(&f, "sse");
    assert!(f.stdout.contains("probe: sse-cpl0 ok"), "{}", f.stdout);
    let stats = lines_with(&f.stdout, "probe: sse rounds ");
    assert_eq!(stats.len(), 1, "{}", f.stdout);
    let fields: Vec<&str> = stats[0].split_whitespace().collect();
    // "<rounds> exits <n> ticks <n> lost-rounds <n> lost-regs <hex>"
    assert!(fields[0].parse::<u32>().unwrap() > 0, "{}", stats[0]);
    assert!(
        fields[4].parse::<u32>().unwrap() > 0,
        "no timer interrupt: {}",
        stats[0]
    );
    assert_eq!((fields[6], fields[8]), ("0", "0x0"), "{}", stats[0]);
    assert!(f.stdout.contains("probe: sse ok"), "{}", f.stdout);
}

#[test]
fn vcpu_threads_are_named_and_sigterm_stops_cleanly() {
    if !kvm_available("vcpu_threads_are_named_and_sigterm_stops_cleanly") {
        return;
    }
    let p = probes();
    let mut w = Wisp::spawn(&[
        "run",
        "--kernel",
        p.probe.to_str().unwrap(),
        "--cmdline",
        "probe.scenario=spin",
        "--cpus",
        "3",
        "--memory",
        "64M",
    ]);
    w.wait_for("probe: progress", T);
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .map(|t| {
            std::fs::read_to_string(t.unwrap().path().join("comm"))
                .unwrap()
                .trim()
                .to_string()
        })
        .filter(|n| n.starts_with("wisp-vcpu"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["wisp-vcpu0", "wisp-vcpu1", "wisp-vcpu2"]);
    w.signal(libc::SIGTERM);
    let f = w.wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(128 + libc::SIGTERM));
    assert_eq!(f.stderr.trim(), "wisp: stopped by signal SIGTERM");
}

#[test]
fn unsupported_instruction_ends_the_vm_with_rip_and_bytes() {
    if !kvm_available("unsupported_instruction_ends_the_vm_with_rip_and_bytes") {
        return;
    }
    if !pvm_host() {
        eprintln!("skipped unsupported_instruction_ends_the_vm_with_rip_and_bytes: hardware KVM runs every instruction");
        return;
    }
    // xrstors at CPL0: neither PVM's emulator nor wisp completes it.
    let f = run_probe("emufail-xrstors", 1, "64M", &[], T);
    assert_eq!(
        f.code(),
        Some(2),
        "console: {}\nstderr: {}",
        f.stdout,
        f.stderr
    );
    let line = f.stderr.trim();
    assert!(
        line.starts_with("wisp: vcpu0: KVM could not emulate the instruction at rip 0x"),
        "{line}"
    );
    // xrstors64 (%rip): 48 0f c7 1d ...
    assert!(line.contains("(bytes: 48 0f c7 1d "), "{line}");
    assert_eq!(line.lines().count(), 1);
}

#[test]
fn locked_cmpxchg16b_at_cpl0_completes_with_both_outcomes() {
    if !kvm_available("locked_cmpxchg16b_at_cpl0_completes_with_both_outcomes") {
        return;
    }
    // On PVM wisp completes it (its emulator cannot); elsewhere the CPU does.
    let f = run_probe("emufail", 1, "64M", &["--log-level", "info"], T);
    assert_clean_run(&f, "emufail");
    assert!(
        f.stdout.contains("probe: emufail cmpxchg16b ok"),
        "{}",
        f.stdout
    );
    if pvm_host() {
        assert!(
            f.stderr.contains("pvm: completed lock cmpxchg8b/16b"),
            "{}",
            f.stderr
        );
    }
}
