//! I/O rate limiters for virtio queues, Firecracker's model: two token buckets, `bandwidth`
//! (bytes) and `ops` (requests or frames), either or both; a request goes through when both
//! buckets have its tokens.
//!
//! A device asks [`RateLimiter::try_consume`] before it takes on a request. Refused, it stops
//! processing that queue (the request stays in the ring: nothing is dropped, nothing queues up
//! in wisp) and the limiter arms its timerfd for the moment the tokens will be there. The
//! device watches that fd like any other (`VirtioDevice::device_fds`) and, when it fires,
//! calls [`RateLimiter::timer_fired`] and processes the queue again. No busy loop: between
//! the refusal and the timer, nothing of the device runs.

mod bucket;
mod timer;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

pub use bucket::{BucketError, BucketParams, TokenBucket, MAX_REFILL_TIME_MS};
pub use timer::Timer;

/// The longest the timer is armed for. It only wakes the device up, which asks again: an
/// absurdly slow bucket gets a look every minute rather than a timer years ahead.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// A change to one bucket of a running limiter (Firecracker's PATCH: a bucket left out stays
/// as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketUpdate {
    Keep,
    /// New parameters; size 0 removes the limit.
    Set(BucketParams),
}

/// A rate limiter with its timer.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
    /// Refused until then (the timer is armed for it).
    blocked_until: Option<Instant>,
}

impl RateLimiter {
    /// A limiter with these buckets (None, or size 0: no limit on that kind). It always has
    /// its timerfd, so that limits added at run time need no new fd.
    pub fn new(bandwidth: Option<BucketParams>, ops: Option<BucketParams>) -> io::Result<Self> {
        Self::new_at(bandwidth, ops, Instant::now())
    }

    fn new_at(
        bandwidth: Option<BucketParams>,
        ops: Option<BucketParams>,
        now: Instant,
    ) -> io::Result<Self> {
        Ok(RateLimiter {
            bandwidth: bandwidth.and_then(|p| TokenBucket::new(p, now)),
            ops: ops.and_then(|p| TokenBucket::new(p, now)),
            timer: Timer::new()?,
            blocked_until: None,
        })
    }

    /// Whether any bucket limits.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Takes one request's tokens (`ops` operations, `bytes` bytes) if both buckets have
    /// them. Refused: the timer is armed for when they will, and every call before then is
    /// refused too.
    pub fn try_consume(&mut self, ops: u64, bytes: u64) -> bool {
        self.try_consume_at(ops, bytes, Instant::now())
    }

    pub fn try_consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if !self.admit_at(ops, bytes, now) {
            return false;
        }
        self.charge_at(ops, bytes, now);
        true
    }

    /// Whether a request of `ops` and `bytes` would go through now, without taking its
    /// tokens (for a cost known only once the work is done: admit, do it, then
    /// [`RateLimiter::charge`]). Refused: as [`RateLimiter::try_consume`].
    pub fn admit(&mut self, ops: u64, bytes: u64) -> bool {
        self.admit_at(ops, bytes, Instant::now())
    }

    fn admit_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if let Some(until) = self.blocked_until {
            if now < until {
                return false;
            }
            self.blocked_until = None;
        }
        let wait = [(&mut self.bandwidth, bytes), (&mut self.ops, ops)]
            .into_iter()
            .filter_map(|(b, n)| Some(b.as_mut()?.wait_for(n, now, MAX_WAIT)))
            .max()
            .unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            return true;
        }
        if let Err(e) = self.timer.arm(wait) {
            // Without a timer the queue would never resume: let the request through.
            rate_limited_warn!("rate limiter: cannot arm the timer ({}); not limiting", e);
            return true;
        }
        self.blocked_until = now.checked_add(wait);
        false
    }

    /// Takes `ops` and `bytes` whether or not the buckets hold them (they may go into debt,
    /// which later requests wait out).
    pub fn charge(&mut self, ops: u64, bytes: u64) {
        self.charge_at(ops, bytes, Instant::now())
    }

    fn charge_at(&mut self, ops: u64, bytes: u64, now: Instant) {
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes, now);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(ops, now);
        }
    }

    /// Whether requests are being refused until the timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked_until.is_some_and(|u| Instant::now() < u)
    }

    /// The timerfd became readable: consumes its expiration. The device then processes the
    /// queue again. Whether the timer had expired (false: a spurious wake-up).
    pub fn timer_fired(&mut self) -> bool {
        self.timer.clear()
    }

    /// Changes the buckets. Requests refused so far are no longer held back by the old
    /// limits: the device should look at its queue again.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = Instant::now();
        for (bucket, update) in [(&mut self.bandwidth, bandwidth), (&mut self.ops, ops)] {
            if let BucketUpdate::Set(params) = update {
                *bucket = match bucket.as_ref() {
                    Some(old) => old.reconfigured(params, now),
                    None => TokenBucket::new(params, now),
                };
            }
        }
        self.blocked_until = None;
        if let Err(e) = self.timer.disarm() {
            rate_limited_warn!("rate limiter: cannot disarm the timer: {}", e);
        }
    }
}

