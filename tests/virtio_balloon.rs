//! Tier 2: virtio-balloon through the probe guest's own driver (tests/guests/balloon.c):
//! inflating by N MiB through `PATCH /balloon` lowers wisp's resident memory by about N MiB
//! (the host got the pages back), deflating lets the guest use them again (they read as
//! zeros, then count again once written), and the guest's statistics reach
//! `GET /balloon/statistics`.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 32;

/// wisp's resident memory, in bytes (VmRSS: every page of guest memory it holds).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib << 10
}

fn patch(sock: &std::path::Path, path: &str, body: &str) -> (u16, String) {
    api_call(sock, "PATCH", path, Some(body))
}

#[test]
fn inflating_returns_the_guests_pages_to_the_host_and_deflating_gives_them_back() {
    if !kvm_available(
        "inflating_returns_the_guests_pages_to_the_host_and_deflating_gives_them_back",
    ) {
        return;
    }
    let dir = TestDir::new("balloon");
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.scenario=balloon probe.balloon_mib={MIB} probe.balloon_at_mib=64"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 256}},
            "balloon": {{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}}}}"#,
        probes().probe.display()
    );
    let file = dir.join("vm.json");
    std::fs::write(&file, config).unwrap();
    let sock = dir.join("api.sock");
    let mut w = Wisp::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        file.to_str().unwrap(),
    ]);
    wait_api_socket(&sock);
    w.wait_for("probe: balloon touched", T);
    let touched = rss(w.pid());

    // Refused: more than the guest has, statistics switched off.
    let (st, body) = patch(&sock, "/balloon", r#"{"amount_mib": 257}"#);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("more than the guest's 256 MiB"), "{body}");
    let (st, body) = patch(
        &sock,
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 0}"#,
    );
    assert_eq!(st, 400, "{body}");

    let (st, body) = patch(&sock, "/balloon", &format!(r#"{{"amount_mib": {MIB}}}"#));
    assert_eq!(st, 204, "{body}");
    w.wait_for("probe: balloon inflated", T);
    let inflated = rss(w.pid());
    let n = MIB << 20;
    // The host got the pages back: about N MiB less (allowing a tenth for whatever else
    // the process touched or freed meanwhile).
    assert!(
        touched.saturating_sub(inflated) >= n * 9 / 10,
        "RSS {} MiB before inflating, {} MiB after",
        touched >> 20,
        inflated >> 20
    );
    let (st, body) = api_call(&sock, "GET", "/balloon", None);
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["amount_mib"], MIB);
    let (st, body) = api_call(&sock, "GET", "/balloon/statistics", None);
    assert_eq!(st, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["target_mib"], MIB, "{body}");
    assert_eq!(s["actual_mib"], MIB, "{body}");
    // What the probe reported.
    assert_eq!(s["total_memory"], 128u64 << 20, "{body}");
    assert_eq!(s["free_memory"], 77u64 << 20, "{body}");

    let (st, body) = patch(&sock, "/balloon", r#"{"amount_mib": 0}"#);
    assert_eq!(st, 204, "{body}");
    w.wait_for("probe: balloon retouched", T);
    assert!(
        w.stdout().contains(&format!(
            "probe: balloon deflated {} pages zeroed {}\n",
            MIB << 8,
            MIB << 8
        )),
        "{}",
        w.stdout()
    );
    let retouched = rss(w.pid());
    assert!(
        retouched.saturating_sub(inflated) >= n * 9 / 10,
        "RSS {} MiB inflated, {} MiB after deflating and writing again",
        inflated >> 20,
        retouched >> 20
    );

    eprintln!(
        "RSS: {} MiB touched, {} MiB inflated, {} MiB deflated and written again",
        touched >> 20,
        inflated >> 20,
        retouched >> 20
    );
    let (st, body) = patch(&sock, "/balloon", r#"{"amount_mib": 1}"#);
    assert_eq!(st, 204, "{body}");
    let f = w.wait(T);
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    assert!(f.stdout.contains("probe: done balloon\n"), "{}", f.stdout);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
}
