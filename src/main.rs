//! The `shardgate` command: parse the command line, start the shards.

use std::process::ExitCode;

use clap::Parser;
use shardgate::config::{Cli, Command};

fn main() -> ExitCode {
    let Cli {
        command: Command::Serve(arguments),
    } = Cli::parse();
    let config = match arguments.with_config_file().and_then(|arguments| arguments.resolve()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shardgate: {error}");
            return ExitCode::from(2);
        }
    };
    match shardgate::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shardgate: {error}");
            ExitCode::FAILURE
        }
    }
}
