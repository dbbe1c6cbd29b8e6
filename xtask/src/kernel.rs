//! Stock Debian kernels for the test VM: resolve the current package through its meta-package,
//! download and unpack it once (cached under `target/nodeseal-vm/kernels/`), and build a small
//! initramfs carrying busybox and the modules the tests need.
//!
//! Why modules live in the initramfs rather than on the 9p share: the kernel's on-demand module
//! loader (`request_module`, e.g. for `seqiv`'s RNG or `crypto-gcm(aes)`) runs `/sbin/modprobe`
//! in the initial root, which is the initramfs even after the test command chroots into the host.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// A kernel of the test matrix, named by its series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSeries {
    pub name: String,
    meta_package: String,
}

impl KernelSeries {
    /// `6.1` (bookworm's default kernel) or `6.12` (bookworm's newer LTS series).
    pub fn parse(name: &str) -> Result<Self> {
        let meta_package = match name {
            "6.1" => "linux-image-amd64",
            "6.12" => "linux-image-6.12-amd64",
            other => bail!("unknown kernel series {other:?}: expected 6.1 or 6.12"),
        };
        Ok(Self {
            name: name.to_owned(),
            meta_package: meta_package.to_owned(),
        })
    }
}

/// The default matrix, overridden by `NODESEAL_KERNELS` (comma-separated series).
pub const DEFAULT_MATRIX: &str = "6.1,6.12";
pub const MATRIX_ENV: &str = "NODESEAL_KERNELS";

/// Modules loaded at boot: the 9p root, then what the tests need. Crypto algorithms not listed
/// here are loaded on demand by the kernel.
const BOOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "veth",
    "bridge",
    "dummy",
    "tun",
    "xfrm_user",
    "xfrm_interface",
    "esp4",
    "esp6",
    "xfrm4_tunnel",
    "xfrm6_tunnel",
    "gcm",
    "seqiv",
    "echainiv",
    "aesni_intel",
    "ghash_clmulni_intel",
    "chacha20poly1305",
    "drbg",
    "jitterentropy_rng",
    "wireguard",
    "sch_ingress",
    "sch_netem",
    "cls_bpf",
    "act_bpf",
];

/// Module directories copied whole, so on-demand crypto loading finds every algorithm.
const WHOLE_DIRS: &[&str] = &[
    "kernel/crypto",
    "kernel/arch/x86/crypto",
    "kernel/lib/crypto",
];

/// Bump when the initramfs layout or init script changes, to rebuild cached images.
const INITRAMFS_REVISION: u32 = 3;

/// An unpacked kernel with its initramfs, ready to boot.
#[derive(Clone, Debug)]
pub struct BootableKernel {
    pub series: String,
    pub release: String,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
}

/// Downloads (if needed) and prepares `series`.
pub fn prepare(series: &KernelSeries, cache: &Path) -> Result<BootableKernel> {
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels)?;
    let package = resolve_package(series)
        .or_else(|err| cached_package(series, &kernels).context(err))
        .with_context(|| format!("resolving the kernel package for {}", series.name))?;
    let unpacked = kernels.join(&package);
    if !unpacked.join("boot").is_dir() {
        let deb = download(&package, &kernels)?;
        let partial = kernels.join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&partial);
        run::checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &unpacked)?;
        let _ = fs::remove_file(&deb);
    }
    let release = single_entry(&unpacked.join("lib/modules"))?;
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no kernel image", unpacked.display());
    }
    let initramfs = unpacked.join(format!("initramfs-r{INITRAMFS_REVISION}.cpio"));
    if !initramfs.is_file() {
        build_initramfs(&unpacked, &release, &initramfs)
            .with_context(|| format!("building the initramfs for {release}"))?;
    }
    Ok(BootableKernel {
        series: series.name.clone(),
        release,
        vmlinuz,
        initramfs,
    })
}

/// Resolves a meta-package to the versioned image package it depends on.
fn resolve_package(series: &KernelSeries) -> Result<String> {
    let deps = run::output(Command::new("apt-cache").args([
        "depends",
        "--important",
        &series.meta_package,
    ]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("unsigned"))
        .map(str::to_owned)
        .with_context(|| format!("{} names no kernel image package", series.meta_package))
}

/// Offline fallback: an already unpacked package of the series.
fn cached_package(series: &KernelSeries, kernels: &Path) -> Result<String> {
    let prefix = match series.name.as_str() {
        "6.1" => "linux-image-6.1.",
        _ => "linux-image-6.12.",
    };
    for entry in fs::read_dir(kernels)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix)
            && !name.ends_with(".partial")
            && kernels.join(&name).join("boot").is_dir()
        {
            return Ok(name);
        }
    }
    bail!("no cached kernel for {}", series.name)
}

fn download(package: &str, dir: &Path) -> Result<PathBuf> {
    eprintln!("xtask: downloading {package}");
    run::checked(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir),
    )
    .or_else(|_| {
        run::checked(Command::new("apt-get").args(["update", "-qq"]))?;
        run::checked(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(dir),
        )
    })?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb")) {
            return Ok(path);
        }
    }
    bail!(
        "apt-get download {package} left no .deb in {}",
        dir.display()
    )
}

fn single_entry(dir: &Path) -> Result<String> {
    let mut names = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()));
    let first = names
        .next()
        .with_context(|| format!("{} is empty", dir.display()))?;
    Ok(first)
}

