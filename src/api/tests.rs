//! Router, body validation, PendingConfig and OpenAPI document tests (no socket).

use super::*;
use serde_json::{json, Value};

fn req(method: &str, path: &str, body: &str) -> Result<ApiRequest, ApiFault> {
    match route(method, path, body.as_bytes())? {
        Routed::Request(r) => Ok(r),
        Routed::Local(v) => panic!("{method} {path} answered locally: {v}"),
    }
}

fn fault(method: &str, path: &str, body: &str) -> ApiFault {
    req(method, path, body).expect_err("request should be refused")
}

fn assert_fault(f: &ApiFault, status: u16, needle: &str) {
    assert_eq!(f.status, status, "{f}");
    assert!(
        f.fault_message.contains(needle),
        "fault {:?} does not mention {needle:?}",
        f.fault_message
    );
}

/// A readable regular file for the path checks of PendingConfig.
fn existing_file() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").to_string()
}

#[test]
fn get_routes() {
    assert_eq!(req("GET", "/", "").unwrap(), ApiRequest::GetInstanceInfo);
    assert_eq!(
        req("GET", "/machine-config", "").unwrap(),
        ApiRequest::GetMachineConfig
    );
    assert_eq!(
        req("GET", "/vm/config", "").unwrap(),
        ApiRequest::GetVmConfig
    );
    assert_eq!(
        req("GET", "/vm/metrics", "").unwrap(),
        ApiRequest::GetVmMetrics
    );
    // A query string is ignored.
    assert_eq!(
        req("GET", "/?x=1", "").unwrap(),
        ApiRequest::GetInstanceInfo
    );
    match route("GET", "/version", b"").unwrap() {
        Routed::Local(v) => {
            // Client libraries compare firecracker_version with the Firecracker release
            // they need; wisp's own version is a field of its own.
            assert_eq!(v["firecracker_version"], FIRECRACKER_API_VERSION);
            assert_eq!(v["wisp_version"], VMM_VERSION);
            assert_eq!(v["app_name"], "wisp");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn firecracker_endpoints_wisp_lacks_answer_400_naming_wisp_and_its_version() {
    for (method, path, what) in [
        ("PATCH", "/balloon/hinting/stop", "free page hinting"),
        ("PUT", "/cpu-config", "CPU templates"),
        ("PUT", "/pmem/pmem0", "virtio-pmem"),
        ("PATCH", "/hotplug/memory", "memory hotplug"),
    ] {
        let f = fault(method, path, "{}");
        assert_fault(&f, 400, what);
        assert!(
            f.fault_message.starts_with(&format!("{method} {path}: ")),
            "{f}"
        );
        assert_fault(&f, 400, &format!("not supported by wisp {VMM_VERSION}"));
    }
}

#[test]
fn patch_network_interface_takes_rate_limiters() {
    let r = req(
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0"}"#,
    )
    .unwrap();
    assert_eq!(r.allowed(), Allowed::PostBoot);
    assert_eq!(r.describe(), "PATCH /network-interfaces/eth0");
    for body in [
        r#"{"iface_id": "eth0", "rx_rate_limiter": null}"#,
        r#"{"iface_id": "eth0", "rx_rate_limiter": {}, "tx_rate_limiter": {"bandwidth": null, "ops": null}}"#,
        // Size 0 is no limit (whatever the refill time).
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
        r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}, "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}}"#,
    ] {
        assert!(matches!(
            req("PATCH", "/network-interfaces/eth0", body).unwrap(),
            ApiRequest::PatchNetworkInterface(_)
        ));
    }
    // Firecracker silently takes a zero refill time as no limit; wisp says it cannot be.
    let zero = r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100}, "ops": {"size": 10, "refill_time": 0}}}"#;
    assert_fault(
        &fault("PATCH", "/network-interfaces/eth0", zero),
        400,
        "rx_rate_limiter.ops.refill_time is 0 with size 10: give the milliseconds to refill the bucket, or size 0 for no limit",
    );
    assert_fault(
        &fault(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth1"}"#,
        ),
        400,
        "the path names \"eth0\" but the body names \"eth1\"",
    );
    assert_fault(
        &fault(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "mtu": 1500}"#,
        ),
        400,
        "unknown field `mtu`",
    );
}

