//! Seccomp filters, one per thread kind (the tables in [`tables`]), built once per process
//! with rust-vmm's seccompiler and installed by each thread on itself before it does what it
//! exists for: a vCPU before its first KVM_RUN, an API thread before its first accept, the
//! main thread (the event loop) once the VM is built and before any vCPU enters the guest.
//!
//! A call outside a thread's table raises SIGSYS (SECCOMP_RET_TRAP). The handler writes one
//! line naming the thread kind and the call to stderr, then re-raises SIGSYS with its default
//! action, so the process dies of signal 31 and its parent sees why.
//!
//! Nothing is installed unless [`configure`] was called (the binary does; a library user or a
//! unit test gets no filter).

mod names;
mod tables;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

pub use tables::Arg;

/// How much the filters check (`--seccomp-level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// No filter.
    Off = 0,
    /// The system call numbers each thread may use.
    Numbers = 1,
    /// The numbers, and the arguments that matter (ioctl requests, fcntl commands, no
    /// PROT_EXEC mappings, the signals a thread may send).
    Arguments = 2,
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "0" => Ok(Level::Off),
            "1" => Ok(Level::Numbers),
            "2" => Ok(Level::Arguments),
            _ => Err(format!(
                "invalid seccomp level '{s}': 0 (no filters), 1 (system call numbers) or 2 \
                 (numbers and arguments, the default)"
            )),
        }
    }
}

/// The kinds of thread wisp runs, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM is built: the event loop, device I/O, the runtime API.
    Main = 1,
    /// `wisp-vcpu<N>`: KVM_RUN and the buses' register accesses.
    Vcpu = 2,
    /// `wisp-api`: accepts connections on the API socket.
    Api = 3,
    /// `wisp-api-conn`: reads requests and writes answers on one connection.
    ApiConn = 4,
    /// `wisp-console`: writes the guest's console output.
    Console = 5,
    /// `wisp-metrics`: writes the metrics line periodically.
    Metrics = 6,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::ApiConn,
        ThreadKind::Console,
        ThreadKind::Metrics,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::ApiConn => "api-conn",
            ThreadKind::Console => "console",
            ThreadKind::Metrics => "metrics",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        self as usize - 1
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} thread's seccomp filter: {source}")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("installing the {kind} thread's seccomp filter: {source}")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error(
        "{var}={value}: not a thread kind (one of main, vcpu, api, api-conn, console, metrics)"
    )]
    SelfTest { var: &'static str, value: String },
}

/// The test hook: `WISP_SECCOMP_SELFTEST=<thread kind>` makes that thread make a system call
/// outside its filter right after installing it, so that a test can see the process die the
/// way a denied call kills it. Read once, by [`configure`].
pub const SELFTEST_VAR: &str = "WISP_SECCOMP_SELFTEST";

struct Filters {
    level: Level,
    /// By [`ThreadKind::index`], each built by the first thread of its kind (off the way to
    /// the API socket and the first KVM_RUN for all but the main thread's).
    programs: [OnceLock<BpfProgram>; ThreadKind::ALL.len()],
    selftest: Option<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// This thread's kind (0: none), for the SIGSYS handler.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Sets the level and installs the SIGSYS handler. Called once by `main`, before any thread
/// that installs a filter starts. Each kind's filter is built from its table once, by the
/// first thread of that kind.
pub fn configure(level: Level) -> Result<(), SeccompError> {
    let selftest = match std::env::var(SELFTEST_VAR) {
        Ok(v) => Some(ThreadKind::from_name(&v).ok_or(SeccompError::SelfTest {
            var: SELFTEST_VAR,
            value: v,
        })?),
        Err(_) => None,
    };
    if level != Level::Off {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
        // glibc reads /etc/localtime on the first localtime_r (the Firecracker-format log
        // lines): let that happen now, not in a filtered thread.
        // SAFETY: localtime_r only writes the tm it is given.
        unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            libc::localtime_r(&0, &mut tm);
        }
    }
    wisp_devices::set_thread_start(|thread| match thread {
        wisp_devices::DeviceThread::Console => install_or_exit(ThreadKind::Console),
    });
    let _ = FILTERS.set(Filters {
        level,
        programs: Default::default(),
        selftest,
    });
    Ok(())
}

/// The level [`configure`] set (`Off` when it was not called).
pub fn level() -> Level {
    FILTERS.get().map_or(Level::Off, |f| f.level)
}

/// Installs `kind`'s filter on the calling thread (nothing when filters are off or were never
/// configured). Also sets no_new_privs, which seccomp requires of an unprivileged caller.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    if filters.level == Level::Off {
        return Ok(());
    }
    let slot = &filters.programs[kind.index()];
    let program = match slot.get() {
        Some(p) => p,
        None => {
            let p = compile(kind, filters.level)?;
            slot.get_or_init(|| p)
        }
    };
    KIND.with(|k| k.set(kind as u8));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })?;
    if filters.selftest == Some(kind) {
        // The test hook: a call no thread may make. execve with no program fails with
        // EFAULT if the filter let it through, and the test sees the process go on.
        // SAFETY: execve with null pointers reads nothing and cannot succeed.
        unsafe {
            libc::syscall(
                libc::SYS_execve,
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
            )
        };
    }
    Ok(())
}

/// [`install`] for a thread that has no one to report an error to: the process ends with
/// the reason (running on without the filter would be worse).
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("wisp: error: {e}");
        std::process::exit(1);
    }
}

