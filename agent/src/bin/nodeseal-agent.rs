//! `nodeseal-agent`: the per-node daemon.

use clap::Parser;
use nodeseal_agent::config::AgentConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "nodeseal-agent", version, about = "nodeseal node agent")]
struct Args {
    #[command(flatten)]
    config: AgentConfig,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    nodeseal_agent::logging::init(args.config.log_json);
    let cancel = CancellationToken::new();
    let signals = nodeseal_agent::shutdown::on_signals(cancel.clone());
    let result = nodeseal_agent::app::run(args.config, cancel).await;
    signals.abort();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "agent failed");
            std::process::ExitCode::FAILURE
        }
    }
}
