/*
 * out (T, N) = x (T, K) · W (N, K)ᵀ for every weight dtype.
 *
 * Every output is accumulated in one fixed order whatever T is and whichever
 * kernel runs it, so a token's result is the same bits in a step of its own or in
 * a batch with other sequences' tokens (continuous batching), and whatever rows the
 * threads split.
 *
 * Float weights (f32, f16, bf16): a register-blocked micro-kernel computes a tile
 * of RT tokens x RN weight rows as RT*RN dot products along K at once (8 lanes by
 * FMA, then one horizontal sum), so each weight vector loaded is used RT times and
 * each activation vector RN times. Steps of more tokens than one tile go in blocks
 * whose activations stay in L2, each weight row group read once per block: a batch
 * of 16 decode tokens streams every weight once, as one token does.
 *
 * Quantized weights (q8_0, q4_0, planar layout of graph/dtype.ts): activations are
 * first quantized to blocks of 32 int16 quants with an f32 scale (quantize_rows_x16).
 * Not to 8 bits as ggml does: that rounding (~0.4% of a block's max per element)
 * flips near-tie top-1 predictions of low-confidence models, while 16 bits is
 * ~256x finer, close to f32 activations. Weights are sign-extended to int16 and
 * each block pair is an exact int32 dot product (AVX2 madd_epi16: |sum| <=
 * 32 * 128 * 32767 < 2^31). The f32 sum of an output has one order, Q_CHUNK: per
 * chunk of 32 blocks, 8 lanes (block b in lane b mod 8) each accumulate
 * lane = fma(sum_b, d_w * d_x, lane) in block order, the lanes are added as hsum8
 * adds 8 lanes, and the chunks' sums are added in order. Steps of fewer than
 * MM_GEMM_MIN_T tokens read the packed weights once per row for all their tokens
 * (the lanes are one vector); larger ones widen panels of 32 rows to int16 once and
 * run an int16 GEMM micro-kernel over them (gemm_q16, lanes held per row in L1):
 * madd_epi16 does 16 multiplies per instruction, twice an f32 FMA's 8. Both give
 * the same bits: the block sums are exact integers and the f32 steps are the same.
 */
#include <math.h>
#include <string.h>

#include "llm.h"

/* How far ahead quantized decode prefetches a weight row (measured: 512-1024 B best). */
#define PF_AHEAD 1024

/* ------------------------------------------------------------------------ */
/* Activation quantization: x (T, K) -> blocks of 32 int16 + f32 scale.     */
/* ------------------------------------------------------------------------ */

