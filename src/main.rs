use clap::Parser;
use wisp::cli::{Cli, Command};

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
        Some(Command::Run(args)) => run(&args),
        Some(Command::Image(cmd)) => match wisp::image::run(&cmd) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        },
        None => match (&cli.api_sock, &cli.config_file) {
            (Some(sock), file) => ended(wisp::control::serve(
                sock,
                cli.id.as_deref(),
                file.as_deref(),
            )),
            (None, Some(file)) if cli.no_api => {
                ended(wisp::control::run_config_file(file, cli.id.as_deref()))
            }
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

fn run(args: &wisp::cli::RunArgs) -> i32 {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let vmm = match wisp::vmm::Vmm::build(&config) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    ended(vmm.run(None))
}

/// The exit status and message for how a VM ended.
fn ended<E: std::fmt::Display>(result: Result<wisp::vstate::exit::VmExit, E>) -> i32 {
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
