/*
 * Internal declarations of the native kernel library (libllm_native).
 *
 * The library runs whole execution plans: the TypeScript side encodes a plan once
 * (one fixed-size record per node, plus a table of tensor addresses) and then runs
 * each step with one foreign call. Everything here is C11; SIMD paths are chosen
 * at build time from the compiler's target macros, with a portable scalar path
 * that any C11 compiler builds (define LLM_PORTABLE to force it).
 */
#ifndef LLM_H
#define LLM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(LLM_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLM_AVX2 1
#include <immintrin.h>
#endif

#if defined(_MSC_VER)
#define LLM_EXPORT __declspec(dllexport)
#else
#define LLM_EXPORT __attribute__((visibility("default")))
#endif

/* ---- Op codes and dtype codes: must match backends/native/encoder.ts. ---- */
enum {
  OP_EMBEDDING = 0,
  OP_RMSNORM = 1,
  OP_MATMUL = 2,
  OP_ROPE = 3,
  OP_SILUMUL = 4,
  OP_ADD = 5,
  OP_ATTENTION = 6,
  OP_GATHER_ROWS = 7,
};

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_Q8_0 = 3, DT_Q4_0 = 4, DT_I32 = 5 };

/* Quant block length (graph/dtype.ts QUANT_BLOCK). */
#define QK 32

/*
 * Symbolic dimensions a plan's row counts may name (T, R, ...): a step passes their
 * values, and a node's `rows` of -1 - k means the step's value of dimension k.
 */
#define LLM_MAX_DIMS 4

/*
 * One node of an encoded plan: 24 int32 slots (floats are stored bit for bit).
 * Tensor fields index the executable's address table. `rows` is the row count of
 * the output: a fixed number, or -1 - k for symbolic dimension k of the step.
 * Parameters per op (p, f), and inputs beyond the first two, are listed in exec.c.
 */
typedef struct {
  int32_t op, dtype, out, rows;
  int32_t in[8];
  int32_t p[8]; /* op parameters; rope keeps theta (f64) in p[6..7] */
  float f[2];   /* float parameters (eps, scale) */
  int32_t pad[2];
} llm_node;

#define LLM_NODE_INTS 24
_Static_assert(sizeof(llm_node) == LLM_NODE_INTS * 4, "llm_node is 24 int32");

/* ---- Thread pool (pool.c). ---- */
typedef struct llm_pool llm_pool;
typedef void (*llm_task)(void *arg, int ith, int nth);

llm_pool *pool_create(int nthreads);
void pool_destroy(llm_pool *p);
int pool_size(const llm_pool *p);
/* Runs task(arg, ith, nth) on threads 0..nth-1 (0 is the caller) and waits. */
void pool_run(llm_pool *p, llm_task task, void *arg, int nth);
/* Spin barrier among the nth threads of the running task. */
void pool_barrier(llm_pool *p, int nth);

/* Splits [0, n) into nth parts: part ith is [*lo, *hi), each rounded to `align`. */
static inline void split_range(int n, int ith, int nth, int align, int *lo, int *hi) {
  int units = (n + align - 1) / align;
  int per = units / nth, extra = units % nth;
  int u0 = ith * per + (ith < extra ? ith : extra);
  int u1 = u0 + per + (ith < extra ? 1 : 0);
  *lo = u0 * align < n ? u0 * align : n;
  *hi = u1 * align < n ? u1 * align : n;
}

/* ---- Scalar conversions. ---- */
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalise */
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/*
 * The f16 nearest to f: round to nearest even, ±inf past the range, NaN kept a
 * quiet NaN — bit for bit what F16C's _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)
 * gives, so the portable build writes the same f16 KV cache bytes as the AVX2 one.
 */
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds past 65504 */
  if (ax < 0x38800000u) {                                   /* below 2^-14: an f16 subnormal or zero */
    if (ax < 0x33000000u) return (uint16_t)sign;            /* below 2^-25 (2^-25 itself ties to 0) */
    uint32_t m = (ax & 0x7fffff) | 0x800000, shift = 126 - (ax >> 23); /* 14..24: units of 2^-24 */
    uint32_t h = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) h++; /* may carry into the smallest normal: still right */
    return (uint16_t)(sign | h);
  }
  uint32_t r = ax - 0x38000000u; /* rebias the exponent from 127 to 15 */
  uint32_t h = r >> 13, rest = r & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++; /* a carry into the exponent is right too */
  return (uint16_t)(sign | h);
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