void quantize_rows_x16(const float *x, int K, int t0, int t1, llm_xq *xq) {
  int nb = K / QK;
  for (int t = t0; t < t1; t++) {
    const float *xr = x + (size_t)t * K;
    int16_t *q = xq->q + (size_t)t * K;
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
      float db = amax / 32767.0f, id = amax > 0 ? 32767.0f / amax : 0.0f;
      d[b] = db;
      __m256 vid = _mm256_set1_ps(id);
      __m256i i32[4];
      for (int i = 0; i < 4; i++)
        i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      /* Pack 2 x 8 int32 -> 16 int16 (saturating); packs works per 128-bit lane,
         giving 64-bit groups in the order 0 2 1 3, which the permute undoes. */
      __m256i sum = _mm256_setzero_si256();
      for (int h = 0; h < 2; h++) {
        __m256i p16 = _mm256_packs_epi32(i32[2 * h], i32[2 * h + 1]);
        p16 = _mm256_permute4x64_epi64(p16, 0xd8);
        _mm256_storeu_si256((__m256i *)(q + b * QK + 16 * h), p16);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
      bs[b] = _mm_cvtsi128_si32(s4);
#else
      float amax = 0;
      for (int i = 0; i < QK; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
      float db = amax / 32767.0f, id = amax > 0 ? 32767.0f / amax : 0.0f;
      d[b] = db;
      int32_t sum = 0;
      for (int i = 0; i < QK; i++) {
        long r = lrintf(xb[i] * id); /* |r| <= 32767 up to rounding of id: clamp as packs does */
        q[b * QK + i] = (int16_t)(r > 32767 ? 32767 : r < -32767 ? -32767 : r);
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

/* 8 weights of a row starting at element k, as f32. */
AI __m256 load_w8(const uint8_t *row, int dtype, int k) {
  if (dtype == DT_F32) return _mm256_loadu_ps((const float *)row + k);
  if (dtype == DT_F16) return load_f16x8((const uint16_t *)row + k);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AI float load_w1(const uint8_t *row, int dtype, int k) {
  if (dtype == DT_F32) return ((const float *)row)[k];
  uint16_t h = ((const uint16_t *)row)[k];
  return dtype == DT_F16 ? _cvtsh_ss(h) : bf16_to_f32(h);
}

/*
 * The float tiles' vectors: 16 lanes where the build has AVX-512 (twice the work per
 * instruction), else 8. Each build has one order, whatever T is.
 */
#if defined(__AVX512F__)
#define FV 16
typedef __m512 vfloat;
AI vfloat vf_zero(void) { return _mm512_setzero_ps(); }
AI vfloat vf_load(const float *p) { return _mm512_loadu_ps(p); }
AI vfloat vf_fma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
/* The lanes' sum in a fixed order: the halves lane by lane, then hsum8. */
AI float vf_sum(vfloat v) {
  __m256 lo = _mm512_castps512_ps256(v), hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum8(_mm256_add_ps(lo, hi));
}
/* 16 weights of a row starting at element k, as f32. */
AI vfloat vf_weights(const uint8_t *row, int dtype, int k) {
  if (dtype == DT_F32) return _mm512_loadu_ps((const float *)row + k);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
  if (dtype == DT_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#else
#define FV 8
typedef __m256 vfloat;
AI vfloat vf_zero(void) { return _mm256_setzero_ps(); }
AI vfloat vf_load(const float *p) { return _mm256_loadu_ps(p); }
AI vfloat vf_fma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
AI float vf_sum(vfloat v) { return hsum8(v); }
AI vfloat vf_weights(const uint8_t *row, int dtype, int k) { return load_w8(row, dtype, k); }
#endif

/*
 * Tile: out[t0 .. t0+RT) x [n, n+RN) = x[t] · W[row j] over all of K, the RN weight
 * rows starting at `wr0` (rowb bytes apart). RT and RN are compile-time constants at
 * every call, so acc stays in registers. Each output accumulates in one order,
 * whatever RT and RN are (FV lanes along k by FMA, vf_sum, then the k tail in order),
 * so a token's result does not depend on the tokens or rows it shares a tile with.
 */
AI void tile_float(float *out, const float *x, const uint8_t *wr0, int dtype, size_t rowb, int K, int N, int t0, int n,
                   const uint8_t *pf, const int RT, const int RN) {
  vfloat acc[MM_RT][MM_RN];
  for (int i = 0; i < RT; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = vf_zero();
  const float *xr[MM_RT];
  const uint8_t *wr[MM_RN];
  for (int i = 0; i < RT; i++) xr[i] = x + (size_t)(t0 + i) * K;
  for (int j = 0; j < RN; j++) wr[j] = wr0 + (size_t)j * rowb;
  int kv = K & ~(FV - 1);
  for (int k = 0; k < kv; k += FV) {
    /* f32 rows, a line (16 floats) at a time: the next tile's weights, fetched while this one computes. */
    if (pf && (k & 15) == 0)
      for (int j = 0; j < MM_RN; j++) _mm_prefetch((const char *)pf + (size_t)j * rowb + (size_t)k * 4, _MM_HINT_T1);
    vfloat wv[MM_RN];
    for (int j = 0; j < RN; j++) wv[j] = vf_weights(wr[j], dtype, k);
    for (int i = 0; i < RT; i++) {
      vfloat xv = vf_load(xr[i] + k);
      for (int j = 0; j < RN; j++) acc[i][j] = vf_fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RT; i++) {
    for (int j = 0; j < RN; j++) {
      float s = vf_sum(acc[i][j]);
      for (int k = kv; k < K; k++) s += xr[i][k] * load_w1(wr[j], dtype, k);
      out[(size_t)(t0 + i) * N + n + j] = s;
    }
  }
}

/* A tile of RT (constant) tokens over nn (1..MM_RN, a constant in each case) weight rows. */
AI void tile_rows(float *out, const float *x, const uint8_t *wr0, int dtype, size_t rowb, int K, int N, int t0, int n,
                  int nn, const uint8_t *pf, const int RT) {
  switch (nn) {
#if MM_RN >= 4
    case 4: tile_float(out, x, wr0, dtype, rowb, K, N, t0, n, pf, RT, 4); break;
#endif
    case 3: tile_float(out, x, wr0, dtype, rowb, K, N, t0, n, pf, RT, 3); break;
    case 2: tile_float(out, x, wr0, dtype, rowb, K, N, t0, n, pf, RT, 2); break;
    default: tile_float(out, x, wr0, dtype, rowb, K, N, t0, n, pf, RT, 1); break;
  }
}

/*
 * Tokens [t0, t1) over nn weight rows: whole tiles of MM_RT tokens, then one narrower
 * tile. The first tile also prefetches `pf` (f32 rows rowb apart; NULL: nothing).
 */
AI void tile_tokens(float *out, const float *x, const uint8_t *wr0, int dtype, size_t rowb, int K, int N, int t0,
                    int t1, int n, int nn, const uint8_t *pf) {
  int t = t0;
  for (; t + MM_RT <= t1; t += MM_RT, pf = NULL) tile_rows(out, x, wr0, dtype, rowb, K, N, t, n, nn, pf, MM_RT);
  switch (t1 - t) {
    case 3: tile_rows(out, x, wr0, dtype, rowb, K, N, t, n, nn, pf, 3 < MM_RT ? 3 : 1); break;
    case 2: tile_rows(out, x, wr0, dtype, rowb, K, N, t, n, nn, pf, 2 < MM_RT ? 2 : 1); break;
    case 1: tile_rows(out, x, wr0, dtype, rowb, K, N, t, n, nn, pf, 1); break;
    default: break;
  }
}

/* Tokens [t0, t1) over nn f32 weight rows: one instance shared by every dtype (f16/bf16 rows come converted). */
AI void tiles_f32(float *out, const float *x, const float *wr0, int K, int N, int t0, int t1, int n, int nn,
                  const uint8_t *pf) {
  tile_tokens(out, x, (const uint8_t *)wr0, DT_F32, (size_t)K * 4, K, N, t0, t1, n, nn, pf);
}

/* Activation bytes of a block of tokens kept in L2 while every weight tile of the range passes over it. */
#define X_BLOCK_BYTES (256 << 10)

/*
 * Every T is the same tile kernel over all of K, so a token's outputs are the same
 * bits in a step of 1 token or of many. A step of at most MM_RT tokens is one tile
 * row per weight row group, reading each weight once (decode, and small batches).
 * Larger steps go in blocks of tokens whose activations stay in L2; each group of
 * MM_RN weight rows is read once per block (f16/bf16 converted once into scratch
 * first, exactly) and shared by all of the block's tiles, so a batch of 16 decode
 * tokens reads every weight once, not 16 times.
 */
AI void mm_float_dt(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1,
                    float *scratch) {
  size_t rowb = (size_t)K * (dtype == DT_F32 ? 4 : 2);
  if (T <= MM_RT) {
    /* Short rows (< 2 KiB) go one at a time: several short streams at once starve the prefetcher
       (measured 6 vs 8.5 GB/s at K = 288); long rows gain from several (11-14 vs 8 GB/s at K = 2048). */
    int step = rowb >= 2048 ? MM_RN : 1;
    for (int n = n0; n < n1; n += step) {
      int nn = n1 - n < step ? n1 - n : step;
      tile_tokens(out, x, w + (size_t)n * rowb, dtype, rowb, K, N, 0, T, n, nn, NULL);
    }
    return;
  }
  int block = (int)(X_BLOCK_BYTES / ((size_t)K * sizeof(float))) / MM_RT * MM_RT;
  if (block < MM_RT) block = MM_RT;
  for (int t0 = 0; t0 < T; t0 += block) {
    int t1 = T - t0 < block ? T : t0 + block;
    for (int n = n0; n < n1; n += MM_RN) {
      int nn = n1 - n < MM_RN ? n1 - n : MM_RN;
      const uint8_t *wr = w + (size_t)n * rowb;
      /* The next tile's rows (a whole tile: rows past n1 belong to another thread's range, still in the weight). */
      const uint8_t *next = n + nn + MM_RN <= N ? wr + (size_t)nn * rowb : NULL;
      if (dtype == DT_F32) {
        tiles_f32(out, x, (const float *)wr, K, N, t0, t1, n, nn, next);
        continue;
      }
      for (int j = 0; j < nn; j++) {
        const uint8_t *src = wr + (size_t)j * rowb;
        float *dst = scratch + (size_t)j * K;
        int k = 0;
        for (; k + 8 <= K; k += 8) {
          if (next && (k & 31) == 0) _mm_prefetch((const char *)next + (size_t)j * rowb + (size_t)k * 2, _MM_HINT_T1);
          _mm256_storeu_ps(dst + k, load_w8(src, dtype, k));
        }
        for (; k < K; k++) dst[k] = load_w1(src, dtype, k);
      }
      tiles_f32(out, x, scratch, K, N, t0, t1, n, nn, NULL);
    }
  }
}

void mm_float(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1,
              float *scratch) {
  switch (dtype) {
    case DT_F32: mm_float_dt(out, x, w, DT_F32, T, K, N, n0, n1, scratch); break;
    case DT_F16: mm_float_dt(out, x, w, DT_F16, T, K, N, n0, n1, scratch); break;
    default: mm_float_dt(out, x, w, DT_BF16, T, K, N, n0, n1, scratch); break;
  }
}

/* ---- Quantized ---- */

/*
 * Exact int32 dot product of block b of a weight row with a block of 32 int16
 * activation quants y, as 8 int32 partial sums: the weights are widened to int16
 * (q8_0: sign-extended; q4_0: nibbles 0..15 zero-extended, minus 8) and madd_epi16
 * multiplies and adds pairs into int32. Each madd lane is <= 2 * 128 * 32767.
 * q4_0 returns Σ nib * y (nib 0..15); the caller subtracts 8 * Σ y.
 */
AI __m256i dot_block(const uint8_t *row, int dtype, int b, const int16_t *y) {
  __m256i y0 = _mm256_loadu_si256((const __m256i *)y), y1 = _mm256_loadu_si256((const __m256i *)(y + 16));
  __m256i w0, w1;
  if (dtype == DT_Q8_0) {
    const uint8_t *p = row + (size_t)b * QK;
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
  } else {
    /* Byte j holds element j (low nibble) and element j + 16 (high nibble): widen the
       16 bytes once, then split each int16 into its nibbles 0..15. The -8 offset is
       applied by the caller as -8 * Σ y (llm_xq.s), not per element: fewer uops. */
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + (size_t)b * QK / 2)));
    w0 = _mm256_and_si256(v, _mm256_set1_epi16(15));
    w1 = _mm256_srli_epi16(v, 4);
  }
  return _mm256_add_epi32(_mm256_madd_epi16(w0, y0), _mm256_madd_epi16(w1, y1));
}

/* The 8 lane sums of 8 int32x8 vectors, in order: one horizontal reduction for 8 blocks. */
AI __m256i reduce8(__m256i s0, __m256i s1, __m256i s2, __m256i s3, __m256i s4, __m256i s5, __m256i s6, __m256i s7) {
  __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
  __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s4, s5), _mm256_hadd_epi32(s6, s7));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* Blocks per chunk of the canonical order (see the top of this file); a multiple of 8. */
#define Q_CHUNK 32

/*
 * Tile of RT tokens x RN weight rows over all K. Blocks go 8 at a time: the 8
 * block dot products of a (token, row) pair are reduced to one vector of 8 exact
 * int32 block sums, converted once, and added into 8 lanes by one FMA with their
 * scales d_w * d_x (the planar layout keeps a row's scales contiguous, so they
 * load as one vector). Every Q_CHUNK blocks (and at the end) the lanes are summed
 * into the output's running total.
 */
AI void tile_quant(float *out, const llm_xq *xq, const uint8_t *wq, const uint16_t *ws, int dtype, size_t rowb, int K,
                   int N, int t0, int n0, const int RT, const int RN) {
  int nb = K / QK;
  __m256 acc[4][4];
  float total[4][4] = {{0}};
  for (int i = 0; i < RT; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
  const int16_t *yr[4];
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
  /* Bytes of 8 blocks of one row: decode prefetches the next groups by hand, the
     hardware prefetcher alone does not keep enough of them in flight here. */
  const int gbytes = dtype == DT_Q8_0 ? 8 * QK : 8 * QK / 2;
  for (int c0 = 0; c0 < nb; c0 += Q_CHUNK) {
    int c1 = nb - c0 < Q_CHUNK ? nb : c0 + Q_CHUNK, b = c0;
    for (; b + 8 <= c1; b += 8) {
      if (RT == 1) {
        for (int j = 0; j < RN; j++) {
          const char *ahead = (const char *)wr[j] + (size_t)b * (gbytes / 8) + PF_AHEAD;
          for (int l = 0; l < gbytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
        }
      }
      __m256 dw[4];
      for (int j = 0; j < RN; j++) dw[j] = load_f16x8(wd[j] + b);
      for (int i = 0; i < RT; i++) {
        const int16_t *y = yr[i] + (size_t)b * QK;
        __m256 dy = _mm256_loadu_ps(yd[i] + b);
        __m256i off = dtype == DT_Q4_0 ? _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(ys[i] + b)), 3)
                                       : _mm256_setzero_si256();
        for (int j = 0; j < RN; j++) {
          __m256i s = reduce8(dot_block(wr[j], dtype, b, y), dot_block(wr[j], dtype, b + 1, y + QK),
                              dot_block(wr[j], dtype, b + 2, y + 2 * QK), dot_block(wr[j], dtype, b + 3, y + 3 * QK),
                              dot_block(wr[j], dtype, b + 4, y + 4 * QK), dot_block(wr[j], dtype, b + 5, y + 5 * QK),
                              dot_block(wr[j], dtype, b + 6, y + 6 * QK), dot_block(wr[j], dtype, b + 7, y + 7 * QK));
          if (dtype == DT_Q4_0) s = _mm256_sub_epi32(s, off);
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw[j], dy), acc[i][j]);
        }
      }
    }
    if (b < c1) {
      /* Fewer than 8 blocks left: their sums and scales in the first lanes, the other lanes kept. */
      int left = c1 - b;
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes));
      for (int j = 0; j < RN; j++) {
        for (int i = 0; i < RT; i++) {
          _Alignas(32) float sums[8] = {0}, scales[8] = {0};
          for (int l = 0; l < left; l++) {
            __m256i s = dot_block(wr[j], dtype, b + l, yr[i] + (size_t)(b + l) * QK);
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            sums[l] = (float)(_mm_cvtsi128_si32(s4) - (dtype == DT_Q4_0 ? 8 * ys[i][b + l] : 0));
            scales[l] = _cvtsh_ss(wd[j][b + l]) * yd[i][b + l];
          }
          __m256 added = _mm256_fmadd_ps(_mm256_load_ps(sums), _mm256_load_ps(scales), acc[i][j]);
          acc[i][j] = _mm256_blendv_ps(acc[i][j], added, keep);
        }
      }
    }
    /* The chunk's lanes into the running total. */
    for (int i = 0; i < RT; i++) {
      for (int j = 0; j < RN; j++) {
        float chunk = hsum8(acc[i][j]);
        total[i][j] = c0 == 0 ? chunk : total[i][j] + chunk;
        acc[i][j] = _mm256_setzero_ps();
      }
    }
  }
  for (int i = 0; i < RT; i++)
    for (int j = 0; j < RN; j++) out[(size_t)(t0 + i) * N + n0 + j] = nb > 0 ? total[i][j] : 0.0f;
}

/*
 * Quantized prefill: an int16 GEMM. For each K chunk and each panel of PR weight
 * rows, the weights are widened once to int16 (q4_0: minus 8) and stored pair-
 * interleaved, P[k/2][PR rows][2], so that one 256-bit load holds the pairs
 * (w[k], w[k+1]) of 8 rows; madd_epi16 against a broadcast activation pair
 * (y[k], y[k+1]) then gives 8 rows' int32 partial sums, 16 multiplies per
 * instruction against an f32 FMA's 8. Sums stay exact in int32 over a block (16
 * madds per lane: <= 16 * 2 * 128 * 32767 < 2^31) and are added into f32 at each
 * block end, acc = fma(sum, d_w * d_x, acc), in block order, as tile_quant does.
 */
/* K chunk: the tokens' chunk (T x KCQ int16) stays in L2 across panels; a panel is PR x KCQ int16
   (64 KiB on the stack). Measured: 512, 1024 and 2048 within noise of each other, 256 a little slower.
   It is the canonical order's chunk: each panel_kernel_q16 call sums one chunk. */
#define KCQ (Q_CHUNK * QK)
/*
 * Tile: QRT tokens x QRN vectors of 8 rows, QRT * QRN int32 sums in registers
 * (<= 12 of the 16). Measured on one core (T = 128, K = 2048, N = 5632, q4_0):
 * 3 x 4 118 GFLOP/s, 2 x 6 117, 4 x 3 111, 4 x 2 75-93, 6 x 2 93; the f32 panels
 * before: 46-64. Fewer broadcasts per madd is what counts.
 */
#ifndef QRT
#define QRT 3
#endif
#ifndef QRN
#define QRN 4
#endif
#define PR (8 * QRN)
_Static_assert(PR == MM_PANEL_ROWS, "exec.c splits rows in whole panels");

/*
 * The broadcast pair and acc += madd(w, pair) in asm: given intrinsics, GCC hoists
 * the loads and products of a whole k step and then spills the int32 sums. Here
 * the sums stay in registers, the weights are memory operands (L1) and the one
 * temporary is ymm15.
 */
AI __m256i bcast_pair(const int16_t *y) {
  __m256i r;
  __asm__("vpbroadcastd %1, %0" : "=x"(r) : "m"(*(const int32_t *)y));
  return r;
}

AI void madd_acc(__m256i *acc, __m256i pair, const __m256i *w) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  /* VNNI: the multiply, the pair add and the accumulate in one instruction, the same int32 result. */
  __asm__("vpdpwssd %2, %1, %0" : "+v"(*acc) : "v"(pair), "m"(*w));
#else
  __asm__("vpmaddwd %2, %1, %%ymm15\n\tvpaddd %%ymm15, %0, %0" : "+x"(*acc) : "x"(pair), "m"(*w) : "xmm15");
#endif
}

/* 8x8 transpose of int32 lanes: r[j] lane i -> r[i] lane j. */
AI void transpose8_epi32(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; h++) {
    u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

/* Block b of a quantized row as 32 int16 (q4_0: minus 8): v[0] elements 0..15, v[1] 16..31. */
AI void widen_block(const uint8_t *row, int dtype, int b, __m256i v[2]) {
  if (dtype == DT_Q8_0) {
    const uint8_t *p = row + (size_t)b * QK;
    v[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    v[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
  } else {
    __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + (size_t)b * QK / 2)));
    v[0] = _mm256_sub_epi16(_mm256_and_si256(u, _mm256_set1_epi16(15)), _mm256_set1_epi16(8));
    v[1] = _mm256_sub_epi16(_mm256_srli_epi16(u, 4), _mm256_set1_epi16(8));
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* 16x16 transpose of int32 lanes in 4 stages of 16 shuffles: r[j] lane i -> r[i] lane j. */
AI void transpose16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  /* u[4i + k], 128-bit lane L: column 4L + k of rows 4i .. 4i+3. */
  for (int i = 0; i < 4; i++) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; k++) {
    __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), b = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xee);
    __m512i c = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44), d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xee);
    r[k] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(a, c, 0xdd);
    r[8 + k] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(b, d, 0xdd);
  }
}