/// `device_fds` of a device whose one fd is its optional limiter's timer (virtio-blk, -rng).
pub fn device_fds(limiter: Option<&RateLimiter>) -> Vec<RawFd> {
    limiter.iter().map(|l| l.as_raw_fd()).collect()
}

/// `process_device_fd(index)` of such a device: whether the timer fired, so that the tokens
/// are back and the queue should be processed again.
pub fn device_fd_fired(limiter: Option<&mut RateLimiter>, index: usize) -> bool {
    index == 0 && limiter.is_some_and(RateLimiter::timer_fired)
}

impl AsRawFd for RateLimiter {
    /// The timerfd: watch it for input while the device is active.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn params(size: u64, refill_time_ms: u64) -> Option<BucketParams> {
        Some(BucketParams {
            size,
            one_time_burst: 0,
            refill_time_ms,
        })
    }

    /// Waits (poll(2), 5 s bound) until `fd` is readable.
    fn wait_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 5000) == 1 }
    }

    #[test]
    fn a_limiter_without_buckets_lets_everything_through_and_never_arms_its_timer() {
        let mut l = RateLimiter::new(None, params(0, 100)).unwrap();
        assert!(!l.is_limiting());
        for _ in 0..1000 {
            assert!(l.try_consume(1, u64::MAX));
        }
        assert!(!l.is_blocked());
        assert!(!l.timer_fired());
    }

    #[test]
    fn both_buckets_must_have_the_tokens_and_a_refusal_takes_none() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new_at(params(1000, 1000), params(2, 1000), t0).unwrap();
        assert!(l.try_consume_at(1, 600, t0));
        // Bandwidth refuses: the op is not taken either.
        assert!(!l.try_consume_at(1, 600, t0));
        // Refused until the timer's moment (200 more tokens at 1/ms), even for a request
        // that fits.
        assert!(!l.try_consume_at(1, 1, t0 + 199 * MS));
        assert!(l.try_consume_at(1, 600, t0 + 200 * MS));
        // Now ops are out (2 per second, one back every 500 ms).
        assert!(!l.try_consume_at(1, 0, t0 + 200 * MS));
        assert!(!l.try_consume_at(1, 0, t0 + 499 * MS));
        assert!(l.try_consume_at(1, 0, t0 + 500 * MS));
    }

    #[test]
    fn a_refusal_arms_the_timerfd_for_when_the_tokens_are_back() {
        // 1 token per 20 ms.
        let mut l = RateLimiter::new(None, params(5, 100)).unwrap();
        for _ in 0..5 {
            assert!(l.try_consume(1, 0));
        }
        let refused = Instant::now();
        assert!(!l.try_consume(1, 0));
        assert!(l.is_blocked());
        assert!(!l.timer_fired(), "not before its time");
        assert!(wait_readable(l.as_raw_fd()), "the timer fires");
        // Not early (the timer and Instant share CLOCK_MONOTONIC).
        assert!(refused.elapsed() >= 19 * MS);
        assert!(l.timer_fired());
        assert!(!l.is_blocked());
        assert!(l.try_consume(1, 0));
        // A read with nothing to read does not block (the fd is non-blocking).
        assert!(!l.timer_fired());
    }

    #[test]
    fn admit_then_charge_lets_a_cost_known_afterwards_go_into_debt() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new_at(params(1000, 1000), None, t0).unwrap();
        assert!(l.admit_at(1, 0, t0));
        l.charge_at(1, 1500, t0);
        // 500 in debt: nothing is admitted for 500 ms.
        assert!(!l.admit_at(1, 0, t0 + 499 * MS));
        assert!(l.admit_at(1, 0, t0 + 500 * MS));
    }

    #[test]
    fn an_update_takes_effect_at_once_and_lifts_a_block() {
        let mut l = RateLimiter::new(None, params(1, 60_000)).unwrap();
        assert!(l.try_consume(1, 0));
        assert!(!l.try_consume(1, 0));
        assert!(l.is_blocked());
        // Limit removed: through at once, the timer disarmed.
        l.update(BucketUpdate::Keep, BucketUpdate::Set(params(0, 0).unwrap()));
        assert!(!l.is_blocked());
        assert!(!l.is_limiting());
        assert!(l.try_consume(1, 0));
        // A limit added at run time uses the same timer.
        let fd = l.as_raw_fd();
        l.update(
            BucketUpdate::Set(params(100, 1000).unwrap()),
            BucketUpdate::Keep,
        );
        assert!(l.try_consume(0, 100));
        assert!(!l.try_consume(0, 100));
        assert_eq!(l.as_raw_fd(), fd);
        // Keep leaves a bucket as it is.
        l.update(BucketUpdate::Keep, BucketUpdate::Keep);
        assert!(l.is_limiting());
    }
}
