//! `shoal-sim`: how users try Shoal, how they load history, and the project's load generator.
//! Subcommands, one module each: `generate` (a synthetic sensor fleet with labelled
//! anomalies), `replay` (a data file over MQTT), `backfill` (history through the bulk ingest
//! API, idempotent and resumable), `fleet` (live devices), `score` (alerts against labels),
//! `load` (the MQTT benchmark load generator) and `lag` (replication lag between two nodes). `dataset` reads and writes the data
//! files; `progress` draws progress bars.

mod backfill;
mod dataset;
mod fleet;
mod generate;
mod lag;
mod load;
mod progress;
mod replay;
mod report;
mod score;

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
    /// Replay a data file (generator CSV / JSON lines, or SKAB CSV) over MQTT from many
    /// device connections, at a speed factor or flat out.
    Replay(replay::ReplayArgs),
    /// Load history through the bulk ingest API with its original event times; idempotent
    /// and resumable.
    Backfill(backfill::BackfillArgs),
    /// Simulated devices publishing live until stopped; they reconnect after a restart.
    Fleet(fleet::FleetArgs),
    /// Write a synthetic sensor fleet with injected, labelled anomalies (deterministic by
    /// seed) as CSV or JSON lines, plus a labels file.
    Generate(generate::GenerateArgs),
    /// Compare alerts (a JSON lines file or a node's API) with anomaly labels: precision,
    /// recall, F1 and detection delay, overall and per anomaly kind.
    Score(score::ScoreArgs),
    /// Replication lag: publish at a fixed rate to one node, receive on another, report
    /// publish -> delivery latency percentiles.
    Lag(lag::LagArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Load(args) => load::main(args),
        Command::Replay(args) => replay::main(args),
        Command::Backfill(args) => backfill::main(args),
        Command::Fleet(args) => fleet::main(args),
        Command::Generate(args) => generate::main(args),
        Command::Score(args) => score::main(args),
        Command::Lag(args) => lag::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