#[test]
fn put_serial_names_the_output_file() {
    match req(
        "PUT",
        "/serial",
        r#"{"serial_out_path": "/tmp/serial.log"}"#,
    )
    .unwrap()
    {
        ApiRequest::PutSerial(c) => {
            assert_eq!(
                c.serial_out_path.as_deref(),
                Some(std::path::Path::new("/tmp/serial.log"))
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        req("PUT", "/serial", "{}").unwrap().allowed(),
        Allowed::PreBoot
    );
    assert_fault(
        &fault("PUT", "/serial", r#"{"serial_out_path": ""}"#),
        400,
        "serial_out_path: empty path",
    );
    assert_fault(
        &fault(
            "PUT",
            "/serial",
            r#"{"rate_limiter": {"size": 100, "refill_time": 10}}"#,
        ),
        400,
        "rate_limiter: rate limiting the serial output is not supported",
    );
    // Applied before boot, the file becomes the console.
    let mut p = PendingConfig::new();
    p.apply(
        &req(
            "PUT",
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{}"}}"#, existing_file()),
        )
        .unwrap(),
    )
    .unwrap();
    p.apply(
        &req(
            "PUT",
            "/serial",
            r#"{"serial_out_path": "/tmp/serial.log"}"#,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        p.to_vm_config().unwrap().console,
        crate::config::ConsoleConfig::File("/tmp/serial.log".into())
    );
}

#[test]
fn put_entropy_gives_the_vm_an_rng_device_with_its_rate_limiter() {
    for body in [
        "{}",
        r#"{"rate_limiter": null}"#,
        r#"{"rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100}}}"#,
    ] {
        let r = req("PUT", "/entropy", body).unwrap();
        assert!(matches!(r, ApiRequest::PutEntropy(_)), "{body}");
        assert_eq!(r.allowed(), Allowed::PreBoot);
        assert_eq!(r.describe(), "PUT /entropy");
    }
    // A limit is the device's (checked as the drives' are).
    match req(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
    )
    .unwrap()
    {
        ApiRequest::PutEntropy(e) => assert!(e.rate_limiter.unwrap().limits()),
        other => panic!("{other:?}"),
    }
    assert_fault(
        &fault(
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 0}}}"#,
        ),
        400,
        "rate_limiter.ops",
    );
    assert_fault(
        &fault("PUT", "/entropy", r#"{"bytes": 1}"#),
        400,
        "unknown field `bytes`",
    );
    let boot = req(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, existing_file()),
    )
    .unwrap();
    let mut p = PendingConfig::new();
    p.apply(&boot).unwrap();
    // Through the API, as in Firecracker, the device is there only when asked for.
    assert!(!p.to_vm_config().unwrap().entropy);
    assert_eq!(p.to_json()["entropy"], Value::Null);
    p.apply(&req("PUT", "/entropy", "{}").unwrap()).unwrap();
    assert!(p.to_vm_config().unwrap().entropy);
    assert_eq!(p.to_json()["entropy"], serde_json::json!({}));
    // A second PUT replaces the first: still one device.
    p.apply(&req("PUT", "/entropy", r#"{"rate_limiter": null}"#).unwrap())
        .unwrap();
    assert!(p.to_vm_config().unwrap().entropy);
}

#[test]
fn put_vsock_checks_the_cid_and_the_socket_path() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let uds = dir.as_path().join("v.sock");
    let body = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
    let r = req("PUT", "/vsock", &body).unwrap();
    assert_eq!(r.allowed(), Allowed::PreBoot);
    assert_eq!(r.describe(), "PUT /vsock");
    // Firecracker's deprecated vsock_id is accepted.
    let with_id = format!(
        r#"{{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "{}"}}"#,
        uds.display()
    );
    assert!(matches!(
        req("PUT", "/vsock", &with_id).unwrap(),
        ApiRequest::PutVsock(_)
    ));
    for (body, why) in [
        (
            r#"{"guest_cid": 0, "uds_path": "/tmp/v.sock"}"#.to_string(),
            "vsock: guest_cid 0 is reserved; use 3 or more",
        ),
        (
            r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#.into(),
            "vsock: guest_cid 2 is reserved",
        ),
        (
            r#"{"guest_cid": 3, "uds_path": "/etc/passwd"}"#.into(),
            "uds_path /etc/passwd: exists and is not a Unix socket",
        ),
        (
            format!(
                r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
                dir.as_path().display()
            ),
            "exists and is not a Unix socket",
        ),
        (
            r#"{"guest_cid": 3, "uds_path": ""}"#.into(),
            "uds_path: empty path",
        ),
        (
            format!(
                r#"{{"guest_cid": 3, "uds_path": "/tmp/{}"}}"#,
                "x".repeat(100)
            ),
            "at most 96",
        ),
        (r#"{"guest_cid": 3}"#.into(), "missing field `uds_path`"),
        (
            r#"{"guest_cid": -1, "uds_path": "/v"}"#.into(),
            "guest_cid: invalid value",
        ),
    ] {
        assert_fault(&fault("PUT", "/vsock", &body), 400, why);
    }
    let mut p = PendingConfig::new();
    p.apply(
        &req(
            "PUT",
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{}"}}"#, existing_file()),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(p.to_json()["vsock"], Value::Null);
    p.apply(&r).unwrap();
    let c = p.to_vm_config().unwrap();
    assert_eq!(c.vsock.unwrap().uds_path, uds);
    assert_eq!(p.to_json()["vsock"]["guest_cid"], 3);
}

#[test]
fn unknown_path_is_404_and_wrong_method_is_405() {
    assert_fault(
        &fault("GET", "/nothing", ""),
        404,
        "Invalid request method and/or path: GET /nothing",
    );
    // A typo of a Firecracker endpoint is still unknown.
    assert_fault(&fault("PUT", "/balloons", "{}"), 404, "/balloons");
    assert_fault(&fault("PUT", "/drives/", "{}"), 404, "/drives/");
    assert_fault(&fault("PUT", "/drives/a/b", "{}"), 404, "/drives/a/b");
    assert_fault(&fault("DELETE", "/", ""), 405, "DELETE /");
    assert_fault(&fault("GET", "/boot-source", ""), 405, "GET /boot-source");
    assert_eq!(
        allowed_methods("/machine-config"),
        vec!["GET", "PUT", "PATCH"]
    );
    assert_eq!(allowed_methods("/drives/x"), vec!["PUT", "PATCH"]);
    assert!(allowed_methods("/nothing").is_empty());
}

#[test]
fn boot_source() {
    let r = req(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
    )
    .unwrap();
    assert_eq!(
        r,
        ApiRequest::PutBootSource(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        })
    );
    assert_fault(
        &fault("PUT", "/boot-source", "{}"),
        400,
        "missing field `kernel_image_path`",
    );
    assert_fault(
        &fault("PUT", "/boot-source", r#"{"kernel_image_path": ""}"#),
        400,
        "kernel_image_path: empty path",
    );
    assert_fault(
        &fault(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "kernel": "/k"}"#,
        ),
        400,
        "unknown field `kernel`",
    );
    assert_fault(
        &fault("PUT", "/boot-source", r#"{"kernel_image_path": 5}"#),
        400,
        "kernel_image_path: invalid type",
    );
}

#[test]
fn malformed_or_empty_json() {
    assert_fault(
        &fault("PUT", "/boot-source", r#"{"kernel_image_path": "/k""#),
        400,
        "invalid JSON body: EOF",
    );
    assert_fault(
        &fault("PUT", "/boot-source", "{,}"),
        400,
        "invalid JSON body: key must be a string",
    );
    assert_fault(
        &fault("PUT", "/boot-source", ""),
        400,
        "the request body is empty",
    );
    assert_fault(
        &fault("PUT", "/boot-source", "[1]"),
        400,
        "invalid JSON body: expected a JSON object",
    );
    assert_fault(
        &fault("PUT", "/actions", r#"{"action_type": "InstanceStart"} x"#),
        400,
        "trailing characters",
    );
}

#[test]
fn machine_config_ranges_and_types() {
    let r = req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    )
    .unwrap();
    let ApiRequest::PutMachineConfig(m) = r else {
        panic!("{r:?}")
    };
    assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 256, false));
    let put = |b: &str| fault("PUT", "/machine-config", b);
    assert_fault(
        &put(r#"{"vcpu_count": 0, "mem_size_mib": 256}"#),
        400,
        "vcpu_count: must be between 1 and 32, got 0",
    );
    assert_fault(
        &put(r#"{"vcpu_count": 1000, "mem_size_mib": 256}"#),
        400,
        "vcpu_count: must be between 1 and 32, got 1000",
    );
    assert_fault(
        &put(r#"{"vcpu_count": -1, "mem_size_mib": 256}"#),
        400,
        "vcpu_count: invalid value: integer `-1`",
    );
    assert_fault(
        &put(r#"{"vcpu_count": "2", "mem_size_mib": 256}"#),
        400,
        "vcpu_count: invalid type: string \"2\"",
    );
    assert_fault(
        &put(r#"{"vcpu_count": 2, "mem_size_mib": 32}"#),
        400,
        "mem_size_mib: must be between 64",
    );
    assert_fault(
        &put(r#"{"vcpu_count": 2}"#),
        400,
        "missing field `mem_size_mib`",
    );
    assert_fault(
        &put(r#"{"vcpu_count": 3, "mem_size_mib": 256, "smt": true}"#),
        400,
        "smt: true puts two threads on each core, so vcpu_count must be 1 or even, got 3",
    );
    // Two threads per core reach the VM's configuration (cpuid.rs lays out the topology).
    let mut p = PendingConfig::new();
    p.apply(
        &req(
            "PUT",
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{}"}}"#, existing_file()),
        )
        .unwrap(),
    )
    .unwrap();
    p.apply(
        &req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 4, "mem_size_mib": 256, "smt": true}"#,
        )
        .unwrap(),
    )
    .unwrap();
    assert!(p.to_vm_config().unwrap().smt);
    assert_fault(
        &put(r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"}"#),
        400,
        "cpu_template: \"T2\" is not supported",
    );
    // 2 MiB huge pages are served (tests/api_firecracker.rs boots on them); other sizes and
    // memory that is not a whole number of them are not.
    match req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
    ) {
        Ok(ApiRequest::PutMachineConfig(m)) => assert!(m.huge_pages_2m()),
        other => panic!("{other:?}"),
    }
    assert_fault(
        &put(r#"{"vcpu_count": 2, "mem_size_mib": 255, "huge_pages": "2M"}"#),
        400,
        "huge_pages: \"2M\" needs mem_size_mib to be a multiple of 2, got 255",
    );
    assert_fault(
        &put(r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "1G"}"#),
        400,
        "huge_pages: \"1G\" is not a huge page size wisp knows",
    );
    assert_fault(
        &put(r#"{"vcpu_count": 2, "mem_size_mib": 256, "vcpus": 2}"#),
        400,
        "unknown field `vcpus`",
    );
    // Firecracker's fields with the values wisp implements are accepted.
    req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": true,
            "cpu_template": "None", "huge_pages": "None"}"#,
    )
    .unwrap();
}

#[test]
fn machine_config_cgroup_extension() {
    let r = req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256,
            "cgroup": {"parent": "machines", "cpu_max": "20000/100000", "cpuset": "0-1", "affinity": "0:0,1:1"}}"#,
    )
    .unwrap();
    let ApiRequest::PutMachineConfig(m) = r else {
        panic!("{r:?}")
    };
    let spec = m.cgroup.as_ref().unwrap().to_spec();
    assert_eq!(spec.parent, "machines");
    assert_eq!(spec.cpu_max.unwrap().quota_us, Some(20000));
    assert_eq!(spec.cpuset.unwrap().cpus(), &[0, 1]);
    assert_eq!(spec.affinity.unwrap().host_cpu(1), Some(1));
    // It serializes back to the same string forms.
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(
        v["cgroup"],
        json!({"parent": "machines", "cpu_max": "20000/100000", "cpuset": "0-1", "affinity": "0:0,1:1"})
    );
    assert_fault(
        &fault(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256, "cgroup": {"cpu_max": "fast"}}"#,
        ),
        400,
        "cgroup.cpu_max: invalid CPU cap `fast`",
    );
    assert_fault(
        &fault(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256, "cgroup": {"affinity": "0:0,1:1"}}"#,
        ),
        400,
        "cgroup.affinity: vCPU 1 is pinned, but the VM has only 1 vCPUs",
    );
}

#[test]
fn patch_machine_config() {
    let r = req("PATCH", "/machine-config", r#"{"vcpu_count": 4}"#).unwrap();
    assert_eq!(
        r,
        ApiRequest::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(4),
            ..Default::default()
        })
    );
    assert_fault(
        &fault("PATCH", "/machine-config", r#"{"vcpu_count": 33}"#),
        400,
        "vcpu_count",
    );
    assert_fault(
        &fault("PATCH", "/machine-config", r#"{"memory": 1}"#),
        400,
        "unknown field `memory`",
    );
}

#[test]
fn drives() {
    let r = req(
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true, "is_read_only": false, "format": "qcow2", "serial": "disk0"}"#,
    )
    .unwrap();
    let ApiRequest::PutDrive(d) = r else {
        panic!("{r:?}")
    };
    assert_eq!(d.format, Some(crate::config::DiskFormat::Qcow2));
    assert_eq!(d.serial.as_deref(), Some("disk0"));
    let put = |id: &str, b: &str| fault("PUT", &format!("/drives/{id}"), b);
    assert_fault(
        &put(
            "other",
            r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true}"#,
        ),
        400,
        "drive_id: the path names \"other\" but the body names \"rootfs\"",
    );
    assert_fault(
        &put("a", r#"{"drive_id": "a", "path_on_host": "/img"}"#),
        400,
        "missing field `is_root_device`",
    );
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": "yes"}"#,
        ),
        400,
        "is_root_device: invalid type",
    );
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "format": "vmdk"}"#,
        ),
        400,
        "format: unknown variant `vmdk`",
    );
    // wisp's backing-file options: off unless given; block devices only with the files.
    let r = req(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "format": "qcow2", "backing_files": true, "backing_devices": true}"#,
    )
    .unwrap();
    let ApiRequest::PutDrive(d) = r else {
        panic!("{r:?}")
    };
    let disk = d.disk_config();
    assert!(disk.backing_files && disk.backing_devices && disk.backing_dir.is_none());
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "backing_devices": true}"#,
        ),
        400,
        "backing_devices=on: needs backing_files=on or backing_dir=DIR",
    );
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "backing_dir": "/nonexistent"}"#,
        ),
        400,
        "backing_dir /nonexistent: No such file or directory",
    );
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "io_engine": "Async"}"#,
        ),
        400,
        "io_engine",
    );
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 0}}}"#,
        ),
        400,
        "rate_limiter.bandwidth.refill_time is 0 with size 1",
    );
    // Negative, beyond 64 bits, fractional, missing or unknown: refused by name.
    for (limiter, needle) in [
        (
            r#"{"ops": {"size": -1, "refill_time": 1}}"#,
            "rate_limiter.ops.size: invalid value: integer `-1`",
        ),
        (
            r#"{"ops": {"size": 18446744073709551616, "refill_time": 1}}"#,
            "rate_limiter.ops.size",
        ),
        (
            r#"{"ops": {"size": 1.5, "refill_time": 1}}"#,
            "rate_limiter.ops.size: invalid type: floating point",
        ),
        (
            r#"{"bandwidth": {"size": 100}}"#,
            "missing field `refill_time`",
        ),
        (
            r#"{"bandwidth": {"size": 1, "refill_time": 1, "burst": 1}}"#,
            "unknown field `burst`",
        ),
        (
            r#"{"iops": {"size": 1, "refill_time": 1}}"#,
            "unknown field `iops`",
        ),
        (
            r#"{"ops": {"size": 1, "refill_time": 18446744073709551615}}"#,
            "rate_limiter.ops.refill_time 18446744073709551615 ms is more than the largest",
        ),
    ] {
        let body = format!(
            r#"{{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "rate_limiter": {limiter}}}"#
        );
        assert_fault(&put("a", &body), 400, needle);
    }
    let r = req(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}, "ops": {"size": 100, "one_time_burst": 10, "refill_time": 1000}}}"#,
    )
    .unwrap();
    let ApiRequest::PutDrive(d) = r else {
        panic!("{r:?}")
    };
    let l = d.rate_limiter.unwrap();
    assert_eq!(l.bandwidth.unwrap().size, 1 << 20);
    assert_eq!(l.ops.unwrap().one_time_burst, Some(10));
    assert_eq!(d.disk_config().rate_limiter, Some(l));
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "partuuid": "abc"}"#,
        ),
        400,
        "partuuid: only meaningful",
    );
    assert_fault(
        &put(
            "a.b",
            r#"{"drive_id": "a.b", "path_on_host": "/img", "is_root_device": false}"#,
        ),
        400,
        "drive_id: \"a.b\" is not a valid id",
    );
    assert_fault(
        &put(
            "a",
            r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "serial": "012345678901234567890"}"#,
        ),
        400,
        "serial: 21 bytes",
    );
    // Firecracker's null rate limiter and explicit defaults are fine.
    req(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "path_on_host": "/img", "is_root_device": false, "rate_limiter": null, "cache_type": "Unsafe", "io_engine": "Sync"}"#,
    )
    .unwrap();
    let r = req(
        "PATCH",
        "/drives/a",
        r#"{"drive_id": "a", "path_on_host": "/new"}"#,
    )
    .unwrap();
    assert_eq!(
        r,
        ApiRequest::PatchDrive(DriveUpdate {
            drive_id: "a".into(),
            path_on_host: Some("/new".into()),
            rate_limiter: None
        })
    );
    // Firecracker's PATCH may name only the drive (and a limiter): nothing to change.
    assert_eq!(
        req(
            "PATCH",
            "/drives/a",
            r#"{"drive_id": "a", "rate_limiter": {}}"#
        )
        .unwrap(),
        ApiRequest::PatchDrive(DriveUpdate {
            drive_id: "a".into(),
            path_on_host: None,
            rate_limiter: Some(Default::default())
        })
    );
    assert_fault(
        &fault(
            "PATCH",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/new"}"#,
        ),
        400,
        "drive_id",
    );
}