#ifdef LLM_AVX2
/* The sum of the 8 lanes. */
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* 8 f16 values as f32 (F16C: exact). */
static inline __m256 load_f16x8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* 8 f32 values stored as f16, rounded to nearest even. */
static inline void store_f16x8(uint16_t *p, __m256 v) {
  _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

/* dst[0..n) = src[0..n) as f16 (round to nearest even). */
static inline void f32_to_f16_row(uint16_t *dst, const float *src, size_t n) {
  size_t i = 0;
#ifdef LLM_AVX2
  for (; i + 8 <= n; i += 8) store_f16x8(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

/* dst[0..n) = src[0..n) (f16) as f32. */
static inline void f16_to_f32_row(float *dst, const uint16_t *src, size_t n) {
  size_t i = 0;
#ifdef LLM_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_f16x8(src + i));
#endif
  for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

/* ---- Kernels (kernels.c, matmul.c). Shapes in comments: rows x columns. ---- */
void k_embedding(float *out, const int32_t *ids, const uint8_t *table, int dtype, int V, int D, int t0, int t1);
void k_rmsnorm(float *out, const float *x, const float *w, int D, float eps, int t0, int t1);
void k_rope(float *out, const float *x, const int32_t *positions, int heads, int head_dim, double theta, int t0,
            int t1);
/* Elements [i0, i1) of rows of F values: each element's result depends on its column only, not on the range. */
void k_silumul(float *out, const float *g, const float *u, size_t i0, size_t i1);
void k_add(float *out, const float *a, const float *b, size_t i0, size_t i1);
/* out[r] = x[rows[r]] for r in [r0, r1), rows of D floats. */
void k_gather_rows(float *out, const float *x, const int32_t *rows, int D, int r0, int r1);

/*
 * Paged attention over a pool of (pageCount * page_size, kvHeads * head_dim) cache
 * rows of kv_dtype (DT_F32, or DT_F16: written rounded to nearest even, read back
 * as f32). Position j of the sequence of page-table row s lives in pool row
 * pages[s * pages_per_seq + j / page_size] * page_size + j % page_size. Every index
 * was checked by the TypeScript side (backends/checks.ts IndexChecks) when written.
 */
typedef struct {
  const float *q;
  void *k_cache, *v_cache;
  float *out;
  const int32_t *positions, *seq_of, *pages;
  int heads, kv_heads, head_dim, window, page_size, pages_per_seq, kv_dtype;
  float scale;
} llm_attn;
/* Writes tokens [t0, t1) of this step's keys k and values v (T, kvHeads * head_dim) at their own rows. */
void k_attention_store(const llm_attn *a, const float *k, const float *v, int t0, int t1);
/* The number of cache rows token t attends over. */
int k_attention_rows(const llm_attn *a, int t);
/* Attention of token t for kv heads [g0, g1) (and the query heads sharing them); see kernels.c. */
void k_attention(const llm_attn *a, int t, int g0, int g1, float *scratch);
/* Floats of scratch k_attention needs per thread when a token attends over at most `max_rows` rows. */
size_t k_attention_scratch(int heads, int kv_heads, int head_dim, int max_rows, int kv_dtype);

/*
 * Quantized activations for quantized matmuls: x (T, K) as blocks of 32 int16
 * quants with one f32 scale each (amax / 32767). 16 bits rather than q8_0's 8:
 * 8-bit activation rounding flips near-tie predictions of low-confidence models,
 * while 16-bit keeps the error near f32's and the block dot products exact in int32.
 */
typedef struct {
  int16_t *q; /* T * K quants */
  float *d;   /* T * K / 32 scales */
  int32_t *s; /* T * K / 32 sums of each block's quants (q4_0 applies its -8 offset as -8 * s) */
} llm_xq;
void quantize_rows_x16(const float *x, int K, int t0, int t1, llm_xq *xq);

/*
 * Quantized matmuls with fewer tokens than this stream each weight row once with
 * exact int32 block dots; from this many on they widen panels of MM_PANEL_ROWS weight
 * rows to int16 once and share them across all tokens in an int16 GEMM micro-kernel.
 * Both read the int16 activations xq and accumulate each output in the same order
 * (see matmul.c), so a row's result is the same bits whichever runs it, whatever
 * else shares the step.
 */
#define MM_GEMM_MIN_T 4
/* Weight rows per panel of that GEMM: threads split N in multiples of it. */
#define MM_PANEL_ROWS 32

/*
 * Float matmul tiles: MM_RT tokens x MM_RN weight rows per register tile, 12
 * accumulators. Measured at T = 16 and 64 (K = 768, N = 2048, f32, one core), in
 * GFLOP/s: 3 x 4 76 and 74 (AVX2 build 76, 69), 4 x 4 57 (GCC spills an accumulator),
 * 4 x 3 47 (AVX2 59), 2 x 4 54 (AVX2 77); the outer-product panels they replace: 70-80.
 */
#define MM_RT 3
#define MM_RN 4

/*
 * out (T, N) = x (T, K) · W (N, K)ᵀ for rows n in [n0, n1). `scratch` holds MM_RN * K
 * floats (f16/bf16 weight rows converted once for all of a step's tokens).
 */
void mm_float(float *out, const float *x, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1,
              float *scratch);
/* The same for q8_0 / q4_0 W, with x given as xq (filled by quantize_rows_x16). */
void mm_quant(float *out, const llm_xq *xq, const uint8_t *w, int dtype, int T, int K, int N, int n0, int n1);

#endif