/* Block b of a quantized row as 32 int16 (q4_0: minus 8) in one vector: lane p holds the pair (2p, 2p+1). */
AI __m512i widen_block_z(const uint8_t *row, int dtype, int b) {
  if (dtype == DT_Q8_0) return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + (size_t)b * QK)));
  /* Byte j holds element j (low nibble) and j + 16 (high nibble): the 16 bytes in both halves, low nibbles kept
     in the first, high nibbles in the second. */
  __m512i u = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + (size_t)b * QK / 2))));
  __m512i v = _mm512_mask_srli_epi16(_mm512_and_si512(u, _mm512_set1_epi16(15)), (__mmask32)0xffff0000u, u, 4);
  return _mm512_sub_epi16(v, _mm512_set1_epi16(8));
}

/*
 * pack_panel_q16 on 512-bit vectors, the same P and S: per block, 16 rows of 16 pairs
 * are one 16x16 int32 transpose (64 shuffles for 256 pairs, against 96 in 8x8
 * transposes), and the scales of 16 rows x 16 blocks are one more transpose instead of
 * a scalar conversion each. Exact copies either way: the kernels see the same bytes.
 */
AI void pack_panel_q16(int32_t *P, float *S, const uint8_t *w, const uint16_t *ws, int dtype, size_t rowb, int nb,
                       int n0, int nn, int b0, int nbc, int next_nn) {
  const int block_bytes = dtype == DT_Q8_0 ? QK : QK / 2, per_line = 64 / block_bytes;
  /* Scales: rows h*16 .. +15 x blocks g*16 .. +15 (blocks past nbc and rows past nn read as 0). */
  for (int h = 0; h < PR / 16; h++) {
    for (int g = 0; g * 16 < nbc; g++) {
      int left = nbc - g * 16 < 16 ? nbc - g * 16 : 16;
      __mmask16 m = (__mmask16)((1u << left) - 1);
      __m512i v[16];
      for (int j = 0; j < 16; j++) {
        int r = 16 * h + j;
        v[j] = r < nn ? _mm512_castps_si512(_mm512_cvtph_ps(
                            _mm256_maskz_loadu_epi16(m, ws + (size_t)(n0 + r) * nb + b0 + 16 * g)))
                      : _mm512_setzero_si512();
      }
      transpose16_epi32(v);
      for (int l = 0; l < left; l++) _mm512_store_si512((__m512i *)(S + (16 * g + l) * PR + 16 * h), v[l]);
    }
  }
  for (int b = 0; b < nbc; b++) {
    /* The next panel's rows, as pack_panel_q16 (256-bit) prefetches them. */
    if (b % per_line == 0) {
      for (int r = 0; r < next_nn; r++) {
        const uint8_t *row = w + (size_t)(n0 + nn + r) * rowb;
        _mm_prefetch((const char *)row + (size_t)(b0 + b) * block_bytes, _MM_HINT_T1);
        if (b == 0) _mm_prefetch((const char *)(ws + (size_t)(n0 + nn + r) * nb + b0), _MM_HINT_T1);
      }
    }
    for (int h = 0; h < PR / 16; h++) {
      __m512i v[16];
      for (int j = 0; j < 16; j++) {
        int r = 16 * h + j;
        v[j] = r < nn ? widen_block_z(w + (size_t)(n0 + r) * rowb, dtype, b0 + b) : _mm512_setzero_si512();
      }
      transpose16_epi32(v);
      int32_t *pb = P + (size_t)b * 16 * PR + 16 * h;
      for (int p = 0; p < 16; p++) _mm512_store_si512((__m512i *)(pb + p * PR), v[p]);
    }
  }
}
#else
/*
 * Packs blocks [b0, b0+nbc) of rows [n0, n0+nn) (zero rows past nn) as int16
 * pairs, P[(b*16 + pair)*PR + row] (int32 units), and their scales S[b*PR + row].
 * Per block, 8 rows at a time: 8 rows x 16 pairs is two 8x8 int32 transposes.
 */
