//! Build script: compiles `crates/ops/kernels/deeplab_ops.cu` as C++ for the CPU, through the
//! CUDA emulation in `emu/` (needs a C++20 compiler; no CUDA toolkit).

fn main() {
    for f in [
        "build.rs",
        "emu/cuda_emu.h",
        "emu/kernels.cpp",
        "../ops/kernels/deeplab_ops.cu",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("emu/kernels.cpp")
        .include("emu")
        .include("../ops/kernels")
        .flag("-pthread")
        .warnings(true)
        .compile("deeplab_cuda_emu");
}