#[test]
fn network_interfaces() {
    let r = req(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
    )
    .unwrap();
    let ApiRequest::PutNetworkInterface(n) = r else {
        panic!("{r:?}")
    };
    assert_eq!(n.guest_mac, Some(MacAddr([6, 0, 0xac, 0x10, 0, 2])));
    assert_eq!(
        serde_json::to_value(n).unwrap()["guest_mac"],
        "06:00:ac:10:00:02"
    );
    let put = |b: &str| fault("PUT", "/network-interfaces/eth0", b);
    assert_fault(
        &put(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00"}"#),
        400,
        "guest_mac: \"06:00:ac:10:00\" is not a MAC address",
    );
    assert_fault(
        &put(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01"}"#),
        400,
        "multicast",
    );
    assert_fault(
        &put(r#"{"iface_id": "eth0", "host_dev_name": "a-very-long-tap-name"}"#),
        400,
        "host_dev_name",
    );
    assert_fault(
        &put(r#"{"iface_id": "eth0"}"#),
        400,
        "missing field `host_dev_name`",
    );
    assert_fault(
        &put(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#),
        400,
        "iface_id: the path names \"eth0\"",
    );
}

#[test]
fn actions_vm_state_logger_metrics_cgroup() {
    for (a, t) in [
        ("InstanceStart", ActionType::InstanceStart),
        ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
        ("FlushMetrics", ActionType::FlushMetrics),
    ] {
        let body = format!(r#"{{"action_type": "{a}"}}"#);
        assert_eq!(
            req("PUT", "/actions", &body).unwrap(),
            ApiRequest::Action(t)
        );
    }
    assert_fault(
        &fault("PUT", "/actions", r#"{"action_type": "Reboot"}"#),
        400,
        "action_type: unknown variant `Reboot`",
    );
    assert_eq!(
        req("PATCH", "/vm", r#"{"state": "Paused"}"#).unwrap(),
        ApiRequest::PatchVm(VmState::Paused)
    );
    assert_eq!(
        req("PATCH", "/vm", r#"{"state": "Resumed"}"#).unwrap(),
        ApiRequest::PatchVm(VmState::Resumed)
    );
    assert_fault(
        &fault("PATCH", "/vm", r#"{"state": "Stopped"}"#),
        400,
        "state: unknown variant `Stopped`",
    );
    let r = req(
        "PUT",
        "/logger",
        r#"{"log_path": "/tmp/log", "level": "Debug", "show_level": true}"#,
    )
    .unwrap();
    let ApiRequest::PutLogger(l) = r else {
        panic!()
    };
    assert_eq!(l.level.unwrap().to_level_filter(), log::LevelFilter::Debug);
    assert_fault(
        &fault("PUT", "/logger", r#"{"level": "Loud"}"#),
        400,
        "level: unknown level \"Loud\"",
    );
    for (text, level) in [
        ("warn", LogLevel::Warning),
        ("TRACE", LogLevel::Trace),
        ("Off", LogLevel::Off),
    ] {
        let body = format!(r#"{{"level": "{text}"}}"#);
        let ApiRequest::PutLogger(l) = req("PUT", "/logger", &body).unwrap() else {
            panic!()
        };
        assert_eq!(l.level, Some(level));
    }
    assert_fault(
        &fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 67}"#,
        ),
        400,
        "mtu: 67 is out of range",
    );
    assert_eq!(
        req("PUT", "/metrics", r#"{"metrics_path": "/tmp/m"}"#).unwrap(),
        ApiRequest::PutMetrics(MetricsConfig {
            metrics_path: "/tmp/m".into()
        })
    );
    assert_fault(
        &fault("PUT", "/metrics", "{}"),
        400,
        "missing field `metrics_path`",
    );

    let r = req(
        "PATCH",
        "/vm/cgroup",
        r#"{"cpu_max": "20000/100000", "cpuset": null}"#,
    )
    .unwrap();
    let ApiRequest::PatchCgroup(c) = r else {
        panic!()
    };
    assert_eq!(c.cpu_max.unwrap().unwrap().quota_us, Some(20000));
    assert_eq!(c.cpuset, Some(None));
    let r = req("PATCH", "/vm/cgroup", r#"{"cpuset": "1"}"#).unwrap();
    let ApiRequest::PatchCgroup(c) = r else {
        panic!()
    };
    assert_eq!(c.cpu_max, None);
    assert_fault(
        &fault("PATCH", "/vm/cgroup", "{}"),
        400,
        "nothing to change",
    );
    assert_fault(
        &fault("PATCH", "/vm/cgroup", r#"{"cpu_max": "500/100000"}"#),
        400,
        "cpu_max: CPU quota 500",
    );
    assert_fault(
        &fault("PATCH", "/vm/cgroup", r#"{"cpuset": "x"}"#),
        400,
        "cpuset: invalid CPU list",
    );
}

#[test]
fn allowed_states() {
    assert_eq!(
        ApiRequest::Action(ActionType::InstanceStart).allowed(),
        Allowed::PreBoot
    );
    assert_eq!(
        ApiRequest::PatchVm(VmState::Paused).allowed(),
        Allowed::PostBoot
    );
    assert_eq!(ApiRequest::GetInstanceInfo.allowed(), Allowed::Always);
    let f = ApiFault::wrong_state(&ApiRequest::Action(ActionType::InstanceStart), true);
    assert_fault(
        &f,
        400,
        "PUT /actions InstanceStart is only valid before InstanceStart",
    );
}

#[test]
fn instance_info_shape() {
    let v = serde_json::to_value(InstanceInfo::new("vm1", InstanceState::NotStarted)).unwrap();
    assert_eq!(
        v,
        json!({"id": "vm1", "state": "Not started", "vmm_version": FIRECRACKER_API_VERSION,
               "wisp_version": VMM_VERSION, "app_name": "wisp"})
    );
}

#[test]
fn pending_config_builds_a_vm_config() {
    let f = existing_file();
    let mut p = PendingConfig::new();
    let start = ApiRequest::Action(ActionType::InstanceStart);
    assert_fault(
        &p.to_vm_config().unwrap_err(),
        400,
        "no boot source configured",
    );
    assert_fault(
        &p.apply(&start).unwrap_err(),
        400,
        "is not a configuration request",
    );
    let apply =
        |p: &mut PendingConfig, m: &str, path: &str, b: String| p.apply(&req(m, path, &b).unwrap());
    apply(
        &mut p,
        "PUT",
        "/boot-source",
        format!(r#"{{"kernel_image_path": "{f}"}}"#),
    )
    .unwrap();
    apply(
        &mut p,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#.into(),
    )
    .unwrap();
    apply(
        &mut p,
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 256}"#.into(),
    )
    .unwrap();
    apply(&mut p, "PUT", "/drives/data", format!(r#"{{"drive_id": "data", "path_on_host": "{f}", "is_root_device": false, "serial": "d1"}}"#)).unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs");
    apply(&mut p, "PUT", "/drives/root", format!(r#"{{"drive_id": "root", "path_on_host": "{root}", "is_root_device": true, "is_read_only": true}}"#)).unwrap();
    apply(
        &mut p,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#.into(),
    )
    .unwrap();
    let c = p.to_vm_config().unwrap();
    assert_eq!(c.kernel, std::path::PathBuf::from(&f));
    assert_eq!(c.cpus, 2);
    assert_eq!(c.memory, crate::config::MemSize(256 << 20));
    assert_eq!(
        c.cmdline,
        format!("{} root=/dev/vda ro", crate::config::DEFAULT_CMDLINE)
    );
    // The root device is vda, whatever the PUT order.
    assert_eq!(c.disks.len(), 2);
    assert_eq!(c.disks[0].path, std::path::PathBuf::from(root));
    assert!(c.disks[0].readonly);
    assert_eq!(c.disks[1].serial.as_deref(), Some("d1"));
    assert_eq!(p.network_interfaces.len(), 1);

    // Errors at PUT time.
    let e = apply(
        &mut p,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#.into(),
    )
    .unwrap_err();
    assert_fault(
        &e,
        400,
        "kernel_image_path: /nonexistent/vmlinux: No such file or directory",
    );
    // A kernel or initrd is a regular file: not a block device (read whole into the guest),
    // not a named pipe (the open would wait for a writer), whatever the path looked like.
    use std::os::unix::fs::FileTypeExt;
    let block = std::fs::read_dir("/dev")
        .unwrap()
        .flatten()
        .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()));
    if let Some(dev) = block {
        for field in ["kernel_image_path", "initrd_path"] {
            let body = match field {
                "initrd_path" => format!(
                    r#"{{"kernel_image_path": "/etc/passwd", "initrd_path": "{}"}}"#,
                    dev.path().display()
                ),
                _ => format!(r#"{{"kernel_image_path": "{}"}}"#, dev.path().display()),
            };
            let e = apply(&mut p, "PUT", "/boot-source", body).unwrap_err();
            assert_fault(
                &e,
                400,
                &format!("{field}: {}: is a block device", dev.path().display()),
            );
        }
    }
    let e = apply(
        &mut p,
        "PUT",
        "/drives/root2",
        r#"{"drive_id": "root2", "path_on_host": "/tmp", "is_root_device": false}"#.to_string(),
    )
    .unwrap_err();
    assert_fault(&e, 400, "path_on_host: /tmp: is a directory");
    // A named pipe is refused before it is opened (the open would wait for a writer).
    let fifo = std::env::temp_dir().join(format!("wisp-api-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path of our own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = apply(
        &mut p,
        "PUT",
        "/drives/pipe",
        format!(
            r#"{{"drive_id": "pipe", "path_on_host": "{}", "is_root_device": false}}"#,
            fifo.display()
        ),
    )
    .unwrap_err();
    std::fs::remove_file(&fifo).unwrap();
    assert_fault(&e, 400, "is a named pipe");
    let e = apply(
        &mut p,
        "PUT",
        "/drives/root2",
        format!(r#"{{"drive_id": "root2", "path_on_host": "{f}", "is_root_device": true}}"#),
    )
    .unwrap_err();
    assert_fault(&e, 400, "already the root device");
    let e = apply(
        &mut p,
        "PUT",
        "/network-interfaces/eth1",
        r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#.into(),
    )
    .unwrap_err();
    assert_fault(&e, 400, "host_dev_name: \"tap0\" is already used");
    // Re-PUT of the same id replaces it.
    apply(
        &mut p,
        "PUT",
        "/boot-source",
        format!(r#"{{"kernel_image_path": "{f}", "boot_args": "quiet"}}"#),
    )
    .unwrap();
    assert_eq!(p.to_vm_config().unwrap().cmdline, "quiet root=/dev/vda ro");
    // root= goes to the kernel's arguments, not after the `--` where only init sees it.
    apply(
        &mut p,
        "PUT",
        "/boot-source",
        format!(r#"{{"kernel_image_path": "{f}", "boot_args": "quiet -- single"}}"#),
    )
    .unwrap();
    assert_eq!(
        p.to_vm_config().unwrap().cmdline,
        "quiet root=/dev/vda ro -- single"
    );

    // wisp's cgroup extension reaches VmConfig.cgroup.
    p.apply(
        &req(
            "PATCH",
            "/machine-config",
            r#"{"cgroup": {"cpu_max": "50000/100000", "cpuset": "0"}}"#,
        )
        .unwrap(),
    )
    .unwrap();
    let cg = p
        .to_vm_config()
        .unwrap()
        .cgroup
        .expect("cgroup in VmConfig");
    assert_eq!(cg.cpu_max.unwrap().quota_us, Some(50000));
    assert_eq!(cg.cpuset.unwrap().cpus(), &[0]);
    let e = p
        .apply(
            &req(
                "PATCH",
                "/machine-config",
                r#"{"cgroup": {"cpuset": "1023"}}"#,
            )
            .unwrap(),
        )
        .unwrap_err();
    assert_fault(&e, 400, "cgroup: host CPU 1023 in the cpuset is not online");

    let full = p.to_json();
    assert_eq!(full["machine-config"]["mem_size_mib"], 256);
    assert_eq!(full["drives"].as_array().unwrap().len(), 2);
    // GET /vm/config's answer is itself a valid config file for the same VM.
    let again =
        PendingConfig::from_firecracker_config(&serde_json::from_value(full).unwrap()).unwrap();
    assert_eq!(again, p);
}

#[test]
fn firecracker_config_file() {
    let f = existing_file();
    let text = format!(
        r#"{{
          "boot-source": {{"kernel_image_path": "{f}", "boot_args": "console=ttyS0 reboot=k panic=1"}},
          "drives": [{{"drive_id": "rootfs", "path_on_host": "{f}", "is_root_device": true, "is_read_only": false}}],
          "machine-config": {{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}},
          "network-interfaces": [{{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0"}}],
          "balloon": null, "vsock": null, "mmds-config": null, "memory-hotplug": null, "pmem": []
        }}"#
    );
    let file = FirecrackerConfig::from_json(&text).unwrap();
    let p = PendingConfig::from_firecracker_config(&file).unwrap();
    let c = p.to_vm_config().unwrap();
    assert_eq!((c.cpus, c.memory.0), (2, 1 << 30));
    assert_eq!(c.cmdline, "console=ttyS0 reboot=k panic=1 root=/dev/vda rw");
    assert_eq!(
        p.network_interfaces[0].guest_mac.unwrap().to_string(),
        "aa:fc:00:00:00:01"
    );

    assert_fault(
        &FirecrackerConfig::from_json(r#"{"drives": []}"#).unwrap_err(),
        400,
        "missing field `boot-source`",
    );
    assert_fault(
        &FirecrackerConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "x", "mem_size_mib": 1}}"#).unwrap_err(),
        400,
        "machine-config.vcpu_count: invalid type",
    );
    assert_fault(
        &FirecrackerConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "bogus": 1}]}"#).unwrap_err(),
        400,
        "drives[0].bogus: unknown field `bogus`",
    );
    let with_vsock = FirecrackerConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{f}"}}, "vsock": {{"guest_cid": 3, "uds_path": "/tmp/wisp-no-such-dir/v.sock"}}}}"#
    ))
    .unwrap();
    let c = PendingConfig::from_firecracker_config(&with_vsock)
        .unwrap()
        .to_vm_config()
        .unwrap();
    assert_eq!(c.vsock.unwrap().guest_cid, 3);
    let bad_cid = FirecrackerConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{f}"}}, "vsock": {{"guest_cid": 2, "uds_path": "/v"}}}}"#
    ))
    .unwrap();
    assert_fault(
        &PendingConfig::from_firecracker_config(&bad_cid).unwrap_err(),
        400,
        "vsock: guest_cid 2 is reserved",
    );
    let with_entropy = FirecrackerConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{f}"}}, "entropy": {{}}}}"#
    ))
    .unwrap();
    let p = PendingConfig::from_firecracker_config(&with_entropy).unwrap();
    assert!(p.to_vm_config().unwrap().entropy);
    let limited = FirecrackerConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{f}"}}, "entropy": {{"rate_limiter": {{"ops": {{"size": 10, "refill_time": 1000}}}}}}}}"#
    ))
    .unwrap();
    let c = PendingConfig::from_firecracker_config(&limited)
        .unwrap()
        .to_vm_config()
        .unwrap();
    assert!(c.entropy && c.entropy_rate_limiter.unwrap().limits());
    let with_pmem = FirecrackerConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{f}"}}, "pmem": [{{"id": "p", "path_on_host": "/p"}}]}}"#
    ))
    .unwrap();
    assert_fault(
        &PendingConfig::from_firecracker_config(&with_pmem).unwrap_err(),
        400,
        "pmem: not supported",
    );
    let bad_vcpus = FirecrackerConfig::from_json(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "{f}"}}, "machine-config": {{"vcpu_count": 0, "mem_size_mib": 128}}}}"#
    ))
    .unwrap();
    assert_fault(
        &PendingConfig::from_firecracker_config(&bad_vcpus).unwrap_err(),
        400,
        "vcpu_count: must be between 1 and 32, got 0",
    );
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document against the code
// ---------------------------------------------------------------------------------------------

fn openapi() -> Value {
    serde_json::from_str(OPENAPI_JSON).expect("openapi.json is valid JSON")
}

/// `(method, path template, operation)` for every operation in the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    ops
}

fn schema<'a>(doc: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").expect("local $ref");
            let target = &doc["components"]["schemas"][name];
            assert!(target.is_object(), "dangling $ref {r}");
            target
        }
        None => s,
    }
}

