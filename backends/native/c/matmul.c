/*
 * out (T, N) = x (T, K) · W (N, K)ᵀ for every weight dtype.
 *
 * Float weights (f32, f16, bf16): a register-blocked micro-kernel computes a tile
 * of RT tokens x RN weight rows as RT*RN dot products along K at once, so each
 * weight vector loaded (and converted: F16C for f16, a 16-bit shift for bf16) is
 * used RT times and each activation vector RN times. For prefill, K is cut into
 * chunks so that the activation chunk of every token stays in L2 while each
 * weight tile (RN rows of one chunk) stays in L1. Decode (T = 1) is the same
 * kernel with RT = 1: a matrix-vector product that streams every weight once.
 *
 * Quantized weights (q8_0, q4_0, planar layout of graph/dtype.ts): activations are
 * first quantized to q8_0 blocks (quantize_rows_q8); each block pair is an exact
 * int32 dot product (AVX2 maddubs on |w| and sign(x, w), as ggml does), scaled in
 * f32 by d_w * d_x and accumulated in f32.
 */
#include <math.h>
#include <string.h>

#include "llm.h"

/* K chunk for prefill: a packed panel is 16 x KC floats, and T x KC activations should sit in L2. */
#define KC 256
/* How far ahead quantized decode prefetches a weight row (measured: 512-1024 B best). */
#define PF_AHEAD 1024

/* ------------------------------------------------------------------------ */
/* Activation quantization: x (T, K) -> q8_0 blocks.                        */
/* ------------------------------------------------------------------------ */

void quantize_rows_q8(const float *x, int K, int t0, int t1, llm_xq *xq) {
  int nb = K / QK;
  for (int t = t0; t < t1; t++) {
    const float *xr = x + (size_t)t * K;
    int8_t *q = xq->q + (size_t)t * K;
    float *d = xq->d + (size_t)t * nb;
    int32_t *bs = xq->s + (size_t)t * nb;
    for (int b = 0; b < nb; b++) {
      const float *xb = xr + b * QK;
#ifdef LLM_AVX2
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 v[4], m = _mm256_setzero_ps();
      for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      float amax = _mm_cvtss_f32(m4);
      float db = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
      d[b] = db;
      __m256 vid = _mm256_set1_ps(id);
      __m256i i32[4];
      for (int i = 0; i < 4; i++)
        i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      /* Pack 32 int32 -> 32 int8; packs works per 128-bit lane, so fix the order after. */
      __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
      __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
      __m256i p8 = _mm256_packs_epi16(p16a, p16b);
      p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i *)(q + b * QK), p8);
      __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p8);
      __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
      bs[b] = _mm_cvtsi128_si32(s4);
#else
      float amax = 0;
      for (int i = 0; i < QK; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
      float db = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
      d[b] = db;
      int32_t sum = 0;
      for (int i = 0; i < QK; i++) {
        q[b * QK + i] = (int8_t)lrintf(xb[i] * id);
        sum += q[b * QK + i];
      }
      bs[b] = sum;
#endif
    }
  }
}

#ifdef LLM_AVX2
/* ------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C                                                        */
/* ------------------------------------------------------------------------ */

#define AI static inline __attribute__((always_inline))

