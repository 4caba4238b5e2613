//! Tier 2: virtio-vsock through the probe guest's own stream driver (tests/guests/vsock.c),
//! with Firecracker's host side: the guest connects to `<uds_path>_<port>` and streams
//! 256 KiB to a listener of the test's; the test connects to `uds_path`, says
//! `CONNECT 52`, gets `OK <port>`, streams 256 KiB to the guest and reads the guest's
//! checksum of them.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
const BYTES: usize = 256 << 10;

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(3))
        .collect()
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

#[test]
fn streams_flow_both_ways_between_host_sockets_and_the_guest() {
    if !kvm_available("streams_flow_both_ways_between_host_sockets_and_the_guest") {
        return;
    }
    let dir = TestDir::new("virtio-vsock");
    let uds = dir.join("v.sock");
    // The guest's connection to host port 1234 lands here.
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let probe = probes().probe.to_str().unwrap().to_string();
    let spec = format!("cid=42,uds={}", uds.display());
    let mut w = Wisp::spawn(&[
        "run",
        "--kernel",
        &probe,
        "--memory",
        "128M",
        "--cmdline",
        "probe.scenario=vsock probe.vsock_port=1234",
        "--vsock",
        &spec,
    ]);
    w.wait_for("probe: vsock cid 42", T);

    // Guest -> host.
    let (mut from_guest, _) = listener.accept().unwrap();
    from_guest.set_read_timeout(Some(T)).unwrap();
    let mut got = vec![0u8; BYTES];
    from_guest.read_exact(&mut got).unwrap();
    assert!(got == pattern(BYTES), "guest -> host bytes differ");

    // Host -> guest.
    let mut to_guest = UnixStream::connect(&uds).unwrap();
    to_guest.set_read_timeout(Some(T)).unwrap();
    to_guest.write_all(b"CONNECT 52\n").unwrap();
    let mut reader = BufReader::new(to_guest.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    let local: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {ok:?}"));
    assert!(local >= 1 << 30, "{ok:?}");
    to_guest.write_all(&pattern(BYTES)).unwrap();
    let mut summary = String::new();
    reader.read_line(&mut summary).unwrap();
    assert_eq!(
        summary,
        format!("rx {BYTES} {:08x}\n", fnv1a(&pattern(BYTES)))
    );
    // Both closed by the host: the guest finishes.
    drop(reader);
    drop(to_guest);
    drop(from_guest);
    let f = w.wait(T);
    assert!(!f.stdout.contains("probe: FAIL"), "{}", f.stdout);
    for line in [
        "probe: vsock connected to host port 1234",
        &format!("probe: vsock accepted host port {local}"),
        &format!("probe: vsock sent {BYTES}"),
        "probe: vsock closed",
        "probe: done vsock",
    ] {
        assert!(f.stdout.contains(line), "no {line:?}:\n{}", f.stdout);
    }
    assert_eq!(f.code(), Some(0), "{}", f.stderr);
    // wisp's socket goes with it.
    assert!(!uds.exists());
}

#[test]
fn a_guest_connection_to_a_port_nobody_listens_on_is_refused() {
    if !kvm_available("a_guest_connection_to_a_port_nobody_listens_on_is_refused") {
        return;
    }
    let dir = TestDir::new("virtio-vsock-rst");
    let uds = dir.join("v.sock");
    let f = run_probe(
        "vsock",
        1,
        "128M",
        &["--vsock", &format!("cid=3,uds={}", uds.display())],
        T,
    );
    assert!(
        f.stdout
            .contains("probe: FAIL vsock: the host refused the connection to port 1234"),
        "{}",
        f.stdout
    );
}

#[test]
fn bad_vsock_settings_are_refused_before_the_vm_starts() {
    let dir = TestDir::new("virtio-vsock-bad");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let probe = probes().probe.to_str().unwrap().to_string();
    for (spec, why) in [
        (
            format!("cid=3,uds={}", file.display()),
            "exists and is not a Unix socket".to_string(),
        ),
        (
            format!("cid=2,uds={}", dir.join("v.sock").display()),
            "vsock: guest_cid 2 is reserved; use 3 or more".into(),
        ),
    ] {
        let f = Wisp::spawn(&["run", "--kernel", &probe, "--vsock", &spec]).wait(T);
        assert_eq!(f.code(), Some(1), "{}", f.stderr);
        assert!(f.stderr.contains(&why), "{}", f.stderr);
    }
    // A live listener at uds_path is not taken over.
    let uds = dir.join("live.sock");
    let _l = UnixListener::bind(&uds).unwrap();
    let f = Wisp::spawn(&[
        "run",
        "--kernel",
        &probe,
        "--vsock",
        &format!("cid=3,uds={}", uds.display()),
    ])
    .wait(T);
    assert_eq!(f.code(), Some(1), "{}", f.stderr);
    assert!(
        f.stderr.contains("another process is listening on it"),
        "{}",
        f.stderr
    );
}