fn variant_name(r: &ApiRequest) -> &'static str {
    use ApiRequest::*;
    match r {
        GetInstanceInfo => "GetInstanceInfo",
        PutBootSource(_) => "PutBootSource",
        GetMachineConfig => "GetMachineConfig",
        PutMachineConfig(_) => "PutMachineConfig",
        PatchMachineConfig(_) => "PatchMachineConfig",
        GetVmConfig => "GetVmConfig",
        PutDrive(_) => "PutDrive",
        PatchDrive(_) => "PatchDrive",
        PutNetworkInterface(_) => "PutNetworkInterface",
        PatchNetworkInterface(_) => "PatchNetworkInterface",
        PutSerial(_) => "PutSerial",
        PutEntropy(_) => "PutEntropy",
        PutVsock(_) => "PutVsock",
        PutBalloon(_) => "PutBalloon",
        PatchBalloon(_) => "PatchBalloon",
        GetBalloon => "GetBalloon",
        GetBalloonStats => "GetBalloonStats",
        PatchBalloonStats(_) => "PatchBalloonStats",
        Action(_) => "Action",
        PatchVm(_) => "PatchVm",
        PutLogger(_) => "PutLogger",
        PutMetrics(_) => "PutMetrics",
        GetVmMetrics => "GetVmMetrics",
        PatchCgroup(_) => "PatchCgroup",
        GetMmds => "GetMmds",
        PutMmds(_) => "PutMmds",
        PatchMmds(_) => "PatchMmds",
        PutMmdsConfig(_) => "PutMmdsConfig",
        CreateSnapshot(_) => "CreateSnapshot",
        LoadSnapshot(_) => "LoadSnapshot",
    }
}

