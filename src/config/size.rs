//! Memory sizes as people write them: `512M`, `1G`, `1536MiB`, `2GB`; a bare number is MiB
//! (as with QEMU's -m).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid memory size {0:?}: use a number with an optional K, M, G or T suffix (bare numbers are MiB)")]
pub struct MemSizeError(pub String);

impl FromStr for MemSize {
    type Err = MemSizeError;
    fn from_str(s: &str) -> Result<Self, MemSizeError> {
        let err = || MemSizeError(s.to_string());
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        let n: u64 = num.parse().map_err(|_| err())?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "M" | "MB" | "MIB" => 20,
            "K" | "KB" | "KIB" => 10,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            "B" => 0,
            _ => return Err(err()),
        };
        n.checked_mul(1 << shift).map(MemSize).ok_or_else(err)
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for MemSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Mib(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Mib(n) => n
                .checked_mul(1 << 20)
                .map(MemSize)
                .ok_or_else(|| serde::de::Error::custom("memory size overflows")),
            Repr::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("512M".parse(), Ok(MemSize(512 << 20)));
        assert_eq!("512".parse(), Ok(MemSize(512 << 20)));
        assert_eq!("1G".parse(), Ok(MemSize(1 << 30)));
        assert_eq!("2GiB".parse(), Ok(MemSize(2 << 30)));
        assert_eq!("1K".parse(), Ok(MemSize(1024)));
        assert_eq!("8g".parse(), Ok(MemSize(8 << 30)));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert!("".parse::<MemSize>().is_err());
        assert!("M".parse::<MemSize>().is_err());
        assert!("-1G".parse::<MemSize>().is_err());
        assert!("1.5G".parse::<MemSize>().is_err());
        assert!("99999999999999T".parse::<MemSize>().is_err());
    }

    #[test]
    fn displays_in_the_largest_whole_unit() {
        assert_eq!(MemSize(512 << 20).to_string(), "512M");
        assert_eq!(MemSize(1 << 30).to_string(), "1G");
        assert_eq!(MemSize(1536 << 20).to_string(), "1536M");
        assert_eq!(MemSize(1000).to_string(), "1000B");
    }
}
