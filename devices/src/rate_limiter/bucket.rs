//! A token bucket (Firecracker's model): `size` tokens, refilled at a constant rate from empty
//! to full in `refill_time_ms`, plus a `one_time_burst` spent before the bucket and never
//! refilled. Time is passed in, so the arithmetic is tested without sleeping.
//!
//! All arithmetic is integer: u128 products of u64 values, so huge sizes and tiny refill
//! times neither overflow nor lose tokens to rounding (the fraction of a token earned so far
//! is kept as time not yet converted).

use std::time::{Duration, Instant};

const NS_PER_MS: u64 = 1_000_000;

/// The longest refill time: its nanoseconds must fit a u64 (about 584 years).
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / NS_PER_MS;

/// A bucket's parameters, as the operator gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketParams {
    /// Tokens the bucket holds when full (bytes, or operations).
    pub size: u64,
    /// Extra tokens spent first, once.
    pub one_time_burst: u64,
    /// Milliseconds to refill the bucket from empty.
    pub refill_time_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BucketError {
    #[error("refill_time is 0 with size {size}: give the milliseconds to refill the bucket, or size 0 for no limit")]
    ZeroRefillTime { size: u64 },
    #[error("refill_time {ms} ms is more than the largest, {MAX_REFILL_TIME_MS} ms")]
    RefillTimeTooLong { ms: u64 },
}

impl BucketParams {
    /// Whether these parameters limit anything: Firecracker's size 0 means no limit.
    pub fn limits(&self) -> bool {
        self.size != 0
    }

    /// Refuses a refill time that cannot be honoured: 0 with a non-zero size (an infinite
    /// rate, which Firecracker silently takes as no limit), or one whose nanoseconds do not
    /// fit 64 bits.
    pub fn validate(&self) -> Result<(), BucketError> {
        if self.size != 0 && self.refill_time_ms == 0 {
            return Err(BucketError::ZeroRefillTime { size: self.size });
        }
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(BucketError::RefillTimeTooLong {
                ms: self.refill_time_ms,
            });
        }
        Ok(())
    }
}

/// A bucket that limits (size > 0, a valid refill time).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u64,
    /// Tokens in the bucket, at most `size`. Negative: a debt left by a request larger than
    /// what was there (a request larger than the bucket itself is let through once the bucket
    /// is full, and paid for afterwards), at least `-u64::MAX`.
    level: i128,
    /// What is left of the one-time burst.
    burst: u64,
    /// The time up to which refills have been counted.
    last: Instant,
    /// The fraction of a token earned by `last`, in token-nanoseconds (tokens times
    /// `refill_ns`), below `refill_ns`: kept, so that frequent refills lose nothing to
    /// rounding.
    carry: u128,
}

impl TokenBucket {
    /// A full bucket, or None when `params` do not limit. `params` must be valid
    /// ([`BucketParams::validate`]); an invalid refill time is taken as its nearest valid one.
    pub fn new(params: BucketParams, now: Instant) -> Option<TokenBucket> {
        if !params.limits() {
            return None;
        }
        let ms = params.refill_time_ms.clamp(1, MAX_REFILL_TIME_MS);
        Some(TokenBucket {
            size: params.size,
            refill_ns: ms * NS_PER_MS,
            level: i128::from(params.size),
            burst: params.one_time_burst,
            last: now,
            carry: 0,
        })
    }

    /// The bucket with new parameters. The level carries over (capped at the new size, debt
    /// kept): a change is not a way to a free refill. The new one-time burst is granted.
    pub fn reconfigured(&self, params: BucketParams, now: Instant) -> Option<TokenBucket> {
        let mut old = self.clone();
        old.refill(now);
        let mut new = TokenBucket::new(params, now)?;
        new.level = old.level.min(new.level);
        Some(new)
    }

    /// Tokens in the bucket now (negative: debt), not counting the burst.
    pub fn level(&mut self, now: Instant) -> i128 {
        self.refill(now);
        self.level
    }

    pub fn burst_left(&self) -> u64 {
        self.burst
    }

