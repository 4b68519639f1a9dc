//! Build steps of the agent:
//! - compiles `mesh-ebpf` for the BPF target (bpf-linker, `-Z build-std=core`) so that a plain
//!   `cargo build` embeds an up-to-date eBPF object (see ../shared/TOOLCHAIN.md and
//!   `.ci/setup`);
//! - generates the control plane's gRPC code from `proto/` (needs `protoc`).
use std::process::Command;

/// The LLVM major version bpf-linker is built against: the compiler of the BPF target must
/// emit bitcode it reads.
const BPF_LLVM_MAJOR: &str = "22";
/// Toolchains tried for the BPF target, in order (`TRELLIS_BPF_TOOLCHAIN` first when set): a
/// nightly when its LLVM matches, else stable, whose unstable `-Z build-std` is unlocked for
/// that build alone with `RUSTC_BOOTSTRAP=1`.
const CANDIDATES: [&str; 3] = ["nightly", "nightly-2026-05-19", "stable"];

fn main() -> anyhow::Result<()> {
    // aya-build declares its own inputs, which turns off cargo's rerun-on-any-change: every
    // other input must be declared too, or edits to it are silently not rebuilt.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../mesh-common");
    println!("cargo:rerun-if-env-changed=TRELLIS_BPF_TOOLCHAIN");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/trellis/v1/mesh.proto"], &["proto"])?;
    let toolchain = bpf_toolchain()?;
    if !toolchain.starts_with("nightly") {
        // SAFETY: the build script is single-threaded here (nothing has spawned a thread), so
        // no other thread reads the environment while it changes. aya-build reads it to
        // decide on `-Z build-std` and passes it to the cargo it starts.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// The first installed toolchain whose LLVM is bpf-linker's.
fn bpf_toolchain() -> anyhow::Result<String> {
    let preferred = std::env::var("TRELLIS_BPF_TOOLCHAIN").ok();
    let mut seen = Vec::new();
    for toolchain in preferred.iter().map(String::as_str).chain(CANDIDATES) {
        let llvm = Command::new("rustup")
            .args(["run", toolchain, "rustc", "-vV"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("LLVM version: ").map(str::to_owned))
            });
        match llvm {
            Some(v) if v.split('.').next() == Some(BPF_LLVM_MAJOR) => {
                return Ok(toolchain.to_owned());
            }
            Some(v) => seen.push(format!("{toolchain}: LLVM {v}")),
            None => seen.push(format!("{toolchain}: not installed")),
        }
    }
    anyhow::bail!(
        "no Rust toolchain with LLVM {BPF_LLVM_MAJOR} for the BPF target ({}); run .ci/setup",
        seen.join(", ")
    )
}
