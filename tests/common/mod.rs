//! Shared helpers for the integration tests: build the probe guests, find the Linux images,
//! spawn wisp, watch its console, and skip (or fail, with WISP_REQUIRE_KVM=1) without KVM.
#![allow(dead_code)]

mod api;
pub mod patience;
// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use api::{api_call, wait_api_socket, Client, Response};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn wisp_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wisp")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_kvm() -> bool {
    std::env::var("WISP_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Whether KVM tests can run. Without a usable /dev/kvm they are skipped with the reason,
/// unless WISP_REQUIRE_KVM=1, when the test fails instead.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if require_kvm() {
                panic!("{test}: /dev/kvm is not usable ({e}) and WISP_REQUIRE_KVM=1");
            }
            eprintln!("skipped {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// Whether this host is the PVM software KVM of ENVIRONMENT.md.
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The probe guests, built once per test binary by tests/guests/build.sh.
pub struct Probes {
    pub probe: PathBuf,
    pub hello: PathBuf,
}

pub fn probes() -> &'static Probes {
    static PROBES: OnceLock<Probes> = OnceLock::new();
    PROBES.get_or_init(|| {
        let out = repo_root().join("target/probe-guests");
        std::fs::create_dir_all(&out).expect("create target/probe-guests");
        let status = Command::new("bash")
            .arg(repo_root().join("tests/guests/build.sh"))
            .arg(&out)
            .status()
            .expect("run tests/guests/build.sh");
        assert!(
            status.success(),
            "building the probe guests failed: {status}"
        );
        Probes {
            probe: out.join("probe.elf"),
            hello: out.join("hello.elf"),
        }
    })
}

/// The Linux images built by images/build.sh, if present. Tests that need them fail with
/// the command to run when they are missing (CI builds them first).
pub fn image(name: &str) -> PathBuf {
    let p = repo_root().join("images/out").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `images/build.sh` first (the README's test command does)",
        p.display()
    );
    p
}

/// The start of every test kernel command line. `random.trust_cpu=on` seeds the guest's RNG
/// from RDRAND at boot: otherwise the first reader of /dev/urandom waits while the interpreted
/// kernel gathers jitter entropy, which took over 12 minutes of a loaded machine (a stalled
/// linux_api run). wisp's virtio-rng (`wisp run`'s default, `PUT /entropy`) seeds it before
/// init as well (one boot without this flag: crng init done at 27 s); the flag stays for the
/// API boots that have no entropy device.
pub const LINUX_CMDLINE: &str = "console=ttyS0 panic=-1 random.trust_cpu=on";

/// A running wisp process whose stdout (the guest console) and stderr are collected.
pub struct Wisp {
    child: Child,
    out: Arc<(Mutex<String>, Condvar)>,
    err: Arc<(Mutex<String>, Condvar)>,
    /// The threads reading stdout and stderr: done once the pipes are closed.
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

fn collect(
    mut r: impl Read + Send + 'static,
) -> (Arc<(Mutex<String>, Condvar)>, std::thread::JoinHandle<()>) {
    let buf = Arc::new((Mutex::new(String::new()), Condvar::new()));
    let b = buf.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    b.0.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                    b.1.notify_all();
                }
            }
        }
        b.1.notify_all();
    });
    (buf, reader)
}

