//! The router: a method, a path and a body in, a validated [`ApiRequest`] (or a fault) out.

use serde::de::DeserializeOwned;

use super::*;

/// HTTP methods the API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "PUT" => Some(Method::Put),
            "PATCH" => Some(Method::Patch),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// Every route served, as (method, path template). The OpenAPI test checks the document
/// against this table and the table against the router.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("PUT", "/boot-source"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("GET", "/vm/config"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/serial"),
    ("PUT", "/entropy"),
    ("PUT", "/vsock"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("GET", "/vm/metrics"),
    ("PATCH", "/vm/cgroup"),
    ("GET", "/mmds"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
];

/// Firecracker's endpoints (v1.16) that wisp does not implement yet, with what they are
/// about: any method on them answers 400 saying so, where an unknown path gets 404.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("/balloon/hinting/start", "free page hinting"),
    ("/balloon/hinting/status", "free page hinting"),
    ("/balloon/hinting/stop", "free page hinting"),
    ("/cpu-config", "custom CPU templates (cpu-config)"),
    ("/hotplug/memory", "memory hotplug (virtio-mem) devices"),
    ("/pmem/{id}", "virtio-pmem devices"),
];

/// What the router made of a request.
// Made once per API call and moved to the main thread: not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// For the main thread.
    Request(ApiRequest),
    /// Answered by the API thread itself (`GET /version`): the JSON body.
    Local(serde_json::Value),
}

