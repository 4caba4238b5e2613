//! I/O rate limits, in Firecracker's JSON shape (`RateLimiter`: `bandwidth` and `ops`
//! token buckets of `size`, `refill_time` in ms and an optional `one_time_burst`), shared by
//! the API, config files and the command line (`bps=`, `iops=`... on `--disk` and `--net`).

use serde::{Deserialize, Serialize};
use wisp_devices::rate_limiter::{BucketParams, BucketUpdate};

/// Firecracker's `TokenBucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens when full; 0 means no limit.
    pub size: u64,
    /// Tokens usable once, before the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    pub fn params(&self) -> BucketParams {
        BucketParams {
            size: self.size,
            one_time_burst: self.one_time_burst.unwrap_or(0),
            refill_time_ms: self.refill_time,
        }
    }

    /// `rate` tokens per second, with a bucket of one second's worth.
    pub fn per_second(rate: u64, one_time_burst: Option<u64>) -> Self {
        TokenBucketConfig {
            size: rate,
            one_time_burst,
            refill_time: 1000,
        }
    }
}

/// Firecracker's `RateLimiter`: either bucket may be left out (no limit of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (virtio-blk) or frames (virtio-net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}.{bucket}.{reason}")]
pub struct RateLimitError {
    pub field: String,
    pub bucket: &'static str,
    pub reason: String,
}

