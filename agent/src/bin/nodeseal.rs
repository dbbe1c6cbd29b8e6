//! `nodeseal`: the operator's command line.

use clap::Parser;
use nodeseal_agent::cli::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    nodeseal_agent::logging::init(false);
    match nodeseal_agent::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodeseal: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
