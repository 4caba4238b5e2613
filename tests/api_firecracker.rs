//! wisp started exactly as Firecracker's jailer and client libraries start Firecracker, driving
//! a probe guest through its life over the API; the log and metrics files must read as
//! Firecracker's.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn now_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Checks one line of Firecracker's log with level and origin shown:
/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn [<id>:<thread>:<LEVEL>:<file>:<line>] <message>`;
/// returns (thread, level, message).
fn parse_log_line<'a>(line: &'a str, id: &str) -> (&'a str, &'a str, &'a str) {
    let (time, rest) = line.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
    let b = time.as_bytes();
    assert_eq!(time.len(), 29, "timestamp of {line:?}");
    for (i, c) in b.iter().enumerate() {
        let expected = match i {
            4 | 7 => b'-',
            10 => b'T',
            13 | 16 => b':',
            19 => b'.',
            _ => {
                assert!(c.is_ascii_digit(), "timestamp of {line:?}");
                continue;
            }
        };
        assert_eq!(*c, expected, "timestamp of {line:?}");
    }
    let (tag, message) = rest
        .strip_prefix('[')
        .and_then(|r| r.split_once("] "))
        .unwrap_or_else(|| panic!("no [tag] in {line:?}"));
    let parts: Vec<&str> = tag.split(':').collect();
    assert_eq!(parts.len(), 5, "tag of {line:?}");
    assert_eq!(parts[0], id, "{line:?}");
    assert!(
        ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&parts[2]),
        "{line:?}"
    );
    assert!(parts[3].ends_with(".rs"), "{line:?}");
    assert!(parts[4].parse::<u32>().is_ok(), "{line:?}");
    (parts[1], parts[2], message)
}

#[test]
fn started_as_the_jailer_does_the_log_and_metrics_read_as_firecrackers() {
    if !kvm_available("started_as_the_jailer_does_the_log_and_metrics_read_as_firecrackers") {
        return;
    }
    let dir = TestDir::new("api-fc-jailer");
    let (sock, log, metrics) = (
        dir.join("fc.sock"),
        dir.join("fc.log"),
        dir.join("fc.metrics"),
    );
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let start_us = now_us(libc::CLOCK_MONOTONIC).to_string();
    let mut w = Wisp::spawn(&[
        "--id",
        "vm-jail",
        "--start-time-us",
        &start_us,
        "--start-time-cpu-us",
        "0",
        "--parent-cpu-time-us",
        "1000",
        "--api-sock",
        sock.to_str().unwrap(),
        "--log-path",
        log.to_str().unwrap(),
        "--level",
        "Info",
        "--show-level",
        "--show-log-origin",
        "--metrics-path",
        metrics.to_str().unwrap(),
    ]);
    wait_api_socket(&sock);
    let call = |method: &str, path: &str, body: Option<&str>| api_call(&sock, method, path, body);

    // What client libraries check first.
    let (st, body) = call("GET", "/version", None);
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["firecracker_version"], wisp::api::FIRECRACKER_API_VERSION);
    let (st, body) = call("GET", "/", None);
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info["id"].as_str(), info["state"].as_str()),
        (Some("vm-jail"), Some("Not started"))
    );

    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=ctrl-alt-del"}}"#,
        probes().probe.display()
    );
    for (path, body) in [
        ("/boot-source", boot),
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": false}"#.to_string(),
        ),
        (
            "/drives/data",
            format!(
                r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
                disk.display()
            ),
        ),
    ] {
        let (st, resp) = call("PUT", path, Some(&body));
        assert_eq!(st, 204, "PUT {path}: {resp}");
    }
    // A line before boot (Firecracker allows it too).
    let flush = Some(r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(call("PUT", "/actions", flush).0, 204);
    let (st, body) = call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(st, 204, "{body}");
    w.wait_for("probe: waiting for ctrl-alt-del", T);

    for (state, shown) in [("Paused", "Paused"), ("Resumed", "Running")] {
        let (st, body) = call("PATCH", "/vm", Some(&format!(r#"{{"state": "{state}"}}"#)));
        assert_eq!(st, 204, "{body}");
        let info: Value = serde_json::from_str(&call("GET", "/", None).1).unwrap();
        assert_eq!(info["state"], shown);
    }
    assert_eq!(call("PUT", "/actions", flush).0, 204);
    let (st, body) = call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(st, 204, "{body}");
    let f = w.wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    assert!(f.stdout.contains("probe: ctrl-alt-del"), "{}", f.stdout);
    assert!(!sock.exists());

    // The log: every line in Firecracker's shape, with the id, level and origin asked for.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, &str, &str)> =
        text.lines().map(|l| parse_log_line(l, "vm-jail")).collect();
    assert!(
        lines
            .iter()
            .any(|(t, l, m)| (*t, *l) == ("main", "INFO") && m.starts_with("Running wisp v")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|(_, l, m)| *l == "INFO" && m.starts_with("VM started: 1 vCPU(s)")),
        "{text}"
    );
    // --level Info: no debug lines.
    assert!(lines.iter().all(|(_, l, _)| *l != "DEBUG"), "{text}");

    // The metrics: one JSON object per line (before boot, after the resume, on exit), each
    // with Firecracker's groups; counters are changes since the line before.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let objs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(objs.len(), 3, "{text}");
    for m in &objs {
        for key in [
            "utc_timestamp_ms",
            "api_server",
            "block",
            "block_data",
            "net",
            "vcpu",
            "vmm",
            "uart",
            "latencies_us",
            "signals",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "logger",
        ] {
            assert!(m.get(key).is_some() || key == "block_data", "{key}: {m}");
        }
        assert!(m["vcpu"]["exit_io_out"].is_u64(), "{m}");
        assert!(m["latencies_us"]["pause_vm"].is_u64(), "{m}");
        let startup = m["api_server"]["process_startup_time_us"].as_u64().unwrap();
        assert!(startup > 0, "{m}");
        let cpu = m["api_server"]["process_startup_time_cpu_us"]
            .as_u64()
            .unwrap();
        assert!(cpu >= 1000, "the jailer's CPU time counts: {m}");
    }
    // The drive appears once the VM runs.
    assert!(objs[0].get("block_data").is_none());
    assert_eq!(objs[1]["block_data"]["write_bytes"], 0);
    let ts: Vec<u64> = objs
        .iter()
        .map(|m| m["utc_timestamp_ms"].as_u64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    // Requests counted once each, in the line after them: the PUTs before the first flush,
    // then that flush, InstanceStart, the PATCHes and GETs.
    let put = |i: usize, f: &str| objs[i]["put_api_requests"][f].as_u64().unwrap();
    assert_eq!(
        (
            put(0, "boot_source_count"),
            put(0, "machine_cfg_count"),
            put(0, "drive_count")
        ),
        (1, 1, 1)
    );
    assert_eq!(
        put(0, "actions_count"),
        0,
        "the flush counts after its line"
    );
    assert_eq!(
        put(1, "boot_source_count"),
        0,
        "counters restart after a line"
    );
    assert_eq!(put(1, "actions_count"), 2, "FlushMetrics and InstanceStart");
    assert_eq!(objs[1]["get_api_requests"]["instance_info_count"], 2);
    assert_eq!(objs[1]["get_api_requests"]["vmm_version_count"], 0);
    assert_eq!(objs[0]["get_api_requests"]["vmm_version_count"], 1);
    let exits = objs[1]["vcpu"]["exit_io_out"].as_u64().unwrap()
        + objs[1]["vcpu"]["exit_io_in"].as_u64().unwrap();
    assert!(exits > 0, "the guest's port I/O: {}", objs[1]["vcpu"]);
}

/// Every flag of `firecracker --help` that wisp cannot honour is answered by name: refused
/// with one line saying which flag and why (status 1, never the argument parser's usage
/// error), or accepted with a one-line warning.
#[test]
fn firecracker_flags_wisp_cannot_honour_are_answered_by_name() {
    let run = |args: &[&str]| Wisp::spawn(args).wait(Duration::from_secs(30));
    for (args, expected) in [
        (&["--enable-pci"][..], "--enable-pci: wisp has no PCI"),
        (&["--no-api"], "--no-api: without the API"),
        (&["--level", "Loud"], "--level: unknown level \"Loud\""),
        (
            &["--start-time-us", "-5"],
            "--start-time-us: \"-5\" is not a whole number",
        ),
        (&["--id", "a/b"], "--id: \"a/b\" is not a valid id"),
        (
            &["--log-path", "/tmp/x.log", "run", "--kernel", "/k"],
            "--log-path is a flag of the Firecracker-compatible mode",
        ),
    ] {
        let f = run(args);
        assert_eq!(f.code(), Some(1), "{args:?}: {}", f.stderr);
        assert_eq!(f.stderr.lines().count(), 1, "{args:?}: {}", f.stderr);
        assert!(
            f.stderr.starts_with(&format!("wisp: error: {expected}")),
            "{args:?}: {}",
            f.stderr
        );
    }
    // Accepted without effect: one warning line each, then wisp goes on (here to the config
    // file, which does not exist).
    let f = run(&[
        "--boot-timer",
        "--mmds-size-limit",
        "4096",
        "--no-api",
        "--config-file",
        "/nonexistent/vm.json",
    ]);
    let lines: Vec<&str> = f.stderr.lines().collect();
    // --mmds-size-limit has its effect now: no warning for it.
    assert_eq!(lines.len(), 2, "{}", f.stderr);
    assert!(
        lines[0].starts_with("wisp: warning: --boot-timer: accepted without effect"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("wisp: error: config file /nonexistent/vm.json"),
        "{}",
        lines[1]
    );
    let f = run(&["--version"]);
    assert_eq!(f.code(), Some(0));
    assert_eq!(
        f.stdout.trim(),
        format!(
            "wisp v{} (Firecracker v{} API)",
            wisp::api::VMM_VERSION,
            wisp::api::FIRECRACKER_API_VERSION
        )
    );
}

/// `--http-api-max-payload-size` is the API's body limit.
#[test]
fn the_payload_size_flag_limits_api_bodies() {
    let dir = TestDir::new("api-fc-payload");
    let sock = dir.join("fc.sock");
    let w = Wisp::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--http-api-max-payload-size",
        "100",
    ]);
    wait_api_socket(&sock);
    let small = r#"{"kernel_image_path": "/k"}"#;
    let large = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
        "x".repeat(100)
    );
    let (st, body) = api_call(&sock, "PUT", "/boot-source", Some(&large));
    assert_eq!(st, 413, "{body}");
    assert!(body.contains("the limit is 100"), "{body}");
    let (st, body) = api_call(&sock, "PUT", "/boot-source", Some(small));
    assert_ne!(st, 413, "{body}");
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(T).code(), Some(128 + libc::SIGTERM));
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} not in /proc/meminfo"))
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// Puts the host's huge page pool back as it was.
struct HugePagePool(u64);

impl HugePagePool {
    const PATH: &'static str = "/proc/sys/vm/nr_hugepages";

    fn current() -> u64 {
        std::fs::read_to_string(Self::PATH)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Grows the pool by `pages`; None when that is not possible here (not root, or the host
    /// has no contiguous memory left for them).
    fn grow(pages: u64) -> Option<HugePagePool> {
        let before = Self::current();
        let guard = HugePagePool(before);
        std::fs::write(Self::PATH, (before + pages).to_string()).ok()?;
        (meminfo("HugePages_Free:") >= pages).then_some(guard)
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.to_string());
    }
}

/// Boots the probe with `huge_pages` through the API; returns the running wisp and its socket.
fn start_with_huge_pages(dir: &TestDir, name: &str) -> (Wisp, std::path::PathBuf, (u16, String)) {
    let sock = dir.join(format!("{name}.sock"));
    let w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_api_socket(&sock);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=ctrl-alt-del"}}"#,
        probes().probe.display()
    );
    assert_eq!(api_call(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let (st, body) = api_call(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}"#),
    );
    assert_eq!(st, 204, "{body}");
    let start = api_call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    (w, sock, start)
}

#[test]
fn huge_pages_back_guest_memory_or_are_refused_naming_the_pool() {
    if !kvm_available("huge_pages_back_guest_memory_or_are_refused_naming_the_pool") {
        return;
    }
    let dir = TestDir::new("api-fc-hugepages");
    let (st, body) = api_call_once(
        &dir,
        r#"{"vcpu_count": 1, "mem_size_mib": 65, "huge_pages": "2M"}"#,
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("multiple of 2"), "{body}");

    // Without enough free huge pages, InstanceStart says so and which numbers.
    if meminfo("HugePages_Free:") < 32 {
        let (w, _, (st, body)) = start_with_huge_pages(&dir, "none");
        assert_eq!(st, 400, "{body}");
        assert!(
            body.contains("2 MiB huge pages") && body.contains("32 pages needed"),
            "{body}"
        );
        assert!(body.contains("/proc/sys/vm/nr_hugepages"), "{body}");
        w.signal(libc::SIGTERM);
        w.wait(T);
    }

    let Some(_pool) = HugePagePool::grow(32) else {
        eprintln!("skipped the huge-page boot: cannot grow the host's huge page pool by 32");
        return;
    };
    let (mut w, sock, (st, body)) = start_with_huge_pages(&dir, "boot");
    assert_eq!(st, 204, "{body}");
    w.wait_for("probe: waiting for ctrl-alt-del", T);
    // The guest's 64 MiB are one mapping of 2 MiB pages in wisp.
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", w.pid())).unwrap();
    let huge_mapping = smaps.split("\nSize:").skip(1).any(|m| {
        m.trim_start().starts_with("65536 kB") && m.contains("KernelPageSize:     2048 kB")
    });
    assert!(huge_mapping, "no 64 MiB mapping of 2 MiB pages:\n{smaps}");
    let (st, body) = api_call(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    assert!(body.contains(r#""huge_pages":"2M""#), "{body}");
    assert_eq!(
        api_call(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#)
        )
        .0,
        204
    );
    let f = w.wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
}

/// One PUT /machine-config on a fresh wisp: (status, body).
fn api_call_once(dir: &TestDir, machine_config: &str) -> (u16, String) {
    let sock = dir.join("once.sock");
    let w = Wisp::spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_api_socket(&sock);
    let r = api_call(&sock, "PUT", "/machine-config", Some(machine_config));
    w.signal(libc::SIGTERM);
    w.wait(T);
    r
}

/// `smt: true` (two threads per core in the guest's topology) boots an SMP guest whose vCPUs
/// all come up.
#[test]
fn smt_guest_boots_with_every_vcpu() {
    if !kvm_available("smt_guest_boots_with_every_vcpu") {
        return;
    }
    let dir = TestDir::new("api-fc-smt");
    let file = dir.join("vm.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.scenario=smp"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64, "smt": true}}}}"#,
            probes().probe.display()
        ),
    )
    .unwrap();
    let f = Wisp::spawn(&["--config-file", file.to_str().unwrap(), "--no-api"]).wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    assert!(f.stdout.contains("probe: cpus 2"), "{}", f.stdout);
}

#[test]
fn block_metrics_count_what_the_guest_did_on_its_disk() {
    if !kvm_available("block_metrics_count_what_the_guest_did_on_its_disk") {
        return;
    }
    let dir = TestDir::new("api-fc-blkmetrics");
    let (sock, metrics) = (dir.join("fc.sock"), dir.join("fc.metrics"));
    let disk = dir.join("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let w = Wisp::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--metrics-path",
        metrics.to_str().unwrap(),
    ]);
    wait_api_socket(&sock);
    let call = |method: &str, path: &str, body: &str| api_call(&sock, method, path, Some(body));
    // The probe writes 64 KiB at sector 8, flushes, and reads them back.
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.scenario=blk probe.seed=5"}}"#,
        probes().probe.display()
    );
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
        disk.display()
    );
    for (path, body) in [
        ("/boot-source", boot.as_str()),
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": false}"#,
        ),
        ("/drives/data", drive.as_str()),
        ("/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let (st, resp) = call("PUT", path, body);
        assert_eq!(st, 204, "PUT {path}: {resp}");
    }
    let f = w.wait(T);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    assert!(f.stdout.contains("probe: blk readback ok"), "{}", f.stdout);

    // Counters are changes since the line before: their sum over the lines is the total.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let objs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let total = |group: &str, field: &str| -> u64 {
        objs.iter()
            .filter_map(|m| m.get(group))
            .map(|g| g[field].as_u64().unwrap())
            .sum()
    };
    for group in ["block_data", "block"] {
        assert_eq!(total(group, "write_bytes"), 65536, "{group}: {text}");
        assert_eq!(total(group, "read_bytes"), 65536, "{group}: {text}");
        assert!(total(group, "write_count") >= 1, "{group}: {text}");
        assert!(total(group, "read_count") >= 1, "{group}: {text}");
        assert_eq!(total(group, "flush_count"), 1, "{group}: {text}");
        assert_eq!(total(group, "invalid_reqs_count"), 0, "{group}: {text}");
        assert_eq!(total(group, "execute_fails"), 0, "{group}: {text}");
        assert!(total(group, "queue_event_count") >= 3, "{group}: {text}");
    }
}
