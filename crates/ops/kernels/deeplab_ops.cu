// deeplab_ops.cu: CUDA kernels of deeplab-ops (f32): depthwise conv forward/backward, bilinear
// resize forward/backward, fused BatchNorm training forward/backward and per-channel affine.
// Compiled to PTX by build.rs when the `cuda` feature is on; loaded by src/cuda.rs.
#include <stdint.h>

struct Geom {
  int n, c, h, w, ho, wo, kh, kw, sy, sx, dy, dx, pt, pl;
};

extern "C" __global__ void dw_fwd(const float* x, const float* k, float* y, Geom g) {
  int64_t total = (int64_t)g.n * g.c * g.ho * g.wo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int ox = i % g.wo;
    int oy = (i / g.wo) % g.ho;
    int64_t plane = i / ((int64_t)g.wo * g.ho);
    int ch = plane % g.c;
    const float* xp = x + plane * g.h * g.w;
    const float* kp = k + (int64_t)ch * g.kh * g.kw;
    float acc = 0.f;
    for (int ky = 0; ky < g.kh; ++ky) {
      int iy = oy * g.sy + ky * g.dy - g.pt;
      if (iy < 0 || iy >= g.h) continue;
      for (int kx = 0; kx < g.kw; ++kx) {
        int ix = ox * g.sx + kx * g.dx - g.pl;
        if (ix < 0 || ix >= g.w) continue;
        acc = fmaf(xp[iy * g.w + ix], kp[ky * g.kw + kx], acc);
      }
    }
    y[i] = acc;
  }
}

// Input gradient: each input element gathers the outputs whose windows contain it.
extern "C" __global__ void dw_bwd_input(const float* gy, const float* k, float* gx, Geom g) {
  int64_t total = (int64_t)g.n * g.c * g.h * g.w;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int ix = i % g.w;
    int iy = (i / g.w) % g.h;
    int64_t plane = i / ((int64_t)g.w * g.h);
    int ch = plane % g.c;
    const float* gp = gy + plane * g.ho * g.wo;
    const float* kp = k + (int64_t)ch * g.kh * g.kw;
    float acc = 0.f;
    for (int ky = 0; ky < g.kh; ++ky) {
      int ny = iy + g.pt - ky * g.dy;
      if (ny < 0 || ny % g.sy != 0) continue;
      int oy = ny / g.sy;
      if (oy >= g.ho) continue;
      for (int kx = 0; kx < g.kw; ++kx) {
        int nx = ix + g.pl - kx * g.dx;
        if (nx < 0 || nx % g.sx != 0) continue;
        int ox = nx / g.sx;
        if (ox >= g.wo) continue;
        acc = fmaf(gp[oy * g.wo + ox], kp[ky * g.kw + kx], acc);
      }
    }
    gx[i] = acc;
  }
}

__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  int nw = (blockDim.x + 31) >> 5;
  v = ((int)threadIdx.x < nw) ? shared[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  __syncthreads();
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  float r = shared[0];
  __syncthreads();
  return r;
}

// Weight gradient: one block per (channel, tap).
extern "C" __global__ void dw_bwd_weight(const float* gy, const float* x, float* gk, Geom g) {
  __shared__ float sh[32];
  int taps = g.kh * g.kw;
  int ch = blockIdx.x / taps;
  int t = blockIdx.x % taps;
  int ky = t / g.kw, kx = t % g.kw;
  float acc = 0.f;
  int64_t per = (int64_t)g.ho * g.wo;
  for (int b = 0; b < g.n; ++b) {
    int64_t plane = (int64_t)b * g.c + ch;
    const float* xp = x + plane * g.h * g.w;
    const float* gp = gy + plane * per;
    for (int64_t j = threadIdx.x; j < per; j += blockDim.x) {
      int ox = j % g.wo, oy = j / g.wo;
      int iy = oy * g.sy + ky * g.dy - g.pt;
      int ix = ox * g.sx + kx * g.dx - g.pl;
      if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) acc = fmaf(gp[j], xp[iy * g.w + ix], acc);
    }
  }
  float s = block_sum(acc, sh);
  if (threadIdx.x == 0) gk[blockIdx.x] = s;
}

// mode: 0 align corners, 1 half pixel, 2 asymmetric.
__device__ void src_coord(int d, int in, int out, int mode, int* i0, int* i1, float* l) {
  float s;
  if (mode == 0) s = out > 1 ? (float)d * (in - 1) / (float)(out - 1) : 0.f;
  else if (mode == 1) s = fmaxf(((float)d + 0.5f) * in / (float)out - 0.5f, 0.f);
  else s = (float)d * in / (float)out;
  int a = min((int)floorf(s), in - 1);
  *i0 = a;
  *i1 = min(a + 1, in - 1);
  *l = s - (float)a;
}

