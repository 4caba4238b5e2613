//! x86_64: the address map, boot protocols, vCPU state, CPUID and ACPI.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod pvm;
pub mod regs;
