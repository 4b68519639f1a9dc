//! Host-side stub so the workspace builds on the host; the programs live in `main.rs` and are
//! compiled for the BPF target by `mesh-node`'s build script.
#![no_std]
