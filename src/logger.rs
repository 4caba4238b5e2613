//! wisp's log, to stderr until `--log-path` or `PUT /logger` names a file or a named pipe.
//! `wisp run` writes `wisp: LEVEL: message` lines; the Firecracker-compatible mode writes
//! Firecracker's `<local time> [<id>:<thread>:<LEVEL>:<file>:<line>] <message>` (level and
//! origin when asked), so tools that parse Firecracker's log read wisp's. The level comes from
//! --log-level, --level or WISP_LOG (error, warn, info, debug, trace), and `PUT /logger` may
//! change it.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use wisp_devices::ratelimit::{self, LogLimiter};

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("log_path: {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
}

/// A change of the log's settings; `None` keeps what is set.
#[derive(Debug, Clone, Default)]
pub struct LogSettings {
    /// A file (appended to, created if missing) or a named pipe.
    pub path: Option<PathBuf>,
    pub level: Option<LevelFilter>,
    /// `LEVEL: ` before the message (on by default).
    pub show_level: Option<bool>,
    /// `file:line: ` of the log statement before the message (off by default).
    pub show_origin: Option<bool>,
    /// Only lines from this module path and below (e.g. `wisp::vmm`).
    pub module: Option<String>,
}

/// The shape of a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineFormat {
    /// `wisp: info: message`.
    Wisp,
    /// Firecracker's: `2026-12-07T18:34:02.123456789 [vm1:main:INFO:src/vmm.rs:42] message`.
    Firecracker { instance_id: String },
}

struct Sink {
    /// None: stderr.
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    format: LineFormat,
}

impl Sink {
    /// The line for `record`, or None when the module filter leaves it out.
    fn format(&self, record: &Record) -> Option<String> {
        if let Some(m) = &self.module {
            let path = record.module_path().unwrap_or("");
            let below = path
                .strip_prefix(m.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
            if !below {
                return None;
            }
        }
        if let LineFormat::Firecracker { instance_id } = &self.format {
            return Some(self.firecracker_line(instance_id, record, &local_time_now()));
        }
        let mut line = String::from("wisp: ");
        if self.show_level {
            line.push_str(match record.level() {
                Level::Error => "error: ",
                Level::Warn => "warning: ",
                Level::Info => "info: ",
                Level::Debug => "debug: ",
                Level::Trace => "trace: ",
            });
        }
        if self.show_origin {
            line.push_str(&format!(
                "{}:{}: ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&record.args().to_string());
        line.push('\n');
        Some(line)
    }

    /// Firecracker's line (its logger's `[id:thread:LEVEL:file:line]` tag), `time` first.
    fn firecracker_line(&self, instance_id: &str, record: &Record, time: &str) -> String {
        let thread = std::thread::current();
        let mut tag = format!("{instance_id}:{}", thread.name().unwrap_or("-"));
        if self.show_level {
            tag.push(':');
            tag.push_str(record.level().as_str());
        }
        if self.show_origin {
            let line = record.line().map_or("?".to_string(), |l| l.to_string());
            tag.push_str(&format!(":{}:{line}", record.file().unwrap_or("?")));
        }
        format!("{time} [{tag}] {}\n", record.args())
    }
}

/// The local time as Firecracker's logger prints it: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
pub fn local_time_now() -> String {
    // SAFETY: clock_gettime and localtime_r only write the plain structs they are given.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts);
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&ts.tv_sec, &mut tm).is_null() {
            return format!("{}.{:09}", ts.tv_sec, ts.tv_nsec);
        }
        format!(
            "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
            i64::from(tm.tm_year) + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec,
            ts.tv_nsec
        )
    }
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    file: None,
    show_level: true,
    show_origin: false,
    module: None,
    format: LineFormat::Wisp,
});

fn sink() -> std::sync::MutexGuard<'static, Sink> {
    SINK.lock().unwrap_or_else(PoisonError::into_inner)
}

struct WispLogger;

impl Log for WispLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut suppressed = 0;
        if is_guest_driven(record.target()) {
            match GUEST_DRIVEN.check() {
                Some(n) => suppressed = n,
                None => return,
            }
        }
        let mut sink = sink();
        let Some(mut line) = sink.format(record) else {
            return;
        };
        if suppressed > 0 {
            line.pop();
            line.push_str(&ratelimit::suppressed_note(suppressed));
            line.push('\n');
        }
        // One write per line, so that lines from several threads do not interleave. A pipe
        // that is full drops the line (it is non-blocking): logging never stalls the VMM.
        let written = match sink.file.as_mut() {
            Some(f) => f.write_all(line.as_bytes()),
            None => std::io::stderr().lock().write_all(line.as_bytes()),
        };
        drop(sink);
        if written.is_err() {
            crate::metrics::add("logger", "missed_log_count", 1);
        }
    }

    fn flush(&self) {}
}

static LOGGER: WispLogger = WispLogger;

