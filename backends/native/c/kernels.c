/*
 * Row-wise kernels: embedding, RMSNorm, RoPE, SwiGLU, add, gatherRows, and fused
 * paged attention. Each takes a range of rows (or elements, or work items) so the
 * caller can split it between threads. All arithmetic stays f32 except where noted
 * (RoPE angles in f64, as the reference computes them).
 *
 * A row's result never depends on the other rows of the step or on how the range
 * was split: a sequence gets the same bits alone or batched with others.
 */
#include <math.h>
#include <string.h>

#include "llm.h"

#ifdef LLM_AVX2
/*
 * exp(x) for 8 lanes: range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
 * polynomial (Cephes expf), relative error about 2e-7, same as libm's expf to
 * the tolerance the kernels need. Inputs are clamped to the finite range.
 */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/*
 * exp8 for one value, operation for operation (the same fused multiply-adds and
 * roundings), so an element gets the same bits whether it falls in a vector or in
 * the scalar tail of a range (which depends on how a step's elements were split).
 */
static inline float exp1(float x) {
  x = fminf(fmaxf(x, -87.3f), 88.3f);
  float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(-n, 0.693359375f, x);
  r = fmaf(-n, -2.12194440e-4f, r);
  float p = 1.9875691500E-4f;
  p = fmaf(p, r, 1.3981999507E-3f);
  p = fmaf(p, r, 8.3334519073E-3f);
  p = fmaf(p, r, 4.1665795894E-2f);
  p = fmaf(p, r, 1.6666665459E-1f);
  p = fmaf(p, r, 5.0000001201E-1f);
  float r2 = r * r;
  p = fmaf(p, r2, r + 1.0f);
  uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}
#endif

/* Dot product of two f32 vectors of length n. */
static inline float dot_f32(const float *a, const float *b, int n) {
  int i = 0;
  float s = 0;
#ifdef LLM_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* y += a * x over n floats. */
static inline void axpy_f32(float *y, float a, const float *x, int n) {
  int i = 0;
#ifdef LLM_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; i++) y[i] += a * x[i];
}

/* out (T, D) = table (V, D) rows ids[t], decoded to f32. Ids were range-checked by the caller. */
void k_embedding(float *out, const int32_t *ids, const uint8_t *table, int dtype, int V, int D, int t0, int t1) {
  for (int t = t0; t < t1; t++) {
    int id = ids[t];
    if (id < 0 || id >= V) id = 0; /* unreachable after the caller's check; keeps reads in bounds */
    float *o = out + (size_t)t * D;
    size_t base = (size_t)id * D;
    switch (dtype) {
      case DT_F32:
        memcpy(o, (const float *)table + base, (size_t)D * 4);
        break;
      case DT_F16:
        for (int d = 0; d < D; d++) o[d] = f16_to_f32(((const uint16_t *)table)[base + d]);
        break;
      case DT_BF16:
        for (int d = 0; d < D; d++) o[d] = bf16_to_f32(((const uint16_t *)table)[base + d]);
        break;
      case DT_Q8_0: {
        const int8_t *q = (const int8_t *)table + base;
        const uint16_t *sc = (const uint16_t *)(table + (size_t)V * D) + base / QK;
        for (int d = 0; d < D; d++) o[d] = q[d] * f16_to_f32(sc[d / QK]);
        break;
      }
      case DT_Q4_0: {
        const uint8_t *q = table + base / 2;
        const uint16_t *sc = (const uint16_t *)(table + (size_t)V * D / 2) + base / QK;
        for (int b = 0; b < D / QK; b++) {
          float s = f16_to_f32(sc[b]);
          for (int j = 0; j < QK / 2; j++) {
            uint8_t byte = q[b * QK / 2 + j];
            o[b * QK + j] = ((int)(byte & 15) - 8) * s;
            o[b * QK + j + QK / 2] = ((int)(byte >> 4) - 8) * s;
          }
        }
        break;
      }
    }
  }
}

/* out (T, D) = x / sqrt(mean(x^2) + eps) * w, rows [t0, t1). */
void k_rmsnorm(float *out, const float *x, const float *w, int D, float eps, int t0, int t1) {
  for (int t = t0; t < t1; t++) {
    const float *xr = x + (size_t)t * D;
    float *o = out + (size_t)t * D;
    float inv = (float)(1.0 / sqrt((double)dot_f32(xr, xr, D) / D + eps));
    int d = 0;
#ifdef LLM_AVX2
    __m256 vi = _mm256_set1_ps(inv);
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), vi), _mm256_loadu_ps(w + d)));
#endif
    for (; d < D; d++) o[d] = xr[d] * inv * w[d];
  }
}