impl Wisp {
    /// `wisp <args>`, stdin closed.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Wisp {
        Self::spawn_cmd(Command::new(wisp_bin()).args(args))
    }

    pub fn spawn_cmd(cmd: &mut Command) -> Wisp {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wisp");
        let (out, out_reader) = collect(child.stdout.take().unwrap());
        let (err, err_reader) = collect(child.stderr.take().unwrap());
        Wisp {
            child,
            out,
            err,
            readers: vec![out_reader, err_reader],
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.out.0.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.err.0.lock().unwrap().clone()
    }

    /// Waits until the console shows `needle`; panics with the console so far on timeout or
    /// if wisp exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut text = lock.lock().unwrap();
        while !text.contains(needle) {
            let now = Instant::now();
            if now >= deadline {
                drop(text);
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?}\nconsole:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                drop(text);
                self.drain_readers();
                let out = self.stdout();
                if out.contains(needle) {
                    return;
                }
                panic!(
                    "wisp exited ({status}) before {needle:?}\nconsole:\n{out}\nstderr:\n{}",
                    self.stderr()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            text = cv.wait_timeout(text, wait).unwrap().0;
        }
    }

    /// [`Wisp::wait_for`] for a Linux guest: gives up when the VMM used `cpu_budget` of CPU
    /// since the wait began, or the guest sat idle and silent for
    /// [`patience::IDLE_LIMIT`], not after a wall-clock time (see `patience`).
    pub fn wait_for_guest(&mut self, needle: &str, cpu_budget: Duration) {
        let mut patience = patience::Patience::new(self.pid(), cpu_budget);
        let mut next_check = Instant::now();
        loop {
            // A second of wall time at most, then the budget's check.
            let left = next_check.saturating_duration_since(Instant::now());
            if self.console_shows(needle, left.max(Duration::from_millis(1))) {
                return;
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_secs(1);
                let len = self.out.0.lock().unwrap().len();
                if let Err(why) = patience.check(len) {
                    panic!(
                        "gave up waiting for {needle:?}: {why}\nconsole:\n{}\nstderr:\n{}",
                        self.stdout(),
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Up to `wait` for the console to show `needle`: true once it does; panics if wisp
    /// exits without it.
    fn console_shows(&mut self, needle: &str, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let (lock, cv) = &*self.out;
        let mut text = lock.lock().unwrap();
        while !text.contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                drop(text);
                self.drain_readers();
                let out = self.stdout();
                if out.contains(needle) {
                    return true;
                }
                panic!(
                    "wisp exited ({status}) before {needle:?}\nconsole:\n{out}\nstderr:\n{}",
                    self.stderr()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            text = cv
                .wait_timeout(text, (deadline - now).min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
        true
    }

    /// [`Wisp::wait`] for a Linux guest, with [`Wisp::wait_for_guest`]'s limits.
    pub fn wait_guest(mut self, cpu_budget: Duration) -> Finished {
        let mut patience = patience::Patience::new(self.pid(), cpu_budget);
        loop {
            if self.status.is_some() || self.child.try_wait().expect("try_wait").is_some() {
                // Exited: the ordinary wait collects it at once.
                return self.wait(Duration::from_secs(10));
            }
            let len = self.out.0.lock().unwrap().len();
            if let Err(why) = patience.check(len) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "gave up waiting for wisp to exit: {why}\nconsole:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// After wisp exited, the pipes close: lets the readers take the last output (a fixed pause
    /// lost a loaded machine's last stderr line). Bounded, in case something wisp started
    /// still holds a pipe.
    fn drain_readers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for wisp to exit; kills it and panics on timeout.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.status {
                break s;
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "wisp did not exit within {timeout:?}\nconsole:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.status = Some(status);
        self.drain_readers();
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sends a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Wisp {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a probe scenario to completion: `wisp run --kernel probe.elf --cmdline probe.scenario=S`.
pub fn run_probe(
    scenario: &str,
    cpus: u8,
    memory: &str,
    extra: &[&str],
    timeout: Duration,
) -> Finished {
    let p = probes();
    let cmdline = format!("probe.scenario={scenario}");
    let cpus = cpus.to_string();
    let mut args: Vec<&str> = vec![
        "run",
        "--kernel",
        p.probe.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--cpus",
        &cpus,
        "--memory",
        memory,
    ];
    args.extend_from_slice(extra);
    Wisp::spawn(&args).wait(timeout)
}

/// The lines of `text` that start with `prefix`, with the prefix removed.
pub fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .collect()
}

/// Every value the guest's init gave for `key`: from its own console lines
/// (`WISP-INIT: key=value`) and from their kernel-log copies (`[ time] WISP-INIT: ...`, with
/// `wisp.kmsg=1`).
pub fn said(console: &str, key: &str) -> Vec<String> {
    let tag = format!("WISP-INIT: {key}=");
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| {
            l.strip_prefix(&tag)
                .or_else(|| l.split_once("] ").and_then(|(_, r)| r.strip_prefix(&tag)))
        })
        .map(str::to_string)
        .collect()
}

/// The guest's init said `key=value`, on its console line or on the kernel-log copy. Both
/// copies come from the same string in the guest: on PVM that text has been seen to lose
/// 16-byte pieces inside the guest before printing (both copies damaged alike; see the issue
/// note), so a mismatch names every copy the guest gave.
pub fn assert_said(console: &str, key: &str, value: &str) {
    let all = said(console, key);
    assert!(
        all.iter().any(|v| v == value),
        "the guest never said {key}={value}; it said {all:?}"
    );
}

/// Each of the init's `scenarios` reported success.
pub fn assert_scenarios_ok(console: &str, scenarios: &[&str]) {
    for scenario in scenarios {
        assert!(
            console.contains(&format!("WISP-INIT: scenario {scenario} ok")),
            "scenario {scenario} failed:\n{console}"
        );
    }
}

/// The guest's eth0 got 10.0.0.2/24 from the test's DHCP server through the tap, has the
/// MAC it was given, and pinged the host end.
pub fn assert_dhcp_and_ping(console: &str, mac: &str) {
    assert!(
        console.contains("IP-Config: Got DHCP answer"),
        "no DHCP answer:\n{console}"
    );
    assert_said(console, "net_addr", "10.0.0.2/24");
    assert_said(console, "net_mac_eth0", mac);
    assert!(console.contains("WISP-INIT: net_ping_ok"), "{console}");
}

/// A cgroup v1 parent group for tests, made in the cpu, cpuacct and cpuset hierarchies and
/// removed (with anything wisp left in it) on drop. `None` when cgroup v1 is not mounted.
pub struct TestCgroupParent {
    pub name: String,
}

pub const CGROUP_V1_CONTROLLERS: [&str; 3] = ["cpu", "cpuacct", "cpuset"];

impl TestCgroupParent {
    pub fn new(test: &str) -> Option<Self> {
        if !Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
            if require_kvm() {
                panic!("{test}: cgroup v1 cpu controller not mounted and WISP_REQUIRE_KVM=1");
            }
            eprintln!("skipped {test}: no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu");
            return None;
        }
        let name = format!("wisp-test-{}-{test}", std::process::id());
        for c in CGROUP_V1_CONTROLLERS {
            std::fs::create_dir_all(format!("/sys/fs/cgroup/{c}/{name}"))
                .expect("create test cgroup");
        }
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let v = std::fs::read_to_string(format!("/sys/fs/cgroup/cpuset/{f}")).unwrap();
            std::fs::write(format!("/sys/fs/cgroup/cpuset/{name}/{f}"), v.trim()).unwrap();
        }
        // Other work on this small machine must not starve the capped threads: the tests
        // measure the cap, not contention.
        let _ = std::fs::write(format!("/sys/fs/cgroup/cpu/{name}/cpu.shares"), "262144");
        Some(Self { name })
    }

    pub fn path(&self, controller: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/cgroup/{controller}/{}", self.name))
    }

    /// The groups wisp made under this parent.
    pub fn children(&self, controller: &str) -> Vec<String> {
        std::fs::read_dir(self.path(controller))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestCgroupParent {
    fn drop(&mut self) {
        for c in CGROUP_V1_CONTROLLERS {
            let root = self.path(c);
            // Deepest first; move any task left back to the root group.
            let mut dirs: Vec<PathBuf> = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                if let Ok(rd) = std::fs::read_dir(&d) {
                    for e in rd.flatten() {
                        if e.path().is_dir() {
                            stack.push(e.path());
                        }
                    }
                }
                dirs.push(d);
            }
            for d in dirs.iter().rev() {
                if let Ok(tasks) = std::fs::read_to_string(d.join("tasks")) {
                    for t in tasks.lines() {
                        let _ = std::fs::write(format!("/sys/fs/cgroup/{c}/tasks"), t);
                    }
                }
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own (IPv6 off, so nothing is sent unasked), with taps
/// whose host ends have addresses; deleted, with everything in it, on drop. No traffic ever
/// leaves it.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(tag: &str) -> TestNetns {
        // Tests of one binary run in parallel: each namespace gets a name of its own.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("wisp-{tag}-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok("ip", &["netns", "add", &name]);
        let ns = TestNetns { name };
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            run_ok("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", key]);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A persistent tap `name` with `addr` (CIDR) on the host end, up.
    pub fn add_tap(&self, name: &str, addr: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["addr", "add", addr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    /// `ip netns exec NS program`: the program (wisp, a listener) runs inside.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl TestNetns {
    /// dnsmasq serving DHCP on `tap` inside the namespace, leasing `addr` only.
    pub fn dnsmasq(&self, tap: &str, addr: &str, dir: &Path) -> Child {
        let mut dnsmasq = self
            .command("dnsmasq")
            // dnsmasq takes long options only as --opt=value.
            .args(["--no-daemon", "--port=0", "--bind-interfaces"])
            .arg(format!("--interface={tap}"))
            .arg(format!("--dhcp-range={addr},{addr},1h"))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq");
        // A dnsmasq that refused its options is gone at once; say so rather than wait for
        // DHCP.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            dnsmasq.try_wait().unwrap().is_none(),
            "dnsmasq exited at start"
        );
        dnsmasq
    }

    /// The host end of a guest's TCP transfers (the init's net scenario): receives `kib`
    /// KiB on `ip`:9000, then sends `kib` KiB of random data on `ip`:9001.
    pub fn tcp_peer(&self, ip: &str, kib: u64, dir: &Path) -> TcpPeer {
        let to_guest = dir.join("to_guest.bin");
        run_ok(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", to_guest.display()),
                "bs=1024",
                &format!("count={kib}"),
                "status=none",
            ],
        );
        let from_guest = dir.join("from_guest.bin");
        // Its own time-outs are only a backstop for a test that dies without dropping it: the
        // guest's progress is judged by the Wisp waits (CPU budgets, see `patience`), and a
        // guest on a busy host may take an hour of wall time to get here.
        let script = format!(
            r#"
import socket
rx = socket.socket(); rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); rx.bind(("{ip}", 9000)); rx.listen(1)
tx = socket.socket(); tx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); tx.bind(("{ip}", 9001)); tx.listen(1)
rx.settimeout(7200); tx.settimeout(7200)
c, _ = rx.accept(); c.settimeout(3600)
want = {bytes}; got = b""
while len(got) < want:
    d = c.recv(65536)
    if not d: break
    got += d
open("{out}", "wb").write(got); c.close()
c, _ = tx.accept(); c.sendall(open("{inp}", "rb").read()); c.close()
"#,
            bytes = kib * 1024,
            out = from_guest.display(),
            inp = to_guest.display()
        );
        let mut child = self
            .command("python3")
            .arg("-")
            .stdin(Stdio::piped())
            .spawn()
            .expect("python3");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        TcpPeer {
            child,
            to_guest,
            from_guest,
        }
    }
}

pub struct TcpPeer {
    child: Child,
    to_guest: PathBuf,
    from_guest: PathBuf,
}

impl TcpPeer {
    /// What the guest sent arrived intact, and the guest got what was sent to it (the
    /// checksums the guest printed against the files on the host).
    pub fn assert_intact(mut self, console: &str) {
        let _ = self.child.wait();
        assert_said(console, "net_tx_sha256", &sha256_hex(&self.from_guest));
        assert_said(console, "net_rx_sha256", &sha256_hex(&self.to_guest));
    }
}

impl Drop for TcpPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Processes still inside (dnsmasq, listeners) go first, then the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kills a process inside the namespace this test created.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Linux boots run one at a time: the guest kernel is interpreted on a software KVM, and two
/// 2-vCPU guests on a 2-core machine starve each other's timer ticks (RCU stalls, boots that
/// take many times longer). Hold this for the whole boot.
pub fn linux_boot_slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    SLOT.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `out`: a disk with an MBR partition table (disk signature `signature`, so the
/// partition's PARTUUID is `{signature:08x}-01`) whose one Linux partition (type 0x83)
/// starts at 1 MiB and holds the bytes of `fs`. No loop device, no partitioning tool.
pub fn mbr_disk(fs: &Path, out: &Path, signature: u32) {
    const START_LBA: u64 = 2048;
    let fs_len = std::fs::metadata(fs).expect("filesystem image").len();
    let sectors = fs_len.div_ceil(512);
    let mut mbr = [0u8; 512];
    mbr[440..444].copy_from_slice(&signature.to_le_bytes());
    let entry = &mut mbr[446..462];
    entry[0] = 0x00; // not bootable
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS unused: LBA only
    entry[4] = 0x83;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&(START_LBA as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut f = std::fs::File::create(out).expect("create partitioned disk");
    use std::io::Write as _;
    f.write_all(&mbr).unwrap();
    f.set_len(START_LBA * 512).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(START_LBA * 512)).unwrap();
    std::io::copy(&mut std::fs::File::open(fs).unwrap(), &mut f).unwrap();
    f.set_len((START_LBA + sectors) * 512).unwrap();
}

/// The root filesystem `rootfs` booted from partition 1 of `disk` (an [`mbr_disk`]) holds
/// the file the init's rootfs scenario wrote; the partition is left extracted at `part`.
pub fn assert_guest_root_file(disk: &Path, rootfs: &Path, part: &Path) {
    let len = std::fs::metadata(rootfs).expect("rootfs image").len();
    extract(disk, 2048 * 512, len, part);
    let dumped = part.with_extension("guest-root.txt");
    run_ok(
        "debugfs",
        &[
            "-R",
            &format!("dump /guest-root.txt {}", dumped.display()),
            part.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&dumped).unwrap(),
        "written-by-the-guest\n"
    );
}

/// Copies `len` bytes at `offset` of `disk` into `out` (a partition, for debugfs/e2fsck).
pub fn extract(disk: &Path, offset: u64, len: u64, out: &Path) {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(disk).expect("disk");
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    let mut o = std::fs::File::create(out).unwrap();
    std::io::copy(&mut f.take(len), &mut o).unwrap();
}

/// The SHA-256 of a file, as sha256sum prints it.
pub fn sha256_hex(path: &Path) -> String {
    let out = run_ok("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

/// A scratch directory of the test's own (mkdtemp under the temp dir), removed with its
/// contents on drop, also when the test fails.
pub struct TestDir(vmm_sys_util::tempdir::TempDir);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let prefix = std::env::temp_dir().join(format!("wisp-{tag}-"));
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix)
            .expect("create the test directory");
        // mkdtemp makes it 0700; the jailer's tests need the jailed user to reach in.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.as_path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the test directory");
        TestDir(dir)
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.as_path().join(name)
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.as_path()
    }
}

/// What one VM started through `wisp jail` leaves on the host, removed on drop (also when
/// the test failed): the VM is killed, `wisp jail --cleanup` runs, then the test's parent
/// cgroups (in `controllers`) go.
pub struct TestJail {
    pub id: String,
    pub base: PathBuf,
    pub parent_cgroup: String,
    pub controllers: Vec<&'static str>,
    pub wisp: Option<Wisp>,
}

impl TestJail {
    pub fn new(tag: &str, base: &Path, controllers: &[&'static str]) -> TestJail {
        TestJail {
            id: format!("{tag}-{}", std::process::id()),
            base: base.to_path_buf(),
            parent_cgroup: format!("wisp-jail-test-{tag}-{}", std::process::id()),
            controllers: controllers.to_vec(),
            wisp: None,
        }
    }

    /// The chroot: the VMM's `/`.
    pub fn root(&self) -> PathBuf {
        self.base.join("wisp").join(&self.id).join("root")
    }

    /// The test's parent cgroup in each hierarchy.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.controllers
            .iter()
            .map(|c| {
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(&self.parent_cgroup)
            })
            .collect()
    }

    /// `wisp jail --cleanup` for this VM.
    pub fn cleanup(&self) -> std::process::Output {
        Command::new(wisp_bin())
            .args([
                "jail",
                "--cleanup",
                "--id",
                &self.id,
                "--exec-file",
                wisp_bin(),
            ])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(["--parent-cgroup", &self.parent_cgroup])
            .output()
            .expect("run wisp jail --cleanup")
    }

    /// Runs the cleanup and checks that nothing the jailer made is left.
    pub fn assert_cleaned_up(&self) {
        let out = self.cleanup();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!self.base.join("wisp").join(&self.id).exists());
        for d in self.cgroup_dirs() {
            assert!(!d.join(&self.id).exists(), "{} left", d.display());
        }
    }
}

impl Drop for TestJail {
    fn drop(&mut self) {
        drop(self.wisp.take());
        let _ = self.cleanup();
        for dir in self.cgroup_dirs() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A field of /proc/PID/status (or of a thread's status).
pub fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
        .trim()
        .to_string()
}

/// The confinement `wisp jail` promises, seen from the host: `pid`'s root is `root`, it runs
/// as `uid`:`uid` with no supplementary groups, no capability and no_new_privs.
pub fn assert_jailed(pid: u32, root: &Path, uid: u32) {
    use std::os::unix::fs::MetadataExt;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let inode = |p: &Path| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.dev(), m.ino())
    };
    assert_eq!(inode(&proc_dir.join("root")), inode(root));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(status_field(&status, "Uid"), ids);
    assert_eq!(status_field(&status, "Gid"), ids);
    assert_eq!(status_field(&status, "Groups"), "");
    for cap in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
}

/// Every thread of `pid` runs under a seccomp filter (`Seccomp: 2`); returns how many were
/// seen. A thread that ends while the list is read is skipped.
pub fn assert_every_thread_filtered(pid: u32) -> usize {
    let mut seen = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        assert_eq!(
            status_field(&status, "Seccomp"),
            "2",
            "thread {:?} ({}) has no seccomp filter",
            task.file_name(),
            status_field(&status, "Name")
        );
        seen += 1;
    }
    seen
}
