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

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist: the allocator's limits apply to threads yet to come.
    nodeseal_agent::memory::configure_allocator();
    let args = Args::parse();
    nodeseal_agent::logging::init(args.config.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args.config))
}

async fn run(config: AgentConfig) -> std::process::ExitCode {
    let cancel = CancellationToken::new();
    let signals = nodeseal_agent::shutdown::on_signals(cancel.clone());
    let result = nodeseal_agent::app::run(config, cancel).await;
    signals.abort();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "agent failed");
            std::process::ExitCode::FAILURE
        }
    }
}
