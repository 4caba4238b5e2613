#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

use clap::Parser;
use std::path::Path;
use wisp::api::{self, PrebootApiController};
use wisp::cli::{Cli, Command, FirecrackerArgs, FirecrackerLaunch, FirecrackerMode};
use wisp::event_loop::{EventLoop, Phase, RunError};
use wisp::vstate::exit::VmExit;

fn main() {
    wisp::startup_trace::init();
    // A node agent written for Firecracker starts `jailer`: wisp under that name is its jail.
    let invoked_as = std::env::args_os().next().unwrap_or_default();
    if Path::new(&invoked_as).file_name() == Some(std::ffi::OsStr::new("jailer")) {
        let cli = wisp::jail::JailerCli::parse();
        std::process::exit(jail(&cli.args));
    }
    // One malloc arena: vCPU threads allocate next to nothing, and a per-thread arena costs
    // start-up time and resident memory for every vCPU.
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // SIGINT, SIGTERM, SIGHUP and SIGUSR1 are taken through a signalfd by the event loop:
    // block them before any thread exists, so that none of wisp's threads (API, vCPUs)
    // gets them delivered with their default action.
    if let Err(e) = wisp::signals::block_stop_signals() {
        eprintln!("wisp: error: blocking signals: {e}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    if let Some(Command::Jail(args)) = &cli.command {
        // Before wisp's own set-up: the jailer execs the VMM, which does its own.
        std::process::exit(jail(args));
    }
    wisp::logger::init(cli.log_level.as_deref());
    let code = match cli.command {
        Some(command) => {
            if let Some(flag) = cli.firecracker.first_given() {
                eprintln!(
                    "wisp: error: {flag} is a flag of the Firecracker-compatible mode: give it \
                     without a subcommand (see wisp --help)"
                );
                std::process::exit(1);
            }
            match command {
                Command::Run(args) => match args
                    .seccomp_level()
                    .and_then(|l| args.to_config().map(|c| (l, c)))
                {
                    Ok((level, config)) => match wisp::seccomp::configure(level) {
                        Ok(()) => {
                            wisp::startup_trace::mark("args: command line parsed");
                            ended(run_vm(|| wisp::builder::build(&config).map_err(Into::into)))
                        }
                        Err(e) => fail(&e),
                    },
                    Err(e) => fail(&e),
                },
                Command::Image(cmd) => match wisp::image::run(&cmd) {
                    Ok(()) => 0,
                    Err(e) => fail(&e),
                },
                Command::Jail(_) => unreachable!("handled before set-up"),
            }
        }
        None => firecracker(&cli.firecracker),
    };
    wisp::startup_trace::mark("exit: process exiting");
    std::process::exit(code);
}

/// `wisp jail` / `jailer`: build the jail and exec the VMM in it (returns only on failure),
/// or remove what an earlier run made.
fn jail(args: &wisp::jail::JailArgs) -> i32 {
    if args.version {
        println!(
            "wisp jailer v{} (Firecracker's jailer contract)",
            api::VMM_VERSION
        );
        return 0;
    }
    if args.cleanup {
        return match args.validate_cleanup().and_then(|c| c.run()) {
            Ok(removed) => {
                for p in removed {
                    println!("removed {}", p.display());
                }
                0
            }
            Err(e) => fail(&e),
        };
    }
    match args.validate().and_then(|j| wisp::jail::run(&j)) {
        Ok(never) => match never {},
        Err(e) => fail(&e),
    }
}

/// `wisp` with Firecracker's command line: serve the API, or boot from a config file.
fn firecracker(args: &FirecrackerArgs) -> i32 {
    let launch = match args.resolve() {
        Ok(FirecrackerMode::PrintVersion) => {
            println!(
                "wisp v{} (Firecracker v{} API)",
                api::VMM_VERSION,
                api::FIRECRACKER_API_VERSION
            );
            return 0;
        }
        Ok(FirecrackerMode::PrintSnapshotVersion) => {
            println!("v{}.0.0", wisp::snapshot::FORMAT_VERSION);
            return 0;
        }
        Ok(FirecrackerMode::DescribeSnapshot(path)) => {
            return match wisp::snapshot::Snapshot::read_file(&path) {
                Ok(_) => {
                    println!("v{}.0.0", wisp::snapshot::FORMAT_VERSION);
                    0
                }
                Err(e) => fail(&e),
            };
        }
        Ok(FirecrackerMode::Launch(l)) => l,
        Err(e) => return fail(&e),
    };
    if launch.jailed {
        wisp::jail::mark_inside();
    }
    // Before any thread starts: every thread installs its filter from these.
    if let Err(e) = wisp::seccomp::configure(launch.seccomp_level) {
        return fail(&e);
    }
    wisp::startup_trace::mark("args: command line parsed");
    wisp::logger::use_firecracker_format(&launch.id);
    if let Err(e) = wisp::logger::configure(&launch.log) {
        return fail(&e);
    }
    for w in &launch.warnings {
        eprintln!("wisp: warning: {w}");
    }
    log::info!(
        "Running wisp v{} (Firecracker v{} API)",
        api::VMM_VERSION,
        api::FIRECRACKER_API_VERSION
    );
    if let Some(path) = &launch.metrics_path {
        if let Err(e) = wisp::metrics::configure(path) {
            return fail(&e);
        }
    }
    wisp::startup_trace::mark("logger and metrics configured");
    report_startup_time(&launch);
    if let Some(n) = launch.max_payload_size {
        api::set_max_payload_size(n);
    }
    let id = Some(launch.id.as_str());
    let result = match (&launch.api_sock, &launch.config_file) {
        (Some(sock), file) => serve(sock, id, file.as_deref(), &launch),
        (None, Some(file)) => run_vm(|| Ok(preboot(id, Some(file), &launch)?.build()?.0)),
        (None, None) => unreachable!("resolve() refuses --no-api without --config-file"),
    };
    let code = ended(result);
    // As Firecracker, a last line of metrics on the way out.
    if let Err(e) = wisp::metrics::write() {
        log::warn!("{e}");
    }
    log::info!("wisp exiting. exit_code={code}");
    code
}

/// Firecracker's start-up metrics from the times the jailer passed: wall-clock (monotonic)
/// and CPU time from the process's start to now, the CPU time including the jailer's.
fn report_startup_time(launch: &FirecrackerLaunch) {
    let now_us = wisp::startup_trace::clock_us;
    if let Some(start) = launch.start_time_us {
        let us = now_us(libc::CLOCK_MONOTONIC).saturating_sub(start);
        wisp::metrics::set("api_server", "process_startup_time_us", us);
    }
    if let Some(start) = launch.start_time_cpu_us {
        let us = now_us(libc::CLOCK_PROCESS_CPUTIME_ID)
            .saturating_sub(start)
            .saturating_add(launch.parent_cpu_time_us.unwrap_or(0));
        wisp::metrics::set("api_server", "process_startup_time_cpu_us", us);
    }
}

/// `wisp run` and `wisp --config-file F --no-api`: a VM with no API.
fn run_vm(build: impl FnOnce() -> Result<wisp::vmm::Vmm, RunError>) -> Result<VmExit, RunError> {
    let vmm = build()?;
    EventLoop::new(None)?.run(Phase::Start(Box::new(vmm), None))
}

/// `wisp --api-sock PATH [--config-file F]`: serves the API until the VM ends (or a signal
/// stops wisp before it started). With a config file the VM starts at once, as
/// Firecracker's does.
fn serve(
    socket: &Path,
    id: Option<&str>,
    config_file: Option<&Path>,
    launch: &FirecrackerLaunch,
) -> Result<VmExit, RunError> {
    let preboot = preboot(id, config_file, launch)?;
    let phase = match config_file {
        Some(_) => {
            let (vmm, runtime) = preboot.build()?;
            Phase::Start(Box::new(vmm), Some(Box::new(runtime)))
        }
        None => Phase::Preboot(Box::new(preboot)),
    };
    EventLoop::new(Some(api::start(socket)?))?.run(phase)
}

/// The pre-boot configuration: the config file's, then the MMDS flags.
fn preboot(
    id: Option<&str>,
    config_file: Option<&Path>,
    launch: &FirecrackerLaunch,
) -> Result<PrebootApiController, RunError> {
    let mut preboot = PrebootApiController::new(id, config_file)?;
    let metadata = match &launch.metadata {
        Some(path) => {
            let fault = |why: String| {
                api::ApiFault::bad_request(format!("--metadata {}: {why}", path.display()))
            };
            let text = std::fs::read(path).map_err(|e| fault(wisp::config::io_reason(&e)))?;
            Some(serde_json::from_slice(&text).map_err(|e| fault(format!("invalid JSON: {e}")))?)
        }
        None => None,
    };
    preboot.seed_mmds(launch.mmds_size_limit, metadata)?;
    Ok(preboot)
}

/// The exit status and message for how a VM ended.
fn ended(result: Result<VmExit, RunError>) -> i32 {
    match result {
        Ok(exit) => {
            let code = exit.exit_code();
            if code == 0 {
                log::info!("{exit}");
            } else {
                eprintln!("wisp: {exit}");
            }
            code
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> i32 {
    wisp::terminal::restore();
    eprintln!("wisp: error: {e}");
    1
}
