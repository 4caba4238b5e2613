//! Tier 2: virtio-net through the probe guest's own driver (tests/guests/net.c, at CPL3) over a
//! real tap. Everything runs inside a network namespace the test creates and removes (also
//! when it fails): the tap with the host end 10.0.0.1/24, wisp (`ip netns exec`), `ping` to
//! the guest at 10.0.0.2, and a UDP listener on 10.0.0.1:9000 that counts and checks the
//! guest's burst. No traffic leaves the namespace.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
const TAP: &str = "wt2tap0";
const GUEST_MAC: &str = "52:54:00:12:34:56";

/// The test's namespace with the tap (host end 10.0.0.1/24, up).
fn netns() -> TestNetns {
    let ns = TestNetns::new("t2net");
    ns.add_tap(TAP, "10.0.0.1/24");
    ns
}

/// The tap's MAC address, as the guest should learn it by ARP.
fn tap_mac(ns: &TestNetns) -> String {
    let out = ns.ip(&["-br", "link", "show", TAP]);
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"))
        .to_string()
}

/// `ip netns exec NAME wisp run ...`: wisp opens the tap inside the namespace. `ip netns
/// exec` execs wisp, so the child's pid is wisp's.
fn spawn_wisp(ns: &TestNetns, cmdline: &str) -> Wisp {
    let probe = probes().probe.to_str().unwrap().to_string();
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    Wisp::spawn_cmd(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        wisp_bin(),
        "run",
        "--kernel",
        &probe,
        "--memory",
        "128M",
        "--cmdline",
        cmdline,
        "--net",
        &net,
    ]))
}

struct Received {
    seqs: BTreeSet<u32>,
    datagrams: u32,
    bad: u32,
}

/// A UDP listener on 10.0.0.1:9000 inside the namespace, on its own thread (setns changes
/// only that thread), until `stop` is set. Checks each payload against the probe's pattern.
fn listen(ns: &TestNetns, stop: Arc<AtomicBool>) -> JoinHandle<Received> {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open the netns");
        // SAFETY: setns on an fd we own; it changes only this thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let sock = UdpSocket::bind("10.0.0.1:9000").expect("bind 10.0.0.1:9000");
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a pointer to a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut r = Received {
            seqs: BTreeSet::new(),
            datagrams: 0,
            bad: 0,
        };
        let mut buf = [0u8; 2048];
        // Bounded, so that a test that panicked before setting `stop` leaves no thread behind.
        let give_up = std::time::Instant::now() + 2 * T;
        while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < give_up {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            r.datagrams += 1;
            let d = &buf[..n];
            let ok = n >= 4 && from.to_string() == "10.0.0.2:9001" && {
                let seq = u32::from_be_bytes(d[..4].try_into().unwrap());
                r.seqs.insert(seq);
                d.iter()
                    .enumerate()
                    .skip(4)
                    .all(|(i, &b)| b == (seq.wrapping_add(i as u32)) as u8)
            };
            if !ok {
                r.bad += 1;
            }
        }
        r
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("listener ready");
    handle
}

fn can_run(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped {test}: network namespaces and taps need root");
        return false;
    }
    true
}

fn assert_clean(f: &Finished) {
    assert!(
        !f.stdout.contains("probe: FAIL"),
        "the probe failed:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert!(
        f.stdout.contains("probe: done net\n"),
        "net did not finish:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
    assert_eq!(f.code(), Some(0), "stderr: {}", f.stderr);
}

/// Stops the listener a second after wisp exited: by then every frame wisp wrote to the tap
/// has gone through the namespace's stack.
fn collect(stop: &AtomicBool, listener: JoinHandle<Received>) -> Received {
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    listener.join().expect("listener thread")
}

#[test]
fn guest_answers_ping_and_sends_a_udp_burst() {
    if !can_run("guest_answers_ping_and_sends_a_udp_burst") {
        return;
    }
    let ns = netns();
    let tap_mac = tap_mac(&ns);
    let stop = Arc::new(AtomicBool::new(false));
    let listener = listen(&ns, stop.clone());
    let mut w = spawn_wisp(
        &ns,
        "probe.scenario=net probe.pings=5 probe.serve_ms=60000 probe.burst=1000",
    );
    w.wait_for("probe: net ready\n", T);
    let ping = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ping", "-c", "5", "-i", "0.2", "-W", "5", "10.0.0.2",
        ])
        .output()
        .unwrap();
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && ping_out.contains("5 packets transmitted, 5 received"),
        "ping: {ping_out}\nconsole:\n{}",
        w.stdout()
    );
    let f = w.wait(T);
    let got = collect(&stop, listener);
    assert_clean(&f);
    for line in [
        format!("probe: net mac {GUEST_MAC}"),
        "probe: net link up".to_string(),
        "probe: net answered 5".to_string(),
        format!("probe: net peer 10.0.0.1 is-at {tap_mac}"),
        "probe: net burst sent 1000".to_string(),
    ] {
        assert!(
            f.stdout.contains(&format!("{line}\n")),
            "missing {line:?}:\n{}",
            f.stdout
        );
    }
    assert_eq!(got.bad, 0, "malformed datagrams");
    assert_eq!(
        got.seqs,
        (0..1000).collect::<BTreeSet<u32>>(),
        "{} datagrams received",
        got.datagrams
    );
    assert_eq!(got.datagrams, 1000, "duplicates");
}

#[test]
fn full_size_frames_arrive_intact() {
    if !can_run("full_size_frames_arrive_intact") {
        return;
    }
    let ns = netns();
    let stop = Arc::new(AtomicBool::new(false));
    let listener = listen(&ns, stop.clone());
    // 1472-byte payloads: 1514-byte Ethernet frames, the largest without offloads.
    let w = spawn_wisp(
        &ns,
        "probe.scenario=net probe.serve_ms=0 probe.burst=300 probe.udp_len=1472",
    );
    let f = w.wait(T);
    let got = collect(&stop, listener);
    assert_clean(&f);
    assert!(
        f.stdout.contains("probe: net burst sent 300\n"),
        "{}",
        f.stdout
    );
    assert_eq!(got.bad, 0, "malformed datagrams");
    assert_eq!(got.seqs, (0..300).collect::<BTreeSet<u32>>());
}