/// Matches `path` against a template; returns the value of its `{param}` segment if any.
fn match_template<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut param = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(param),
            (Some(ts), Some(ps)) => {
                if ts.starts_with('{') {
                    if ps.is_empty() {
                        return None;
                    }
                    param = Some(ps);
                } else if ts != ps {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// The templates that match `path`, and the param value.
fn find_route(path: &str) -> (Vec<(&'static str, &'static str)>, Option<&str>) {
    let mut found = Vec::new();
    let mut param = None;
    for &(m, t) in ROUTES {
        if let Some(p) = match_template(t, path) {
            found.push((m, t));
            param = p;
        }
    }
    (found, param)
}

/// The methods served on `path` (for a 405's Allow header); empty for an unknown path.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let (found, _) = find_route(path);
    found.into_iter().map(|(m, _)| m).collect()
}

/// Turns one HTTP request into a validated request. Unknown path: 404; known path, other
/// method: 405; bad body: 400. A query string is ignored.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Routed, ApiFault> {
    let path = path.split('?').next().unwrap_or(path);
    let (found, param) = find_route(path);
    let Some(&(_, template)) = found.iter().find(|(m, _)| *m == method) else {
        if let Some((_, what)) = UNSUPPORTED
            .iter()
            .find(|(t, _)| match_template(t, path).is_some())
        {
            return Err(ApiFault::bad_request(format!(
                "{method} {path}: {what} are not supported by wisp {VMM_VERSION} (it implements \
                 Firecracker's API v{FIRECRACKER_API_VERSION} without them)"
            )));
        }
        let invalid = format!("Invalid request method and/or path: {method} {path}");
        return Err(if found.is_empty() {
            ApiFault::new(404, invalid)
        } else {
            ApiFault::new(405, invalid)
        });
    };
    let param = param.unwrap_or("");
    let req = match (method, template) {
        ("GET", "/") => ApiRequest::GetInstanceInfo,
        ("GET", "/version") => {
            let v = serde_json::to_value(VersionInfo::current())
                .expect("VersionInfo serializes to JSON");
            return Ok(Routed::Local(v));
        }
        ("PUT", "/boot-source") => {
            let b: BootSource = parse_body(body)?;
            b.validate()?;
            ApiRequest::PutBootSource(b)
        }
        ("GET", "/machine-config") => ApiRequest::GetMachineConfig,
        ("PUT", "/machine-config") => {
            let m: MachineConfig = parse_body(body)?;
            m.validate()?;
            ApiRequest::PutMachineConfig(m)
        }
        ("PATCH", "/machine-config") => {
            let m: MachineConfigUpdate = parse_body(body)?;
            m.validate()?;
            ApiRequest::PatchMachineConfig(m)
        }
        ("GET", "/vm/config") => ApiRequest::GetVmConfig,
        ("PUT", "/drives/{drive_id}") => {
            let d: Drive = parse_body(body)?;
            check_path_id("drive_id", param, &d.drive_id)?;
            d.validate()?;
            ApiRequest::PutDrive(d)
        }
        ("PATCH", "/drives/{drive_id}") => {
            let d: DriveUpdate = parse_body(body)?;
            check_path_id("drive_id", param, &d.drive_id)?;
            d.validate()?;
            ApiRequest::PatchDrive(d)
        }
        ("PUT", "/network-interfaces/{iface_id}") => {
            let n: NetworkInterface = parse_body(body)?;
            check_path_id("iface_id", param, &n.iface_id)?;
            n.validate()?;
            ApiRequest::PutNetworkInterface(n)
        }
        ("PATCH", "/network-interfaces/{iface_id}") => {
            let n: NetworkInterfaceUpdate = parse_body(body)?;
            check_path_id("iface_id", param, &n.iface_id)?;
            n.validate()?;
            ApiRequest::PatchNetworkInterface(n)
        }
        ("PUT", "/vsock") => {
            let v: VsockDevice = parse_body(body)?;
            v.validate()?;
            ApiRequest::PutVsock(v)
        }
        ("PUT", "/entropy") => {
            let e: EntropyDevice = parse_body(body)?;
            e.validate()?;
            ApiRequest::PutEntropy(e)
        }
        ("GET", "/balloon") => ApiRequest::GetBalloon,
        ("PUT", "/balloon") => {
            let b: BalloonConfig = parse_body(body)?;
            balloon::check_balloon(&b)?;
            ApiRequest::PutBalloon(b)
        }
        ("PATCH", "/balloon") => ApiRequest::PatchBalloon(parse_body(body)?),
        ("GET", "/balloon/statistics") => ApiRequest::GetBalloonStats,
        ("PATCH", "/balloon/statistics") => ApiRequest::PatchBalloonStats(parse_body(body)?),
        ("PUT", "/serial") => {
            let c: SerialConfig = parse_body(body)?;
            c.validate()?;
            ApiRequest::PutSerial(c)
        }
        ("PUT", "/actions") => {
            let a: InstanceAction = parse_body(body)?;
            ApiRequest::Action(a.action_type)
        }
        ("PATCH", "/vm") => {
            let s: VmStateChange = parse_body(body)?;
            ApiRequest::PatchVm(s.state)
        }
        ("PUT", "/logger") => {
            let l: LoggerConfig = parse_body(body)?;
            l.validate()?;
            ApiRequest::PutLogger(l)
        }
        ("PUT", "/metrics") => {
            let m: MetricsConfig = parse_body(body)?;
            m.validate()?;
            ApiRequest::PutMetrics(m)
        }
        ("GET", "/vm/metrics") => ApiRequest::GetVmMetrics,
        ("GET", "/mmds") => ApiRequest::GetMmds,
        ("PUT", "/mmds") => ApiRequest::PutMmds(mmds::parse_mmds_data(body)?),
        ("PATCH", "/mmds") => ApiRequest::PatchMmds(mmds::parse_mmds_data(body)?),
        ("PUT", "/mmds/config") => {
            let c: MmdsConfig = parse_body(body)?;
            mmds::check_mmds_config(&c)?;
            ApiRequest::PutMmdsConfig(c)
        }
        ("PATCH", "/vm/cgroup") => {
            let c: CgroupUpdate = parse_body(body)?;
            c.validate()?;
            ApiRequest::PatchCgroup(c)
        }
        ("PUT", "/snapshot/create") => {
            let c: SnapshotCreate = parse_body(body)?;
            c.validate()?;
            ApiRequest::CreateSnapshot(c)
        }
        ("PUT", "/snapshot/load") => {
            let l: SnapshotLoad = parse_body(body)?;
            l.validate()?;
            ApiRequest::LoadSnapshot(l)
        }
        _ => unreachable!("ROUTES entry {method} {template} has no handler"),
    };
    Ok(Routed::Request(req))
}

/// Parses a JSON body; the fault names the field that is wrong (`vcpu_count: invalid type ...`).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiFault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFault::bad_request(
            "the request body is empty; this request needs a JSON object",
        ));
    }
    // serde's derived structs also accept a JSON array of the fields in order: refuse it.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiFault::bad_request(
            "invalid JSON body: expected a JSON object ({...})",
        ));
    }
    // Request bodies nest three levels at most; refusing deep nesting before serde recurses
    // keeps a hostile body from exhausting the connection thread's stack.
    if nesting_exceeds(body, MAX_JSON_DEPTH) {
        return Err(ApiFault::bad_request(format!(
            "invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = strip_position(&inner);
        if path == "." || path.is_empty() || inner.is_syntax() || inner.is_eof() {
            ApiFault::bad_request(format!("invalid JSON body: {msg}"))
        } else {
            ApiFault::bad_request(format!("{path}: {msg}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiFault::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Deepest nesting of JSON arrays and objects accepted in a body.
pub const MAX_JSON_DEPTH: usize = 16;

/// True if arrays/objects nest deeper than `max` (brackets inside strings do not count).
pub(super) fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// serde_json's message, with " at line L column C" kept only for syntax errors.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    if e.is_syntax() || e.is_eof() {
        return s;
    }
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