/// Crates whose log lines a guest can cause at will (virtio-queue logs each bad descriptor
/// index it is handed at error level); wisp's own such lines go through
/// `rate_limited_warn!`.
const GUEST_DRIVEN_TARGETS: &[&str] = &["virtio_queue"];

static GUEST_DRIVEN: LogLimiter = LogLimiter::new();

fn is_guest_driven(target: &str) -> bool {
    GUEST_DRIVEN_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

pub fn init(level: Option<&str>) {
    let env = std::env::var("WISP_LOG").ok();
    let filter = env
        .as_deref()
        .or(level)
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(filter);
    }
}

/// Switches to Firecracker's line shape for the VM `instance_id`, with its defaults (no level,
/// no origin) until `--show-level`, `--show-log-origin` or `PUT /logger` ask for them.
pub fn use_firecracker_format(instance_id: &str) {
    let mut sink = sink();
    sink.format = LineFormat::Firecracker {
        instance_id: instance_id.to_string(),
    };
    sink.show_level = false;
    sink.show_origin = false;
}

/// Applies `PUT /logger`: the destination is opened first, and on an error nothing changes.
pub fn configure(settings: &LogSettings) -> Result<(), LoggerError> {
    let file = settings.path.as_deref().map(open_destination).transpose()?;
    // Installed here too when `init` never ran (tests, library users).
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
    let mut sink = sink();
    if let Some(f) = file {
        sink.file = Some(f);
    }
    if let Some(v) = settings.show_level {
        sink.show_level = v;
    }
    if let Some(v) = settings.show_origin {
        sink.show_origin = v;
    }
    if let Some(m) = &settings.module {
        sink.module = Some(m.clone());
    }
    if let Some(level) = settings.level {
        log::set_max_level(level);
    }
    Ok(())
}

fn open_destination(path: &Path) -> Result<File, LoggerError> {
    open_file_or_pipe(path).map_err(|e| LoggerError::Open {
        path: path.to_path_buf(),
        reason: crate::config::io_reason(&e),
    })
}

