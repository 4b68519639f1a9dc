//! Compiles `mesh-ebpf` for the BPF target (nightly, bpf-linker) so that a plain `cargo build`
//! of the agent embeds an up-to-date eBPF object. See ../shared/TOOLCHAIN.md and `.ci/setup`.
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