impl RateLimiterConfig {
    /// Refuses buckets that cannot be honoured; `field` names the limiter in the message
    /// (`rate_limiter`, `rx_rate_limiter`, ...).
    pub fn validate(&self, field: &str) -> Result<(), RateLimitError> {
        for (bucket, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                b.params().validate().map_err(|e| RateLimitError {
                    field: field.to_string(),
                    bucket,
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(())
    }

    pub fn bandwidth_params(&self) -> Option<BucketParams> {
        self.bandwidth.map(|b| b.params())
    }

    pub fn ops_params(&self) -> Option<BucketParams> {
        self.ops.map(|b| b.params())
    }

    /// Firecracker's PATCH: a bucket given replaces this one (size 0 removes the limit), a
    /// bucket left out stays. The result, and the change for the running device.
    pub fn patched(&self, update: &RateLimiterConfig) -> (RateLimiterConfig, [BucketUpdate; 2]) {
        let apply = |old: Option<TokenBucketConfig>, new: Option<TokenBucketConfig>| match new {
            None => (old, BucketUpdate::Keep),
            Some(b) => (
                Some(b).filter(|b| b.size != 0),
                BucketUpdate::Set(b.params()),
            ),
        };
        let (bandwidth, bw) = apply(self.bandwidth, update.bandwidth);
        let (ops, op) = apply(self.ops, update.ops);
        (RateLimiterConfig { bandwidth, ops }, [bw, op])
    }

    /// Whether a bucket limits anything.
    pub fn limits(&self) -> bool {
        [self.bandwidth, self.ops]
            .iter()
            .flatten()
            .any(|b| b.size != 0)
    }
}

/// The command line's limits on one queue: `<prefix>bps=RATE` (bytes per second, with an
/// optional K, M or G suffix in powers of 1024), `<prefix><ops>=N` (`iops` for disks, `pps`
/// for NICs), and `..._burst=N` for a one-time burst. Returns false for a key it does not
/// know.
pub fn parse_cli_key(
    limiter: &mut Option<RateLimiterConfig>,
    prefix: &str,
    ops_name: &str,
    key: &str,
    value: &str,
) -> Result<bool, String> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Ok(false);
    };
    let (kind, burst) = match rest.strip_suffix("_burst") {
        Some(kind) => (kind, true),
        None => (rest, false),
    };
    let is_bandwidth = match kind {
        "bps" => true,
        k if k == ops_name => false,
        _ => return Ok(false),
    };
    let n = parse_rate(value).ok_or_else(|| {
        format!("{key}={value}: not a number (a K, M or G suffix is allowed, powers of 1024)")
    })?;
    let l = limiter.get_or_insert_with(RateLimiterConfig::default);
    let bucket = if is_bandwidth {
        &mut l.bandwidth
    } else {
        &mut l.ops
    };
    let b = bucket.get_or_insert(TokenBucketConfig::per_second(0, None));
    if burst {
        b.one_time_burst = Some(n);
    } else {
        *b = TokenBucketConfig::per_second(n, b.one_time_burst);
    }
    Ok(true)
}

/// Checks that every `..._burst` came with its rate.
pub fn check_cli_limiter(
    limiter: &Option<RateLimiterConfig>,
    prefix: &str,
    ops_name: &str,
) -> Result<(), String> {
    for (name, b) in limiter
        .iter()
        .flat_map(|l| [("bps", l.bandwidth), (ops_name, l.ops)])
    {
        if let Some(b) = b {
            if b.size == 0 && b.one_time_burst.is_some() {
                return Err(format!(
                    "{prefix}{name}_burst needs a rate ({prefix}{name}=...)"
                ));
            }
        }
    }
    Ok(())
}

fn parse_rate(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time,
        })
    }

    #[test]
    fn firecrackers_json_round_trips() {
        let text = r#"{"bandwidth":{"size":1048576,"one_time_burst":4096,"refill_time":1000},"ops":{"size":100,"refill_time":1000}}"#;
        let l: RateLimiterConfig = serde_json::from_str(text).unwrap();
        assert_eq!(l.bandwidth.unwrap().one_time_burst, Some(4096));
        assert_eq!(serde_json::to_string(&l).unwrap(), text);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bandwidth":{"size":1}}"#).is_err());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"iops":{}}"#).is_err());
    }

    #[test]
    fn refill_time_zero_with_a_size_is_refused_by_name() {
        let l = RateLimiterConfig {
            bandwidth: bucket(0, 0),
            ops: bucket(10, 0),
        };
        let e = l.validate("rx_rate_limiter").unwrap_err().to_string();
        assert!(
            e.starts_with("rx_rate_limiter.ops.refill_time is 0 with size 10"),
            "{e}"
        );
        let l = RateLimiterConfig {
            bandwidth: bucket(1, u64::MAX),
            ops: None,
        };
        let e = l.validate("rate_limiter").unwrap_err().to_string();
        assert!(e.starts_with("rate_limiter.bandwidth.refill_time 18446744073709551615 ms is more than the largest"), "{e}");
        assert!(!RateLimiterConfig {
            bandwidth: bucket(0, 0),
            ops: None
        }
        .limits());
    }

    #[test]
    fn a_patch_replaces_the_buckets_it_names_and_keeps_the_others() {
        let old = RateLimiterConfig {
            bandwidth: bucket(1000, 100),
            ops: bucket(10, 1000),
        };
        let update = RateLimiterConfig {
            bandwidth: None,
            ops: bucket(20, 1000),
        };
        let (new, changes) = old.patched(&update);
        assert_eq!(new.bandwidth, old.bandwidth);
        assert_eq!(new.ops, update.ops);
        assert_eq!(changes[0], BucketUpdate::Keep);
        assert_eq!(changes[1], BucketUpdate::Set(update.ops.unwrap().params()));
        // Size 0 removes the bucket.
        let (new, _) = old.patched(&RateLimiterConfig {
            bandwidth: bucket(0, 0),
            ops: None,
        });
        assert_eq!(new.bandwidth, None);
        assert_eq!(new.ops, old.ops);
    }

    #[test]
    fn command_line_keys_give_per_second_buckets() {
        let mut l = None;
        for (k, v) in [("bps", "1M"), ("iops", "100"), ("iops_burst", "50")] {
            assert!(parse_cli_key(&mut l, "", "iops", k, v).unwrap());
        }
        let l = l.unwrap();
        assert_eq!(l.bandwidth, bucket(1 << 20, 1000));
        assert_eq!(
            l.ops,
            Some(TokenBucketConfig {
                size: 100,
                one_time_burst: Some(50),
                refill_time: 1000
            })
        );
        let mut n = None;
        assert!(parse_cli_key(&mut n, "tx_", "pps", "tx_pps", "1000").unwrap());
        assert!(!parse_cli_key(&mut n, "tx_", "pps", "rx_pps", "1").unwrap());
        assert!(!parse_cli_key(&mut n, "tx_", "pps", "tx_iops", "1").unwrap());
        for bad in [
            "",
            "-1",
            "1.5",
            "12X",
            "M",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(
                parse_cli_key(&mut n, "tx_", "pps", "tx_bps", bad).is_err(),
                "{bad}"
            );
        }
        let mut b = None;
        parse_cli_key(&mut b, "", "iops", "bps_burst", "10").unwrap();
        let e = check_cli_limiter(&b, "", "iops").unwrap_err();
        assert!(e.contains("bps_burst needs a rate"), "{e}");
        let mut b = None;
        parse_cli_key(&mut b, "rx_", "pps", "rx_pps_burst", "10").unwrap();
        let e = check_cli_limiter(&b, "rx_", "pps").unwrap_err();
        assert!(e.contains("rx_pps_burst needs a rate (rx_pps=...)"), "{e}");
    }
}
