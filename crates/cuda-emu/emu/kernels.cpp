// kernels.cpp: deeplab_ops.cu compiled for the CPU through cuda_emu.h, with one C entry point
// per kernel that launches it on a given grid (see src/lib.rs for the Rust side).
#include "cuda_emu.h"

#include "deeplab_ops.cu"

extern "C" {
void emu_dw_fwd(unsigned grid, unsigned block, const float* x, const float* k, float* y, Geom g) {
  emu::launch(grid, block, [=] { dw_fwd(x, k, y, g); });
}
void emu_dw_bwd_input(unsigned grid, unsigned block, const float* gy, const float* k, float* gx, Geom g) {
  emu::launch(grid, block, [=] { dw_bwd_input(gy, k, gx, g); });
}
void emu_dw_bwd_weight(unsigned grid, unsigned block, const float* gy, const float* x, float* gk, Geom g) {
  emu::launch(grid, block, [=] { dw_bwd_weight(gy, x, gk, g); });
}
void emu_resize_fwd(unsigned grid, unsigned block, const float* x, float* y, int planes, int h, int w, int ho,
                    int wo, int mode) {
  emu::launch(grid, block, [=] { resize_fwd(x, y, planes, h, w, ho, wo, mode); });
}
void emu_resize_bwd(unsigned grid, unsigned block, const float* gy, float* gx, int planes, int h, int w, int ho,
                    int wo, int mode) {
  emu::launch(grid, block, [=] { resize_bwd(gy, gx, planes, h, w, ho, wo, mode); });
}
void emu_bn_train_fwd(unsigned grid, unsigned block, const float* x, const float* gamma, const float* beta,
                      float* out, int n, int c, int hw, float eps) {
  emu::launch(grid, block, [=] { bn_train_fwd(x, gamma, beta, out, n, c, hw, eps); });
}
void emu_bn_train_bwd(unsigned grid, unsigned block, const float* x, const float* dy, const float* p, float* out,
                      int n, int c, int hw, float eps) {
  emu::launch(grid, block, [=] { bn_train_bwd(x, dy, p, out, n, c, hw, eps); });
}
void emu_channel_affine(unsigned grid, unsigned block, const float* x, const float* s, const float* b, float* y,
                        int64_t total, int c, int hw, int act) {
  emu::launch(grid, block, [=] { channel_affine(x, s, b, y, total, c, hw, act); });
}
}