    /// Brings the level up to `now`.
    fn refill(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last) else {
            return;
        };
        self.last = now;
        let size = i128::from(self.size);
        if self.level >= size {
            // Full: time spent full earns nothing.
            self.carry = 0;
            return;
        }
        let refill_ns = u128::from(self.refill_ns);
        // tokens = elapsed * size / refill_ns, the remainder carried to the next refill. An
        // overflow means centuries at a huge rate: the bucket is full whatever its debt.
        let earned = elapsed
            .as_nanos()
            .checked_mul(u128::from(self.size))
            .and_then(|p| p.checked_add(self.carry));
        let missing = (size - self.level) as u128;
        match earned {
            Some(e) if e / refill_ns < missing => {
                self.level += (e / refill_ns) as i128;
                self.carry = e % refill_ns;
            }
            _ => {
                self.level = size;
                self.carry = 0;
            }
        }
    }

    /// The tokens that must be in the bucket (besides the burst) to take `tokens`: all of
    /// them, or a full bucket for a request larger than the bucket.
    fn needed(&self, tokens: u64) -> i128 {
        i128::from(tokens.saturating_sub(self.burst).min(self.size))
    }

    /// Whether `tokens` can be taken at `now`. Taking 0 needs a bucket not in debt.
    pub fn can_take(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.needed(tokens)
    }

    /// Takes `tokens`, from the burst first, whether or not they are there (the level may go
    /// into debt, down to `-u64::MAX`). Call after [`TokenBucket::can_take`], or to charge a
    /// cost known only afterwards.
    pub fn take(&mut self, tokens: u64, now: Instant) {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let rest = i128::from(tokens - from_burst);
        self.level = (self.level - rest).max(-i128::from(u64::MAX));
    }

    /// How long from `now` until [`TokenBucket::can_take`]`(tokens)` holds (zero if it does),
    /// at most `cap`.
    pub fn wait_for(&mut self, tokens: u64, now: Instant, cap: Duration) -> Duration {
        self.refill(now);
        let deficit = self.needed(tokens) - self.level;
        if deficit <= 0 {
            return Duration::ZERO;
        }
        // Time for `deficit` tokens less the fraction already earned. deficit <= 2^65 and
        // refill_ns < 2^64: u128 overflows only for absurd debts, and then the cap applies.
        let Some(total) = (deficit as u128).checked_mul(u128::from(self.refill_ns)) else {
            return cap;
        };
        let ns = (total - self.carry).div_ceil(u128::from(self.size)).max(1);
        match u64::try_from(ns) {
            Ok(ns) => Duration::from_nanos(ns).min(cap),
            Err(_) => cap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: u64, refill_time_ms: u64, now: Instant) -> TokenBucket {
        let params = BucketParams {
            size,
            one_time_burst: burst,
            refill_time_ms,
        };
        params.validate().unwrap();
        TokenBucket::new(params, now).unwrap()
    }

    #[test]
    fn starts_full_and_refills_at_size_per_refill_time() {
        let t0 = Instant::now();
        // 1000 tokens per 100 ms: 10 per ms.
        let mut b = bucket(1000, 0, 100, t0);
        assert!(b.can_take(1000, t0));
        b.take(1000, t0);
        assert!(!b.can_take(1, t0));
        assert_eq!(b.level(t0 + 10 * MS), 100);
        assert_eq!(b.level(t0 + 50 * MS), 500);
        // Never more than full, however long it waits.
        assert_eq!(b.level(t0 + 10_000 * MS), 1000);
        b.take(1, t0 + 10_000 * MS);
        assert_eq!(b.level(t0 + 10_000 * MS), 999);
    }

    #[test]
    fn fractions_of_a_token_are_kept_not_lost() {
        let t0 = Instant::now();
        // 3 tokens per 1 s: one every 333.33 ms.
        let mut b = bucket(3, 0, 1000, t0);
        b.take(3, t0);
        // Checked every millisecond for 10 s (rounding down each time would lose tokens).
        let mut got = 0u64;
        for ms in 1..=10_000u64 {
            let now = t0 + ms as u32 * MS;
            if b.can_take(1, now) {
                b.take(1, now);
                got += 1;
            }
        }
        assert_eq!(got, 30);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = bucket(100, 500, 1000, t0);
        // The burst and the full bucket: 600 at once.
        assert!(b.can_take(600, t0));
        b.take(400, t0);
        assert_eq!((b.burst_left(), b.level(t0)), (100, 100));
        b.take(150, t0);
        assert_eq!((b.burst_left(), b.level(t0)), (0, 50));
        // Refilled later: the bucket comes back, the burst does not.
        assert_eq!(b.level(t0 + 2000 * MS), 100);
        assert_eq!(b.burst_left(), 0);
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 100, t0);
        b.take(50, t0);
        assert!(!b.can_take(1000, t0), "only half full");
        assert_eq!(b.wait_for(1000, t0, Duration::MAX), 50 * MS);
        let t1 = t0 + 50 * MS;
        assert!(b.can_take(1000, t1));
        b.take(1000, t1);
        assert_eq!(b.level(t1), -900);
        // The debt is paid at the bucket's rate: 900 ms until it is empty, 1 ms more for one.
        assert_eq!(b.wait_for(1, t1, Duration::MAX), 901 * MS);
        assert!(!b.can_take(0, t1 + 899 * MS));
        assert!(b.can_take(0, t1 + 900 * MS));
        assert!(!b.can_take(1, t1 + 900 * MS));
        assert!(b.can_take(1, t1 + 901 * MS));
    }

    #[test]
    fn wait_for_counts_the_fraction_already_earned() {
        let t0 = Instant::now();
        // One token every 10 ms.
        let mut b = bucket(10, 0, 100, t0);
        b.take(10, t0);
        assert_eq!(b.wait_for(1, t0 + 4 * MS, Duration::MAX), 6 * MS);
        assert_eq!(b.wait_for(3, t0 + 4 * MS, Duration::MAX), 26 * MS);
        assert_eq!(b.wait_for(3, t0 + 30 * MS, Duration::MAX), Duration::ZERO);
        // A bucket never needs more than its size: 100 ms from empty.
        let mut b = bucket(10, 0, 100, t0);
        b.take(10, t0);
        assert_eq!(b.wait_for(u64::MAX, t0, Duration::MAX), 100 * MS);
        assert_eq!(b.wait_for(u64::MAX, t0, 7 * MS), 7 * MS, "capped");
    }

    #[test]
    fn huge_sizes_and_tiny_refill_times_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = bucket(u64::MAX, u64::MAX, 1, t0);
        assert!(b.can_take(u64::MAX, t0));
        b.take(u64::MAX, t0);
        b.take(u64::MAX, t0);
        assert_eq!(b.level(t0), 0);
        // u64::MAX tokens per ms: 1 ns earns 2^64 / 10^6 of them.
        assert_eq!(
            b.level(t0 + Duration::from_nanos(1)),
            (u64::MAX / 1_000_000) as i128
        );
        assert_eq!(b.level(t0 + MS), i128::from(u64::MAX));
        // Years later, with the largest rate and the largest debt.
        b.take(u64::MAX, t0 + MS);
        b.take(u64::MAX, t0 + MS);
        assert_eq!(b.level(t0 + MS), -i128::from(u64::MAX));
        let years = Duration::from_secs(100 * 365 * 86400);
        assert_eq!(b.level(t0 + years), i128::from(u64::MAX));

        // The slowest rate: one token per 584 years, with the deepest debt.
        let mut slow = bucket(1, 0, MAX_REFILL_TIME_MS, t0);
        slow.take(u64::MAX, t0);
        assert_eq!(slow.level(t0 + years), -i128::from(u64::MAX) + 1);
        let cap = Duration::from_secs(60);
        assert_eq!(slow.wait_for(1, t0, cap), cap);
        assert!(!slow.can_take(0, t0 + years));
    }

    #[test]
    fn bad_refill_times_are_refused_with_the_reason() {
        let p = |size, refill_time_ms| BucketParams {
            size,
            one_time_burst: 0,
            refill_time_ms,
        };
        assert_eq!(
            p(1000, 0).validate(),
            Err(BucketError::ZeroRefillTime { size: 1000 })
        );
        assert!(p(0, 0).validate().is_ok(), "size 0 is no limit");
        assert!(p(0, 100).validate().is_ok());
        assert!(p(1, MAX_REFILL_TIME_MS).validate().is_ok());
        assert_eq!(
            p(1, MAX_REFILL_TIME_MS + 1).validate(),
            Err(BucketError::RefillTimeTooLong {
                ms: MAX_REFILL_TIME_MS + 1
            })
        );
        assert!(TokenBucket::new(p(0, 100), Instant::now()).is_none());
    }

    #[test]
    fn reconfiguring_keeps_the_level_and_takes_the_new_rate_at_once() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        b.take(1000, t0);
        // Half a second at 1000/s, then a change to 4000/s with a larger bucket.
        let t1 = t0 + 500 * MS;
        let mut b = b
            .reconfigured(
                BucketParams {
                    size: 4000,
                    one_time_burst: 0,
                    refill_time_ms: 1000,
                },
                t1,
            )
            .unwrap();
        assert_eq!(b.level(t1), 500, "no free refill");
        assert_eq!(b.level(t1 + 100 * MS), 900, "the new rate");
        // A smaller bucket caps the level.
        let small = BucketParams {
            size: 10,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        assert_eq!(b.reconfigured(small, t1).unwrap().level(t1), 10);
        let off = BucketParams { size: 0, ..small };
        assert!(b.reconfigured(off, t1).is_none());
    }
}
