//! The API's HTTP parser and router (src/api/http.rs, src/api/requests.rs) on the bytes a
//! client sends over one connection: `wisp::api::fuzz_connection` reads them through the
//! real `Conn` over a Unix socket pair, routes each request, parses and validates its JSON
//! body, applies configuration requests that name no host file to a pre-boot config and
//! builds the VM config from it, and renders every answer.
//!
//! Checked: no panic, no hang (libFuzzer's -timeout), no allocation that grows with a
//! value in the request (-rss_limit_mb).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wisp::api::fuzz_connection(data);
});
