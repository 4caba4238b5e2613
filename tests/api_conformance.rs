//! Conformance with Firecracker's own API description (tests/data/firecracker-v1.16.1.json,
//! from its swagger): every path and method it lists, with a minimal and a full body made from
//! its schemas, before and after boot, gets a status Firecracker could give (the codes it
//! lists, or 400 for its `default` error) and, when refused, a one-line fault_message. The
//! endpoints wisp implements accept the minimal bodies in the right VM state; the ones it does
//! not implement say so.

mod common;
use common::*;
use serde_json::{json, Map, Value};
use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn swagger() -> Value {
    serde_json::from_str(include_str!("data/firecracker-v1.16.1.json"))
        .expect("tests/data/firecracker-v1.16.1.json is JSON")
}

/// One operation of the document.
struct Op {
    method: String,
    template: String,
    body: Option<Value>,
    /// The status codes it lists (`default` stands for 400 here).
    codes: Vec<u16>,
}

fn operations(doc: &Value) -> Vec<Op> {
    let mut ops = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let body = op["parameters"].as_array().and_then(|ps| {
                ps.iter()
                    .find(|p| p["in"] == "body")
                    .map(|p| p["schema"].clone())
            });
            let mut codes: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter_map(|c| c.parse().ok())
                .collect();
            codes.push(400);
            ops.push(Op {
                method: method.to_uppercase(),
                template: template.clone(),
                body,
                codes,
            });
        }
    }
    ops
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.strip_prefix("#/definitions/").expect("local $ref");
            &doc["definitions"][name]
        }
        None => schema,
    }
}

/// Makes request bodies from the document's schemas, with values a node agent would send.
struct Bodies<'a> {
    doc: &'a Value,
    dir: &'a Path,
    /// The path parameter of the request being made (drive_id, iface_id, pmem id).
    id: String,
    files: Cell<u32>,
}