AI float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* 8 weights of a row starting at element k, as f32. */
AI __m256 load_w8(const uint8_t *row, int dtype, int k) {
  if (dtype == DT_F32) return _mm256_loadu_ps((const float *)row + k);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
  if (dtype == DT_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AI float load_w1(const uint8_t *row, int dtype, int k) {
  if (dtype == DT_F32) return ((const float *)row)[k];
  uint16_t h = ((const uint16_t *)row)[k];
  return dtype == DT_F16 ? _cvtsh_ss(h) : bf16_to_f32(h);
}

/*
 * Tile: out[t0 .. t0+RT) x [n0 .. n0+RN) (+)= x[t, k0..k1) · W[n, k0..k1).
 * RT and RN are compile-time constants at every call, so acc stays in registers.
 */
AI void tile_float(float *out, const float *x, const uint8_t *w, int dtype, size_t rowb, int K, int N, int t0, int n0,
                   int k0, int k1, int add, const int RT, const int RN) {
  __m256 acc[4][4];
  for (int i = 0; i < RT; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
  const float *xr[4];
  const uint8_t *wr[4];
  for (int i = 0; i < RT; i++) xr[i] = x + (size_t)(t0 + i) * K;
  for (int j = 0; j < RN; j++) wr[j] = w + (size_t)(n0 + j) * rowb;
  int kv = k0 + ((k1 - k0) & ~7);
  for (int k = k0; k < kv; k += 8) {
    __m256 wv[4];
    for (int j = 0; j < RN; j++) wv[j] = load_w8(wr[j], dtype, k);
    for (int i = 0; i < RT; i++) {
      __m256 xv = _mm256_loadu_ps(xr[i] + k);
      for (int j = 0; j < RN; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RT; i++) {
    for (int j = 0; j < RN; j++) {
      float s = hsum8(acc[i][j]);
      for (int k = kv; k < k1; k++) s += xr[i][k] * load_w1(wr[j], dtype, k);
      float *o = out + (size_t)(t0 + i) * N + n0 + j;
      *o = add ? *o + s : s;
    }
  }
}

/*
 * Prefill micro-kernel (outer-product form): out[t0 .. t0+RT) x [n0 .. n0+16) (+)=
 * x[t, k0..k1) · P, where P is a panel of 16 weight rows packed k-major (P[k][16],
 * already f32). Each k step loads two vectors of P and broadcasts RT activations:
 * 2*RT FMAs for 2 + RT loads, no horizontal sums, and the weights' conversion is
 * paid once per panel instead of once per token.
 */
AI void panel_kernel(float *out, const float *x, const float *P, int K, int N, int t0, int n0, int nn, int kc, int add,
                     const int RT) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < RT; i++) {
    acc[i][0] = _mm256_setzero_ps();
    acc[i][1] = _mm256_setzero_ps();
  }
  const float *xr[6];
#pragma GCC unroll 6
  for (int i = 0; i < RT; i++) xr[i] = x + (size_t)(t0 + i) * K;
  for (int k = 0; k < kc; k++) {
    __m256 w0 = _mm256_load_ps(P + (size_t)k * 16), w1 = _mm256_load_ps(P + (size_t)k * 16 + 8);
#pragma GCC unroll 6
    for (int i = 0; i < RT; i++) {
      __m256 xb = _mm256_broadcast_ss(xr[i] + k);
      acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < RT; i++) {
    float *o = out + (size_t)(t0 + i) * N + n0;
    if (nn == 16) {
      if (add) {
        acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(o));
        acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(o + 8));
      }
      _mm256_storeu_ps(o, acc[i][0]);
      _mm256_storeu_ps(o + 8, acc[i][1]);
    } else { /* the last, partial panel: only nn columns are real */
      _Alignas(32) float tmp[16];
      _mm256_store_ps(tmp, acc[i][0]);
      _mm256_store_ps(tmp + 8, acc[i][1]);
      for (int j = 0; j < nn; j++) o[j] = add ? o[j] + tmp[j] : tmp[j];
    }
  }
}

/* Packs rows [n0, n0+nn) x columns [k0, k0+kc) of W as f32, k-major, zero-padded to 16 rows. */
AI void pack_panel(float *P, const uint8_t *w, int dtype, size_t rowb, int n0, int nn, int k0, int kc) {
  for (int j = 0; j < 16; j++) {
    if (j >= nn) {
      for (int k = 0; k < kc; k++) P[(size_t)k * 16 + j] = 0;
      continue;
    }
    const uint8_t *row = w + (size_t)(n0 + j) * rowb;
    int k = 0;
    for (; k + 8 <= kc; k += 8) {
      _Alignas(32) float v[8];
      _mm256_store_ps(v, load_w8(row, dtype, k0 + k));
      for (int u = 0; u < 8; u++) P[(size_t)(k + u) * 16 + j] = v[u];
    }
    for (; k < kc; k++) P[(size_t)k * 16 + j] = load_w1(row, dtype, k0 + k);
  }
}

AI void mm_float_dt(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  size_t rowb = (size_t)K * (dtype == DT_F32 ? 4 : 2);
  if (T < 4) {
    /* Decode: a matrix-vector product streaming each weight once. */
    for (int t = 0; t < T; t++) {
      int n = n0;
      /* Short rows (< 2 KiB) go one at a time: 4 short streams at once starve the prefetcher
         (measured 6 vs 8.5 GB/s at K = 288); long rows gain from 4 (11-14 vs 8 GB/s at K = 2048). */
      if (rowb >= 2048)
        for (; n + 4 <= n1; n += 4) tile_float(out, x, w, dtype, rowb, K, N, t, n, 0, K, 0, 1, 4);
      for (; n < n1; n++) tile_float(out, x, w, dtype, rowb, K, N, t, n, 0, K, 0, 1, 1);
    }
    return;
  }
  /*
   * Prefill: for each K chunk and each panel of 16 weight rows, pack the panel
   * (16 x KC floats, 32 KiB: L1/L2) once, then run every group of 6 tokens over it;
   * the tokens' K chunk (T x KC floats) stays in L2 across panels.
   */
  _Alignas(32) float P[KC * 16];
  for (int k0 = 0; k0 < K; k0 += KC) {
    int kc = K - k0 < KC ? K - k0 : KC;
    for (int n = n0; n < n1; n += 16) {
      int nn = n1 - n < 16 ? n1 - n : 16;
      pack_panel(P, w, dtype, rowb, n, nn, k0, kc);
      int t = 0;
      for (; t + 6 <= T; t += 6) panel_kernel(out, x + k0, P, K, N, t, n, nn, kc, k0 > 0, 6);
      switch (T - t) {
        case 5: panel_kernel(out, x + k0, P, K, N, t, n, nn, kc, k0 > 0, 5); break;
        case 4: panel_kernel(out, x + k0, P, K, N, t, n, nn, kc, k0 > 0, 4); break;
        case 3: panel_kernel(out, x + k0, P, K, N, t, n, nn, kc, k0 > 0, 3); break;
        case 2: panel_kernel(out, x + k0, P, K, N, t, n, nn, kc, k0 > 0, 2); break;
        case 1: panel_kernel(out, x + k0, P, K, N, t, n, nn, kc, k0 > 0, 1); break;
        default: break;
      }
    }
  }
}

void mm_float(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  switch (dtype) {
    case DT_F32: mm_float_dt(out, x, w, DT_F32, T, K, N, n0, n1); break;
    case DT_F16: mm_float_dt(out, x, w, DT_F16, T, K, N, n0, n1); break;
    default: mm_float_dt(out, x, w, DT_BF16, T, K, N, n0, n1); break;
  }
}

/* ---- Quantized ---- */

/*
 * Exact int32 dot product of block b of a weight row with a block of activation
 * quants, as 8 int32 partial sums. q8_0: maddubs needs one unsigned operand, so
 * it multiplies |w| by sign(y, w) (products <= 128 * 127, pairs fit int16). q4_0:
 * the nibbles 0..15 are already unsigned, so the product is Σ nib * y directly and
 * the -8 offset is applied later as -8 * Σ y (the block sums of quantize_rows_q8).
 */
AI __m256i dot_block(const uint8_t *row, int dtype, int b, __m256i y) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (dtype == DT_Q8_0) {
    __m256i w = _mm256_loadu_si256((const __m256i *)(row + (size_t)b * QK));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)), ones);
  }
  __m128i bytes = _mm_loadu_si128((const __m128i *)(row + (size_t)b * QK / 2));
  __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
  __m256i nib = _mm256_and_si256(both, _mm256_set1_epi8(15));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(nib, y), ones);
}

