//! Tier 2: rate limits measured from outside wisp, with the probe guest's own drivers at CPL3
//! (tests/guests): a disk's request rate and bandwidth through the API's metrics and the
//! host's file, a limit changed through `PATCH /drives` mid-run, a NIC's transmit rate on
//! its tap in a network namespace the test creates (and changed through
//! `PATCH /network-interfaces`), and wisp's CPU time while throttled.
//!
//! How rates are judged: the limiter can only be slower than its limit, never faster. The
//! upper bound is tight: it is taken over the widest interval the two samples can span (from
//! before the first sample was asked for to after the second was answered), with the
//! bucket's size on top (a full bucket at the first sample) and one request or frame (counted
//! just after the first sample but paid for before it), plus 1%. The lower bound is loose
//! (half the limit over the narrowest interval): on a loaded 2-core machine the guest may
//! not keep the queue full, which only makes it slower.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// A reading of a counter, with when it could have been taken.
struct Sample {
    /// Just before it was asked for, just after it came.
    before: Instant,
    after: Instant,
    value: u64,
}

impl Sample {
    fn take(read: impl FnOnce() -> u64) -> Sample {
        let before = Instant::now();
        let value = read();
        Sample {
            before,
            after: Instant::now(),
            value,
        }
    }
}

/// Asserts that the counter moved by no more than `rate` per second plus `slack` between
/// `a` and `b`, and by at least half of `rate` (see the module's comment). Returns the rate
/// measured over the narrowest interval.
fn assert_rate(what: &str, a: &Sample, b: &Sample, rate: f64, slack: f64) -> f64 {
    let done = (b.value - a.value) as f64;
    let widest = (b.after - a.before).as_secs_f64();
    let narrowest = (b.before - a.after).as_secs_f64();
    let max = rate * widest * 1.01 + slack;
    assert!(
        done <= max,
        "{what}: {done} in at most {widest:.3} s; the limit allows {max:.0}"
    );
    assert!(
        done >= 0.5 * rate * narrowest,
        "{what}: only {done} in at least {narrowest:.3} s at a limit of {rate}/s"
    );
    eprintln!(
        "{what}: {done} in {narrowest:.3}-{widest:.3} s: {:.1}-{:.1}% of the limit",
        done / widest / rate * 100.0,
        done / narrowest / rate * 100.0
    );
    done / narrowest
}

/// The drive's counter `field` from `GET /vm/metrics`.
fn drive_counter(sock: &Path, drive: &str, field: &str) -> u64 {
    let (st, body) = api_call(sock, "GET", "/vm/metrics", None);
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["block"][drive][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no block.{drive}.{field} in {body}"))
}

/// utime + stime of process `pid` (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[0] + f[1]) as f64 / hz
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_limited_disk_keeps_to_its_limits_and_a_patch_changes_them_mid_run() {
    if !kvm_available("a_limited_disk_keeps_to_its_limits_and_a_patch_changes_them_mid_run") {
        return;
    }
    let dir = TestDir::new("ratelimit-blk");
    let disk = dir.join("data.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(256 << 20))
        .unwrap();
    // 100 requests/s and 1 MiB/s, with buckets of a tenth of a second (a small first burst).
    const OPS: f64 = 100.0;
    const OPS_BUCKET: u64 = 10;
    const BPS: f64 = 1_048_580.0;
    const BPS_BUCKET: u64 = 104_858;
    const BS: u64 = 4096;
    // Sequential 4 KiB writes at queue depth 1 for 20 s, within the first 256 MiB (no
    // wrap at these rates): each write lands in a block of its own.
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.scenario=blk-bench probe.op=write probe.bs={BS} probe.qd=1 probe.ms=20000 probe.span_mib=256"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "drives": [{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false,
                "rate_limiter": {{"bandwidth": {{"size": {BPS_BUCKET}, "refill_time": 100}},
                                  "ops": {{"size": {OPS_BUCKET}, "refill_time": 100}}}}}}]}}"#,
        probes().probe.display(),
        disk.display()
    );
    let file = dir.join("vm.json");
    std::fs::write(&file, config).unwrap();
    let sock = dir.join("api.sock");
    let w = Wisp::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        file.to_str().unwrap(),
    ]);
    wait_api_socket(&sock);
    let writes = || drive_counter(&sock, "data", "write_count");
    let written = || drive_counter(&sock, "data", "write_bytes");
    wait_until("the guest's first writes", || writes() >= 2 * OPS_BUCKET);

    // Request-bound (100 x 4 KiB = 400 KiB/s, under the bandwidth limit).
    let cpu0 = cpu_seconds(w.pid());
    let a = Sample::take(writes);
    std::thread::sleep(Duration::from_secs(4));
    let b = Sample::take(writes);
    let cpu = cpu_seconds(w.pid()) - cpu0;
    let ops_rate = assert_rate("requests", &a, &b, OPS, (OPS_BUCKET + 1) as f64);
    // Throttled, wisp waits on its timer and the guest halts for its interrupts: its CPU
    // time (every thread, vCPU included) is a small fraction of the time that passed. Not
    // throttled, the same guest keeps a CPU busy.
    let wall = (b.after - a.before).as_secs_f64();
    assert!(
        cpu < 0.25 * wall,
        "wisp used {cpu:.2} s of CPU in {wall:.2} s while throttled"
    );
    eprintln!("CPU while throttled: {cpu:.2} s in {wall:.2} s");
    assert!(drive_counter(&sock, "data", "rate_limiter_throttled_events") > 0);

    // Lift the request limit: now bandwidth-bound, at 1 MiB/s (256 requests/s).
    let (st, body) = api_call(
        &sock,
        "PATCH",
        "/drives/data",
        Some(r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#),
    );
    assert_eq!(st, 204, "{body}");
    let c = Sample::take(written);
    std::thread::sleep(Duration::from_secs(4));
    let d = Sample::take(written);
    let bytes_rate = assert_rate("bytes", &c, &d, BPS, (BPS_BUCKET + BS) as f64);
    // The lower bound alone is above the old request limit; said plainly:
    assert!(
        bytes_rate / BS as f64 > 1.2 * ops_rate,
        "the PATCH did not lift the request limit: {ops_rate:.0} then {:.0} requests/s",
        bytes_rate / BS as f64
    );
    let (_, body) = api_call(&sock, "GET", "/vm/config", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["drives"][0]["rate_limiter"],
        serde_json::json!({"bandwidth": {"size": BPS_BUCKET, "refill_time": 100}}),
        "{body}"
    );

    let f = w.wait(T);
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    let line = lines_with(&f.stdout, "probe: blk bench write")
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no bench line:\n{}", f.stdout));
    let ios: u64 = line
        .split_whitespace()
        .skip_while(|w| *w != "ios")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // The guest's count, wisp's and the file agree: every request completed, none twice.
    assert!(ios >= d.value / BS, "{line}");
    let data = std::fs::read(&disk).unwrap();
    let blocks = data
        .chunks(BS as usize)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64;
    assert_eq!(blocks, ios, "blocks written in the file vs {line}");
}

