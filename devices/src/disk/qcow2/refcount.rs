//! Refcount entries inside a refcount block, for every width qcow2 allows
//! (refcount_order 0..=6). Sub-byte entries are packed from the least significant bit,
//! wider ones are big-endian, as QEMU stores them.

pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            u64::from((byte >> ((index % per_byte) * bits)) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[index * 2], block[index * 2 + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[index * 4..index * 4 + 4]
                .try_into()
                .expect("4-byte slice"),
        )),
        _ => u64::from_be_bytes(
            block[index * 8..index * 8 + 8]
                .try_into()
                .expect("8-byte slice"),
        ),
    }
}

/// Largest refcount representable with this order.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Stores `value` (which must be <= `max(order)`).
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
    debug_assert!(value <= max(order));
    let be = value.to_be_bytes();
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | ((be[7] << shift) & mask);
        }
        // The low bytes of `value`, big-endian: all of it, as it is <= max(order).
        3 => block[index] = be[7],
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&be[6..]),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&be[4..]),
        _ => block[index * 8..index * 8 + 8].copy_from_slice(&be),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set(&mut block, order, i, (i as u64 * 7) & max(order));
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7) & max(order),
                    "order {order} i {i}"
                );
            }
        }
    }
}