impl Bodies<'_> {
    /// A fresh 1 MiB file (disks, initrds, log and metrics destinations).
    fn scratch_file(&self) -> String {
        let n = self.files.get() + 1;
        self.files.set(n);
        let p = self.dir.join(format!("file{n}"));
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn value(&self, name: &str, schema: &Value, full: bool) -> Value {
        let s = resolve(self.doc, schema);
        if let Some(e) = s["enum"].as_array() {
            return e[0].clone();
        }
        match s["type"].as_str() {
            Some("object") | None if s["properties"].is_object() => {
                let required: Vec<&str> = s["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut obj = Map::new();
                for (k, v) in s["properties"].as_object().unwrap() {
                    // A drive needs a file or a vhost-user socket; agents give the file.
                    if full || required.contains(&k.as_str()) || k == "path_on_host" {
                        obj.insert(k.clone(), self.value(k, v, full));
                    }
                }
                Value::Object(obj)
            }
            Some("object") | None => json!({}),
            Some("array") => match full {
                true => json!([self.value(name, &s["items"], full)]),
                false => json!([]),
            },
            Some("boolean") => json!(false),
            Some("integer") | Some("number") => match name {
                "vcpu_count" => json!(1),
                "mem_size_mib" => json!(128),
                "mtu" => json!(1500),
                _ => json!(s["minimum"].as_u64().unwrap_or(1)),
            },
            Some("string") => json!(match name {
                "kernel_image_path" => probes().probe.to_str().unwrap().to_string(),
                "boot_args" => "probe.scenario=ctrl-alt-del".to_string(),
                "drive_id" | "iface_id" | "id" => self.id.clone(),
                "guest_mac" => "06:00:ac:10:00:02".to_string(),
                "host_dev_name" => "wispconf0".to_string(),
                "partuuid" => "0eaa91a0-01".to_string(),
                "module" => "wisp".to_string(),
                n if n.ends_with("_path") || n == "path_on_host" => self.scratch_file(),
                _ => "x".to_string(),
            }),
            other => panic!("{name}: schema type {other:?}"),
        }
    }
}

/// The concrete path, and the id its parameter takes.
fn concrete(template: &str) -> (String, String) {
    for (param, id) in [
        ("{drive_id}", "rootfs"),
        ("{iface_id}", "eth0"),
        ("{id}", "pmem0"),
    ] {
        if template.contains(param) {
            return (template.replace(param, id), id.to_string());
        }
    }
    (template.to_string(), String::new())
}

/// What wisp answered one request.
struct Answer {
    what: String,
    status: u16,
    body: String,
}

impl Answer {
    fn fault(&self) -> String {
        let v: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{}: {e}: {:?}", self.what, self.body));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["fault_message"], "{}: {}", self.what, self.body);
        v["fault_message"].as_str().unwrap().to_string()
    }
}

/// Sends every operation but the ones that change the VM's state (actions, PATCH /vm), each
/// with its minimal and full body; checks what every answer must be.
fn send_all(sock: &Path, dir: &Path, phase: &str) -> Vec<(Op, bool, Answer)> {
    let doc = swagger();
    let mut answers = Vec::new();
    for op in operations(&doc) {
        if (op.method.as_str(), op.template.as_str()) == ("PUT", "/actions")
            || (op.method.as_str(), op.template.as_str()) == ("PATCH", "/vm")
        {
            continue;
        }
        let (path, id) = concrete(&op.template);
        let bodies = Bodies {
            doc: &doc,
            dir,
            id,
            files: Cell::new(answers.len() as u32 * 10),
        };
        for full in [false, true] {
            let body = op
                .body
                .as_ref()
                .map(|s| bodies.value("", s, full).to_string());
            if body.is_none() && full {
                continue;
            }
            let (status, text) = api_call(sock, &op.method, &path, body.as_deref());
            let what = format!(
                "{phase}: {} {path} {}",
                op.method,
                body.as_deref().unwrap_or("")
            );
            let a = Answer {
                what,
                status,
                body: text,
            };
            // The table a reader of `--nocapture` checks by eye.
            eprintln!("{} -> {} {}", a.what, a.status, a.body);
            check_answer(&op, &a);
            answers.push((
                Op {
                    method: op.method.clone(),
                    template: op.template.clone(),
                    body: None,
                    codes: op.codes.clone(),
                },
                full,
                a,
            ));
        }
    }
    answers
}

fn is_unsupported(template: &str) -> bool {
    wisp::api::UNSUPPORTED.iter().any(|(t, _)| *t == template)
}

fn check_answer(op: &Op, a: &Answer) {
    assert!(
        op.codes.contains(&a.status),
        "{}: status {} is not one Firecracker gives here ({:?}): {}",
        a.what,
        a.status,
        op.codes,
        a.body
    );
    match a.status {
        200 => {
            serde_json::from_str::<Value>(&a.body)
                .unwrap_or_else(|e| panic!("{}: {e}: {}", a.what, a.body));
        }
        204 => assert!(a.body.is_empty(), "{}: {}", a.what, a.body),
        _ => {
            let f = a.fault();
            assert!(
                !f.is_empty() && !f.contains('\n') && f.len() < 400,
                "{}: {f:?}",
                a.what
            );
            assert!(
                !f.starts_with("Invalid request method and/or path"),
                "{}: Firecracker's endpoint is not recognised: {f}",
                a.what
            );
            if is_unsupported(&op.template) {
                assert!(
                    f.contains(&format!("not supported by wisp {}", wisp::api::VMM_VERSION)),
                    "{}: {f}",
                    a.what
                );
            }
        }
    }
}

/// The status of the minimal-body request for `method template`.
fn minimal<'a>(answers: &'a [(Op, bool, Answer)], method: &str, template: &str) -> &'a Answer {
    &answers
        .iter()
        .find(|(op, full, _)| !full && op.method == method && op.template == template)
        .unwrap_or_else(|| panic!("{method} {template} was not sent"))
        .2
}

#[test]
fn firecracker_swagger_lists_only_what_wisp_serves_or_refuses_by_name() {
    let doc = swagger();
    assert_eq!(doc["info"]["version"], wisp::api::FIRECRACKER_API_VERSION);
    for op in operations(&doc) {
        let served = wisp::api::ROUTES
            .iter()
            .any(|(m, t)| *m == op.method && *t == op.template);
        assert!(
            served || is_unsupported(&op.template),
            "{} {}: neither served nor listed as unsupported",
            op.method,
            op.template
        );
    }
}

