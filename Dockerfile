# syntax=docker/dockerfile:1
# The Trellis image: `mesh-node` (agent, controller, node-init: every role) and `meshctl`.
#
#   docker build -t trellis/mesh-node:dev .                              # build inside (default)
#   cargo build --release --bins && \
#     docker build --build-arg BINARIES=prebuilt -t trellis/mesh-node:dev .  # copy host binaries
#
# `cargo xtask image` runs one of these. BINARIES=source (default) builds with the toolchain
# recipe of .ci/setup (stable + nightly with rust-src, LLVM 22, bpf-linker 0.13.0, protoc), so
# the image does not depend on the host. BINARIES=prebuilt copies target/release/ from the
# context: much faster with a warm cargo cache, and correct when the host's glibc is not newer
# than Debian 12's (the final image's).
#
# The final image is distroless (glibc, libgcc, CA certificates; no shell): the binaries link
# glibc and aws-lc statically otherwise. It runs as the distroless `nonroot` user; the chart
# runs the agent as root, which the datapath needs.

ARG BINARIES=source

FROM rust:1.95-bookworm AS build-source
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
# The eBPF programs build with `cargo +nightly` (mesh-node's build.rs); aya-ebpf 0.2.1 is
# verified with nightly 1.97 (see .ci/setup).
RUN rustup toolchain install nightly --profile minimal --component rust-src
RUN PATH=/usr/lib/llvm-22/bin:$PATH cargo install --locked bpf-linker --version 0.13.0 \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mesh-node --bins \
 && mkdir -p /out \
 && cp target/release/mesh-node target/release/meshctl /out/

FROM scratch AS build-prebuilt
COPY target/release/mesh-node target/release/meshctl /out/

FROM build-${BINARIES} AS binaries

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="trellis" \
      org.opencontainers.image.description="Trellis sidecarless service mesh: mesh-node and meshctl"
COPY --from=binaries /out/mesh-node /out/meshctl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/mesh-node"]
