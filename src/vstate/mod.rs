//! KVM state: the VM (memory, irqchip), the vCPUs and how a VM ends.

pub mod control;
pub mod exit;
pub mod state;
pub mod teardown;
pub mod vcpu;
pub mod vm;