/// The number of system calls `kind`'s filter allows (whatever their arguments).
pub fn allowed_count(kind: ThreadKind) -> usize {
    let mut nrs: Vec<i64> = tables::table(kind).into_iter().map(|(nr, _)| nr).collect();
    nrs.sort_unstable();
    nrs.dedup();
    nrs.len()
}

fn compile(kind: ThreadKind, level: Level) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let rules = merged(tables::table(kind), level).map_err(build)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// One chain of rules per system call: the entries of a call are ways for it to pass, and an
/// entry that allows any arguments (or level 1) makes the chain empty, which allows the call.
fn merged(
    table: Vec<(i64, Arg)>,
    level: Level,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut chains: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, arg) in table {
        let chain = chains.entry(nr).or_insert_with(|| Some(Vec::new()));
        let rules = match (&arg, level) {
            (Arg::Any, _) | (_, Level::Numbers | Level::Off) => None,
            _ => Some(arg_rules(&arg)?),
        };
        match (chain.as_mut(), rules) {
            (Some(c), Some(r)) => c.extend(r),
            _ => *chain = None,
        }
    }
    Ok(chains
        .into_iter()
        .map(|(nr, c)| (nr, c.unwrap_or_default()))
        .collect())
}

/// The seccompiler rules for one table entry: an empty chain allows any arguments; each rule
/// of a chain is one way for the call to pass.
fn arg_rules(arg: &Arg) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let cond = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
    };
    match arg {
        Arg::Any => Ok(Vec::new()),
        Arg::OneOf(index, values) => values
            .iter()
            .map(|&v| SeccompRule::new(vec![cond(*index, SeccompCmpOp::Eq, v)?]))
            .collect(),
        Arg::NoneOf(index, mask) => Ok(vec![SeccompRule::new(vec![cond(
            *index,
            SeccompCmpOp::MaskedEq(*mask),
            0,
        )?])?]),
        Arg::AllOf(index, mask) => Ok(vec![SeccompRule::new(vec![cond(
            *index,
            SeccompCmpOp::MaskedEq(*mask),
            *mask,
        )?])?]),
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: the handler only reads its siginfo and thread-locals set at install time, and
    // makes the write, getpid, gettid, tgkill and exit_group calls every filter allows. SA_RESETHAND puts
    // the default action back on entry and SA_NODEFER leaves SIGSYS unblocked, so the
    // re-raise kills the process at once.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGSYS fields of siginfo_t (linux/asm-generic/siginfo.h, `_sigsys`).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// SYS_SECCOMP, the si_code of a seccomp trap.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe only: no allocation, no lock; a fixed buffer and raw system calls.
    // SAFETY: the kernel passes a valid siginfo_t, whose SIGSYS layout is SigsysInfo.
    let info = unsafe { &*(info as *const SigsysInfo) };
    let kind = KIND.try_with(Cell::get).unwrap_or(0);
    let kind = ThreadKind::ALL
        .into_iter()
        .find(|k| *k as u8 == kind)
        .map_or("unfiltered", ThreadKind::name);
    let mut line = Line::default();
    line.push(b"wisp: seccomp: the ");
    line.push(kind.as_bytes());
    line.push(b" thread made a system call its filter does not allow: ");
    if info.code == SYS_SECCOMP {
        line.push(
            names::name(i64::from(info.syscall))
                .unwrap_or("unknown")
                .as_bytes(),
        );
        line.push(b" (");
        line.number(info.syscall);
        line.push(b")");
    } else {
        line.push(b"unknown (SIGSYS not from seccomp)");
    }
    line.push(b"; killed by SIGSYS\n");
    // SAFETY: write, getpid, gettid and tgkill with valid arguments (raw system calls: a
    // forked child has ids of its own); exit_group does not return.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        let pid = libc::syscall(libc::SYS_getpid);
        let tid = libc::syscall(libc::SYS_gettid);
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
        // Not reached when the re-raise killed the process.
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// A fixed-size line for the signal handler.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_bad_ones_are_named() {
        assert_eq!("0".parse::<Level>(), Ok(Level::Off));
        assert_eq!("1".parse::<Level>(), Ok(Level::Numbers));
        assert_eq!("2".parse::<Level>(), Ok(Level::Arguments));
        for bad in ["7", "", "-1", "two", "02"] {
            let e = bad.parse::<Level>().unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn every_filter_compiles_at_both_levels() {
        for kind in ThreadKind::ALL {
            for level in [Level::Numbers, Level::Arguments] {
                let p = compile(kind, level).unwrap();
                assert!(!p.is_empty() && p.len() < 4096, "{kind:?}: {}", p.len());
            }
        }
    }

    #[test]
    fn an_entry_allowing_any_arguments_wins_over_checked_ones() {
        let table = vec![
            (libc::SYS_ioctl, Arg::OneOf(1, vec![1, 2])),
            (libc::SYS_ioctl, Arg::OneOf(1, vec![3])),
            (libc::SYS_read, Arg::OneOf(0, vec![0])),
            (libc::SYS_read, Arg::Any),
        ];
        let rules = merged(table.clone(), Level::Arguments).unwrap();
        assert_eq!(rules[&libc::SYS_ioctl].len(), 3);
        assert!(rules[&libc::SYS_read].is_empty());
        let rules = merged(table, Level::Numbers).unwrap();
        assert!(rules.values().all(Vec::is_empty));
    }

    #[test]
    fn the_handler_line_names_numbers() {
        let mut l = Line::default();
        l.number(0);
        l.push(b" ");
        l.number(59);
        l.push(b" ");
        l.number(-12);
        assert_eq!(&l.buf[..l.len], b"0 59 -12");
    }
}
