//! nodeseal's eBPF programs. The programs are the `nodeseal` binary target, built for
//! `bpfel-unknown-none` by `nodeseal-bpf`'s build script; this library target is empty and exists
//! so cargo can track the crate as a build-dependency.
#![no_std]
