use clap::Parser;
use std::path::Path;
use wisp::api::{self, PrebootApiController};
use wisp::cli::{Cli, Command};
use wisp::event_loop::{EventLoop, Phase, RunError};
use wisp::vstate::exit::VmExit;

fn main() {
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
    wisp::logger::init(cli.log_level.as_deref());
    let code = match cli.command {
        Some(Command::Run(args)) => match args.to_config() {
            Ok(config) => ended(run_vm(|| wisp::builder::build(&config).map_err(Into::into))),
            Err(e) => fail(&e),
        },
        Some(Command::Image(cmd)) => match wisp::image::run(&cmd) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        },
        None => match (&cli.api_sock, &cli.config_file) {
            (Some(sock), file) => ended(serve(sock, cli.id.as_deref(), file.as_deref())),
            (None, Some(file)) if cli.no_api => ended(run_vm(|| {
                let (vmm, _) = PrebootApiController::new(cli.id.as_deref(), Some(file))?.build()?;
                Ok(vmm)
            })),
            _ => {
                eprintln!(
                    "wisp: error: nothing to do: use `wisp run ...`, `wisp --api-sock PATH`, or \
                     `wisp --config-file FILE --no-api` (see --help)"
                );
                1
            }
        },
    };
    std::process::exit(code);
}

/// `wisp run` and `wisp --config-file F --no-api`: a VM with no API.
fn run_vm(build: impl FnOnce() -> Result<wisp::vmm::Vmm, RunError>) -> Result<VmExit, RunError> {
    let vmm = build()?;
    EventLoop::new(None)?.run(Phase::Start(Box::new(vmm), None))
}

/// `wisp --api-sock PATH [--config-file F]`: serves the API until the VM ends (or a signal
/// stops wisp before it started). With a config file the VM starts at once, as
/// Firecracker's does.
fn serve(socket: &Path, id: Option<&str>, config_file: Option<&Path>) -> Result<VmExit, RunError> {
    let preboot = PrebootApiController::new(id, config_file)?;
    let phase = match config_file {
        Some(_) => {
            let (vmm, runtime) = preboot.build()?;
            Phase::Start(Box::new(vmm), Some(Box::new(runtime)))
        }
        None => Phase::Preboot(Box::new(preboot)),
    };
    EventLoop::new(Some(api::start(socket)?))?.run(phase)
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