#[test]
fn every_firecracker_endpoint_and_body_gets_an_answer_firecracker_could_give() {
    if !kvm_available("every_firecracker_endpoint_and_body_gets_an_answer_firecracker_could_give") {
        return;
    }
    let dir = TestDir::new("api-conformance");

    // Before boot, on a VM that never starts (its tap does not exist).
    let sock = dir.join("pre.sock");
    let w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "conf-pre"]);
    wait_api_socket(&sock);
    let pre = send_all(&sock, &dir, "before boot");
    for (method, template) in [
        ("GET", "/"),
        ("GET", "/version"),
        ("GET", "/machine-config"),
        ("GET", "/vm/config"),
        ("PUT", "/boot-source"),
        ("PUT", "/machine-config"),
        ("PATCH", "/machine-config"),
        ("PUT", "/drives/{drive_id}"),
        ("PUT", "/network-interfaces/{iface_id}"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/serial"),
    ] {
        let a = minimal(&pre, method, template);
        assert!(a.status < 300, "{}: {} {}", a.what, a.status, a.body);
    }
    for (method, template) in [
        ("PATCH", "/drives/{drive_id}"),
        ("PATCH", "/network-interfaces/{iface_id}"),
    ] {
        let a = minimal(&pre, method, template);
        assert!(
            a.status == 400 && a.fault().contains("only valid once the VM has started"),
            "{}: {}",
            a.what,
            a.body
        );
    }
    let action = |sock: &Path, a: &str| {
        api_call(
            sock,
            "PUT",
            "/actions",
            Some(&format!(r#"{{"action_type": "{a}"}}"#)),
        )
    };
    assert_eq!(action(&sock, "FlushMetrics").0, 204);
    let (st, body) = action(&sock, "SendCtrlAltDel");
    assert_eq!(st, 400, "{body}");
    let (st, body) = api_call(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(st, 400, "{body}");
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(T).code(), Some(128 + libc::SIGTERM));

    // After boot.
    let sock = dir.join("post.sock");
    let mut w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "conf-post"]);
    wait_api_socket(&sock);
    let disk = dir.join("rootfs.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    for (path, body) in [
        (
            "/boot-source",
            format!(
                r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=ctrl-alt-del"}}"#,
                probes().probe.display()
            ),
        ),
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#.into(),
        ),
        (
            "/drives/rootfs",
            format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": false}}"#,
                disk.display()
            ),
        ),
    ] {
        let (st, resp) = api_call(&sock, "PUT", path, Some(&body));
        assert_eq!(st, 204, "PUT {path}: {resp}");
    }
    assert_eq!(action(&sock, "InstanceStart").0, 204);
    w.wait_for("probe: waiting for ctrl-alt-del", T);
    let post = send_all(&sock, &dir, "after boot");
    for (method, template) in [
        ("GET", "/"),
        ("GET", "/version"),
        ("GET", "/machine-config"),
        ("GET", "/vm/config"),
        ("PATCH", "/drives/{drive_id}"),
    ] {
        let a = minimal(&post, method, template);
        assert!(a.status < 300, "{}: {} {}", a.what, a.status, a.body);
    }
    for (method, template) in [
        ("PUT", "/boot-source"),
        ("PUT", "/machine-config"),
        ("PUT", "/drives/{drive_id}"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/serial"),
    ] {
        let a = minimal(&post, method, template);
        assert!(
            a.status == 400 && a.fault().contains("only valid before InstanceStart"),
            "{}: {}",
            a.what,
            a.body
        );
    }
    // The VM has no interface eth0: the PATCH says so.
    let a = minimal(&post, "PATCH", "/network-interfaces/{iface_id}");
    assert!(
        a.status == 400 && a.fault().contains("no network interface \"eth0\""),
        "{}",
        a.body
    );
    for state in ["Paused", "Resumed"] {
        let (st, body) = api_call(
            &sock,
            "PATCH",
            "/vm",
            Some(&format!(r#"{{"state": "{state}"}}"#)),
        );
        assert_eq!(st, 204, "{state}: {body}");
    }
    assert_eq!(action(&sock, "FlushMetrics").0, 204);
    assert_eq!(action(&sock, "InstanceStart").0, 400);
    assert_eq!(action(&sock, "SendCtrlAltDel").0, 204);
    let f = w.wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
}