/// Opens a log or metrics destination. A named pipe is opened read-write and non-blocking, as
/// Firecracker does: the open does not wait for a reader, and a full pipe never blocks a
/// writer. A regular file (or a character device such as /dev/null) is appended to, and
/// created if missing. The path itself must not be a symbolic link (O_NOFOLLOW): wisp
/// writes with its own privileges, and a link planted where the log goes would aim them at
/// another file. Block devices are refused. The opened file's type decides, so a file swapped
/// for a pipe in between cannot block the open.
pub(crate) fn open_file_or_pipe(path: &Path) -> std::io::Result<File> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::AsRawFd;
    // O_PATH opens nothing for I/O: a device is never opened, only looked at.
    let handle = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(h) => h,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // O_EXCL: nothing, not even a dangling link, may be there by now.
            return OpenOptions::new()
                .append(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| match e.kind() {
                    ErrorKind::AlreadyExists => {
                        Error::new(ErrorKind::InvalidInput, "appeared while being created")
                    }
                    _ => e,
                });
        }
        Err(e) => return Err(e),
    };
    let ft = handle.metadata()?.file_type();
    let mut reopen = OpenOptions::new();
    if ft.is_symlink() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "is a symbolic link; name the file itself (wisp does not follow links for files it writes)",
        ));
    } else if ft.is_fifo() {
        reopen
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    } else if ft.is_file() || ft.is_char_device() {
        reopen.append(true).custom_flags(libc::O_CLOEXEC);
    } else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "is not a regular file, a named pipe or a character device",
        ));
    }
    // The same inode again, through the handle: no second lookup of the path.
    match reopen.open(format!("/proc/self/fd/{}", handle.as_raw_fd())) {
        Err(e) if e.kind() == ErrorKind::NotFound && !Path::new("/proc/self").exists() => {
            // No /proc (inside `wisp jail`'s chroot): the path once more, still without
            // following a link, and it must be the inode looked at.
            use std::os::unix::fs::MetadataExt;
            let file = reopen
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(path)?;
            let (was, is) = (handle.metadata()?, file.metadata()?);
            if (was.dev(), was.ino()) != (is.dev(), is.ino()) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "was replaced while being opened",
                ));
            }
            Ok(file)
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> vmm_sys_util::tempdir::TempDir {
        let prefix = std::env::temp_dir().join(format!("wisp-logger-{tag}-"));
        vmm_sys_util::tempdir::TempDir::new_with_prefix(prefix).unwrap()
    }

    #[test]
    fn lines_show_level_origin_and_follow_the_module_filter() {
        let mut sink = Sink {
            file: None,
            show_level: true,
            show_origin: false,
            module: None,
            format: LineFormat::Wisp,
        };
        let line = |sink: &Sink, module: &str| {
            sink.format(
                &Record::builder()
                    .args(format_args!("VM started"))
                    .level(Level::Info)
                    .module_path(Some(module))
                    .file(Some("src/vmm.rs"))
                    .line(Some(42))
                    .build(),
            )
        };
        assert_eq!(
            line(&sink, "wisp::vmm").as_deref(),
            Some("wisp: info: VM started\n")
        );
        sink.show_level = false;
        sink.show_origin = true;
        assert_eq!(
            line(&sink, "wisp::vmm").as_deref(),
            Some("wisp: src/vmm.rs:42: VM started\n")
        );
        sink.module = Some("wisp::vmm".into());
        assert!(line(&sink, "wisp::vmm").is_some());
        assert!(line(&sink, "wisp::vmm::inner").is_some());
        assert!(line(&sink, "wisp::vmmx").is_none());
        assert!(line(&sink, "wisp::api::server").is_none());
    }

    #[test]
    fn the_virtio_queue_crate_is_rate_limited() {
        assert!(is_guest_driven("virtio_queue"));
        assert!(is_guest_driven("virtio_queue::queue"));
        assert!(!is_guest_driven("virtio_queue_x"));
        assert!(!is_guest_driven("wisp::vmm"));
        assert!(!is_guest_driven("wisp_devices::virtio::block"));
    }

    #[test]
    fn firecracker_lines_carry_id_thread_and_asked_for_level_and_origin() {
        let mut sink = Sink {
            file: None,
            show_level: false,
            show_origin: false,
            module: None,
            format: LineFormat::Firecracker {
                instance_id: "vm1".into(),
            },
        };
        let record = |level| {
            Record::builder()
                .args(format_args!("VM started"))
                .level(level)
                .module_path(Some("wisp::vmm"))
                .file(Some("src/vmm.rs"))
                .line(Some(42))
                .build()
        };
        let t = "2026-12-07T18:34:02.000000001";
        let thread = std::thread::current().name().unwrap_or("-").to_string();
        assert_eq!(
            sink.firecracker_line("vm1", &record(Level::Info), t),
            format!("{t} [vm1:{thread}] VM started\n")
        );
        sink.show_level = true;
        sink.show_origin = true;
        assert_eq!(
            sink.firecracker_line("vm1", &record(Level::Warn), t),
            format!("{t} [vm1:{thread}:WARN:src/vmm.rs:42] VM started\n")
        );
        // format() takes the same path, with the time of the call.
        let line = sink.format(&record(Level::Error)).unwrap();
        assert!(
            line.ends_with(&format!(" [vm1:{thread}:ERROR:src/vmm.rs:42] VM started\n")),
            "{line}"
        );
        let time = line.split(' ').next().unwrap();
        assert_eq!(time.len(), t.len(), "{time}");
        assert_eq!((&time[4..5], &time[10..11], &time[19..20]), ("-", "T", "."));
    }

    #[test]
    fn destination_errors_name_the_path_and_change_nothing() {
        let tmp = temp_dir("bad");
        let dir = tmp.as_path();
        for bad in [dir.to_path_buf(), dir.join("missing/dir/wisp.log")] {
            let e = configure(&LogSettings {
                path: Some(bad.clone()),
                level: Some(LevelFilter::Trace),
                ..Default::default()
            })
            .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("log_path: {}: ", bad.display())),
                "{msg}"
            );
            assert_ne!(
                log::max_level(),
                LevelFilter::Trace,
                "the level was changed"
            );
        }
    }

    #[test]
    fn a_named_pipe_without_a_reader_opens_and_never_blocks() {
        let tmp = temp_dir("fifo");
        let dir = tmp.as_path();
        let path = dir.join("log.fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut f = open_destination(&path).unwrap();
        // Far more than the pipe holds: the writes past its capacity fail with EAGAIN
        // instead of blocking.
        let line = [b'x'; 4096];
        let full = (0..64).any(|_| {
            f.write_all(&line)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
        });
        assert!(full, "a full pipe must refuse, not block");
    }

    #[test]
    fn a_symbolic_link_or_a_block_device_is_never_written() {
        let tmp = temp_dir("links");
        let dir = tmp.as_path();
        let target = dir.join("precious");
        std::fs::write(&target, b"keep me\n").unwrap();
        let link = dir.join("wisp.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let dangling = dir.join("dangling.log");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
        for path in [&link, &dangling] {
            let e = open_destination(path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("log_path: {}: ", path.display())),
                "{e}"
            );
            assert!(e.contains("is a symbolic link"), "{e}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me\n");
        assert!(!dir.join("nowhere").exists());
        // A regular file is appended to; /dev/null is fine too.
        open_destination(&target)
            .unwrap()
            .write_all(b"more\n")
            .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me\nmore\n");
        open_destination(Path::new("/dev/null")).unwrap();
        let block = std::fs::read_dir("/dev")
            .unwrap()
            .flatten()
            .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()));
        if let Some(dev) = block {
            let e = open_destination(&dev.path()).unwrap_err().to_string();
            assert!(e.contains("is not a regular file"), "{e}");
        }
    }
}
