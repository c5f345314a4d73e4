//! Build script. The CUDA kernels (`kernels/*.cu`) and their CPU-emulator build are added
//! here with the kernel work; until then the crate is pure Rust and builds anywhere.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
