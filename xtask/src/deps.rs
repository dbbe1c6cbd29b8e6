//! Installs what the build and the tests need on a fresh Debian 12 machine: Debian packages, the
//! pinned nightly toolchain with `rust-src` (eBPF programs), `bpf-linker`, the Kubernetes
//! control-plane binaries (kube-apiserver, kubectl, etcd) and `helm`, built from their Go modules.
//!
//! Every requirement names a file that proves it is there, and that file is checked after the
//! install as well as before: a package that installs without the file we need (a
//! `--no-install-recommends` that left out a dependency, a renamed package) fails set-up here,
//! with the file's name, instead of failing a build script far away. A warm machine pays a few
//! `stat` calls and one `go` invocation.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::run;

/// A Debian package, a file it installs that we use, and why.
struct DebianPackage {
    name: &'static str,
    provides: &'static str,
    why: &'static str,
}

const fn deb(name: &'static str, provides: &'static str, why: &'static str) -> DebianPackage {
    DebianPackage {
        name,
        provides,
        why,
    }
}

/// Paths are the ones Debian 12 (merged `/usr`) installs.
const DEBIAN_PACKAGES: &[DebianPackage] = &[
    deb(
        "qemu-system-x86",
        "/usr/bin/qemu-system-x86_64",
        "boots the test kernels",
    ),
    deb("busybox-static", "/bin/busybox", "the test VM's initramfs"),
    deb("cpio", "/bin/cpio", "packs the initramfs"),
    deb(
        "xz-utils",
        "/usr/bin/xz",
        "decompresses Debian's kernel modules",
    ),
    deb(
        "zstd",
        "/usr/bin/zstd",
        "decompresses Debian's kernel modules",
    ),
    deb(
        "kmod",
        "/sbin/depmod",
        "depmod for the initramfs module tree",
    ),
    deb(
        "iproute2",
        "/bin/ip",
        "namespaces, links and the independent XFRM reader",
    ),
    deb(
        "wireguard-tools",
        "/usr/bin/wg",
        "wg, the WireGuard reference",
    ),
    deb("iputils-ping", "/bin/ping", "ping between test pods"),
    deb(
        "tcpdump",
        "/usr/bin/tcpdump",
        "wire captures when debugging a scenario",
    ),
    deb("procps", "/sbin/sysctl", "sysctl"),
    deb(
        "openssl",
        "/usr/bin/openssl",
        "independent X.509 reader in keymgr tests",
    ),
    deb(
        "etcd-server",
        "/usr/bin/etcd",
        "the etcd store backend's tests (Debian's etcd 3.4)",
    ),
    deb(
        "protobuf-compiler",
        "/usr/bin/protoc",
        "etcd-client's build script compiles etcd's protocol",
    ),
    deb(
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
        "the well-known .proto files etcd's protocol imports (protoc alone lacks them)",
    ),
    deb(
        "llvm-22-dev",
        "/usr/lib/llvm-22/lib/libLLVMCore.a",
        "bpf-linker links the eBPF programs",
    ),
    deb(
        "libpolly-22-dev",
        "/usr/lib/llvm-22/lib/libPolly.a",
        "bpf-linker links against LLVM's static libraries",
    ),
    deb(
        "libzstd-dev",
        "/usr/include/zstd.h",
        "bpf-linker links against LLVM's static libraries",
    ),
    deb(
        "zlib1g-dev",
        "/usr/include/zlib.h",
        "bpf-linker links against LLVM's static libraries",
    ),
];

/// The nightly that builds the eBPF programs with the pinned aya-ebpf (`rustc 1.97.0-nightly
/// (e50aa6fba 2026-05-19)`). Newer nightlies may not; keep in step with `bpf/loader/build.rs`.
pub const BPF_NIGHTLY: &str = "nightly-2026-05-20";
const BPF_NIGHTLY_COMMIT: &str = "e50aa6fba";

