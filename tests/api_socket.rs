//! The API server over a real Unix socket, with a stand-in main thread (no VM): it waits on
//! the channel's eventfd like the VMM's epoll loop and answers from a `PendingConfig`.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod common;
use common::{Client, Response, TestDir};
use serde_json::{json, Value};
use wisp::api::{
    self, ActionType, ApiChannel, ApiError, ApiFault, ApiLimits, ApiRequest, InstanceInfo,
    InstanceState, PendingConfig,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The API server plus a stand-in main thread.
struct Server {
    /// Server tests run one at a time: some measure this process's RSS.
    _serial: std::sync::MutexGuard<'static, ()>,
    _dir: TestDir,
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    main: Option<JoinHandle<ApiChannel>>,
}

impl Server {
    fn start() -> Self {
        Self::with_limits(ApiLimits::default())
    }

    fn with_limits(limits: ApiLimits) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = TestDir::new("api-srv");
        let sock = dir.join("api.sock");
        let channel = api::start_with_limits(&sock, limits).expect("API server starts");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let main = thread::spawn(move || fake_main_loop(channel, &stop2));
        Server {
            _serial: serial,
            _dir: dir,
            sock,
            stop,
            main: Some(main),
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.sock)
    }

    /// Stops the stand-in main thread and returns the channel.
    fn stop_main(&mut self) -> ApiChannel {
        self.stop.store(true, Ordering::Release);
        self.main.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.main.is_some() {
            drop(self.stop_main());
        }
    }
}

/// Waits on the eventfd (as the VMM's epoll does) and answers every queued request.
fn fake_main_loop(channel: ApiChannel, stop: &AtomicBool) -> ApiChannel {
    let mut pending = PendingConfig::new();
    let mut started = false;
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: channel.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        while let Some((req, responder)) = channel.try_recv() {
            if req == ApiRequest::GetVmMetrics {
                // Stands for a main thread that fails to answer.
                drop(responder);
                continue;
            }
            responder.respond(answer(&mut pending, &mut started, req));
        }
    }
    channel
}

fn answer(
    pending: &mut PendingConfig,
    started: &mut bool,
    req: ApiRequest,
) -> Result<Option<Value>, ApiFault> {
    let state = if *started {
        InstanceState::Running
    } else {
        InstanceState::NotStarted
    };
    match &req {
        ApiRequest::GetInstanceInfo => Ok(Some(
            serde_json::to_value(InstanceInfo::new("test-vm", state)).unwrap(),
        )),
        ApiRequest::GetMachineConfig => {
            Ok(Some(serde_json::to_value(&pending.machine_config).unwrap()))
        }
        ApiRequest::GetVmConfig => Ok(Some(pending.to_json())),
        ApiRequest::Action(ActionType::InstanceStart) if !*started => {
            pending.to_vm_config()?;
            *started = true;
            Ok(None)
        }
        r if r.allowed() == api::Allowed::PreBoot && !*started => {
            pending.apply(r)?;
            Ok(None)
        }
        r if r.allowed() == api::Allowed::Always => Ok(None),
        r => Err(ApiFault::wrong_state(r, *started)),
    }
}

/// Held by every `Server` (see `Server::_serial`).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn test_file() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").to_string()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn get_root_reports_instance_info_from_the_main_thread() {
    let srv = Server::start();
    let mut c = srv.connect();
    let r = c.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!({"id": "test-vm", "state": "Not started", "vmm_version": api::FIRECRACKER_API_VERSION,
               "wisp_version": api::VMM_VERSION, "app_name": "wisp"})
    );
    let v = c.get("/version");
    assert_eq!(v.status, 200);
    assert_eq!(
        v.json(),
        json!({"firecracker_version": api::FIRECRACKER_API_VERSION,
               "wisp_version": api::VMM_VERSION, "app_name": "wisp"})
    );
}

