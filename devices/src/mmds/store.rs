//! The MMDS data store: one JSON document the host sets (`PUT /mmds`) and patches
//! (`PATCH /mmds`, RFC 7396), bounded in size, and what the guest reads from it: a path
//! into the document, as JSON or as an IMDS listing.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use super::token::{TokenError, Tokens};
use super::MmdsCounters;

/// Firecracker's default limit on the serialized document (`--mmds-size-limit`).
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

/// How the guest must ask (Firecracker's `version`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MmdsVersion {
    /// GETs need no session token (one that is given is still checked, and counted).
    #[default]
    V1,
    /// Every GET needs a session token from `PUT /latest/api/token`.
    V2,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(
        "the MMDS data would be {size} bytes as JSON, over the limit of {limit} bytes \
         (--mmds-size-limit)"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("the MMDS data store is not initialized: PUT /mmds before PATCH /mmds")]
    NotInitialized,
}

/// Why a guest's GET found nothing to answer with.
#[derive(Debug, PartialEq, Eq)]
pub enum GetError {
    NotFound,
    /// IMDS listings have objects and strings only.
    UnsupportedValueType,
}

/// The document, its limit, the guest-facing settings and the session tokens.
pub struct Mmds {
    data: Option<Value>,
    limit: usize,
    version: MmdsVersion,
    /// Answer in IMDS format whatever the guest's `Accept` says (as EC2's IMDS).
    imds_compat: bool,
    tokens: Tokens,
    counters: Arc<MmdsCounters>,
}

impl Mmds {
    /// An empty store whose document may be at most `limit` bytes as JSON.
    pub fn new(limit: usize) -> Mmds {
        Mmds {
            data: None,
            limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: Tokens::default(),
            counters: Arc::new(MmdsCounters::default()),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn set_version(&mut self, version: MmdsVersion) {
        self.version = version;
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    pub fn set_imds_compat(&mut self, on: bool) {
        self.imds_compat = on;
    }

    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// The counters of every interface's responder.
    pub fn counters(&self) -> Arc<MmdsCounters> {
        self.counters.clone()
    }

    /// Replaces the document.
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// Merges `patch` into the document (RFC 7396); nothing changes if the result is over
    /// the limit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        let mut data = self.data.clone().ok_or(StoreError::NotInitialized)?;
        merge_patch(&mut data, patch);
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// The document; `{}` before the first PUT (as Firecracker answers `GET /mmds`).
    pub fn data(&self) -> Value {
        self.data
            .clone()
            .unwrap_or_else(|| Value::Object(Map::new()))
    }

    fn check_size(&self, data: &Value) -> Result<(), StoreError> {
        // Serializing a Value cannot fail: its keys are strings.
        let size = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
        if size > self.limit {
            return Err(StoreError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// The value at `path` (a URI path: `/a/b`, a trailing `/` allowed), as compact JSON
    /// or (`json` false, or `imds_compat`) as an IMDS listing: an object's keys one per
    /// line, `/` after those that are objects; a string as it is.
    pub fn get(&self, path: &str, json: bool) -> Result<String, GetError> {
        let data = self.data.as_ref().ok_or(GetError::NotFound)?;
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = data.pointer(pointer).ok_or(GetError::NotFound)?;
        if json && !self.imds_compat {
            return Ok(value.to_string());
        }
        match value {
            Value::Object(map) => Ok(map
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")),
            Value::String(s) => Ok(s.clone()),
            _ => Err(GetError::UnsupportedValueType),
        }
    }

    /// A new session token valid for `ttl_seconds` from `now`.
    pub fn new_token(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        self.tokens.issue(ttl_seconds, now)
    }

    /// Whether `token` was issued here and has not expired at `now`.
    pub fn token_is_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.is_valid(token, now)
    }
}

/// RFC 7396 JSON merge patch: objects merge key by key, `null` removes a key, anything else
/// replaces the target.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(doc) = target else {
        unreachable!("made an object above");
    };
    for (key, value) in patch {
        if value.is_null() {
            doc.remove(key);
        } else {
            merge_patch(doc.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396_examples() {
        // RFC 7396 appendix A, a few of its cases.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn size_limit_holds_for_put_and_patch() {
        let mut m = Mmds::new(20);
        assert_eq!(m.patch(&json!({"a": "b"})), Err(StoreError::NotInitialized));
        m.put(json!({"a": "b"})).unwrap();
        let err = m.put(json!({"a": "0123456789abcdef"})).unwrap_err();
        assert_eq!(
            err,
            StoreError::TooLarge {
                size: 24,
                limit: 20
            }
        );
        let err = m.patch(&json!({"c": "0123456789"})).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }));
        // Nothing changed.
        assert_eq!(m.data(), json!({"a": "b"}));
    }

    #[test]
    fn get_lists_keys_or_returns_json() {
        let mut m = Mmds::new(DEFAULT_SIZE_LIMIT);
        assert_eq!(m.data(), json!({}));
        assert_eq!(m.get("/", false), Err(GetError::NotFound));
        m.put(json!({"latest": {"meta-data": {"id": "i-1", "n": 3}, "user-data": "hi"}}))
            .unwrap();
        assert_eq!(m.get("/", false).unwrap(), "latest/");
        assert_eq!(m.get("/latest", false).unwrap(), "meta-data/\nuser-data");
        assert_eq!(m.get("/latest/", false).unwrap(), "meta-data/\nuser-data");
        assert_eq!(m.get("/latest/user-data", false).unwrap(), "hi");
        assert_eq!(m.get("/latest/user-data", true).unwrap(), "\"hi\"");
        assert_eq!(
            m.get("/latest/meta-data", true).unwrap(),
            r#"{"id":"i-1","n":3}"#
        );
        assert_eq!(
            m.get("/latest/meta-data/n", false),
            Err(GetError::UnsupportedValueType)
        );
        assert_eq!(m.get("/latest/nope", false), Err(GetError::NotFound));
        m.set_imds_compat(true);
        assert_eq!(m.get("/latest/user-data", true).unwrap(), "hi");
    }
}
