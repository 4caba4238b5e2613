//! wisp's device models. Devices know guest memory, interrupt lines and their backends;
//! they know nothing of the VMM's configuration, CLI or API.

#[macro_use]
pub mod ratelimit;

pub mod bus;
pub mod disk;
pub mod events;
pub mod interrupt;
pub mod legacy;
pub mod rate_limiter;
pub mod tap;
#[cfg(test)]
mod test_utils;
pub mod virtio;