AI void pack_panel_q16(int32_t *P, float *S, const uint8_t *w, const uint16_t *ws, int dtype, size_t rowb, int nb,
                       int n0, int nn, int b0, int nbc, int next_nn) {
  /* Bytes of one block of a row: a cache line holds 2 (q8_0) or 4 (q4_0). */
  const int block_bytes = dtype == DT_Q8_0 ? QK : QK / 2, per_line = 64 / block_bytes;
  for (int b = 0; b < nbc; b++) {
    /*
     * The next panel's rows (next_nn of them, right after these), a line of each per
     * line of blocks: its blocks arrive while this panel's tokens run. Spread over the
     * packing, not all at once, so that the misses in flight never overflow. The
     * panel reads 32 rows at once, too many streams for the hardware prefetcher.
     */
    if (b % per_line == 0) {
      for (int r = 0; r < next_nn; r++) {
        const uint8_t *row = w + (size_t)(n0 + nn + r) * rowb;
        _mm_prefetch((const char *)row + (size_t)(b0 + b) * block_bytes, _MM_HINT_T1);
        if (b == 0) _mm_prefetch((const char *)(ws + (size_t)(n0 + nn + r) * nb + b0), _MM_HINT_T1);
      }
    }
    for (int h = 0; h < QRN; h++) {
      __m256i lo[8], hi[8]; /* pairs 0..7 and 8..15 of rows h*8 .. h*8+7 */
      for (int j = 0; j < 8; j++) {
        int r = 8 * h + j;
        if (r < nn) {
          __m256i v[2];
          widen_block(w + (size_t)(n0 + r) * rowb, dtype, b0 + b, v);
          lo[j] = v[0];
          hi[j] = v[1];
          S[b * PR + r] = _cvtsh_ss(ws[(size_t)(n0 + r) * nb + b0 + b]);
        } else {
          lo[j] = hi[j] = _mm256_setzero_si256();
          S[b * PR + r] = 0;
        }
      }
      transpose8_epi32(lo);
      transpose8_epi32(hi);
      int32_t *pb = P + (size_t)b * 16 * PR + 8 * h;
      for (int p = 0; p < 8; p++) {
        _mm256_store_si256((__m256i *)(pb + p * PR), lo[p]);
        _mm256_store_si256((__m256i *)(pb + (p + 8) * PR), hi[p]);
      }
    }
  }
}