/// bpf-linker, built against Debian's LLVM 22 (its default feature wants LLVM 23).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the Kubernetes binaries' wrapper module lives (its go.mod pins the release).
const KUBE_MODULE_DIR: &str = "xtask/kube";
/// The release that go.mod requires; stamped into the binaries as Kubernetes' own build does
/// (a module build otherwise reports v0.0.0, which version checks and skew warnings misread).
const KUBE_VERSION: (u32, u32, u32) = (1, 37, 2);
/// The binaries it builds, with the arguments that print their versions.
const KUBE_BINARIES: &[(&str, &[&str])] = &[
    ("kube-apiserver", &["--version"]),
    ("kubectl", &["version", "--client"]),
    ("etcd", &["--version"]),
];
/// The oldest Go the pinned Kubernetes release builds with.
const GO_MIN_MINOR: u32 = 26;

/// Installs everything that is missing.
pub fn ensure_all() -> Result<()> {
    ensure_debian_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_kube_binaries()?;
    ensure_helm()?;
    Ok(())
}

fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&DebianPackage> = DEBIAN_PACKAGES
        .iter()
        .filter(|p| !Path::new(p.provides).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for p in &missing {
        eprintln!(
            "xtask: installing {} for {} ({})",
            p.name, p.provides, p.why
        );
    }
    run::checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run::checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|p| p.name))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages (run as root)")?;
    let still_missing: Vec<String> = missing
        .iter()
        .filter(|p| !Path::new(p.provides).exists())
        .map(|p| format!("{} (from {})", p.provides, p.name))
        .collect();
    if !still_missing.is_empty() {
        bail!("installed, but still missing: {}", still_missing.join(", "));
    }
    Ok(())
}

