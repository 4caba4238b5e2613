//! Each piece of KVM state read from a vCPU that has run, written back and read again; and a
//! vCPU's state moved into a new VM, where its guest carries on. Real KVM (skipped without a
//! usable /dev/kvm unless WISP_REQUIRE_KVM=1).

use super::*;
use crate::arch::x86_64::{cpuid, pvm, regs};
use crate::vstate::vm::Vm;
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

const MEM_SIZE: u64 = 16 << 20;
const CODE: u64 = 0x10_0000;
/// 32-bit protected mode: `1: inc %eax; out %al, $0x80; jmp 1b`.
const COUNTER: [u8; 5] = [0x40, 0xe6, 0x80, 0xeb, 0xfb];

fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("WISP_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("{test}: /dev/kvm is not usable ({e}) and WISP_REQUIRE_KVM=1")
        }
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// A VM with one vCPU set up as the builder does it, at the PVH entry of `COUNTER`.
fn counter_vm() -> (Vm, VcpuFd) {
    let vm = Vm::new(MEM_SIZE, false).unwrap();
    let fd = vm.fd.create_vcpu(0).unwrap();
    let mut id = vm.supported_cpuid.clone();
    cpuid::normalize(&mut id, 0, 1, false);
    if pvm::is_pvm_host() {
        cpuid::hide_kvm_features(&mut id, cpuid::PVM_BROKEN_KVM_FEATURES);
    }
    fd.set_cpuid2(&id).unwrap();
    regs::setup_msrs(&fd).unwrap();
    regs::setup_fpu(&fd).unwrap();
    regs::setup_lapic(&fd).unwrap();
    regs::setup_boot_vcpu(
        &fd,
        &vm.mem,
        regs::EntryMode::Pvh {
            entry: CODE,
            start_info: 0,
        },
    )
    .unwrap();
    vm.mem.write_slice(&COUNTER, GuestAddress(CODE)).unwrap();
    (vm, fd)
}

/// Runs until the guest's next `n` writes to port 0x80; returns the bytes written.
fn outs(fd: &mut VcpuFd, n: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match fd.run().unwrap() {
            VcpuExit::IoOut(0x80, data) => seen.push(data[0]),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    seen
}

fn msr_map(msrs: &[kvm_msr_entry]) -> std::collections::BTreeMap<u32, u64> {
    msrs.iter().map(|e| (e.index, e.data)).collect()
}

#[test]
fn every_piece_of_vcpu_and_vm_state_reads_back_as_written() {
    if !kvm_usable("every_piece_of_vcpu_and_vm_state_reads_back_as_written") {
        return;
    }
    let (vm, mut fd) = counter_vm();
    assert_eq!(outs(&mut fd, 3), [1, 2, 3]);
    let indices = msrs_to_save(&vm.kvm).unwrap();
    assert!(!indices.is_empty(), "KVM lists MSRs to save");
    let saved = VcpuState::save(&fd, &indices).unwrap();
    let vm_saved = VmState::save(&vm.fd).unwrap();
    assert_eq!(saved.regs.rax & 0xff, 3);
    assert!(
        saved.msrs.iter().any(|e| e.index == 0xc000_0082),
        "LSTAR is among the saved MSRs"
    );
    // On PVM too: every MSR KVM lists is readable, and the TSC frequency is reported.
    assert_eq!(saved.msrs.len(), indices.len(), "every listed MSR was read");
    assert!(saved.tsc_khz.is_some());

    saved.restore(&fd).unwrap();
    vm_saved.restore(&vm.fd).unwrap();
    let again = VcpuState::save(&fd, &indices).unwrap();
    let vm_again = VmState::save(&vm.fd).unwrap();
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs.as_bytes(), saved.sregs.as_bytes());
    assert_eq!(again.mp_state, saved.mp_state);
    assert_eq!(again.xsave.as_bytes(), saved.xsave.as_bytes());
    assert_eq!(again.xcrs.as_bytes(), saved.xcrs.as_bytes());
    assert_eq!(again.debugregs.as_bytes(), saved.debugregs.as_bytes());
    assert_eq!(again.lapic.as_bytes(), saved.lapic.as_bytes());
    assert_eq!(again.events.as_bytes(), saved.events.as_bytes());
    assert_eq!(again.tsc_khz, saved.tsc_khz);
    assert_eq!(again.cpuid.len(), saved.cpuid.len());
    // Every MSR read back; the counters that run with time (the TSC and what follows it)
    // moved on, the rest are as written.
    let (before, after) = (msr_map(&saved.msrs), msr_map(&again.msrs));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (index, value) in &before {
        if !TIME_MSRS.contains(index) {
            assert_eq!(after[index], *value, "MSR {index:#x}");
        }
    }
    assert_eq!(
        vm_again.pic_master.as_bytes(),
        vm_saved.pic_master.as_bytes()
    );
    assert_eq!(vm_again.pic_slave.as_bytes(), vm_saved.pic_slave.as_bytes());
    assert_eq!(vm_again.ioapic.as_bytes(), vm_saved.ioapic.as_bytes());
    // KVM stamps each PIT channel's count_load_time with the host's time of the write.
    let unstamped = |pit: &kvm_pit_state2| {
        let mut pit = *pit;
        for ch in &mut pit.channels {
            ch.count_load_time = 0;
        }
        pit
    };
    assert_eq!(
        unstamped(&vm_again.pit).as_bytes(),
        unstamped(&vm_saved.pit).as_bytes()
    );
    // The clock goes on from the value written, never back.
    assert!(vm_again.clock.clock >= vm_saved.clock.clock);
    // The guest runs on from where it was.
    assert_eq!(outs(&mut fd, 1), [4]);
}

/// MSRs whose value moves with time between a write and the next read.
const TIME_MSRS: [u32; 3] = [
    0x10,        // IA32_TSC
    0x6e0,       // IA32_TSC_DEADLINE
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW (no guest clock here; listed for its neighbours)
];

#[test]
fn a_vcpu_moved_into_a_new_vm_continues_its_count() {
    if !kvm_usable("a_vcpu_moved_into_a_new_vm_continues_its_count") {
        return;
    }
    let (vm, mut fd) = counter_vm();
    assert_eq!(outs(&mut fd, 5), [1, 2, 3, 4, 5]);
    let indices = msrs_to_save(&vm.kvm).unwrap();
    let saved = VcpuState::save(&fd, &indices).unwrap();
    let vm_saved = VmState::save(&vm.fd).unwrap();
    drop(fd);
    drop(vm);

    // A new VM whose vCPU was never set up: all it has is the saved state and the memory.
    let vm = Vm::new(MEM_SIZE, false).unwrap();
    let mut fd = vm.fd.create_vcpu(0).unwrap();
    vm.mem.write_slice(&COUNTER, GuestAddress(CODE)).unwrap();
    vm_saved.restore(&vm.fd).unwrap();
    saved.restore(&fd).unwrap();
    assert_eq!(outs(&mut fd, 2), [6, 7]);
}
