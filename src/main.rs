use clap::Parser;
use wisp::cli::{Cli, Command};

fn main() {
    // One malloc arena: vCPU threads allocate next to nothing, and a per-thread arena costs
    // start-up time and resident memory for every vCPU.
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = Cli::parse();
    wisp::logger::init(cli.log_level.as_deref());
    let code = match cli.command {
        Command::Run(args) => run(&args),
        Command::Image(cmd) => match wisp::image::run(&cmd) {
            Ok(()) => 0,
            Err(e) => fail(&e),
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
    match vmm.run() {
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