#[test]
fn keep_alive_configure_and_start_on_one_connection() {
    let srv = Server::start();
    let mut c = srv.connect();
    let f = test_file();
    let r = c.put(
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{f}", "boot_args": "console=ttyS0"}}"#),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), None);
    assert_eq!(
        c.put(
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#
        )
        .status,
        204
    );
    assert_eq!(
        c.patch("/machine-config", r#"{"mem_size_mib": 512}"#)
            .status,
        204
    );
    let m = c.get("/machine-config");
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["vcpu_count"], 2);
    assert_eq!(m.json()["mem_size_mib"], 512);
    assert_eq!(
        c.put(
            "/drives/rootfs",
            &format!(r#"{{"drive_id": "rootfs", "path_on_host": "{f}", "is_root_device": true, "is_read_only": true}}"#)
        )
        .status,
        204
    );
    let cfg = c.get("/vm/config").json();
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(cfg["boot-source"]["boot_args"], "console=ttyS0");
    // Not valid before boot.
    let r = c.patch("/vm", r#"{"state": "Paused"}"#);
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("only valid once the VM has started"),
        "{}",
        r.fault()
    );
    assert_eq!(
        c.put("/actions", r#"{"action_type": "InstanceStart"}"#)
            .status,
        204
    );
    assert_eq!(c.get("/").json()["state"], "Running");
    let r = c.put("/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("only valid before InstanceStart"),
        "{}",
        r.fault()
    );
}

#[test]
fn bad_bodies_get_400_naming_the_field() {
    let srv = Server::start();
    let mut c = srv.connect();
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": "#,
            "invalid JSON body",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 256}"#,
            "vcpu_count: invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2}"#,
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "turbo": true}"#,
            "unknown field `turbo`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
            "vcpu_count: must be between 1 and 32, got 0",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1000, "mem_size_mib": 256}"#,
            "vcpu_count: must be between 1 and 32, got 1000",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#,
            "drive_id: the path names \"a\" but the body names \"b\"",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
            "kernel_image_path: /nonexistent/vmlinux: No such file or directory",
        ),
    ];
    for (m, p, b, needle) in cases {
        let r = c.request(m, p, Some(b));
        assert_eq!(r.status, 400, "{m} {p} {b}");
        assert!(r.fault().contains(needle), "{m} {p} {b}: {}", r.fault());
    }
    // The connection stays usable after each 400.
    assert_eq!(c.get("/").status, 200);
}

#[test]
fn unknown_path_404_wrong_method_405_with_allow() {
    let srv = Server::start();
    let mut c = srv.connect();
    let r = c.get("/snapshots/create");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.fault(),
        "Invalid request method and/or path: GET /snapshots/create"
    );
    // A Firecracker endpoint wisp lacks is not unknown: 400 saying so.
    let r = c.request("PUT", "/cpu-config", Some("{}"));
    assert_eq!(r.status, 400);
    assert!(
        r.fault().contains("(cpu-config) are not supported by wisp"),
        "{}",
        r.fault()
    );
    let r = c.request("POST", "/machine-config", Some("{}"));
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, PUT, PATCH"));
    assert_eq!(c.get("/").status, 200);
}

#[test]
fn dropped_responder_is_500() {
    let srv = Server::start();
    let mut c = srv.connect();
    let r = c.get("/vm/metrics");
    assert_eq!(r.status, 500);
    assert!(r.fault().contains("dropped the request"), "{}", r.fault());
}

#[test]
fn ten_mib_body_is_refused_unread() {
    let srv = Server::start();
    let rss_before = vm_rss_kib();
    let mut c = srv.connect();
    let t = Instant::now();
    c.send_raw(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n");
    // Keep sending the body from another thread; the server must answer without reading it.
    let mut writer = c.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        for _ in 0..10 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    let r = c.read_response().expect("a 413 answer");
    let elapsed = t.elapsed();
    assert_eq!(r.status, 413);
    assert!(r.fault().contains("10485760"), "{}", r.fault());
    assert_eq!(r.header("connection"), Some("close"));
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(c.is_closed());
    let sent = sender.join().unwrap();
    assert!(
        sent < 10 << 20,
        "the server swallowed the whole body ({sent} bytes)"
    );
    let grown = vm_rss_kib().saturating_sub(rss_before);
    assert!(grown < 4096, "RSS grew by {grown} KiB");

    // Just over the limit, sent whole: still 413.
    let mut c = srv.connect();
    let body = "x".repeat((64 << 10) + 1);
    let r = c.put("/boot-source", &body);
    assert_eq!(r.status, 413);
    // Headers over 8 KiB: 431, closed.
    let mut c = srv.connect();
    c.send_raw(format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "y".repeat(9000)).as_bytes());
    assert_eq!(c.read_response().unwrap().status, 431);
    assert!(c.is_closed());
}