#endif

/*
 * out[t0 .. t0+RT) x [n0 .. n0+nn) (+)= tokens' blocks [b0, b0+nbc) · panel. Per
 * pair: RT broadcasts, RT*QRN madds into int32 block sums; at each block end the
 * sums are added into f32 accumulators C (in L1: the registers hold the int32 ones),
 * which start from the outputs of the earlier K chunks when `add` is set.
 */
AI void panel_kernel_q16(float *out, const llm_xq *xq, const int32_t *P, const float *S, int K, int N, int t0, int n0,
                         int nn, int b0, int nbc, int add, const int RT) {
  int nb = K / QK;
  /* The canonical order's 8 lanes (block b in lane b mod 8) of every output, in L1. */
  _Alignas(32) float C[8][QRT][PR];
  const int16_t *y[QRT];
  const float *yd[QRT];
  for (int i = 0; i < RT; i++) {
    y[i] = xq->q + (size_t)(t0 + i) * K + (size_t)b0 * QK;
    yd[i] = xq->d + (size_t)(t0 + i) * nb + b0;
    for (int l = 0; l < 8; l++)
      for (int j = 0; j < QRN; j++) _mm256_store_ps(C[l][i] + 8 * j, _mm256_setzero_ps());
  }
  for (int b = 0; b < nbc; b++) {
    const __m256i *pb = (const __m256i *)(P + (size_t)b * 16 * PR);
    __m256i acc[QRT][QRN];
    for (int i = 0; i < RT; i++)
      for (int j = 0; j < QRN; j++) acc[i][j] = _mm256_setzero_si256();
#pragma GCC unroll 1 /* unrolled 2, 4 or 16 times: no faster, measured */
    for (int p = 0; p < 16; p++) {
      for (int i = 0; i < RT; i++) {
        __m256i pair = bcast_pair(y[i] + b * QK + 2 * p);
        for (int j = 0; j < QRN; j++) madd_acc(&acc[i][j], pair, pb + p * QRN + j);
      }
    }
    __m256 s[QRN];
    for (int j = 0; j < QRN; j++) s[j] = _mm256_load_ps(S + b * PR + 8 * j);
    float(*lane)[PR] = C[b & 7];
    for (int i = 0; i < RT; i++) {
      __m256 dx = _mm256_set1_ps(yd[i][b]);
      for (int j = 0; j < QRN; j++)
        _mm256_store_ps(lane[i] + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]), _mm256_mul_ps(s[j], dx),
                                                         _mm256_load_ps(lane[i] + 8 * j)));
    }
  }
  for (int i = 0; i < RT; i++) {
    float *o = out + (size_t)(t0 + i) * N + n0;
    for (int j = 0; j < QRN; j++) {
      /* The lanes added as hsum8 adds them, then onto the earlier chunks' total. */
#define LANE(l) _mm256_load_ps(C[l][i] + 8 * j)
      __m256 a = _mm256_add_ps(LANE(0), LANE(4)), b = _mm256_add_ps(LANE(1), LANE(5));
      __m256 c = _mm256_add_ps(LANE(2), LANE(6)), d = _mm256_add_ps(LANE(3), LANE(7));
#undef LANE
      __m256 chunk = _mm256_add_ps(_mm256_add_ps(a, c), _mm256_add_ps(b, d));
      int cols = nn - 8 * j < 8 ? nn - 8 * j : 8;
      if (cols == 8) {
        _mm256_storeu_ps(o + 8 * j, add ? _mm256_add_ps(_mm256_loadu_ps(o + 8 * j), chunk) : chunk);
        continue;
      }
      _Alignas(32) float v[8];
      _mm256_store_ps(v, chunk);
      for (int r = 0; r < cols; r++) o[8 * j + r] = add ? o[8 * j + r] + v[r] : v[r];
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/*
 * The same tile on 512-bit vectors (AVX-512 VNNI): QRT_Z tokens x 2 vectors of 16
 * rows of the same packed panel (its 32 rows' pairs are 128 contiguous bytes), so
 * each vpdpwssd does 32 multiplies: twice the 256-bit kernel's work per instruction.
 * Every output is computed by the same per-lane steps in the same order (exact
 * int32 block sums, one fma into lane b mod 8, the lane tree, onto the total), so
 * both kernels and tile_quant give the same bits.
 */
#define QRT_Z 6
AI void panel_kernel_q16z(float *out, const llm_xq *xq, const int32_t *P, const float *S, int K, int N, int t0,
                          int n0, int nn, int b0, int nbc, int add, const int RT) {
  int nb = K / QK;
  _Alignas(64) float C[8][QRT_Z][PR];
  const int16_t *y[QRT_Z];
  const float *yd[QRT_Z];
  for (int i = 0; i < RT; i++) {
    y[i] = xq->q + (size_t)(t0 + i) * K + (size_t)b0 * QK;
    yd[i] = xq->d + (size_t)(t0 + i) * nb + b0;
    for (int l = 0; l < 8; l++)
      for (int j = 0; j < 2; j++) _mm512_store_ps(C[l][i] + 16 * j, _mm512_setzero_ps());
  }
  for (int b = 0; b < nbc; b++) {
    const __m512i *pb = (const __m512i *)(P + (size_t)b * 16 * PR);
    __m512i acc[QRT_Z][2];
    for (int i = 0; i < RT; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    for (int p = 0; p < 16; p++) {
      __m512i w0 = _mm512_load_si512(pb + 2 * p), w1 = _mm512_load_si512(pb + 2 * p + 1);
      for (int i = 0; i < RT; i++) {
        __m512i pair = _mm512_set1_epi32(*(const int32_t *)(y[i] + b * QK + 2 * p));
        acc[i][0] = _mm512_dpwssd_epi32(acc[i][0], pair, w0);
        acc[i][1] = _mm512_dpwssd_epi32(acc[i][1], pair, w1);
      }
    }
    __m512 s0 = _mm512_load_ps(S + b * PR), s1 = _mm512_load_ps(S + b * PR + 16);
    float(*lane)[PR] = C[b & 7];
    for (int i = 0; i < RT; i++) {
      __m512 dx = _mm512_set1_ps(yd[i][b]);
      _mm512_store_ps(lane[i], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, dx),
                                               _mm512_load_ps(lane[i])));
      _mm512_store_ps(lane[i] + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, dx),
                                                    _mm512_load_ps(lane[i] + 16)));
    }
  }
  for (int i = 0; i < RT; i++) {
    float *o = out + (size_t)(t0 + i) * N + n0;
    for (int j = 0; j < 2; j++) {
#define LANE(l) _mm512_load_ps(C[l][i] + 16 * j)
      __m512 a = _mm512_add_ps(LANE(0), LANE(4)), b = _mm512_add_ps(LANE(1), LANE(5));
      __m512 c = _mm512_add_ps(LANE(2), LANE(6)), d = _mm512_add_ps(LANE(3), LANE(7));
#undef LANE
      __m512 chunk = _mm512_add_ps(_mm512_add_ps(a, c), _mm512_add_ps(b, d));
      int cols = nn - 16 * j < 16 ? (nn - 16 * j > 0 ? nn - 16 * j : 0) : 16;
      __mmask16 m = (__mmask16)((1u << cols) - 1);
      __m512 prev = add ? _mm512_maskz_loadu_ps(m, o + 16 * j) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(o + 16 * j, m, add ? _mm512_add_ps(prev, chunk) : chunk);
    }
  }
}
#endif

