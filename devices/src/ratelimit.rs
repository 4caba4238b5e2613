//! Rate limiting for log lines a guest can cause: a guest that repeats a bad access millions
//! of times must not turn wisp's log into a flood (or its disk into the log's).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines let through per window, per limiter.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Lets at most [`BURST`] lines through per [`WINDOW`] and counts the rest, so the next line
/// let through can say how many were left out. One per call site (see
/// [`rate_limited_warn!`](crate::rate_limited_warn)); `const`, so it can be a `static`.
pub struct LogLimiter {
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines left out since
    /// the last one let through, `None` to leave this one out.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if expired {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window < BURST {
            s.in_window += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// " (N similar lines left out)" when `n > 0`, else "".
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar lines left out)")
    }
}

/// `log::warn!` for lines a guest can cause: at most [`BURST`] per [`WINDOW`] per call site;
/// the next line let through says how many were left out.
#[macro_export]
macro_rules! rate_limited_warn {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        if log::log_enabled!(log::Level::Warn) {
            if let Some(n) = LIMIT.check() {
                log::warn!(
                    "{}{}",
                    format_args!($($arg)*),
                    $crate::ratelimit::suppressed_note(n)
                );
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_window_of_silence_then_the_count() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.check_at(t0), Some(0));
        }
        // A million more in the same window: none gets through.
        let let_through = (0..1_000_000)
            .filter(|_| l.check_at(t0 + Duration::from_secs(1)).is_some())
            .count();
        assert_eq!(let_through, 0);
        // The next window's first line tells how many were left out.
        assert_eq!(l.check_at(t0 + WINDOW), Some(1_000_000));
        assert_eq!(l.check_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn note_is_empty_without_suppressed_lines() {
        assert_eq!(suppressed_note(0), "");
        assert_eq!(suppressed_note(3), " (3 similar lines left out)");
    }
}
