//! The PVM instruction decoder and completer (src/arch/x86_64/pvm/): the instruction bytes
//! at a guest's RIP are the guest's to choose. The input is up to 15 instruction bytes
//! followed by the register state they run on.
//!
//! Checked: no panic (overflow included: the target is built with debug assertions); a
//! decoded instruction never claims more bytes than it was given; RIP moves by at most the
//! instruction's length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wisp::arch::x86_64::pvm::{fuzz_decode, Completed};
use wisp_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let n = usize::from(input.u8() % 16);
    let bytes = input.bytes(n);
    let mut regs = kvm_bindings::kvm_regs {
        rax: input.u64(),
        rbx: input.u64(),
        rcx: input.u64(),
        rdx: input.u64(),
        rsi: input.u64(),
        rdi: input.u64(),
        rsp: input.u64(),
        rbp: input.u64(),
        r8: input.u64(),
        r9: input.u64(),
        r10: input.u64(),
        r11: input.u64(),
        r12: input.u64(),
        r13: input.u64(),
        r14: input.u64(),
        r15: input.u64(),
        rip: input.u64(),
        rflags: input.u64(),
    };
    let rip = regs.rip;
    if let Some(done) = fuzz_decode(bytes, &mut regs) {
        let moved = regs.rip.wrapping_sub(rip);
        assert!(moved <= bytes.len() as u64, "{done:?}: RIP moved {moved}");
        if done == Completed::CmpxchgDouble {
            assert_eq!(moved, 0, "cmpxchg moves RIP only once it has run on memory");
        }
    }
});