AI void gemm_q16(float *out, const llm_xq *xq, const uint8_t *w, const uint16_t *ws, int dtype, size_t rowb, int T,
                 int K, int N, int n0, int n1) {
  _Alignas(64) int32_t P[KCQ / 2 * PR];
  _Alignas(64) float S[KCQ / QK * PR];
  int nb = K / QK;
  for (int b0 = 0; b0 < nb; b0 += KCQ / QK) {
    int nbc = nb - b0 < KCQ / QK ? nb - b0 : KCQ / QK;
    for (int n = n0; n < n1; n += PR) {
      int nn = n1 - n < PR ? n1 - n : PR;
      int next_nn = n1 - (n + nn) < PR ? n1 - (n + nn) : PR;
      pack_panel_q16(P, S, w, ws, dtype, rowb, nb, n, nn, b0, nbc, next_nn);
      int t = 0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
      for (; t + QRT_Z <= T; t += QRT_Z) panel_kernel_q16z(out, xq, P, S, K, N, t, n, nn, b0, nbc, b0 > 0, QRT_Z);
      switch (T - t) {
        case 5: panel_kernel_q16z(out, xq, P, S, K, N, t, n, nn, b0, nbc, b0 > 0, 5); t += 5; break;
        case 4: panel_kernel_q16z(out, xq, P, S, K, N, t, n, nn, b0, nbc, b0 > 0, 4); t += 4; break;
        default: break;
      }
#endif
      for (; t + QRT <= T; t += QRT) panel_kernel_q16(out, xq, P, S, K, N, t, n, nn, b0, nbc, b0 > 0, QRT);
      /* The last T mod QRT tokens: a narrower tile (RT a constant in each call; R >= QRT never happens). */
#define Q16_TAIL(R) \
  case R: panel_kernel_q16(out, xq, P, S, K, N, t, n, nn, b0, nbc, b0 > 0, R < QRT ? R : 1); break
      switch (T - t) {
        Q16_TAIL(5);
        Q16_TAIL(4);
        Q16_TAIL(3);
        Q16_TAIL(2);
        Q16_TAIL(1);
        default: break;
      }
#undef Q16_TAIL
    }
  }
}