/// The concrete path for a template, taking the id from the body when there is one.
fn concrete_path(template: &str, body: Option<&Value>) -> String {
    let mut path = template.to_string();
    for param in ["drive_id", "iface_id"] {
        let id = body
            .and_then(|b| b[param].as_str())
            .unwrap_or("x")
            .to_string();
        path = path.replace(&format!("{{{param}}}"), &id);
    }
    path
}

/// The fields a request type accepts, from serde's "unknown field" message
/// ("expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`").
fn accepted_fields(method: &str, path: &str) -> Vec<String> {
    let f = route(method, path, br#"{"__probe__": 1}"#).expect_err("probe field refused");
    field_list(&f.fault_message)
}

fn field_list(msg: &str) -> Vec<String> {
    let (_, list) = msg
        .split_once(", expected ")
        .unwrap_or_else(|| panic!("no field list in {msg:?}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

#[test]
fn openapi_routes_are_the_served_routes() {
    let doc = openapi();
    assert_eq!(
        doc["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    let mut documented: Vec<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served, "openapi.json paths vs api::ROUTES");
    // And every route in the table is really served by the router.
    for (method, template) in ROUTES {
        let path = concrete_path(template, None);
        if let Err(f) = route(method, &path, b"{}") {
            assert!(
                f.status != 404 && f.status != 405,
                "{method} {template} is in ROUTES but not served: {f}"
            );
        }
    }
}

#[test]
fn openapi_request_examples_parse_into_the_right_request() {
    let doc = openapi();
    let mut checked = 0;
    for (method, template, op) in operations(&doc) {
        let body = &op["requestBody"];
        let expected = op["x-wisp-request"].as_str();
        if body.is_null() {
            let r = route(&method, &concrete_path(&template, None), b"")
                .unwrap_or_else(|f| panic!("{method} {template}: {f}"));
            match (r, expected) {
                (Routed::Request(r), Some(e)) => {
                    assert_eq!(variant_name(&r), e, "{method} {template}")
                }
                (Routed::Local(_), None) => {}
                (r, e) => panic!("{method} {template}: routed to {r:?}, document says {e:?}"),
            }
            continue;
        }
        let expected = expected.unwrap_or_else(|| panic!("{method} {template}: no x-wisp-request"));
        let content = &body["content"]["application/json"];
        let sch = schema(&doc, &content["schema"]);
        let examples = content["examples"].as_object().expect("request examples");
        assert!(!examples.is_empty(), "{method} {template}: no examples");
        for (i, (name, ex)) in examples.iter().enumerate() {
            let value = &ex["value"];
            let path = concrete_path(&template, Some(value));
            let text = serde_json::to_vec(value).unwrap();
            let r = match route(&method, &path, &text) {
                Ok(Routed::Request(r)) => r,
                other => panic!("{method} {template} example {name}: {other:?}"),
            };
            assert_eq!(
                variant_name(&r),
                expected,
                "{method} {template} example {name}"
            );
            checked += 1;
            // The document's `required` matches the code: dropping a field of the first
            // example breaks the request exactly when the field is required.
            if i == 0 {
                let required: Vec<&str> = sch["required"]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
                    .unwrap_or_default();
                for key in keys(value) {
                    let mut less = value.clone();
                    less.as_object_mut().unwrap().remove(&key);
                    let ok = route(&method, &path, &serde_json::to_vec(&less).unwrap()).is_ok();
                    assert_eq!(
                        ok,
                        !required.contains(&key.as_str()),
                        "{method} {template}: field {key} required in the code: {}, in the document: {}",
                        !ok,
                        required.contains(&key.as_str())
                    );
                }
            }
        }
        // A free-form document (the MMDS's) has no fields to compare.
        if sch["additionalProperties"] == Value::Bool(true) {
            continue;
        }
        // The document's properties are exactly the fields the code accepts.
        let mut props = keys(&sch["properties"]);
        let mut fields = accepted_fields(&method, &concrete_path(&template, None));
        props.sort();
        fields.sort();
        assert_eq!(
            props, fields,
            "{method} {template}: schema properties vs struct fields"
        );
    }
    assert!(checked >= 20, "only {checked} examples");
}

#[test]
fn openapi_response_examples_match_the_code() {
    let doc = openapi();
    for (method, template, op) in operations(&doc) {
        for (code, resp) in op["responses"].as_object().unwrap() {
            let content = &resp["content"]["application/json"];
            if content.is_null() {
                assert_eq!(code, "204", "{method} {template}: {code} without a body");
                continue;
            }
            let sch = &content["schema"];
            let ex = &content["example"];
            let name = sch["$ref"]
                .as_str()
                .unwrap_or("")
                .rsplit('/')
                .next()
                .unwrap();
            let what = format!("{method} {template} {code} example");
            match name {
                "Error" => {
                    assert_eq!(keys(ex), vec!["fault_message"], "{what}");
                    let status: u16 = code.parse().unwrap();
                    assert!(status >= 400, "{what}");
                }
                "InstanceInfo" => {
                    let info: InstanceInfo = serde_json::from_value(ex.clone()).expect(&what);
                    assert_eq!(&serde_json::to_value(info).unwrap(), ex, "{what}");
                }
                "VersionInfo" => {
                    let v: VersionInfo = serde_json::from_value(ex.clone()).expect(&what);
                    assert_eq!(v.app_name, "wisp");
                    assert_eq!(
                        keys(ex),
                        keys(&serde_json::to_value(VersionInfo::current()).unwrap())
                    );
                }
                "MachineConfiguration" => {
                    let m: MachineConfig = serde_json::from_value(ex.clone()).expect(&what);
                    m.validate().expect(&what);
                    assert_eq!(&serde_json::to_value(m).unwrap(), ex, "{what}");
                }
                "FullVmConfiguration" => {
                    let f: FirecrackerConfig = serde_json::from_value(ex.clone()).expect(&what);
                    // PendingConfig::to_json produces the same keys.
                    assert_eq!(keys(ex), keys(&PendingConfig::new().to_json()), "{what}");
                    assert_eq!(f.drives.len(), 1);
                }
                "VmMetrics" => assert!(ex.is_object(), "{what}"),
                "MmdsDocument" => {
                    // What PUT /mmds takes, GET /mmds gives back.
                    let r = route("PUT", "/mmds", &serde_json::to_vec(ex).unwrap());
                    assert!(
                        matches!(r, Ok(Routed::Request(ApiRequest::PutMmds(_)))),
                        "{what}"
                    );
                }
                "Balloon" => {
                    let b: crate::config::BalloonConfig =
                        serde_json::from_value(ex.clone()).expect(&what);
                    assert_eq!(&serde_json::to_value(b).unwrap(), ex, "{what}");
                }
                "BalloonStats" => {
                    // The names the runtime controller gives the statistics.
                    let names: Vec<&str> = wisp_devices::virtio::balloon::STAT_NAMES
                        .iter()
                        .map(|(_, n)| *n)
                        .chain(["target_pages", "actual_pages", "target_mib", "actual_mib"])
                        .collect();
                    for k in keys(ex) {
                        assert!(names.contains(&k.as_str()), "{what}: {k}");
                    }
                }
                other => panic!("{what}: schema {other:?} not checked by this test"),
            }
        }
    }
    // The config-file schema lists exactly FirecrackerConfig's fields.
    let full = &doc["components"]["schemas"]["FullVmConfiguration"];
    let f = FirecrackerConfig::from_json(r#"{"__probe__": 1}"#).unwrap_err();
    let mut fields = field_list(&f.fault_message);
    fields.sort();
    assert_eq!(keys(&full["properties"]), fields);
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let deep = format!(
        r#"{{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {}{}}}"#,
        "[".repeat(16),
        "]".repeat(16)
    );
    assert_fault(
        &fault("PUT", "/drives/a", &deep),
        400,
        "nested deeper than 16 levels",
    );
    // Brackets inside strings (and after escaped quotes) do not count.
    let b = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "\"{}"}}"#,
        "[".repeat(100)
    );
    req("PUT", "/boot-source", &b).unwrap();
    // Fifteen levels inside the object are fine as far as nesting goes (refused as a limiter).
    let ok = format!(
        r#"{{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {}{}}}"#,
        "[".repeat(15),
        "]".repeat(15)
    );
    assert_fault(
        &fault("PUT", "/drives/a", &ok),
        400,
        "rate_limiter[0][0]: invalid type: sequence",
    );
}

/// Seeded mutations of every documented example (byte flips, truncation, splices) through
/// the router and of request heads through the HTTP parser: an answer, never a panic.
#[test]
fn mutated_requests_never_panic() {
    let mut seed: u64 = 0x5eed_0a11;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let doc = openapi();
    let mut bodies: Vec<(String, String, Vec<u8>)> = Vec::new();
    for (method, template, op) in operations(&doc) {
        let examples = &op["requestBody"]["content"]["application/json"]["examples"];
        for ex in examples.as_object().into_iter().flat_map(|o| o.values()) {
            let path = concrete_path(&template, Some(&ex["value"]));
            bodies.push((
                method.clone(),
                path,
                serde_json::to_vec(&ex["value"]).unwrap(),
            ));
        }
    }
    let alphabet = b"{}[]\":,\\ 0-9eE.+tfnul\x00\xff\xc3";
    let (mut ok, mut refused) = (0, 0);
    for i in 0..20_000 {
        let (method, path, body) = &bodies[i % bodies.len()];
        let mut b = body.clone();
        for _ in 0..1 + next() % 4 {
            let pos = (next() as usize) % (b.len() + 1);
            match next() % 4 {
                0 if pos < b.len() => b[pos] = alphabet[(next() as usize) % alphabet.len()],
                1 => b.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
                2 => b.truncate(pos),
                _ => {
                    let other = &bodies[(next() as usize) % bodies.len()].2;
                    let from = (next() as usize) % other.len();
                    b.splice(pos..pos, other[from..].iter().copied());
                }
            }
        }
        match route(method, path, &b) {
            Ok(_) => ok += 1,
            Err(f) => {
                assert_eq!(f.status, 400, "{f}");
                assert!(!f.fault_message.is_empty());
                refused += 1;
            }
        }
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nContent-Length: {}", b.len()).into_bytes();
        let pos = (next() as usize) % head.len();
        head[pos] = alphabet[(next() as usize) % alphabet.len()];
        let _ = super::http::parse_head(&head, 1 << 16);
    }
    assert!(ok > 100 && refused > 10_000, "ok {ok}, refused {refused}");
}

#[test]
fn drives_keep_their_ids_in_device_order_root_first() {
    let f = existing_file();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs");
    let mut p = PendingConfig::new();
    for body in [
        format!(r#"{{"drive_id": "data", "path_on_host": "{f}", "is_root_device": false}}"#),
        format!(
            r#"{{"drive_id": "root", "path_on_host": "{root}", "is_root_device": true, "is_read_only": true, "format": "raw"}}"#
        ),
    ] {
        let id = if body.contains("\"root\"") {
            "root"
        } else {
            "data"
        };
        p.apply(&req("PUT", &format!("/drives/{id}"), &body).unwrap())
            .unwrap();
    }
    // The root device is attached first (vda), whatever the PUT order, and each disk
    // keeps its drive id: runtime requests find its device by it.
    p.boot_source = Some(BootSource {
        kernel_image_path: f.clone().into(),
        initrd_path: None,
        boot_args: None,
    });
    let disks = p.to_vm_config().unwrap().disks;
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0].id.as_deref(), Some("root"));
    assert_eq!(disks[0].path, std::path::Path::new(root));
    assert!(disks[0].readonly);
    assert_eq!(disks[0].format, Some(crate::config::DiskFormat::Raw));
    assert_eq!(disks[1].id.as_deref(), Some("data"));
    assert_fault(&p.drive_mut("nope").unwrap_err(), 400, "no drive \"nope\"");
    p.drive_mut("data").unwrap().path_on_host = "/srv/new.img".into();
    let config = p.to_json();
    assert_eq!(config["drives"][0]["path_on_host"], "/srv/new.img");
    assert_eq!(config["drives"][1]["path_on_host"], root);
}

#[test]
fn put_logger_with_a_path_that_cannot_be_opened_is_refused_and_not_recorded() {
    let mut p = PendingConfig::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let body = format!(r#"{{"log_path": "{dir}", "level": "Info"}}"#);
    assert_fault(
        &p.apply(&req("PUT", "/logger", &body).unwrap()).unwrap_err(),
        400,
        &format!("log_path: {dir}: "),
    );
    assert_eq!(p.logger, None);
}

#[test]
fn put_balloon_is_checked_against_the_guests_memory() {
    let r = req(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 2}"#,
    )
    .unwrap();
    assert_eq!(r.allowed(), Allowed::PreBoot);
    for (body, needle) in [
        (r#"{"amount_mib": 64}"#, "missing field `deflate_on_oom`"),
        (
            r#"{"amount_mib": -1, "deflate_on_oom": false}"#,
            "amount_mib: invalid value",
        ),
        (
            r#"{"amount_mib": 1, "deflate_on_oom": false, "free_page_reporting": true}"#,
            "balloon.free_page_reporting: not supported",
        ),
        (
            r#"{"amount_mib": 1, "deflate_on_oom": false, "stats_polling_interval_s": 70000}"#,
            "stats_polling_interval_s",
        ),
    ] {
        assert_fault(&fault("PUT", "/balloon", body), 400, needle);
    }
    let boot = req(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, existing_file()),
    )
    .unwrap();
    let mut p = PendingConfig::new();
    p.apply(&boot).unwrap();
    p.apply(
        &req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        )
        .unwrap(),
    )
    .unwrap();
    let too_big = req(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 129, "deflate_on_oom": false}"#,
    )
    .unwrap();
    assert_fault(
        &p.apply(&too_big).unwrap_err(),
        400,
        "balloon.amount_mib: 129 MiB is more than the guest's 128 MiB of memory",
    );
    p.apply(&r).unwrap();
    let vm = p.to_vm_config().unwrap();
    assert_eq!(vm.balloon.unwrap().amount_mib, 64);
    assert_eq!(p.to_json()["balloon"]["stats_polling_interval_s"], 2);
    // Memory shrunk below the balloon afterwards: refused at InstanceStart.
    let big = req(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 100, "deflate_on_oom": false}"#,
    )
    .unwrap();
    p.apply(&big).unwrap();
    p.apply(&req("PATCH", "/machine-config", r#"{"mem_size_mib": 64}"#).unwrap())
        .unwrap();
    let e = p.to_vm_config().unwrap_err();
    assert_fault(&e, 400, "100 MiB is more than the guest's 64 MiB");
    assert!(
        req("PATCH", "/balloon", r#"{"amount_mib": 1}"#)
            .unwrap()
            .allowed()
            == Allowed::PostBoot
    );
    assert_eq!(
        req("GET", "/balloon/statistics", "").unwrap().allowed(),
        Allowed::PostBoot
    );
    assert_fault(
        &fault(
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": -1}"#,
        ),
        400,
        "stats_polling_interval_s",
    );
}