/// (rx bytes, rx packets) of the tap as the host kernel counts them: what the guest sent.
fn tap_rx(ns: &TestNetns, tap: &str) -> (u64, u64) {
    let out = ns.ip(&["-s", "-j", "link", "show", tap]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rx = &v[0]["stats64"]["rx"];
    (
        rx["bytes"].as_u64().unwrap(),
        rx["packets"].as_u64().unwrap(),
    )
}

#[test]
fn a_nics_transmit_limit_holds_on_its_tap_and_a_patch_changes_it() {
    let name = "a_nics_transmit_limit_holds_on_its_tap_and_a_patch_changes_it";
    if !kvm_available(name) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped {name}: taps need root");
        return;
    }
    let ns = TestNetns::new("ratelimit-net");
    const TAP: &str = "wrl0";
    ns.add_tap(TAP, "10.0.0.1/24");
    let dir = TestDir::new("ratelimit-net");
    // 100 KiB/s with a bucket of a tenth of a second, then 200 KiB/s.
    const BPS: f64 = 102_400.0;
    const BUCKET: u64 = 10_240;
    // 1200 datagrams of 1000 bytes: 1042-byte frames, about 9 s at these limits.
    const FRAME: u64 = 14 + 20 + 8 + 1000;
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}",
                "boot_args": "probe.scenario=net probe.serve_ms=0 probe.burst=1200 probe.udp_len=1000"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{TAP}",
                "guest_mac": "52:54:00:12:34:56",
                "tx_rate_limiter": {{"bandwidth": {{"size": {BUCKET}, "refill_time": 100}}}}}}]}}"#,
        probes().probe.display()
    );
    let file = dir.join("vm.json");
    std::fs::write(&file, config).unwrap();
    let sock = dir.join("api.sock");
    let w = Wisp::spawn_cmd(
        ns.command(wisp_bin())
            .arg("--api-sock")
            .arg(&sock)
            .arg("--config-file")
            .arg(&file),
    );
    wait_api_socket(&sock);
    let bytes = || tap_rx(&ns, TAP).0;
    // Past the first bucket: the guest has a backlog from here on.
    wait_until("the burst", || bytes() >= 4 * BUCKET);
    let a = Sample::take(bytes);
    std::thread::sleep(Duration::from_secs(3));
    let b = Sample::take(bytes);
    let before = assert_rate("tap bytes", &a, &b, BPS, (BUCKET + FRAME) as f64);

    // Doubled at run time (the bucket too).
    let (st, body) = api_call(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        Some(&format!(
            r#"{{"iface_id": "eth0", "tx_rate_limiter": {{"bandwidth": {{"size": {}, "refill_time": 100}}}}}}"#,
            2 * BUCKET
        )),
    );
    assert_eq!(st, 204, "{body}");
    let c = Sample::take(bytes);
    std::thread::sleep(Duration::from_secs(3));
    let d = Sample::take(bytes);
    let after = assert_rate(
        "tap bytes after PATCH",
        &c,
        &d,
        2.0 * BPS,
        (2 * BUCKET + FRAME) as f64,
    );
    assert!(
        after > 1.2 * before,
        "the PATCH did not raise the limit: {before:.0} then {after:.0} bytes/s"
    );
    let (_, body) = api_call(&sock, "GET", "/vm/config", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["network-interfaces"][0]["tx_rate_limiter"]["bandwidth"]["size"],
        2 * BUCKET,
        "{body}"
    );
    let (_, body) = api_call(&sock, "GET", "/vm/metrics", None);
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        m["net"][TAP]["tx_rate_limiter_throttled"].as_u64() > Some(0),
        "{body}"
    );

    let f = w.wait(T);
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    assert!(
        f.stdout.contains("probe: net burst sent 1200\n"),
        "{}",
        f.stdout
    );
    // Every frame reached the tap (throttled frames wait in the ring, never dropped): the
    // burst, and the ARP request before it.
    let (_, packets) = tap_rx(&ns, TAP);
    assert!(packets >= 1201, "{packets} frames on the tap");
}