AI void mm_quant_dt(float *out, const llm_xq *xq, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  size_t rowb = dtype == DT_Q8_0 ? (size_t)K : (size_t)K / 2;
  const uint16_t *ws = (const uint16_t *)(w + rowb * N);
  if (T >= MM_GEMM_MIN_T) {
    gemm_q16(out, xq, w, ws, dtype, rowb, T, K, N, n0, n1);
    return;
  }
  /* Decode: one row at a time, all T (< 4) tokens per row so each weight is read once.
     Several rows at once (as for floats) means several concurrent streams of quants
     and scales, measured ~2x slower from DRAM here. */
  for (int n = n0; n < n1; n++) {
    switch (T) {
      case 3: tile_quant(out, xq, w, ws, dtype, rowb, K, N, 0, n, 3, 1); break;
      case 2: tile_quant(out, xq, w, ws, dtype, rowb, K, N, 0, n, 2, 1); break;
      default: tile_quant(out, xq, w, ws, dtype, rowb, K, N, 0, n, 1, 1); break;
    }
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

void mm_float(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1,
              float *scratch) {
  (void)scratch; /* converts each weight as it reads it */
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

/* Weight k of quantized block row `wr` (b = k / QK), as an int in -128..127. */
static inline int q_at(const uint8_t *wr, int dtype, int k) {
  if (dtype == DT_Q8_0) return (int8_t)wr[k];
  uint8_t byte = wr[(size_t)(k / QK) * (QK / 2) + (k % QK) % (QK / 2)];
  return ((k % QK) < QK / 2 ? byte & 15 : byte >> 4) - 8;
}

/* Same numerics as the AVX2 path: exact int32 block dots of the int16 activations with the weights. */
void mm_quant(float *out, const llm_xq *xq, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1) {
  int nb = K / QK;
  size_t rowb = dtype == DT_Q8_0 ? (size_t)K : (size_t)K / 2;
  const uint8_t *ws = w + rowb * N;
  for (int n = n0; n < n1; n++) {
    const uint8_t *wr = w + (size_t)n * rowb;
    for (int t = 0; t < T; t++) {
      const int16_t *y = xq->q + (size_t)t * K;
      const float *yd = xq->d + (size_t)t * nb;
      float acc = 0;
      for (int b = 0; b < nb; b++) {
        uint16_t h;
        memcpy(&h, ws + ((size_t)n * nb + b) * 2, 2);
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += (int32_t)q_at(wr, dtype, b * QK + j) * y[b * QK + j];
        acc += (float)s * f16_to_f32(h) * yd[b];
      }
      out[(size_t)t * N + n] = acc;
    }
  }
}
#endif
