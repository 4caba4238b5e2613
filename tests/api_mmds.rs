//! The metadata service (MMDS) through the API, as a node agent drives it: the document
//! (`PUT/PATCH/GET /mmds`) with its size limit, `PUT /mmds/config`, the config file's
//! `mmds-config` and Firecracker's `--metadata` and `--mmds-size-limit` flags. The guest's
//! side is tested in wisp-devices (crafted frames) and tests/linux_api.rs (a Linux guest).

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wisp-mmds-{}-{name}.sock", std::process::id()))
}

fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    api_call(sock, method, path, (!body.is_empty()).then_some(body))
}

fn fault(body: &str) -> String {
    serde_json::from_str::<Value>(body).unwrap_or_else(|e| panic!("{body:?}: {e}"))["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {body}"))
        .to_string()
}

fn get_mmds(sock: &Path) -> Value {
    let (st, body) = call(sock, "GET", "/mmds", "");
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A 400 whose fault_message contains `needle`.
fn assert_400(sock: &Path, method: &str, path: &str, body: &str, needle: &str) {
    let (st, answer) = call(sock, method, path, body);
    assert_eq!(st, 400, "{method} {path} {body}: {answer}");
    let f = fault(&answer);
    assert!(
        f.contains(needle),
        "{method} {path}: {f:?} lacks {needle:?}"
    );
}

#[test]
fn mmds_document_and_config_before_boot_with_the_size_limit_and_clear_errors() {
    let sock = sock_path("preboot");
    let s = sock.to_str().unwrap();
    let w = Wisp::spawn(&["--api-sock", s, "--mmds-size-limit", "200"]);
    wait_api_socket(&sock);

    assert_eq!(get_mmds(&sock), json!({}));
    assert_400(
        &sock,
        "PATCH",
        "/mmds",
        r#"{"a": "b"}"#,
        "not initialized: PUT /mmds before PATCH /mmds",
    );
    let doc = json!({"latest": {"meta-data": {"instance-id": "i-1", "zone": "z0"}}});
    assert_eq!(call(&sock, "PUT", "/mmds", &doc.to_string()).0, 204);
    assert_eq!(get_mmds(&sock), doc);
    // RFC 7396: null removes, objects merge.
    let patch =
        r#"{"latest": {"meta-data": {"instance-id": null, "zone": "z1"}, "user-data": "u"}}"#;
    assert_eq!(call(&sock, "PATCH", "/mmds", patch).0, 204);
    let patched = json!({"latest": {"meta-data": {"zone": "z1"}, "user-data": "u"}});
    assert_eq!(get_mmds(&sock), patched);

    // Over the limit (200 bytes of JSON), by PUT or by PATCH: refused, nothing changes.
    let big = json!({ "v": "x".repeat(300) }).to_string();
    assert_400(&sock, "PUT", "/mmds", &big, "over the limit of 200 bytes");
    assert_400(&sock, "PATCH", "/mmds", &big, "over the limit of 200 bytes");
    assert_eq!(get_mmds(&sock), patched);
    assert_400(&sock, "PUT", "/mmds", r#"{"a": "#, "invalid JSON body");
    assert_400(&sock, "PUT", "/mmds", "", "the request body is empty");

    // /mmds/config names interfaces that exist.
    let config = r#"{"network_interfaces": ["eth0"], "version": "V2"}"#;
    assert_400(
        &sock,
        "PUT",
        "/mmds/config",
        config,
        "\"eth0\" is not a network interface of this VM",
    );
    let nic = r#"{"iface_id": "eth0", "host_dev_name": "wmmds0"}"#;
    assert_eq!(call(&sock, "PUT", "/network-interfaces/eth0", nic).0, 204);
    assert_eq!(call(&sock, "PUT", "/mmds/config", config).0, 204);
    let (st, body) = call(&sock, "GET", "/vm/config", "");
    assert_eq!(st, 200);
    let vm: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        vm["mmds-config"],
        json!({"version": "V2", "network_interfaces": ["eth0"],
               "ipv4_address": "169.254.169.254", "imds_compat": false})
    );
    for (body, needle) in [
        (
            r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
            "10.0.0.1 is not a link-local address",
        ),
        (r#"{"network_interfaces": []}"#, "the list is empty"),
        (
            r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
            "version: unknown variant `V3`",
        ),
        (
            r#"{"network_interfaces": ["eth0"], "ttl": 5}"#,
            "unknown field `ttl`",
        ),
        (r#"{"version": "V1"}"#, "missing field `network_interfaces`"),
        (
            r#"{"network_interfaces": ["eth/0"]}"#,
            "\"eth/0\" is not a valid id",
        ),
    ] {
        assert_400(&sock, "PUT", "/mmds/config", body, needle);
    }
    // The last good configuration stands.
    let vm: Value = serde_json::from_str(&call(&sock, "GET", "/vm/config", "").1).unwrap();
    assert_eq!(vm["mmds-config"]["version"], "V2");
    drop(w);
}

#[test]
fn mmds_is_served_after_boot_and_its_config_is_only_taken_before() {
    // The VM has a NIC serving the MMDS (its responder is built with the device); the
    // guest side is tested in wisp-devices and tests/linux_api.rs.
    if !kvm_available("mmds_is_served_after_boot_and_its_config_is_only_taken_before") {
        return;
    }
    let dir = TestDir::new("mmds-boot");
    let metadata = dir.join("md.json");
    std::fs::write(
        &metadata,
        r#"{"latest": {"meta-data": {"instance-id": "i-7"}}}"#,
    )
    .unwrap();
    let sock = sock_path("boot");
    let s = sock.to_str().unwrap();
    // In a namespace of the test's own, with a tap for the interface that serves the MMDS.
    let ns = TestNetns::new("mmds");
    ns.add_tap("wmmds0", "10.0.0.1/24");
    let mut w = Wisp::spawn_cmd(ns.command(wisp_bin()).args([
        "--api-sock",
        s,
        "--mmds-size-limit",
        "1000",
        "--metadata",
        metadata.to_str().unwrap(),
    ]));
    wait_api_socket(&sock);
    let nic = r#"{"iface_id": "eth0", "host_dev_name": "wmmds0"}"#;
    assert_eq!(call(&sock, "PUT", "/network-interfaces/eth0", nic).0, 204);
    let config = r#"{"network_interfaces": ["eth0"], "version": "V2", "imds_compat": true}"#;
    assert_eq!(call(&sock, "PUT", "/mmds/config", config).0, 204);
    // --metadata seeded the document.
    assert_eq!(
        get_mmds(&sock),
        json!({"latest": {"meta-data": {"instance-id": "i-7"}}})
    );
    let kernel = probes().probe.to_str().unwrap().to_string();
    let boot =
        format!(r#"{{"kernel_image_path": "{kernel}", "boot_args": "probe.scenario=spin"}}"#);
    assert_eq!(call(&sock, "PUT", "/boot-source", &boot).0, 204);
    let mc = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(call(&sock, "PUT", "/machine-config", mc).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&sock, "PUT", "/actions", start).0, 204);
    w.wait_for("probe: progress 1", T);

    // The running VM's store: what was there at boot, then patched and replaced.
    assert_eq!(
        get_mmds(&sock),
        json!({"latest": {"meta-data": {"instance-id": "i-7"}}})
    );
    let patch = r#"{"latest": {"user-data": "hello"}}"#;
    assert_eq!(call(&sock, "PATCH", "/mmds", patch).0, 204);
    assert_eq!(
        get_mmds(&sock),
        json!({"latest": {"meta-data": {"instance-id": "i-7"}, "user-data": "hello"}})
    );
    let big = json!({ "v": "x".repeat(2000) }).to_string();
    assert_400(
        &sock,
        "PATCH",
        "/mmds",
        &big,
        "over the limit of 1000 bytes",
    );
    assert_400(&sock, "PUT", "/mmds", &big, "over the limit of 1000 bytes");
    assert_eq!(call(&sock, "PUT", "/mmds", r#"{"k": "v"}"#).0, 204);
    assert_eq!(get_mmds(&sock), json!({"k": "v"}));
    assert_400(
        &sock,
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"]}"#,
        "PUT /mmds/config is only valid before InstanceStart",
    );
    w.signal(libc::SIGTERM);
    let f = w.wait(Duration::from_secs(10));
    assert_eq!(f.code(), Some(128 + libc::SIGTERM), "{}", f.stderr);
    drop(ns);
}

#[test]
fn config_file_mmds_config_is_checked_and_a_bad_metadata_file_is_named() {
    let dir = TestDir::new("mmds-file");
    let kernel = probes().probe.to_str().unwrap().to_string();
    let file = dir.join("vm.json");
    std::fs::write(
        &file,
        json!({
            "boot-source": {"kernel_image_path": kernel},
            "mmds-config": {"network_interfaces": ["eth0"], "version": "V2"}
        })
        .to_string(),
    )
    .unwrap();
    let f = Wisp::spawn(&["--no-api", "--config-file", file.to_str().unwrap()])
        .wait(Duration::from_secs(30));
    assert_eq!(f.code(), Some(1), "{}", f.stderr);
    assert!(
        f.stderr
            .contains("mmds-config: network_interfaces: \"eth0\" is not a network interface"),
        "{}",
        f.stderr
    );
    let plain = dir.join("plain.json");
    std::fs::write(
        &plain,
        json!({"boot-source": {"kernel_image_path": kernel}}).to_string(),
    )
    .unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    for (path, needle) in [
        (bad.to_str().unwrap(), "invalid JSON"),
        ("/nonexistent/md.json", "/nonexistent/md.json"),
    ] {
        let f = Wisp::spawn(&[
            "--no-api",
            "--config-file",
            plain.to_str().unwrap(),
            "--metadata",
            path,
        ])
        .wait(Duration::from_secs(30));
        assert_eq!(f.code(), Some(1), "{}", f.stderr);
        assert!(f.stderr.contains(needle), "{}", f.stderr);
    }
}