/* The 8 lane sums of 8 int32x8 vectors, in order: one horizontal reduction for 8 blocks. */
AI __m256i reduce8(__m256i s0, __m256i s1, __m256i s2, __m256i s3, __m256i s4, __m256i s5, __m256i s6, __m256i s7) {
  __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
  __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s4, s5), _mm256_hadd_epi32(s6, s7));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/*
 * Tile of RT tokens x RN weight rows over all K. Blocks go 8 at a time: the 8
 * block dot products of a (token, row) pair are reduced to one vector of 8 int32
 * block sums, converted once, and scaled by the 8 products d_w * d_x (the planar
 * layout keeps a row's scales contiguous, so they load as one vector).
 */
AI void tile_quant(float *out, const llm_xq *xq, const uint8_t *wq, const uint16_t *ws, int dtype, size_t rowb, int K,
                   int N, int t0, int n0, const int RT, const int RN) {
  int nb = K / QK;
  __m256 acc[4][4];
  for (int i = 0; i < RT; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
  const int8_t *yr[4];
  const float *yd[4];
  const int32_t *ys[4];
  const uint8_t *wr[4];
  const uint16_t *wd[4];
  for (int i = 0; i < RT; i++) {
    yr[i] = xq->q + (size_t)(t0 + i) * K;
    yd[i] = xq->d + (size_t)(t0 + i) * nb;
    ys[i] = xq->s + (size_t)(t0 + i) * nb;
  }
  for (int j = 0; j < RN; j++) {
    wr[j] = wq + (size_t)(n0 + j) * rowb;
    wd[j] = ws + (size_t)(n0 + j) * nb;
  }
  int b = 0;
  /* Bytes of 8 blocks of one row: decode prefetches the next groups by hand, the
     hardware prefetcher alone does not keep enough of them in flight here. */
  const int gbytes = dtype == DT_Q8_0 ? 8 * QK : 8 * QK / 2;
  for (; b + 8 <= nb; b += 8) {
    if (RT == 1) {
      for (int j = 0; j < RN; j++) {
        const char *ahead = (const char *)wr[j] + (size_t)b * (gbytes / 8) + PF_AHEAD;
        for (int l = 0; l < gbytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
      }
    }
    __m256 dw[4];
    for (int j = 0; j < RN; j++) dw[j] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd[j] + b)));
    for (int i = 0; i < RT; i++) {
      const int8_t *y = yr[i] + (size_t)b * QK;
      __m256 dy = _mm256_loadu_ps(yd[i] + b);
      __m256i off = dtype == DT_Q4_0 ? _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(ys[i] + b)), 3)
                                     : _mm256_setzero_si256();
      for (int j = 0; j < RN; j++) {
#define YB(u) _mm256_loadu_si256((const __m256i *)(y + (u) * QK))
        __m256i s = reduce8(dot_block(wr[j], dtype, b, YB(0)), dot_block(wr[j], dtype, b + 1, YB(1)),
                            dot_block(wr[j], dtype, b + 2, YB(2)), dot_block(wr[j], dtype, b + 3, YB(3)),
                            dot_block(wr[j], dtype, b + 4, YB(4)), dot_block(wr[j], dtype, b + 5, YB(5)),
                            dot_block(wr[j], dtype, b + 6, YB(6)), dot_block(wr[j], dtype, b + 7, YB(7)));
#undef YB
        if (dtype == DT_Q4_0) s = _mm256_sub_epi32(s, off);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw[j], dy), acc[i][j]);
      }
    }
  }
  float tail[4][4] = {{0}};
  for (; b < nb; b++) { /* fewer than 8 blocks left: one block at a time */
    for (int j = 0; j < RN; j++) {
      float dwb = _cvtsh_ss(wd[j][b]);
      for (int i = 0; i < RT; i++) {
        __m256i s = dot_block(wr[j], dtype, b, _mm256_loadu_si256((const __m256i *)(yr[i] + (size_t)b * QK)));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        int32_t dot = _mm_cvtsi128_si32(s4) - (dtype == DT_Q4_0 ? 8 * ys[i][b] : 0);
        tail[i][j] += (float)dot * dwb * yd[i][b];
      }
    }
  }
  for (int i = 0; i < RT; i++)
    for (int j = 0; j < RN; j++) out[(size_t)(t0 + i) * N + n0 + j] = hsum8(acc[i][j]) + tail[i][j];
}