/*
 * Rotate-half RoPE on x (T, heads * head_dim), rows [t0, t1): element i < d/2 of
 * each head pairs with i + d/2, angle positions[t] * theta^(-2i/d). The angle and
 * its cos/sin are computed in f64 once per (t, i) and shared by all heads.
 */
void k_rope(float *out, const float *x, const int32_t *positions, int heads, int head_dim, double theta, int t0,
            int t1) {
  int half = head_dim / 2, width = heads * head_dim;
  float cs[512], sn[512]; /* half <= 512 is checked by the TypeScript side */
  for (int t = t0; t < t1; t++) {
    double pos = (double)positions[t];
    for (int i = 0; i < half; i++) {
      double angle = pos * pow(theta, -2.0 * i / head_dim);
      cs[i] = (float)cos(angle);
      sn[i] = (float)sin(angle);
    }
    const float *xr = x + (size_t)t * width;
    float *o = out + (size_t)t * width;
    for (int h = 0; h < heads; h++) {
      const float *a = xr + h * head_dim;
      float *oa = o + h * head_dim;
      for (int i = 0; i < half; i++) {
        float x0 = a[i], x1 = a[i + half];
        oa[i] = x0 * cs[i] - x1 * sn[i];
        oa[i + half] = x1 * cs[i] + x0 * sn[i];
      }
    }
  }
}

