//! The one copy of the helpers the crate's unit tests share: scratch directories, a
//! deterministic random stream, running host tools, and network namespaces.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch directory (mkdtemp under /tmp), removed with its contents on drop.
pub struct TempDir(vmm_sys_util::tempdir::TempDir);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/wisp-devices-test-")
            .expect("create a scratch directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.as_path()
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path().join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

/// xorshift64*: a deterministic stream for the hostile-input tests (a failing seed replays).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for tests; `n` must not be 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
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
        "{cmd} {args:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace for one test, deleted on drop (the taps in it go with their fds).
/// IPv6 is off, so its stack sends nothing onto a tap behind the test's back.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new() -> TestNetns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wisp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok("ip", &["netns", "add", &name]);
        let ns = TestNetns { name };
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            ns.sysctl(key);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args..`, which must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    pub fn sysctl(&self, key_value: &str) {
        run_ok(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-qw", key_value],
        );
    }

    /// Runs `f` on a thread that joined the namespace (fds it opens stay in it).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open netns");
                // SAFETY: setns on an fd we own; it changes only this thread's namespace.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns")
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
