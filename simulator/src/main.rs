//! `shoal-sim`: traffic tools for Shoal. Today it has one subcommand, `load`, an MQTT 3.1.1
//! load generator for benchmarks (see [`load`]). The sensor-fleet generator, replay,
//! backfill and scoring subcommands are planned and will live next to it as their own
//! modules.

mod load;
mod report;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "shoal-sim", version, about = "Traffic tools for Shoal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// MQTT 3.1.1 load generator: N connections pipelining PUBLISHes, measuring throughput
    /// and per-message ack latency.
    Load(load::LoadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Load(args) => load::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
