//! The fuzzing entry point for the API (fuzz/fuzz_targets/api_http.rs): the bytes a client
//! sends, through the same parser, router and pre-boot configuration as a real connection.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::http::{Conn, ReadError, Response};
use super::{allowed_methods, route, ApiFault, ApiLimits, ApiRequest, PendingConfig, Routed};

/// `data` is what a client wrote on one connection before closing its sending side. Each
/// request is read as `serve_connection` reads it, routed, and (if it is a configuration
/// request that names no host file) applied to a `PendingConfig`, whose VM config is then
/// built; the answer is rendered as bytes. Errors are expected; a panic, a hang or an
/// allocation that grows with a value in the request is a bug.
#[doc(hidden)]
pub fn fuzz_connection(data: &[u8]) {
    let Ok((mut client, server)) = UnixStream::pair() else {
        return;
    };
    // More than the socket buffer holds is cut: nothing reads concurrently.
    let _ = client.set_nonblocking(true);
    let _ = client.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let limits = ApiLimits {
        // The whole request is there or the client closed: no read ever waits.
        request_timeout: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(100),
        ..ApiLimits::default()
    };
    let mut conn = Conn::new(server);
    let mut config = PendingConfig::new();
    loop {
        let req = match conn.read_request(&limits) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Reject(fault)) => {
                let _ = Response::fault(&fault, false).to_bytes();
                return;
            }
        };
        let response = match route(&req.method, &req.target, &req.body) {
            Ok(Routed::Local(v)) => Response::json(200, &v, req.keep_alive),
            Ok(Routed::Request(r)) => match apply(&mut config, &r) {
                Ok(()) => Response::no_content(req.keep_alive),
                Err(fault) => Response::fault(&fault, req.keep_alive),
            },
            Err(fault) => {
                let mut resp = Response::fault(&fault, req.keep_alive);
                if fault.status == 405 {
                    resp.allow = Some(allowed_methods(&req.target).join(", "));
                }
                resp
            }
        };
        let _ = response.to_bytes();
        if !req.keep_alive {
            return;
        }
    }
}

/// Applies the requests that name no host file and touch no global state (`apply` would open
/// kernel and drive paths, and PUT /logger reconfigures the process's logger), takes a boot
/// source as validated without opening its files, then builds the VM config as
/// InstanceStart would.
fn apply(config: &mut PendingConfig, req: &ApiRequest) -> Result<(), ApiFault> {
    match req {
        ApiRequest::PutMachineConfig(_)
        | ApiRequest::PatchMachineConfig(_)
        | ApiRequest::PutNetworkInterface(_)
        | ApiRequest::PutMetrics(_) => config.apply(req)?,
        ApiRequest::PutBootSource(b) => {
            b.validate()?;
            config.boot_source = Some(b.clone());
        }
        _ => return Ok(()),
    }
    let _ = config.to_json();
    config.to_vm_config().map(drop)
}

#[cfg(test)]
mod tests {
    use super::fuzz_connection;

    #[test]
    fn fuzz_entry_serves_pipelined_requests_and_stops_at_eof() {
        fuzz_connection(
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 36\r\n\r\n\
              {\"vcpu_count\": 2, \"mem_size_mib\": 64}\
              GET /version HTTP/1.1\r\n\r\nPATCH /vm HTT",
        );
    }
}
