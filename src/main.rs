//! The `shardgate` command: parse the command line, start the shards.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: shardgate::sys::CountingAllocator = shardgate::sys::CountingAllocator;
use shardgate::host::config::{Cli, Command};

fn main() -> ExitCode {
    let Cli {
        command: Command::Serve(arguments),
    } = parse_command_line();
    let config = match arguments.with_config_file().and_then(|arguments| arguments.resolve()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shardgate: {error}");
            return ExitCode::from(2);
        }
    };
    shardgate::telemetry::logging::init(config.log_format, &config.log_level);
    match shardgate::host::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "stopped with an error");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Clap's parse, with `serve`'s flags and defaults shown under `shardgate --help`
/// too: operators look there first.
fn parse_command_line() -> Cli {
    let mut command = Cli::command();
    let serve_help = command
        .find_subcommand_mut("serve")
        .map(|serve| serve.render_long_help().to_string());
    if let Some(serve_help) = serve_help {
        command = command.after_long_help(format!("`shardgate serve` options:\n\n{serve_help}"));
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}