extern "C" __global__ void resize_fwd(const float* x, float* y, int planes, int h, int w, int ho, int wo, int mode) {
  int64_t total = (int64_t)planes * ho * wo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int ox = i % wo, oy = (i / wo) % ho;
    int64_t p = i / ((int64_t)wo * ho);
    int y0, y1, x0, x1;
    float ly, lx;
    src_coord(oy, h, ho, mode, &y0, &y1, &ly);
    src_coord(ox, w, wo, mode, &x0, &x1, &lx);
    const float* xp = x + p * h * w;
    float a = xp[y0 * w + x0], b = xp[y0 * w + x1], c = xp[y1 * w + x0], d = xp[y1 * w + x1];
    float top = a + (b - a) * lx, bot = c + (d - c) * lx;
    y[i] = top + (bot - top) * ly;
  }
}

// gx must be zeroed.
extern "C" __global__ void resize_bwd(const float* gy, float* gx, int planes, int h, int w, int ho, int wo, int mode) {
  int64_t total = (int64_t)planes * ho * wo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int ox = i % wo, oy = (i / wo) % ho;
    int64_t p = i / ((int64_t)wo * ho);
    int y0, y1, x0, x1;
    float ly, lx;
    src_coord(oy, h, ho, mode, &y0, &y1, &ly);
    src_coord(ox, w, wo, mode, &x0, &x1, &lx);
    float g = gy[i];
    float* gp = gx + p * h * w;
    atomicAdd(gp + y0 * w + x0, g * (1.f - ly) * (1.f - lx));
    atomicAdd(gp + y0 * w + x1, g * (1.f - ly) * lx);
    atomicAdd(gp + y1 * w + x0, g * ly * (1.f - lx));
    atomicAdd(gp + y1 * w + x1, g * ly * lx);
  }
}

// One block per channel. out = [y (n*c*hw), mean (c), var (c)].
extern "C" __global__ void bn_train_fwd(const float* x, const float* gamma, const float* beta, float* out, int n, int c, int hw, float eps) {
  __shared__ float sh[32];
  int ch = blockIdx.x;
  int64_t m = (int64_t)n * hw;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) s += x[((j / hw) * c + ch) * (int64_t)hw + j % hw];
  float mean = block_sum(s, sh) / (float)m;
  float q = 0.f;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    float d = x[((j / hw) * c + ch) * (int64_t)hw + j % hw] - mean;
    q += d * d;
  }
  float var = block_sum(q, sh) / (float)m;
  float inv = rsqrtf(var + eps);
  float scale = gamma[ch] * inv, shift = beta[ch] - mean * scale;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    int64_t idx = ((j / hw) * c + ch) * (int64_t)hw + j % hw;
    out[idx] = fmaf(x[idx], scale, shift);
  }
  int64_t total = (int64_t)n * c * hw;
  if (threadIdx.x == 0) {
    out[total + ch] = mean;
    out[total + c + ch] = var;
  }
}

// One block per channel. p = [gamma, mean, var]; out = [dx, dgamma, dbeta].
extern "C" __global__ void bn_train_bwd(const float* x, const float* dy, const float* p, float* out, int n, int c, int hw, float eps) {
  __shared__ float sh[32];
  int ch = blockIdx.x;
  int64_t m = (int64_t)n * hw;
  float gamma = p[ch], mean = p[c + ch], var = p[2 * c + ch];
  float inv = rsqrtf(var + eps);
  float sd = 0.f, sdx = 0.f;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    int64_t idx = ((j / hw) * c + ch) * (int64_t)hw + j % hw;
    sd += dy[idx];
    sdx += dy[idx] * (x[idx] - mean) * inv;
  }
  sd = block_sum(sd, sh);
  sdx = block_sum(sdx, sh);
  float k = gamma * inv, mdy = sd / (float)m, mdx = sdx / (float)m;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    int64_t idx = ((j / hw) * c + ch) * (int64_t)hw + j % hw;
    float xhat = (x[idx] - mean) * inv;
    out[idx] = k * (dy[idx] - mdy - xhat * mdx);
  }
  int64_t total = (int64_t)n * c * hw;
  if (threadIdx.x == 0) {
    out[total + ch] = sdx;
    out[total + c + ch] = sd;
  }
}

// act: 0 none, 1 relu, 2 relu6.
extern "C" __global__ void channel_affine(const float* x, const float* s, const float* b, float* y, int64_t total, int c, int hw, int act) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int ch = (i / hw) % c;
    float v = fmaf(x[i], s[ch], b[ch]);
    if (act == 1) v = fmaxf(v, 0.f);
    else if (act == 2) v = fminf(fmaxf(v, 0.f), 6.f);
    y[i] = v;
  }
}
