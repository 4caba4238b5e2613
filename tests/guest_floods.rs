//! Probe guests that hammer a device (tests/guests/floods.c, virtio.c): wisp's memory, its
//! log and its vCPUs stay bounded whatever the guest does.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(300);

/// Most lines one rate-limited call site can log in a run of at most `T`: 10 per 10 s.
const MAX_LINES_PER_SITE: usize = 10 * (T.as_secs() as usize / 10 + 1);

/// One flood at a time: they are slow under load (each port write is a VM exit), and the
/// bounds above hold for one run of at most `T`.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn probe_args(cmdline: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        probes().probe.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--memory",
        "64M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits for `child` to exit; kills it and panics after `timeout` (a hang is the failure).
fn wait_or_kill(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: wisp did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_all_in_background(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

#[test]
fn i8042_flood_queues_no_more_than_a_small_buffer() {
    if !kvm_available("i8042_flood_queues_no_more_than_a_small_buffer") {
        return;
    }
    let _one = one_at_a_time();
    let f = Wisp::spawn(&probe_args("probe.scenario=i8042-flood probe.writes=20000")).wait(T);
    assert!(f.stdout.contains("probe: done i8042-flood"), "{}", f.stdout);
    let queued: u64 = lines_with(&f.stdout, "probe: i8042 flood writes 20000 queued ")[0]
        .parse()
        .unwrap();
    // A real i8042 holds one byte; wisp a few more (Ctrl-Alt-Del waits whole).
    assert!(queued <= 16, "{queued} replies queued");
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    // Rate limited (one call site): one warning per dropped reply would be 19,984 lines.
    assert!(
        f.stderr.lines().count() <= MAX_LINES_PER_SITE,
        "{}",
        f.stderr
    );
}

#[test]
fn a_console_reader_that_goes_away_is_reported_once() {
    if !kvm_available("a_console_reader_that_goes_away_is_reported_once") {
        return;
    }
    let _one = one_at_a_time();
    // `wisp run ... | head -5`: the reader closes its end while the guest still prints.
    let mut child = Command::new(wisp_bin())
        .args(probe_args("probe.scenario=console-flood probe.lines=300"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = read_all_in_background(child.stderr.take().unwrap());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..5 {
        line.clear();
        out.read_line(&mut line).unwrap();
    }
    assert!(line.starts_with("probe: flood 3 "), "{line}");
    drop(out);
    let status = wait_or_kill(&mut child, T, "reader gone");
    let stderr = stderr.join().unwrap();
    // The guest ran to its end: the lost reader did not stop it.
    assert_eq!(status.code(), Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("console: writing the guest's output failed")
            && lines[0].contains("Broken pipe"),
        "{stderr}"
    );
    let dropped: u64 = lines[1]
        .strip_prefix("wisp: warning: console: ")
        .and_then(|r| r.strip_suffix(" bytes of the guest's console output were dropped"))
        .unwrap_or_else(|| panic!("{stderr}"))
        .parse()
        .unwrap();
    // Most of the 300 lines of 64 bytes came after the reader left.
    assert!(dropped > 100 * 64, "{dropped}");
}

#[test]
fn a_console_nobody_reads_does_not_stop_the_guest() {
    if !kvm_available("a_console_nobody_reads_does_not_stop_the_guest") {
        return;
    }
    let _one = one_at_a_time();
    // A pipe whose reader never reads: the guest's output fills it at once.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fresh fds into the array, owned right after.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fds[0] and fds[1] are ours alone.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our pipe; one page is the smallest size.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let mut child = Command::new(wisp_bin())
        .args(probe_args("probe.scenario=console-flood probe.lines=1300"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = read_all_in_background(child.stderr.take().unwrap());
    // 83 KB of output against a 4 KiB pipe and wisp's 64 KiB buffer: a vCPU that waits for
    // the reader never gets to power off.
    let status = wait_or_kill(&mut child, T, "reader stuck");
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("bytes of the guest's console output were dropped"),
        "{stderr}"
    );
    // The buffer overflowed once, and the total at the end.
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    let mut first = [0u8; 27];
    std::fs::File::from(rd).read_exact(&mut first).unwrap();
    assert_eq!(&first, b"probe: start console-flood\n");
}

#[test]
fn a_guest_repeating_what_wisp_warns_about_does_not_flood_the_log() {
    if !kvm_available("a_guest_repeating_what_wisp_warns_about_does_not_flood_the_log") {
        return;
    }
    let _one = one_at_a_time();
    let f = Wisp::spawn(&probe_args("probe.scenario=log-flood probe.writes=5000")).wait(T);
    assert!(f.stdout.contains("probe: done log-flood"), "{}", f.stdout);
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    // 10,000 warnings from two call sites, rate limited to 10 per call site per 10 s.
    let lines = f.stderr.lines().count();
    assert!(
        (2..=2 * MAX_LINES_PER_SITE).contains(&lines),
        "{lines} lines:\n{}",
        f.stderr
    );
    assert!(f.stderr.contains("acpi: unsupported sleep request 0x2c"));
    assert!(f.stderr.contains("a crash kernel is loaded"));
}
