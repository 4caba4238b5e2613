//! How long a Linux guest may take, measured in what the host gave it rather than in wall time.
//!
//! An interpreted Linux guest here needs minutes of CPU, and on a busy host (CPU hogs, other
//! builds, other guests) it gets a fraction of a core: the same boot took 1 minute quiet and
//! over 20 minutes at load 15-30. A wall-clock deadline either fails such a run or, sized for
//! it, lets a hung guest hold CI for an hour. So a wait has two limits:
//! - a **CPU budget**: the CPU time (user + system; PVM interprets the guest inside KVM_RUN,
//!   which is system time of the vCPU thread) the VMM and its descendants (the jailer's VMM is
//!   a grandchild) used since the wait began. A guest spinning without reaching its goal uses
//!   it up as fast on a busy host as on a quiet one;
//! - an **idle limit**: wall time in which the console printed nothing and no thread of the
//!   VMM was runnable. A guest waiting for something that never comes (an interrupt, a host
//!   peer) is idle; a starved one is runnable, so load does not count against it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Wall time a guest may sit idle and silent before a wait gives up.
pub const IDLE_LIMIT: Duration = Duration::from_secs(600);

/// What one look at `/proc` found for a process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TreeSample {
    /// User + system CPU time of every live process in the tree.
    pub cpu: Duration,
    /// Some thread of the tree was running or waiting for a CPU (state R).
    pub runnable: bool,
}

/// Fields after the `(comm)` of a `/proc/.../stat` line (the command may hold spaces and
/// parentheses, so split after the last `)`): index 0 is the state, 1 the parent pid, 11 and
/// 12 utime and stime in clock ticks.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (fields.len() > 12).then_some(fields)
}

fn ticks(fields: &[&str]) -> u64 {
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

/// CPU time and runnability of `root` and every process below it.
pub fn sample_tree(root: u32) -> TreeSample {
    let mut parent = HashMap::new();
    let mut cpu_ticks = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return TreeSample::default();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(f) = stat_fields(&stat) {
            parent.insert(pid, f[1].parse::<u32>().unwrap_or(0));
            cpu_ticks.insert(pid, ticks(&f));
        }
    }
    let in_tree = |mut pid: u32| {
        // Bounded walk up: pid 1's parent is 0.
        for _ in 0..64 {
            if pid == root {
                return true;
            }
            match parent.get(&pid) {
                Some(&p) if p != 0 => pid = p,
                _ => return false,
            }
        }
        false
    };
    let mut sample = TreeSample::default();
    let mut total = 0;
    for (&pid, &t) in &cpu_ticks {
        if !in_tree(pid) {
            continue;
        }
        total += t;
        // A process's own state is its main thread's; the vCPUs are other threads.
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let path = task.path().join("stat");
                let running = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| stat_fields(&s).map(|f| f[0] == "R"))
                    .unwrap_or(false);
                sample.runnable |= running;
            }
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    sample.cpu = Duration::from_millis(total * 1000 / hz);
    sample
}

/// The two limits of one wait; `check` once a second or so with the console's length.
pub struct Patience {
    root: u32,
    budget: Duration,
    cpu_at_start: Duration,
    last_output: usize,
    idle_since: Option<Instant>,
}

impl Patience {
    pub fn new(root: u32, budget: Duration) -> Patience {
        Patience {
            root,
            budget,
            cpu_at_start: sample_tree(root).cpu,
            last_output: 0,
            idle_since: None,
        }
    }

    /// `Err(why)` once the guest used up its CPU budget or sat idle and silent too long.
    pub fn check(&mut self, output_len: usize) -> Result<(), String> {
        let s = sample_tree(self.root);
        let used = s.cpu.saturating_sub(self.cpu_at_start);
        if used > self.budget {
            return Err(format!(
                "the VMM used {used:?} of CPU (budget {:?}) without getting there",
                self.budget
            ));
        }
        if output_len != self.last_output || s.runnable {
            self.last_output = output_len;
            self.idle_since = None;
        } else {
            let since = *self.idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > IDLE_LIMIT {
                return Err(format!(
                    "the guest printed nothing and the VMM wanted no CPU for {IDLE_LIMIT:?} \
                     ({used:?} of its {:?} CPU budget used)",
                    self.budget
                ));
            }
        }
        Ok(())
    }
}