/// The pinned nightly and its `rust-src`, checked by the compiler's version and the library
/// sources aya-build compiles `core` from.
fn ensure_nightly() -> Result<()> {
    if nightly_ready() {
        return Ok(());
    }
    eprintln!("xtask: installing the {BPF_NIGHTLY} toolchain with rust-src (eBPF builds)");
    run::checked(Command::new("rustup").args([
        "toolchain",
        "install",
        BPF_NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
    .with_context(|| format!("installing {BPF_NIGHTLY}"))?;
    if !nightly_ready() {
        bail!(
            "{BPF_NIGHTLY} was installed but is not rustc {BPF_NIGHTLY_COMMIT} with rust-src \
             (rustup run {BPF_NIGHTLY} rustc --version; its lib/rustlib/src)"
        );
    }
    Ok(())
}

fn nightly_ready() -> bool {
    let version = run::output(Command::new("rustup").args(["run", BPF_NIGHTLY, "rustc", "-V"]))
        .unwrap_or_default();
    if !version.contains(BPF_NIGHTLY_COMMIT) {
        return false;
    }
    let sysroot = run::output(Command::new("rustup").args([
        "run",
        BPF_NIGHTLY,
        "rustc",
        "--print",
        "sysroot",
    ]))
    .unwrap_or_default();
    Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn ensure_bpf_linker() -> Result<()> {
    let installed = run::output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if installed.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (a few minutes, once)"
    );
    // LLVM_PREFIX: without it the build finds Debian's default llvm-config (LLVM 14).
    run::checked(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker")?;
    let installed = run::output(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker was installed but does not run from PATH (add ~/.cargo/bin)")?;
    if !installed.contains(BPF_LINKER_VERSION) {
        bail!("bpf-linker on PATH is {installed:?}, not {BPF_LINKER_VERSION}");
    }
    Ok(())
}

/// Where the Kubernetes binaries are built (`target/nodeseal-k8s/bin`). The netns harness
/// looks there too. A fresh clone rebuilds them, which with Go's build cache is a link step.
pub fn kube_bin_dir() -> PathBuf {
    crate::target_dir().join("nodeseal-k8s/bin")
}

/// Builds kube-apiserver, kubectl and etcd from the pinned modules unless every binary is
/// present and newer than the module's go.mod and go.sum.
fn ensure_kube_binaries() -> Result<()> {
    let module = crate::workspace_root().join(KUBE_MODULE_DIR);
    let bin_dir = kube_bin_dir();
    let (major, minor, patch) = KUBE_VERSION;
    let pinned_version = format!("v{major}.{minor}.{patch}");
    let pinned = newest_mtime(&[module.join("go.mod"), module.join("go.sum")])?;
    let up_to_date = KUBE_BINARIES.iter().all(|(name, version_args)| {
        let path = bin_dir.join(name);
        let fresh = fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|built| built >= pinned);
        // etcd has its own version; the Kubernetes binaries must carry the pinned release.
        fresh
            && (*name == "etcd"
                || run::output(Command::new(&path).args(*version_args))
                    .is_ok_and(|v| v.contains(&pinned_version)))
    });
    if up_to_date {
        return Ok(());
    }
    check_go()?;
    let go_mod = fs::read_to_string(module.join("go.mod")).context("reading xtask/kube/go.mod")?;
    if !go_mod.contains(&format!("k8s.io/kubernetes {pinned_version}")) {
        bail!(
            "xtask/kube/go.mod does not require k8s.io/kubernetes {pinned_version} (KUBE_VERSION)"
        );
    }
    let ldflags = [
        (
            "k8s.io/component-base/version",
            "gitVersion",
            pinned_version.clone(),
        ),
        (
            "k8s.io/component-base/version",
            "gitMajor",
            major.to_string(),
        ),
        (
            "k8s.io/component-base/version",
            "gitMinor",
            minor.to_string(),
        ),
        (
            "k8s.io/client-go/pkg/version",
            "gitVersion",
            pinned_version.clone(),
        ),
        (
            "k8s.io/client-go/pkg/version",
            "gitMajor",
            major.to_string(),
        ),
        (
            "k8s.io/client-go/pkg/version",
            "gitMinor",
            minor.to_string(),
        ),
    ]
    .iter()
    .map(|(package, var, value)| format!("-X {package}.{var}={value}"))
    .collect::<Vec<_>>()
    .join(" ");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    eprintln!(
        "xtask: building {} from {KUBE_MODULE_DIR} (Go modules; minutes the first time, a link \
         step with a warm Go build cache)",
        KUBE_BINARIES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let started = Instant::now();
    run::checked(
        Command::new("go")
            .args(["install", "-trimpath", "-ldflags", &ldflags, "./cmd/..."])
            .current_dir(&module)
            .env("GOBIN", &bin_dir)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=readonly"),
    )
    .context("building the Kubernetes binaries")?;
    for (name, version_args) in KUBE_BINARIES {
        let version = run::output(Command::new(bin_dir.join(name)).args(*version_args))
            .with_context(|| format!("{name} was built but does not run"))?;
        eprintln!(
            "xtask:   {name}: {}",
            version.lines().next().unwrap_or_default().trim()
        );
    }
    eprintln!(
        "xtask: Kubernetes binaries built in {:.0?} into {}",
        started.elapsed(),
        bin_dir.display()
    );
    Ok(())
}

/// Where helm's wrapper module lives (its go.mod pins the release). A module of its own: helm's
/// dependency set must not move the versions the control plane is built with.
const HELM_MODULE_DIR: &str = "xtask/helm";
/// The helm release go.mod requires, stamped into the binary as helm's Makefile does (a module
/// build otherwise reports "v3.22" and no patch level).
const HELM_VERSION: &str = "v3.22.0";

/// Builds `helm` from the pinned module into the Kubernetes binaries' directory (the tests look
/// for it next to kube-apiserver) unless it is there, newer than go.mod and go.sum, and reports
/// the pinned version.
fn ensure_helm() -> Result<()> {
    let module = crate::workspace_root().join(HELM_MODULE_DIR);
    let bin_dir = kube_bin_dir();
    let helm = bin_dir.join("helm");
    let pinned = newest_mtime(&[module.join("go.mod"), module.join("go.sum")])?;
    let fresh = fs::metadata(&helm)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built >= pinned);
    if fresh && helm_version(&helm).is_ok_and(|v| v == HELM_VERSION) {
        return Ok(());
    }
    check_go()?;
    let go_mod = fs::read_to_string(module.join("go.mod")).context("reading xtask/helm/go.mod")?;
    if !go_mod.contains(&format!("helm.sh/helm/v3 {HELM_VERSION}")) {
        bail!("xtask/helm/go.mod does not require helm.sh/helm/v3 {HELM_VERSION} (HELM_VERSION)");
    }
    // helm's Makefile also stamps the Kubernetes version of its k8s.io modules: it is the
    // cluster version `helm template` and `helm lint` assume (else 1.20, which the chart's
    // kubeVersion constraint refuses).
    let k8s = run::output(
        Command::new("go")
            .args(["list", "-m", "-f", "{{.Version}}", "k8s.io/client-go"])
            .current_dir(&module)
            .env("GOFLAGS", "-mod=readonly"),
    )
    .context("reading the k8s.io/client-go version of xtask/helm")?;
    let k8s_minor = k8s
        .trim()
        .strip_prefix("v0.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .with_context(|| format!("unexpected k8s.io/client-go version {:?}", k8s.trim()))?;
    let ldflags = [
        (
            "helm.sh/helm/v3/internal/version",
            "version",
            HELM_VERSION.to_owned(),
        ),
        (
            "helm.sh/helm/v3/internal/version",
            "gitTreeState",
            "clean".to_owned(),
        ),
        (
            "helm.sh/helm/v3/pkg/lint/rules",
            "k8sVersionMajor",
            "1".to_owned(),
        ),
        (
            "helm.sh/helm/v3/pkg/lint/rules",
            "k8sVersionMinor",
            k8s_minor.to_string(),
        ),
        (
            "helm.sh/helm/v3/pkg/chartutil",
            "k8sVersionMajor",
            "1".to_owned(),
        ),
        (
            "helm.sh/helm/v3/pkg/chartutil",
            "k8sVersionMinor",
            k8s_minor.to_string(),
        ),
    ]
    .iter()
    .map(|(package, var, value)| format!("-X {package}.{var}={value}"))
    .collect::<Vec<_>>()
    .join(" ");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    eprintln!(
        "xtask: building helm {HELM_VERSION} from {HELM_MODULE_DIR} (about 2 minutes the first time)"
    );
    let started = Instant::now();
    run::checked(
        Command::new("go")
            .args([
                "install",
                "-trimpath",
                "-ldflags",
                &ldflags,
                "helm.sh/helm/v3/cmd/helm",
            ])
            .current_dir(&module)
            .env("GOBIN", &bin_dir)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=readonly"),
    )
    .context("building helm")?;
    let version = helm_version(&helm).context("helm was built but does not run")?;
    if version != HELM_VERSION {
        bail!("built helm reports {version:?}, not {HELM_VERSION}");
    }
    eprintln!(
        "xtask: helm {version} built in {:.0?} into {}",
        started.elapsed(),
        bin_dir.display()
    );
    Ok(())
}

/// `helm version`'s release (e.g. "v3.22.0").
fn helm_version(helm: &Path) -> Result<String> {
    Ok(
        run::output(Command::new(helm).args(["version", "--template", "{{.Version}}"]))?
            .trim()
            .to_owned(),
    )
}

fn newest_mtime(paths: &[PathBuf]) -> Result<std::time::SystemTime> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for path in paths {
        let modified = fs::metadata(path)
            .and_then(|m| m.modified())
            .with_context(|| format!("reading {}", path.display()))?;
        newest = newest.max(modified);
    }
    Ok(newest)
}

fn check_go() -> Result<()> {
    let version = run::output(Command::new("go").args(["env", "GOVERSION"])).context(
        "Go is needed to build kube-apiserver and helm (the machine image provides Go 1.26; `go` is not on PATH)",
    )?;
    let minor = version
        .trim()
        .strip_prefix("go1.")
        .and_then(|rest| rest.split(['.', 'r', 'b']).next())
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(minor) if minor >= GO_MIN_MINOR => Ok(()),
        _ => bail!(
            "Go {} is too old to build the pinned Kubernetes release (needs go1.{GO_MIN_MINOR})",
            version.trim()
        ),
    }
}
