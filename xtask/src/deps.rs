//! Installs what the build and the tests need on a fresh Debian 12 machine: Debian packages, the
//! nightly toolchain with `rust-src` (eBPF programs) and `bpf-linker`. Each step checks first, so
//! a warm machine pays a few `dpkg-query` calls.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages and why each is needed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "boots the test kernels"),
    ("busybox-static", "the test VM's initramfs"),
    ("cpio", "packs the initramfs"),
    ("xz-utils", "decompresses Debian's kernel modules"),
    ("zstd", "decompresses Debian's kernel modules"),
    ("kmod", "depmod for the initramfs module tree"),
    (
        "iproute2",
        "namespaces, links and the independent XFRM reader",
    ),
    ("wireguard-tools", "wg, the WireGuard reference"),
    ("iputils-ping", "ping between test pods"),
    ("tcpdump", "wire captures when debugging a scenario"),
    ("procps", "sysctl"),
    ("openssl", "independent X.509 reader in keymgr tests"),
    ("etcd-server", "the etcd store backend's tests"),
    (
        "protobuf-compiler",
        "etcd-client's build script compiles etcd's protocol",
    ),
    ("llvm-22-dev", "bpf-linker links the eBPF programs"),
    (
        "libpolly-22-dev",
        "bpf-linker links against LLVM's static libraries",
    ),
    (
        "libzstd-dev",
        "bpf-linker links against LLVM's static libraries",
    ),
    (
        "zlib1g-dev",
        "bpf-linker links against LLVM's static libraries",
    ),
];

const NIGHTLY: &str = "nightly";

/// Installs everything that is missing.
pub fn ensure_all() -> Result<()> {
    ensure_debian_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !debian_package_installed(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run::checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run::checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages (run as root)")?;
    Ok(())
}

fn debian_package_installed(name: &str) -> bool {
    run::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_ok_and(|status| status.ends_with("installed") && !status.contains("not-installed"))
}

fn ensure_nightly() -> Result<()> {
    let components = run::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    // Add the component to the nightly the machine already has (installing would move it to
    // the newest nightly, which the pinned aya-ebpf may not build with); install only if absent.
    let has_nightly = run::output(Command::new("rustup").args(["toolchain", "list"]))
        .is_ok_and(|list| list.lines().any(|l| l.starts_with(NIGHTLY)));
    eprintln!("xtask: adding rust-src to the nightly toolchain (eBPF builds)");
    if has_nightly {
        run::checked(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))
    } else {
        run::checked(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
    }
}

fn ensure_bpf_linker() -> Result<()> {
    if run::succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker against Debian's LLVM 22 (a few minutes, once)");
    // LLVM_PREFIX: without it the build finds Debian's default llvm-config (LLVM 14).
    run::checked(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker")?;
    if !run::succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but is not on PATH (add ~/.cargo/bin)");
    }
    Ok(())
}