AI void tile_quant_any(float *out, const llm_xq *xq, const uint8_t *wq, const uint16_t *ws, int dtype, size_t rowb,
                       int K, int N, int t0, int n0, int rt, int rn) {
#define TQ(a, b) tile_quant(out, xq, wq, ws, dtype, rowb, K, N, t0, n0, a, b)
  switch (rt * 4 + rn) {
    case 4 * 4 + 2: TQ(4, 2); break;
    case 4 * 4 + 1: TQ(4, 1); break;
    case 3 * 4 + 2: TQ(3, 2); break;
    case 3 * 4 + 1: TQ(3, 1); break;
    case 2 * 4 + 2: TQ(2, 2); break;
    case 2 * 4 + 1: TQ(2, 1); break;
    case 1 * 4 + 2: TQ(1, 2); break;
    default: TQ(1, 1); break;
  }
#undef TQ
}

AI void mm_quant_dt(float *out, const llm_xq *xq, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  size_t rowb = dtype == DT_Q8_0 ? (size_t)K : (size_t)K / 2;
  const uint16_t *ws = (const uint16_t *)(w + rowb * N);
  if (T == 1) {
    /* Decode: one row at a time. Several rows at once (as for floats) means several
       concurrent streams of quants and scales, measured ~2x slower from DRAM here. */
    for (int n = n0; n < n1; n++) tile_quant(out, xq, w, ws, dtype, rowb, K, N, 0, n, 1, 1);
    return;
  }
  /* Weight rows outer (two at a time, in L1), all tokens inner (activation quants in L2). */
  for (int n = n0; n < n1; n += 2) {
    int rn = n1 - n < 2 ? n1 - n : 2;
    for (int t = 0; t < T; t += 4) tile_quant_any(out, xq, w, ws, dtype, rowb, K, N, t, n, T - t < 4 ? T - t : 4, rn);
  }
}

