//! `cargo xtask test`.
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct TestArgs {}

pub fn run(_args: TestArgs) -> Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
