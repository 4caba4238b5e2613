//! `PUT/PATCH/GET /mmds` (the metadata service's document) and `PUT /mmds/config`.

use serde_json::Value;

use super::router::nesting_exceeds;
use super::ApiFault;

pub use crate::config::MmdsConfig;

/// Deepest nesting of arrays and objects accepted in an MMDS document: deeper than any
/// request body, shallow enough that serde and the drop of the document stay far from the
/// end of a thread's stack.
const MAX_MMDS_DEPTH: usize = 64;

/// The body of `PUT /mmds` or `PATCH /mmds`: any JSON document.
pub fn parse_mmds_data(body: &[u8]) -> Result<Value, ApiFault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFault::bad_request(
            "the request body is empty; the MMDS needs a JSON document",
        ));
    }
    if nesting_exceeds(body, MAX_MMDS_DEPTH) {
        return Err(ApiFault::bad_request(format!(
            "invalid JSON body: nested deeper than {MAX_MMDS_DEPTH} levels"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiFault::bad_request(format!("invalid JSON body: {e}")))
}

/// `PUT /mmds/config`, checked as far as it can be without the VM's interfaces.
pub fn check_mmds_config(c: &MmdsConfig) -> Result<(), ApiFault> {
    for id in &c.network_interfaces {
        super::check_id("network_interfaces", id)?;
    }
    c.validate().map_err(ApiFault::bad_request)
}
