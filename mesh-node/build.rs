//! Build steps of the agent:
//! - compiles `mesh-ebpf` for the BPF target (nightly, bpf-linker) so that a plain `cargo build`
//!   embeds an up-to-date eBPF object (see ../shared/TOOLCHAIN.md and `.ci/setup`);
//! - generates the control plane's gRPC code from `proto/` (needs `protoc`).
fn main() -> anyhow::Result<()> {
    // aya-build declares its own inputs, which turns off cargo's rerun-on-any-change: every
    // other input must be declared too, or edits to it are silently not rebuilt.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../mesh-common");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/trellis/v1/mesh.proto"], &["proto"])?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
