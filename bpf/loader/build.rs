//! Builds the eBPF programs (`nodeseal-bpf-programs`) for the BPF target with aya-build and
//! leaves the object in `OUT_DIR/nodeseal-datapath` for `include_bytes_aligned!`.
//!
//! Needs the pinned nightly toolchain with `rust-src` and `bpf-linker` on `PATH` (`cargo xtask
//! setup` installs both).

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const PROGRAMS_PACKAGE: &str = "nodeseal-bpf-programs";
/// The nightly known to build the programs with the pinned aya-ebpf; keep in step with
/// `BPF_NIGHTLY` in `xtask/src/deps.rs`.
const BPF_NIGHTLY: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == PROGRAMS_PACKAGE)
        .ok_or_else(|| anyhow!("{PROGRAMS_PACKAGE} is not a workspace member"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", package.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: PROGRAMS_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(BPF_NIGHTLY),
    )
}
