//! Firecracker's rate-limiter fields (`RateLimiter`, `TokenBucket`): the JSON shape is
//! `crate::config::RateLimiterConfig`; its checks, as the API's 400s.

use super::ApiFault;
use crate::config::RateLimiterConfig;

/// Refuses buckets that cannot be honoured (a zero refill time with a size, a refill time
/// beyond 64 bits of nanoseconds), naming the field.
pub(super) fn check_limiter(
    field: &str,
    limiter: Option<&RateLimiterConfig>,
) -> Result<(), ApiFault> {
    match limiter {
        Some(l) => l
            .validate(field)
            .map_err(|e| ApiFault::bad_request(e.to_string())),
        None => Ok(()),
    }
}

/// A token bucket that limits nothing: null, or a zero size or refill time.
pub(super) fn bucket_is_unlimited(bucket: &serde_json::Value) -> bool {
    let zero = |k: &str| bucket.get(k).and_then(serde_json::Value::as_u64) == Some(0);
    bucket.is_null() || (bucket.is_object() && (zero("size") || zero("refill_time")))
}
