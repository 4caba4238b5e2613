//! Decoding the few instructions wisp completes for a PVM guest (Intel SDM vol. 2): prefixes,
//! REX, ModRM/SIB memory operands in 64-bit mode. Pure: bytes in, an [`Insn`] out.

const OPCODE_INT3: u8 = 0xcc;
const OPCODE_FWAIT: u8 = 0x9b;

/// An instruction decoded far enough to complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Insn {
    Int3,
    Fwait,
    /// Register-to-register POPCNT: destination, source (0-15, SDM encoding), width in bytes.
    Popcnt {
        dst: u8,
        src: u8,
        width: u8,
        len: u8,
    },
    Clac,
    Stac,
    /// CMPXCHG8B/16B m64/m128 (0F C7 /1): `wide` is the 16-byte form (REX.W).
    CmpxchgDouble {
        mem: MemOperand,
        wide: bool,
        len: u8,
    },
    /// LSL r, r/m16 (0F 03 /r): destination register, the selector's source, operand width.
    Lsl {
        dst: u8,
        src: Operand,
        width: u8,
        len: u8,
    },
    /// VERR r/m16 (0F 00 /4) or VERW r/m16 (0F 00 /5).
    Verify {
        write: bool,
        src: Operand,
        len: u8,
    },
}

/// Where an instruction's r/m operand is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operand {
    Reg(u8),
    Mem(MemOperand),
}

/// A decoded memory operand (Intel SDM vol. 2 §2.1.5, 64-bit addressing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MemOperand {
    /// 0x64 (FS) or 0x65 (GS) segment override.
    pub(super) seg: Option<u8>,
    pub(super) base: Option<u8>,
    pub(super) index: Option<(u8, u8)>,
    pub(super) disp: i64,
    pub(super) rip_relative: bool,
}

/// Decodes a ModRM memory operand at `bytes[0]`; returns it and the bytes it used.
fn decode_modrm_mem(
    bytes: &[u8],
    rex_b: u8,
    rex_x: u8,
    seg: Option<u8>,
) -> Option<(MemOperand, usize)> {
    let modrm = *bytes.first()?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if md == 3 {
        return None;
    }
    let mut used = 1;
    let mut op = MemOperand {
        seg,
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
    };
    if rm == 4 {
        let sib = *bytes.get(1)?;
        used += 1;
        let (scale, index, base) = (
            sib >> 6,
            ((sib >> 3) & 7) | (rex_x << 3),
            (sib & 7) | (rex_b << 3),
        );
        if index != 4 {
            op.index = Some((index, 1 << scale));
        }
        if !(md == 0 && sib & 7 == 5) {
            op.base = Some(base);
        }
        if md == 0 && sib & 7 == 5 {
            op.disp = i64::from(i32::from_le_bytes(
                bytes.get(used..used + 4)?.try_into().ok()?,
            ));
            used += 4;
        }
    } else if md == 0 && rm == 5 {
        op.rip_relative = true;
        op.disp = i64::from(i32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?));
        used += 4;
    } else {
        op.base = Some(rm | (rex_b << 3));
    }
    match md {
        1 => {
            op.disp = i64::from(*bytes.get(used)? as i8);
            used += 1;
        }
        2 => {
            op.disp = i64::from(i32::from_le_bytes(
                bytes.get(used..used + 4)?.try_into().ok()?,
            ));
            used += 4;
        }
        _ => {}
    }
    Some((op, used))
}

/// Decodes a ModRM r/m operand at `bytes[0]`: a register or memory; returns it and the bytes
/// it used.
fn rm_operand(bytes: &[u8], rex_b: u8, rex_x: u8, seg: Option<u8>) -> Option<(Operand, usize)> {
    let modrm = *bytes.first()?;
    if modrm >> 6 == 3 {
        return Some((Operand::Reg((modrm & 7) | (rex_b << 3)), 1));
    }
    let (m, used) = decode_modrm_mem(bytes, rex_b, rex_x, seg)?;
    Some((Operand::Mem(m), used))
}

/// Decodes the few instructions wisp completes (Intel SDM vol. 2: prefixes, REX, ModRM).
pub(super) fn decode(bytes: &[u8]) -> Option<Insn> {
    let mut i = 0;
    let (mut opsize16, mut rep, mut lock, mut seg) = (false, false, false, None);
    while let Some(&b) = bytes.get(i) {
        match b {
            0x66 => opsize16 = true,
            0xf3 => rep = true,
            0xf0 => lock = true,
            0x64 | 0x65 => seg = Some(b),
            _ => break,
        }
        i += 1;
    }
    let rex = bytes.get(i).copied().filter(|b| b & 0xf0 == 0x40);
    if rex.is_some() {
        i += 1;
    }
    let (w, r, b) = rex.map_or((false, 0, 0), |x| (x & 8 != 0, (x >> 2) & 1, x & 1));
    let x = rex.map_or(0, |v| (v >> 1) & 1);
    match bytes.get(i..)? {
        [OPCODE_INT3, ..] if i == 0 => Some(Insn::Int3),
        _ if lock && bytes.get(i..i + 2) != Some(&[0x0f, 0xc7]) => None,
        [OPCODE_FWAIT, ..] if i == 0 => Some(Insn::Fwait),
        [0x0f, 0x01, 0xca, ..] if i == 0 => Some(Insn::Clac),
        [0x0f, 0x01, 0xcb, ..] if i == 0 => Some(Insn::Stac),
        [0x0f, 0xc7, modrm, ..] if !rep && (modrm >> 3) & 7 == 1 => {
            let (mem, used) = decode_modrm_mem(&bytes[i + 2..], b, x, seg)?;
            Some(Insn::CmpxchgDouble {
                mem,
                wide: w,
                len: u8::try_from(i + 2 + used).ok()?,
            })
        }
        [0x0f, 0x00, modrm, ..] if !rep && matches!((modrm >> 3) & 7, 4 | 5) => {
            let (src, used) = rm_operand(&bytes[i + 2..], b, x, seg)?;
            Some(Insn::Verify {
                write: (modrm >> 3) & 7 == 5,
                src,
                len: u8::try_from(i + 2 + used).ok()?,
            })
        }
        [0x0f, 0x03, modrm, ..] if !rep => {
            let dst = ((modrm >> 3) & 7) | (r << 3);
            let (src, used) = rm_operand(&bytes[i + 2..], b, x, seg)?;
            Some(Insn::Lsl {
                dst,
                src,
                width: operand_width(w, opsize16),
                len: u8::try_from(i + 2 + used).ok()?,
            })
        }
        [0x0f, 0xb8, modrm, ..] if rep && !lock && seg.is_none() && modrm >> 6 == 3 => {
            Some(Insn::Popcnt {
                dst: ((modrm >> 3) & 7) | (r << 3),
                src: (modrm & 7) | (b << 3),
                width: operand_width(w, opsize16),
                len: u8::try_from(i + 3).ok()?,
            })
        }
        _ => None,
    }
}

/// The operand size of an instruction with REX.W `w` and an operand-size prefix `opsize16`.
fn operand_width(w: bool, opsize16: bool) -> u8 {
    if w {
        8
    } else if opsize16 {
        2
    } else {
        4
    }
}