fn build_initramfs(unpacked: &Path, release: &str, out: &Path) -> Result<()> {
    let modules_src = unpacked.join("lib/modules").join(release);
    if !modules_src.join("modules.dep").is_file() {
        run::checked(Command::new("depmod").arg("-b").arg(unpacked).arg(release))?;
    }
    let deps = parse_modules_dep(&fs::read_to_string(modules_src.join("modules.dep"))?);
    let mut wanted: Vec<String> = BOOT_MODULES.iter().map(|m| (*m).to_owned()).collect();
    for path in deps.values().map(|(p, _)| p) {
        if WHOLE_DIRS.iter().any(|d| path.starts_with(d)) {
            wanted.push(module_name(path));
        }
    }
    let files = dependency_closure(&deps, &wanted);

    let staging = out.with_extension("staging");
    let _ = fs::remove_dir_all(&staging);
    let modules_dst = staging.join("lib/modules").join(release);
    fs::create_dir_all(&modules_dst)?;
    for rel in &files {
        let (dst_rel, decompress) = match rel.rsplit_once(".ko.") {
            Some((stem, "xz")) => (format!("{stem}.ko"), Some("xz")),
            Some((stem, "zst")) => (format!("{stem}.ko"), Some("zstd")),
            _ => (rel.clone(), None),
        };
        let dst = modules_dst.join(&dst_rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        let src = modules_src.join(rel);
        match decompress {
            Some(tool) => {
                let bytes = Command::new(tool)
                    .arg("-dc")
                    .arg(&src)
                    .output()
                    .with_context(|| format!("running {tool}"))?;
                if !bytes.status.success() {
                    bail!("{tool} -dc {} failed", src.display());
                }
                fs::write(&dst, bytes.stdout)?;
            }
            None => {
                fs::copy(&src, &dst)?;
            }
        }
    }
    for meta in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let src = modules_src.join(meta);
        if src.is_file() {
            fs::copy(&src, modules_dst.join(meta))?;
        }
    }
    run::checked(Command::new("depmod").arg("-b").arg(&staging).arg(release))?;

    for dir in ["bin", "sbin", "proc", "sys", "dev", "host", "tmp", "etc"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox"))
        .context("copying /bin/busybox (package busybox-static)")?;
    std::os::unix::fs::symlink("/bin/busybox", staging.join("sbin/modprobe"))?;
    let init = staging.join("init");
    fs::write(&init, init_script())?;
    set_mode(&init, 0o755)?;

    let partial = out.with_extension("partial");
    run::checked(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 > '{}'",
                partial.display()
            ))
            .current_dir(&staging),
    )?;
    fs::rename(&partial, out)?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// modules.dep: `kernel/a/b.ko.xz: kernel/c.ko.xz kernel/d.ko.xz`, keyed by module name.
fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            Some((module_name(path), (path.to_owned(), deps)))
        })
        .collect()
}

/// `kernel/net/ipv4/esp4.ko.xz` → `esp4`; dashes and underscores are the same to modprobe.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Every module file needed to load `wanted` (unknown names are built in or absent: skipped).
fn dependency_closure(
    deps: &HashMap<String, (String, Vec<String>)>,
    wanted: &[String],
) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    let mut stack: Vec<String> = wanted
        .iter()
        .filter_map(|m| deps.get(&m.replace('-', "_")).map(|(p, _)| p.clone()))
        .collect();
    while let Some(path) = stack.pop() {
        if !files.insert(path.clone()) {
            continue;
        }
        if let Some((_, more)) = deps.get(&module_name(&path)) {
            stack.extend(more.iter().cloned());
        }
    }
    files
}

/// The VM's /init: load modules, mount the host's / read-only over 9p plus a writable scratch
/// share, give the chroot fresh kernel filesystems and writable tmpfs, run the command script,
/// record its exit status and power off.
fn init_script() -> String {
    let modules = BOOT_MODULES.join(" ");
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /host /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do modprobe -q "$m" 2>/dev/null; done
scratch=$(sed -n 's/.*nodeseal\.scratch=\([^ ]*\).*/\1/p' /proc/cmdline)
die() {{ echo "nodeseal-vm: $*"; poweroff -f; }}
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts,ro,cache=loose hostroot /host || die "cannot mount the host root"
mount -t 9p -o $opts scratch "/host$scratch" || die "cannot mount the scratch share"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mount -t tmpfs vartmp /host/var/tmp
mount -t bpf bpf /host/sys/fs/bpf
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
mkdir -p /host/run/netns
ip link set lo up
echo 1 > /proc/sys/kernel/printk_ratelimit 2>/dev/null
# Under qemu TCG, patching a global static key while another vCPU runs the code it guards has
# oopsed the 6.12 guest (int3 in __netif_receive_skb_core while agents removed their tc programs
# under a stream). A clsact qdisc on lo for the VM's life keeps the tc hook keys on, so the
# agents attaching and removing theirs never flips them.
chroot /host tc qdisc add dev lo clsact 2>/dev/null
chroot /host /bin/sh "$scratch/run.sh" < /dev/console > /dev/console 2>&1
echo $? > "/host$scratch/rc"
sync
poweroff -f
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_follows_modules_dep() {
        let deps = parse_modules_dep(
            "kernel/net/ipv4/esp4.ko.xz: kernel/net/xfrm/xfrm_algo.ko.xz\n\
             kernel/net/xfrm/xfrm_algo.ko.xz:\n\
             kernel/drivers/net/veth.ko.xz:\n",
        );
        let files = dependency_closure(&deps, &["esp4".into(), "not_a_module".into()]);
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            [
                "kernel/net/ipv4/esp4.ko.xz",
                "kernel/net/xfrm/xfrm_algo.ko.xz"
            ]
        );
        assert_eq!(
            module_name("kernel/crypto/crc32c-intel.ko.zst"),
            "crc32c_intel"
        );
    }
}