/* out = silu(g) * u over elements [i0, i1). */
void k_silumul(float *out, const float *g, const float *u, size_t i0, size_t i1) {
  size_t i = i0;
#ifdef LLM_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= i1; i += 8) {
    __m256 vg = _mm256_loadu_ps(g + i);
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), vg));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(vg, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
#endif
#ifdef LLM_AVX2
  for (; i < i1; i++) out[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
#else
  for (; i < i1; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#endif
}

/* out = a + b over elements [i0, i1). */
void k_add(float *out, const float *a, const float *b, size_t i0, size_t i1) {
  size_t i = i0;
#ifdef LLM_AVX2
  for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
#endif
  for (; i < i1; i++) out[i] = a[i] + b[i];
}

void k_gather_rows(float *out, const float *x, const int32_t *rows, int D, int r0, int r1) {
  for (int r = r0; r < r1; r++) memcpy(out + (size_t)r * D, x + (size_t)rows[r] * D, (size_t)D * sizeof(float));
}

/* In-place exp(x - max) over n scores; returns their sum. */
static float softmax_exp(float *s, int n, float max) {
  int i = 0;
  float sum = 0;
#ifdef LLM_AVX2
  __m256 vm = _mm256_set1_ps(max), acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; i < n; i++) {
    s[i] = expf(s[i] - max);
    sum += s[i];
  }
  return sum;
}

/* The pool row of position j of a sequence whose page-table row is `table`. */
static inline size_t pool_row(const llm_attn *a, const int32_t *table, int j) {
  return (size_t)table[j / a->page_size] * (size_t)a->page_size + (size_t)(j % a->page_size);
}

/* Each token's key and value go to its own row, in the cache's dtype: f16 rounds to nearest even (F16C). */
void k_attention_store(const llm_attn *a, const float *k, const float *v, int t0, int t1) {
  size_t kv_dim = (size_t)a->kv_heads * a->head_dim;
  for (int t = t0; t < t1; t++) {
    const int32_t *table = a->pages + (size_t)a->seq_of[t] * a->pages_per_seq;
    size_t off = pool_row(a, table, a->positions[t]) * kv_dim;
    const float *ks = k + (size_t)t * kv_dim, *vs = v + (size_t)t * kv_dim;
    if (a->kv_dtype == DT_F16) {
      f32_to_f16_row((uint16_t *)a->k_cache + off, ks, kv_dim);
      f32_to_f16_row((uint16_t *)a->v_cache + off, vs, kv_dim);
    } else {
      memcpy((float *)a->k_cache + off, ks, kv_dim * sizeof(float));
      memcpy((float *)a->v_cache + off, vs, kv_dim * sizeof(float));
    }
  }
}

/* The first position token t attends to (its window's start). */
static inline int attention_start(const llm_attn *a, int p) {
  return a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
}

int k_attention_rows(const llm_attn *a, int t) {
  int p = a->positions[t];
  return p - attention_start(a, p) + 1;
}

/*
 * A walk over the pool rows of consecutive positions of one sequence: the page's
 * first row is looked up once per page, so stepping to the next row is an add (no
 * division per row). `page` never reads past the sequence's page-table row.
 */
typedef struct {
  const int32_t *table;
  int page_size, pages, page, offset;
  size_t base;
} kv_walk;

static inline void walk_start(kv_walk *w, const llm_attn *a, const int32_t *table, int j) {
  w->table = table;
  w->page_size = a->page_size;
  w->pages = a->pages_per_seq;
  w->page = j / a->page_size;
  w->offset = j % a->page_size;
  w->base = w->page < w->pages ? (size_t)table[w->page] * (size_t)a->page_size : 0;
}

static inline size_t walk_row(const kv_walk *w) { return w->base + (size_t)w->offset; }

static inline void walk_next(kv_walk *w) {
  if (++w->offset < w->page_size) return;
  w->offset = 0;
  w->base = ++w->page < w->pages ? (size_t)w->table[w->page] * (size_t)w->page_size : 0;
}

/*
 * Prefetching of cache rows: a head's slice of consecutive rows is kv_dim values
 * apart (a new page every row or two), which the hardware prefetchers do not
 * follow, so without it decode at long contexts waits on memory for every row
 * (measured 4x slower at 8K rows). Rows are fetched about this many multiply-adds
 * of work ahead (group * head_dim per row; measured best for 64 to 512 per row),
 * clamped to 4..32 rows. Pool pages need not be adjacent, so the rows ahead are
 * found through the page table by a second walk.
 */
#define KV_AHEAD_WORK 2048

/* always_inline: GCC 12 deemed a call to it free of side effects and dropped it. */
static inline __attribute__((always_inline)) void prefetch_bytes(const void *p, size_t bytes) {
#ifdef LLM_AVX2
  /* Every line the bytes touch, from the one holding the first. */
  const char *s = (const char *)p;
  size_t skew = (uintptr_t)s & 63;
  for (size_t l = 0; l < bytes + skew; l += 64) _mm_prefetch(s - skew + l, _MM_HINT_T0);
#else
  (void)p; /* the portable build has no portable prefetch */
  (void)bytes;
#endif
}

/* Scores (heads * rows), accumulators (heads * head_dim), and for f16 one row converted to f32 (kv_dim). */
size_t k_attention_scratch(int heads, int kv_heads, int head_dim, int max_rows, int kv_dtype) {
  size_t kv_dim = (size_t)kv_heads * head_dim;
  return (size_t)heads * (size_t)max_rows + (size_t)heads * (size_t)head_dim + (kv_dtype == DT_F16 ? kv_dim : 0);
}

/*
 * Fused causal attention of token t for kv heads [g0, g1), each with the
 * `heads / kvHeads` query heads that share it, so each cache row is loaded once for
 * all of them: a range of heads reads one contiguous stretch of each row, all of
 * them the whole row, which streams from memory far better than one head's slice.
 * For query head h:
 *   out[t, h] = softmax(scale * q[t, h] · K[rows]ᵀ) · V[rows],
 *   rows: positions max(0, p - window + 1) .. p of t's sequence, p = positions[t]
 *   (all positions up to p if window is 0),
 * read through the sequence's page table. K and V already hold this step's rows. An
 * f16 cache row is converted to f32 once (F16C) into scratch and then shared by the
 * heads' dot products and accumulations, all in f32. Each head is computed the same
 * way whatever range it is in, so its output has the same bits. Rows ahead are
 * prefetched. `f16` is a constant at each call, so each instance has no dtype branch
 * in its loops.
 */
static inline __attribute__((always_inline)) void attention_dt(const llm_attn *a, int t, int g0, int g1, float *scratch,
                                                               const int f16) {
  int group = a->heads / a->kv_heads, hd = a->head_dim, qh = (g1 - g0) * group;
  size_t kv_dim = (size_t)a->kv_heads * hd, first = (size_t)g0 * hd, width = (size_t)(g1 - g0) * hd;
  int p = a->positions[t];
  int start = attention_start(a, p);
  int n = p - start + 1;
  const int32_t *table = a->pages + (size_t)a->seq_of[t] * a->pages_per_seq;
  float *scores = scratch;               /* qh * n */
  float *acc = scratch + (size_t)qh * n; /* qh * hd */
  float *row = acc + (size_t)qh * hd;    /* width, f16 only */
  const float *q0 = a->q + ((size_t)t * a->heads + (size_t)g0 * group) * hd;
  const size_t esize = f16 ? 2 : 4;
  int ahead = KV_AHEAD_WORK / (qh * hd);
  ahead = ahead < 4 ? 4 : ahead > 32 ? 32 : ahead;
  kv_walk at, pf;
  /* The first rows before the loop (at short contexts, most of them), then each row `ahead` before its turn;
     the first rows of V too, which the V pass reaches soon after. */
  walk_start(&pf, a, table, start);
  for (int j = 0; j < ahead && j < n; j++, walk_next(&pf)) {
    prefetch_bytes((const char *)a->k_cache + (walk_row(&pf) * kv_dim + first) * esize, width * esize);
  }
  walk_start(&at, a, table, start);
  for (int j = 0; j < n; j++, walk_next(&at)) {
    size_t off = walk_row(&at) * kv_dim + first;
    if (j + ahead < n) {
      prefetch_bytes((const char *)a->k_cache + (walk_row(&pf) * kv_dim + first) * esize, width * esize);
      walk_next(&pf);
    }
    if (j < ahead) prefetch_bytes((const char *)a->v_cache + off * esize, width * esize);
    const float *kr = f16 ? row : (const float *)a->k_cache + off;
    if (f16) f16_to_f32_row(row, (const uint16_t *)a->k_cache + off, width);
    for (int g = 0, hh = 0; g < g1 - g0; g++)
      for (int h = 0; h < group; h++, hh++) scores[hh * n + j] = dot_f32(q0 + hh * hd, kr + g * hd, hd) * a->scale;
  }
  for (int hh = 0; hh < qh; hh++) {
    float *s = scores + (size_t)hh * n;
    float max = s[0];
    for (int j = 1; j < n; j++) max = s[j] > max ? s[j] : max;
    float sum = softmax_exp(s, n, max);
    float inv = 1.0f / sum;
    for (int j = 0; j < n; j++) s[j] *= inv;
    memset(acc + (size_t)hh * hd, 0, (size_t)hd * sizeof(float));
  }
  walk_start(&at, a, table, start);
  walk_start(&pf, a, table, start + ahead);
  for (int j = 0; j < n; j++, walk_next(&at)) {
    size_t off = walk_row(&at) * kv_dim + first;
    if (j + ahead < n) {
      prefetch_bytes((const char *)a->v_cache + (walk_row(&pf) * kv_dim + first) * esize, width * esize);
      walk_next(&pf);
    }
    const float *vr = f16 ? row : (const float *)a->v_cache + off;
    if (f16) f16_to_f32_row(row, (const uint16_t *)a->v_cache + off, width);
    for (int g = 0, hh = 0; g < g1 - g0; g++)
      for (int h = 0; h < group; h++, hh++) axpy_f32(acc + (size_t)hh * hd, scores[hh * n + j], vr + g * hd, hd);
  }
  float *o = a->out + ((size_t)t * a->heads + (size_t)g0 * group) * hd;
  memcpy(o, acc, (size_t)qh * hd * sizeof(float));
}

void k_attention(const llm_attn *a, int t, int g0, int g1, float *scratch) {
  if (a->kv_dtype == DT_F16) attention_dt(a, t, g0, g1, scratch, 1);
  else attention_dt(a, t, g0, g1, scratch, 0);
}
