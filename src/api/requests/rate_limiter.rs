//! Firecracker's rate-limiter fields (`RateLimiter`, `TokenBucket`): the JSON shape is
//! `crate::config::RateLimiterConfig`; its checks, as the API's 400s.

use super::{ApiFault, VMM_VERSION};
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

/// For devices wisp does not rate-limit (the entropy device): accepts a limiter that limits
/// nothing (null, `{}`, or buckets that are null or have a zero size or refill time, which
/// Firecracker takes as "no limit"), refuses one that limits.
pub(super) fn check_no_limit(
    field: &str,
    limiter: Option<&serde_json::Value>,
) -> Result<(), ApiFault> {
    let unlimited = match limiter {
        None | Some(serde_json::Value::Null) => true,
        Some(v) => v.as_object().is_some_and(|o| {
            o.iter()
                .all(|(k, b)| matches!(k.as_str(), "bandwidth" | "ops") && bucket_is_unlimited(b))
        }),
    };
    if unlimited {
        return Ok(());
    }
    Err(ApiFault::bad_request(format!(
        "{field}: rate limiters are not supported by wisp {VMM_VERSION} on this device yet; \
         send null or {{}} (no limit), or leave it out"
    )))
}
