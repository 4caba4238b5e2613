//! MMDS V2 session tokens: 32 random bytes from getrandom(2), given to the guest as 64 hex
//! digits, each with its expiry. At most [`MAX_TOKENS`] live at once: a guest asking for
//! more pushes out the one closest to expiring, so the table cannot grow.

use std::time::{Duration, Instant};

/// The TTL range Firecracker accepts (`X-metadata-token-ttl-seconds`).
pub const MIN_TTL_SECONDS: u32 = 1;
pub const MAX_TTL_SECONDS: u32 = 21600;
/// Tokens kept at once.
pub const MAX_TOKENS: usize = 64;
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}."
    )]
    InvalidTtl(String),
    #[error("cannot make a token: getrandom: {0}")]
    Random(String),
}

#[derive(Default)]
pub(super) struct Tokens {
    live: Vec<([u8; TOKEN_BYTES], Instant)>,
}

impl Tokens {
    pub(super) fn issue(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds.to_string()));
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        let mut got = 0;
        while got < TOKEN_BYTES {
            // SAFETY: getrandom writes at most the given length into our buffer.
            let n =
                unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), TOKEN_BYTES - got, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TokenError::Random(e.to_string()));
            }
            got += n as usize;
        }
        self.live.retain(|(_, expiry)| *expiry > now);
        if self.live.len() >= MAX_TOKENS {
            if let Some(i) = (0..self.live.len()).min_by_key(|&i| self.live[i].1) {
                self.live.swap_remove(i);
            }
        }
        let expiry = now + Duration::from_secs(u64::from(ttl_seconds));
        self.live.push((bytes, expiry));
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub(super) fn is_valid(&self, token: &str, now: Instant) -> bool {
        let Some(bytes) = parse_hex(token) else {
            return false;
        };
        self.live.iter().any(|(t, expiry)| {
            // Compared in full whatever the first difference, so the time taken says nothing.
            let same = t.iter().zip(&bytes).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
            same && *expiry > now
        })
    }
}

fn parse_hex(s: &str) -> Option<[u8; TOKEN_BYTES]> {
    let s = s.as_bytes();
    if s.len() != 2 * TOKEN_BYTES {
        return None;
    }
    let mut out = [0u8; TOKEN_BYTES];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_are_bounded() {
        let mut t = Tokens::default();
        let t0 = Instant::now();
        assert!(matches!(t.issue(0, t0), Err(TokenError::InvalidTtl(_))));
        assert!(matches!(t.issue(21601, t0), Err(TokenError::InvalidTtl(_))));
        let a = t.issue(10, t0).unwrap();
        assert_eq!(a.len(), 64);
        assert!(t.is_valid(&a, t0 + Duration::from_secs(9)));
        assert!(!t.is_valid(&a, t0 + Duration::from_secs(10)));
        assert!(!t.is_valid("nothex", t0));
        let mut wrong = a.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert!(!t.is_valid(std::str::from_utf8(&wrong).unwrap(), t0));
        // Many more than the table holds: it stays bounded, the newest stay valid.
        let long = t.issue(21600, t0).unwrap();
        let newest: Vec<String> = (0..1000).map(|_| t.issue(100, t0).unwrap()).collect();
        assert!(t.live.len() <= MAX_TOKENS);
        assert!(t.is_valid(newest.last().unwrap(), t0));
        // What is pushed out is what expires first: never the 6-hour token.
        assert!(t.is_valid(&long, t0));
    }
}