void mm_quant(float *out, const llm_xq *xq, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  if (dtype == DT_Q8_0) mm_quant_dt(out, xq, w, DT_Q8_0, T, K, N, n0, n1);
  else mm_quant_dt(out, xq, w, DT_Q4_0, T, K, N, n0, n1);
}

#else
/* ------------------------------------------------------------------------ */
/* Portable scalar path (any C11 compiler).                                 */
/* ------------------------------------------------------------------------ */

static inline float w_at(const uint8_t *row, int dtype, int k) {
  if (dtype == DT_F32) {
    float f;
    memcpy(&f, row + (size_t)k * 4, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, row + (size_t)k * 2, 2);
  return dtype == DT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

void mm_float(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  size_t rowb = (size_t)K * (dtype == DT_F32 ? 4 : 2);
  for (int n = n0; n < n1; n++) {
    const uint8_t *wr = w + (size_t)n * rowb;
    /* Four tokens per pass over a weight row, so prefill reads weights a quarter as often. */
    int t = 0;
    for (; t + 4 <= T; t += 4) {
      const float *x0 = x + (size_t)t * K;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int k = 0; k < K; k++) {
        float wv = w_at(wr, dtype, k);
        s0 += wv * x0[k];
        s1 += wv * x0[K + k];
        s2 += wv * x0[2 * K + k];
        s3 += wv * x0[3 * K + k];
      }
      out[(size_t)t * N + n] = s0;
      out[(size_t)(t + 1) * N + n] = s1;
      out[(size_t)(t + 2) * N + n] = s2;
      out[(size_t)(t + 3) * N + n] = s3;
    }
    for (; t < T; t++) {
      const float *xr = x + (size_t)t * K;
      float s = 0;
      for (int k = 0; k < K; k++) s += w_at(wr, dtype, k) * xr[k];
      out[(size_t)t * N + n] = s;
    }
  }
}

void mm_quant(float *out, const llm_xq *xq, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  int nb = K / QK;
  size_t rowb = dtype == DT_Q8_0 ? (size_t)K : (size_t)K / 2;
  const uint8_t *ws = w + rowb * N;
  int8_t wb[QK];
  for (int n = n0; n < n1; n++) {
    const uint8_t *wr = w + (size_t)n * rowb;
    for (int t = 0; t < T; t++) {
      const int8_t *y = xq->q + (size_t)t * K;
      const float *yd = xq->d + (size_t)t * nb;
      float acc = 0;
      for (int b = 0; b < nb; b++) {
        if (dtype == DT_Q8_0) {
          memcpy(wb, wr + (size_t)b * QK, QK);
        } else {
          for (int j = 0; j < QK / 2; j++) {
            uint8_t byte = wr[(size_t)b * QK / 2 + j];
            wb[j] = (int8_t)((byte & 15) - 8);
            wb[j + QK / 2] = (int8_t)((byte >> 4) - 8);
          }
        }
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += (int32_t)wb[j] * y[b * QK + j];
        uint16_t h;
        memcpy(&h, ws + ((size_t)n * nb + b) * 2, 2);
        acc += (float)s * f16_to_f32(h) * yd[b];
      }
      out[(size_t)t * N + n] = acc;
    }
  }
}
#endif