#[test]
fn chunked_body_is_411() {
    let srv = Server::start();
    let mut c = srv.connect();
    c.send_raw(
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 411);
    assert!(c.is_closed());
}

#[test]
fn silent_and_trickling_clients_do_not_block_others() {
    // Silent and half-sent requests hold their connection for up to the 3 s request
    // timeout; another client is answered long before that.
    let srv = Server::with_limits(ApiLimits {
        request_timeout: Duration::from_secs(3),
        ..ApiLimits::default()
    });
    let _silent = srv.connect();
    let mut half = srv.connect();
    half.send_raw(b"GET / HT");
    let mut trickle = srv.connect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let mut s = trickle.stream.try_clone().unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            for b in b"PUT /actions HTTP/1.1\r\nX-Slow: "
                .iter()
                .chain([b'x'; 200].iter())
            {
                if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let mut c = srv.connect();
    for _ in 0..3 {
        assert_eq!(c.get("/").status, 200);
    }
    let elapsed = t.elapsed();
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");

    // Requests that do not arrive whole in time: 408 and close.
    let r = half.read_response().expect("408 for the half request");
    assert_eq!(r.status, 408);
    assert!(
        r.fault().contains("did not arrive within 3000 ms"),
        "{}",
        r.fault()
    );
    let r = trickle.read_response().expect("408 for the trickle");
    assert_eq!(r.status, 408);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
}

#[test]
fn hundred_concurrent_clients_all_answered() {
    let srv = Server::start();
    let round = |sock: &Path| {
        let ok = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(100));
        let threads: Vec<_> = (0..100)
            .map(|_| {
                let (sock, ok, barrier) = (sock.to_path_buf(), ok.clone(), barrier.clone());
                thread::spawn(move || {
                    let mut c = Client::connect(&sock);
                    barrier.wait();
                    for _ in 0..5 {
                        let r = c.get("/");
                        assert_eq!(r.status, 200);
                        assert_eq!(r.json()["app_name"], "wisp");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ok.load(Ordering::Relaxed), 500);
    };
    round(&srv.sock);
    // Connection threads end when their client closes; memory does not grow per round.
    let after_first = vm_rss_kib();
    for _ in 0..5 {
        round(&srv.sock);
    }
    let grown = vm_rss_kib().saturating_sub(after_first);
    eprintln!("RSS after 1 round: {after_first} KiB, growth over 5 more: {grown} KiB");
    assert!(
        grown < 2048,
        "RSS grew by {grown} KiB over 3000 more requests"
    );
}

#[test]
fn connections_over_the_limit_get_503() {
    let srv = Server::with_limits(ApiLimits {
        max_connections: 4,
        ..ApiLimits::default()
    });
    let mut held: Vec<Client> = (0..4).map(|_| srv.connect()).collect();
    // Make sure all four are being served.
    for c in &mut held {
        assert_eq!(c.get("/").status, 200);
    }
    let mut extra = srv.connect();
    let r = extra.read_response().expect("503 answer");
    assert_eq!(r.status, 503);
    assert!(r.fault().contains("too many"), "{}", r.fault());
    drop(held.pop());
    // The slot frees once the connection thread ends.
    let t = Instant::now();
    loop {
        let mut c = srv.connect();
        match c.request_opt("GET", "/") {
            Some(r) if r.status == 200 => break,
            _ => assert!(t.elapsed() < Duration::from_secs(5), "slot never freed"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Client {
    /// A GET whose answer may be a refusal before the request was read.
    fn request_opt(&mut self, method: &str, path: &str) -> Option<Response> {
        let req = format!("{method} {path} HTTP/1.1\r\n\r\n");
        let _ = self.stream.write_all(req.as_bytes());
        self.read_response()
    }
}

#[test]
fn pipelined_requests_and_connection_close() {
    let srv = Server::start();
    let mut c = srv.connect();
    c.send_raw(
        b"GET / HTTP/1.1\r\n\r\nPUT /logger HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /version HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(c.read_response().unwrap().status, 204);
    let last = c.read_response().unwrap();
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(c.is_closed());
}

#[test]
fn expect_100_continue() {
    let srv = Server::start();
    let mut c = srv.connect();
    let body = r#"{"action_type": "FlushMetrics"}"#;
    c.send_raw(
        format!(
            "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let cont = c.read_response().unwrap();
    assert_eq!(cont.status, 100);
    c.send_raw(body.as_bytes());
    assert_eq!(c.read_response().unwrap().status, 204);
}

#[test]
fn socket_mode_stale_live_and_removal() {
    let dir = TestDir::new("api-sock");
    let path = dir.join("api.sock");

    // A stale socket (its listener is gone) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut ch = api::start(&path).expect("stale socket replaced");
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A live one is refused (and left alone).
    match api::start(&path) {
        Err(ApiError::SocketInUse { path: p }) => assert_eq!(p, path),
        Err(e) => panic!("expected SocketInUse, got {e}"),
        Ok(_) => panic!("a second server on a live socket"),
    }
    assert!(path.exists());
    assert!(UnixStream::connect(&path).is_ok());

    // A connection open at shutdown gets 503 for its next request; the file is gone.
    let mut c = Client::connect(&path);
    assert_eq!(
        c.get("/version").status,
        200,
        "served by the API thread alone"
    );
    ch.shutdown();
    assert!(!path.exists(), "socket removed on shutdown");
    assert!(UnixStream::connect(&path).is_err());
    assert_eq!(c.get("/").status, 503);

    // Dropping the channel removes the socket too.
    let ch = api::start(&path).unwrap();
    assert!(path.exists());
    drop(ch);
    assert!(!path.exists());

    // A regular file at the path is never removed.
    std::fs::write(&path, b"not a socket").unwrap();
    match api::start(&path) {
        Err(ApiError::NotASocket { .. }) => {}
        Err(e) => panic!("expected NotASocket, got {e}"),
        Ok(_) => panic!("started over a regular file"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[test]
fn socket_mode_is_0600_whatever_the_umask() {
    let dir = TestDir::new("api-umask");
    let path = dir.join("api.sock");
    // SAFETY: umask only changes this process's file creation mask (restored below).
    let old = unsafe { libc::umask(0) };
    let ch = api::start(&path);
    // SAFETY: as above; the old mask back.
    unsafe { libc::umask(old) };
    let _ch = ch.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn channel_eventfd_signals_each_request() {
    let dir = TestDir::new("api-evt");
    let path = dir.join("api.sock");
    let ch = api::start(&path).unwrap();
    assert!(ch.try_recv().is_none());
    let client = thread::spawn(move || {
        let mut c = Client::connect(&path);
        c.put("/actions", r#"{"action_type": "SendCtrlAltDel"}"#)
    });
    let mut pfd = libc::pollfd {
        fd: ch.event_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "eventfd readable once a request is queued");
    let (req, responder) = ch.try_recv().expect("the queued request");
    assert_eq!(req, ApiRequest::Action(ActionType::SendCtrlAltDel));
    // Drained: the eventfd is no longer readable and the queue is empty.
    assert!(ch.try_recv().is_none());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    responder.respond(Err(ApiFault::bad_request("the VM has not started")));
    let r = client.join().unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.fault(), "the VM has not started");
    let _ = ch.event_fd().as_raw_fd();
}

#[test]
fn curl_drives_the_api() {
    let srv = Server::start();
    let sock = srv.sock.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--unix-socket", sock, "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse::<u16>().unwrap(), body.to_string())
    };
    let (code, body) = run(&["http://localhost/"]);
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["state"],
        "Not started"
    );
    let f = test_file();
    let boot = format!(r#"{{"kernel_image_path": "{f}"}}"#);
    let (code, body) = run(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        &boot,
        "http://localhost/boot-source",
    ]);
    assert_eq!((code, body.as_str()), (204, ""));
    let (code, body) = run(&[
        "-X",
        "PUT",
        "-d",
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
        "http://localhost/machine-config",
    ]);
    assert_eq!(code, 400);
    assert!(body.contains("vcpu_count"), "{body}");
    // A large body makes curl send Expect: 100-continue.
    let big = format!(
        r#"{{"kernel_image_path": "{f}", "boot_args": "{}"}}"#,
        "a".repeat(3000)
    );
    let (code, _) = run(&["-X", "PUT", "-d", &big, "http://localhost/boot-source"]);
    assert_eq!(code, 204);
}

#[test]
fn deeply_nested_json_is_refused_without_crashing() {
    let srv = Server::start();
    let mut c = srv.connect();
    for depth in [100, 127, 128, 129, 5000, 30000] {
        for field in ["rate_limiter", "boot_args"] {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let (path, body) = if field == "rate_limiter" {
                (
                    "/drives/a",
                    format!(
                        r#"{{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {nested}}}"#
                    ),
                )
            } else {
                (
                    "/boot-source",
                    format!(r#"{{"kernel_image_path": "/k", "boot_args": {nested}}}"#),
                )
            };
            let r = c.put(path, &body);
            assert!(
                r.status == 400 || r.status == 413,
                "depth {depth} {field}: {}",
                r.status
            );
        }
    }
    assert_eq!(c.get("/").status, 200);
}

/// The API threads block process-directed signals, so SIGTERM and friends reach the main
/// thread's signalfd instead of killing wisp from an API thread.
#[test]
fn api_threads_block_async_signals() {
    let srv = Server::start();
    let mut c = srv.connect();
    assert_eq!(c.get("/").status, 200);
    let mut checked = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.trim().starts_with("wisp-api") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let Some(blk) = status.lines().find_map(|l| l.strip_prefix("SigBlk:")) else {
            continue; // the thread ended meanwhile
        };
        let mask = u64::from_str_radix(blk.trim(), 16).unwrap();
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGCHLD,
        ] {
            assert_ne!(
                mask & (1 << (sig - 1)),
                0,
                "{} blocks no signal {sig}",
                comm.trim()
            );
        }
        assert_eq!(mask & (1 << (libc::SIGSEGV - 1)), 0);
        checked += 1;
    }
    // The acceptor and this client's connection thread (other tests' threads may add more).
    assert!(checked >= 2, "found {checked} API threads");
}

/// Measurement, not a check: `cargo test --release --test api_socket -- --ignored --nocapture`.
/// Median time from `api::start` to the first answered `GET /version`, and of a `GET /`
/// round trip through the main thread on a kept-alive connection.
#[test]
#[ignore]
fn measure_start_and_get_latency() {
    let dir = TestDir::new("api-bench");
    let path = dir.join("api.sock");
    let mut starts = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let ch = api::start(&path).unwrap();
        let mut c = Client::connect(&path);
        assert_eq!(c.get("/version").status, 200);
        starts.push(t.elapsed());
        drop(c);
        drop(ch);
    }
    starts.sort();
    let srv = Server::start();
    let mut c = srv.connect();
    let mut gets = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        assert_eq!(c.get("/").status, 200);
        gets.push(t.elapsed());
    }
    gets.sort();
    eprintln!(
        "api::start to first answer: median {:?}; GET / via the main thread: median {:?}, p99 {:?}",
        starts[starts.len() / 2],
        gets[gets.len() / 2],
        gets[gets.len() * 99 / 100]
    );
}

#[test]
fn a_busy_event_loop_gets_503_by_the_deadline_and_never_runs_the_abandoned_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new("api-busy");
    let sock = dir.join("api.sock");
    // No main loop reads the channel: the event loop is busy elsewhere.
    let limits = ApiLimits {
        dispatch_timeout: Duration::from_millis(300),
        ..ApiLimits::default()
    };
    let channel = api::start_with_limits(&sock, limits).expect("API server starts");
    let mut c = Client::connect(&sock);
    let r = c.patch("/vm", r#"{"state": "Paused"}"#);
    assert_eq!(r.status, 503);
    assert!(
        r.fault().contains("busy") && r.fault().contains("not carried out"),
        "{}",
        r.fault()
    );
    // The connection still serves, and the loop, free again, never sees the request its
    // client gave up on.
    let r = c.get("/version");
    assert_eq!(r.status, 200);
    assert!(
        channel.try_recv().is_none(),
        "an abandoned request was handed out"
    );

    // A request the loop took is answered when it is done, even past the deadline.
    let sock2 = sock.clone();
    let client = thread::spawn(move || Client::connect(&sock2).get("/").status);
    let (req, responder) = loop {
        if let Some(taken) = channel.try_recv() {
            break taken;
        }
        thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(req, ApiRequest::GetInstanceInfo);
    thread::sleep(Duration::from_millis(600));
    responder.respond(Ok(Some(
        serde_json::to_value(InstanceInfo::new("busy-vm", InstanceState::Running)).unwrap(),
    )));
    assert_eq!(client.join().unwrap(), 200);
}
