/*
 * The exported API: memory, thread pools, encoded plans ("executables") and the
 * step interpreter, plus a memory-bandwidth probe. Every function here is called
 * from backends/native/ through Deno FFI; that side checks every shape, offset and
 * index (token ids, positions, page tables, rows) before it reaches a kernel, so
 * the kernels trust their arguments.
 *
 * Node parameters (llm_node, written by backends/native/encoder.ts):
 *   embedding  in: ids, table                    p: D, V
 *   rmsNorm    in: x, w                          p: D            f: eps
 *   matmul     in: x, W                          p: K, N
 *   rope       in: x, positions                  p: heads, headDim, theta (f64 in p[6..7])
 *   siluMul    in: gate, up                      p: F
 *   add        in: a, b                          p: F
 *   gatherRows in: x, rows                       p: D
 *   attention  in: q, k, v, kCache, vCache, positions, seqOf, pages
 *              p: heads, kvHeads, headDim, window, pageSize, pagesPerSeq   f: scale
 */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llm.h"

#ifndef LLM_ABI
#define LLM_ABI "unversioned"
#endif

typedef struct {
  int nnodes, ntensors, threads, ndims;
  int32_t max_dims[LLM_MAX_DIMS];
  llm_node *nodes;
  uint8_t **ptr; /* tensor id -> address */
  llm_xq xq;     /* quantized activations, shared by the threads of a matmul */
  float *attn_scratch;
  size_t attn_per_thread; /* floats */
  float *mm_scratch;      /* f16/bf16 weight rows converted for a batch, per thread */
  size_t mm_per_thread;   /* floats */
  int32_t *attn_order;    /* a step's tokens, most attention rows first */
  /* [0]: the last step's milliseconds; [1 + i]: node i's, when the step was profiled. */
  double *times;
  /*
   * One work counter per node: matmul and attention hand out their work in
   * chunks that threads claim from it, so a thread that loses its core for a
   * while (a busy shared machine) delays its current chunk only, not a fixed
   * half of the op.
   */
  atomic_int *claim;
  /* The step being run. */
  llm_pool *pool;
  int32_t dims[LLM_MAX_DIMS];
  int from, to, profile;
} llm_exec;

/* Claims chunks of node `i` until none is left; returns -1 when done. */
static inline int claim_chunk(llm_exec *e, int i, int nchunks) {
  int c = atomic_fetch_add_explicit(&e->claim[i], 1, memory_order_relaxed);
  return c < nchunks ? c : -1;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* ---- Memory ---- */

LLM_EXPORT const char *llm_abi(void) { return LLM_ABI; }

/* Bit 0: AVX2+FMA+F16C kernels compiled in. */
LLM_EXPORT uint32_t llm_features(void) {
#ifdef LLM_AVX2
  return 1;
#else
  return 0;
#endif
}

/* Zero-filled memory aligned to 64 bytes (a cache line, any SIMD load). NULL on failure. */
LLM_EXPORT void *llm_alloc(size_t bytes) {
  size_t n = (bytes + 63) & ~(size_t)63;
  void *p = aligned_alloc(64, n ? n : 64);
  if (p) memset(p, 0, n ? n : 64);
  return p;
}

LLM_EXPORT void llm_free(void *p) { free(p); }

/* ---- Thread pools ---- */

LLM_EXPORT void *llm_pool_new(int32_t threads) { return pool_create(threads); }
LLM_EXPORT void llm_pool_free(void *p) { pool_destroy(p); }
LLM_EXPORT int32_t llm_pool_size(void *p) { return pool_size(p); }

/* ---- Executables ---- */

/* A row count of a node: a fixed number, or -1 - k for the step's (or the plan's largest) dimension k. */
static inline int rows_in(const int32_t *dims, int rows) { return rows < 0 ? dims[-1 - rows] : rows; }
static inline int rows_of(const llm_exec *e, int rows) { return rows_in(e->dims, rows); }

/* The most cache rows one token of an attention node attends over. */
static inline int attention_max_rows(const llm_node *n) {
  int reach = n->p[4] * n->p[5], window = n->p[3];
  return window > 0 && window < reach ? window : reach;
}

LLM_EXPORT void llm_exec_free(void *p);

/*
 * Encodes a plan: `nodes` holds nnodes records of LLM_NODE_INTS int32 (layout of
 * llm_node), `addrs` the address of every tensor id (0 for ids no node uses),
 * `max_dims` the plan's largest value of each of its ndims symbolic dimensions.
 * Scratch for quantized activations, converted weights, attention scores and the
 * attention order is sized here, once, for the largest step.
 */
LLM_EXPORT void *llm_exec_new(const int32_t *nodes, int32_t nnodes, const uint64_t *addrs, int32_t ntensors,
                              const int32_t *max_dims, int32_t ndims, int32_t threads) {
  if (ndims < 0 || ndims > LLM_MAX_DIMS || nnodes < 0 || ntensors < 0) return NULL;
  llm_exec *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  e->nnodes = nnodes;
  e->ntensors = ntensors;
  e->ndims = ndims;
  for (int k = 0; k < ndims; k++) e->max_dims[k] = max_dims[k];
  e->threads = threads < 1 ? 1 : threads;
  e->nodes = malloc(sizeof(llm_node) * (size_t)(nnodes ? nnodes : 1));
  e->ptr = malloc(sizeof(uint8_t *) * (size_t)(ntensors ? ntensors : 1));
  e->claim = calloc((size_t)(nnodes ? nnodes : 1), sizeof(atomic_int));
  e->times = calloc((size_t)nnodes + 1, sizeof(double));
  if (!e->nodes || !e->ptr || !e->claim || !e->times) goto fail;
  memcpy(e->nodes, nodes, sizeof(llm_node) * (size_t)nnodes);
  for (int i = 0; i < ntensors; i++) e->ptr[i] = (uint8_t *)(uintptr_t)addrs[i];
  size_t xq_elems = 0, attn = 0, mm = 0, order = 0;
  for (int i = 0; i < nnodes; i++) {
    const llm_node *n = &e->nodes[i];
    if (n->rows < -ndims) goto fail; /* names a dimension the step does not pass */
    size_t rows = (size_t)rows_in(e->max_dims, n->rows);
    if (n->op == OP_MATMUL && (n->dtype == DT_Q8_0 || n->dtype == DT_Q4_0)) {
      size_t el = rows * (size_t)n->p[0];
      if (el > xq_elems) xq_elems = el;
    }
    if (n->op == OP_MATMUL && (n->dtype == DT_F16 || n->dtype == DT_BF16) && rows > MM_RT) {
      size_t el = (size_t)MM_RN * (size_t)n->p[0];
      if (el > mm) mm = el;
    }
    if (n->op == OP_ATTENTION) {
      size_t need = k_attention_scratch(n->p[0], n->p[1], n->p[2], attention_max_rows(n), n->dtype);
      if (need > attn) attn = need;
      if (rows > order) order = rows;
    }
  }
  if (xq_elems) {
    e->xq.q = llm_alloc(xq_elems * sizeof(int16_t));
    e->xq.d = llm_alloc(xq_elems / QK * sizeof(float));
    e->xq.s = llm_alloc(xq_elems / QK * sizeof(int32_t));
    if (!e->xq.q || !e->xq.d || !e->xq.s) goto fail;
  }
  if (attn) {
    e->attn_per_thread = (attn + 15) & ~(size_t)15;
    e->attn_scratch = llm_alloc(e->attn_per_thread * sizeof(float) * (size_t)e->threads);
    e->attn_order = llm_alloc(order * sizeof(int32_t));
    if (!e->attn_scratch || !e->attn_order) goto fail;
  }
  if (mm) {
    e->mm_per_thread = (mm + 15) & ~(size_t)15;
    e->mm_scratch = llm_alloc(e->mm_per_thread * sizeof(float) * (size_t)e->threads);
    if (!e->mm_scratch) goto fail;
  }
  return e;
fail:
  llm_exec_free(e); /* frees whatever was allocated: the rest is NULL (calloc) */
  return NULL;
}

LLM_EXPORT void llm_exec_free(void *p) {
  llm_exec *e = p;
  if (!e) return;
  free(e->claim);
  free(e->nodes);
  free(e->ptr);
  free(e->times);
  free(e->xq.q);
  free(e->xq.d);
  free(e->xq.s);
  free(e->attn_scratch);
  free(e->attn_order);
  free(e->mm_scratch);
  free(e);
}

/* The executable's timings (nnodes + 1 doubles, see llm_exec.times), valid while it lives. */
LLM_EXPORT double *llm_exec_times(void *p) { return p ? ((llm_exec *)p)->times : NULL; }

/* Threads worth using for an op of `work` multiply-adds: tiny ops stay on thread 0. */
static inline int op_threads(double work, int nth) { return work < 32768.0 ? 1 : nth; }

/* Splits n rows into chunks of `align`-multiples: about 4 per thread, so a slow thread can be covered. */
static inline int chunk_rows(int n, int nth, int align) {
  int per = (n + 4 * nth - 1) / (4 * nth);
  per = (per + align - 1) / align * align;
  return per < align ? align : per;
}

/*
 * Orders tokens [0, T) by the rows they attend over, most first (Shell sort, in
 * place: T is at most the plan's largest step), so that the heaviest items are
 * claimed first and the last ones claimed are short: a batch of sequences of
 * different lengths ends with the threads finishing together.
 */
static void order_by_rows(const llm_attn *a, int32_t *order, int T) {
  for (int t = 0; t < T; t++) order[t] = t;
  for (int gap = T / 2; gap > 0; gap /= 2) {
    for (int i = gap; i < T; i++) {
      int32_t v = order[i];
      int rows = k_attention_rows(a, v), j = i;
      while (j >= gap && k_attention_rows(a, order[j - gap]) < rows) {
        order[j] = order[j - gap];
        j -= gap;
      }
      order[j] = v;
    }
  }
}

static void run_attention(llm_exec *e, int idx, int ith, int nth) {
  const llm_node *n = &e->nodes[idx];
  uint8_t **P = e->ptr;
  int T = rows_of(e, n->rows);
  llm_attn a;
  a.heads = n->p[0];
  a.kv_heads = n->p[1];
  a.head_dim = n->p[2];
  a.window = n->p[3];
  a.page_size = n->p[4];
  a.pages_per_seq = n->p[5];
  a.scale = n->f[0];
  a.kv_dtype = n->dtype;
  a.q = (const float *)P[n->in[0]];
  a.k_cache = P[n->in[3]];
  a.v_cache = P[n->in[4]];
  a.positions = (const int32_t *)P[n->in[5]];
  a.seq_of = (const int32_t *)P[n->in[6]];
  a.pages = (const int32_t *)P[n->in[7]];
  a.out = (float *)P[n->out];
  /* Every thread sums the same rows, so all agree on how many take part. */
  double rows = 0;
  for (int t = 0; t < T; t++) rows += k_attention_rows(&a, t);
  int use = op_threads(rows * a.heads * a.head_dim * 2, nth);
  /* First every token's key and value into the pool, then (after a barrier) attend. */
  int lo, hi;
  if (ith < use) {
    split_range(T, ith, use, 1, &lo, &hi);
    k_attention_store(&a, (const float *)P[n->in[1]], (const float *)P[n->in[2]], lo, hi);
  }
  if (ith == 0) order_by_rows(&a, e->attn_order, T);
  pool_barrier(e->pool, nth);
  if (ith >= use) return;
  float *scratch = e->attn_scratch + e->attn_per_thread * (size_t)ith;
  /*
   * Items of one token and a group of its kv heads, claimed one at a time, heaviest
   * tokens first. As few groups as still give every thread about 4 items: a group
   * reads a contiguous stretch of each cache row, the whole row in one group, which
   * streams from memory better than many heads' slices (measured 15-25% faster for
   * 16 tokens at 200-1000 rows than one item per head); one token alone gets one
   * item per kv head, so it still spreads over the threads.
   */
  int groups = (4 * use + T - 1) / T;
  groups = groups > a.kv_heads ? a.kv_heads : groups;
  int items = T * groups;
  for (int w; (w = claim_chunk(e, idx, items)) >= 0;) {
    int gi = w % groups;
    k_attention(&a, e->attn_order[w / groups], gi * a.kv_heads / groups, (gi + 1) * a.kv_heads / groups, scratch);
  }
}

static void run_matmul(llm_exec *e, int idx, int ith, int nth) {
  const llm_node *n = &e->nodes[idx];
  uint8_t **P = e->ptr;
  float *out = (float *)P[n->out];
  int R = rows_of(e, n->rows);
  int K = n->p[0], N = n->p[1], lo, hi;
  const float *x = (const float *)P[n->in[0]];
  int use = op_threads((double)R * K * N, nth);
  if (n->dtype == DT_Q8_0 || n->dtype == DT_Q4_0) {
    /* Quantize the activations once, split by rows, before any thread reads them. */
    int qu = R >= nth ? use : 1;
    if (ith < qu) {
      split_range(R, ith, qu, 1, &lo, &hi);
      quantize_rows_x16(x, K, lo, hi, &e->xq);
    }
    pool_barrier(e->pool, nth);
    if (ith >= use) return;
    /* Chunks of whole 32-row panels of the int16 GEMM (MM_PANEL_ROWS). */
    int rows = chunk_rows(N, use, MM_PANEL_ROWS), nchunks = (N + rows - 1) / rows;
    for (int c; (c = claim_chunk(e, idx, nchunks)) >= 0;) {
      lo = c * rows;
      hi = lo + rows < N ? lo + rows : N;
      mm_quant(out, &e->xq, P[n->in[1]], n->dtype, R, K, N, lo, hi);
    }
    return;
  }
  if (ith >= use) return;
  float *scratch = e->mm_scratch ? e->mm_scratch + e->mm_per_thread * (size_t)ith : NULL;
  if (use == 1) {
    mm_float(out, x, P[n->in[1]], n->dtype, R, K, N, 0, N, scratch);
    return;
  }
  int rows = chunk_rows(N, use, 4 * MM_RN), nchunks = (N + rows - 1) / rows;
  for (int c; (c = claim_chunk(e, idx, nchunks)) >= 0;) {
    lo = c * rows;
    hi = lo + rows < N ? lo + rows : N;
    mm_float(out, x, P[n->in[1]], n->dtype, R, K, N, lo, hi, scratch);
  }
}

static void run_node(llm_exec *e, int idx, int ith, int nth) {
  const llm_node *n = &e->nodes[idx];
  uint8_t **P = e->ptr;
  float *out = (float *)P[n->out];
  int R = rows_of(e, n->rows);
  int lo, hi;
  switch (n->op) {
    case OP_EMBEDDING: {
      int use = op_threads((double)R * n->p[0], nth);
      if (ith >= use) return;
      split_range(R, ith, use, 1, &lo, &hi);
      k_embedding(out, (const int32_t *)P[n->in[0]], P[n->in[1]], n->dtype, n->p[1], n->p[0], lo, hi);
      return;
    }
    case OP_RMSNORM: {
      int use = op_threads((double)R * n->p[0] * 4, nth);
      if (ith >= use) return;
      split_range(R, ith, use, 1, &lo, &hi);
      k_rmsnorm(out, (const float *)P[n->in[0]], (const float *)P[n->in[1]], n->p[0], n->f[0], lo, hi);
      return;
    }
    case OP_MATMUL:
      run_matmul(e, idx, ith, nth);
      return;
    case OP_ROPE: {
      int use = op_threads((double)R * n->p[0] * n->p[1] * 8, nth);
      if (ith >= use) return;
      double theta;
      memcpy(&theta, &n->p[6], sizeof theta);
      split_range(R, ith, use, 1, &lo, &hi);
      k_rope(out, (const float *)P[n->in[0]], (const int32_t *)P[n->in[1]], n->p[0], n->p[1], theta, lo, hi);
      return;
    }
    case OP_SILUMUL:
    case OP_ADD: {
      size_t total = (size_t)R * (size_t)n->p[0];
      int use = op_threads((double)total * (n->op == OP_SILUMUL ? 8 : 1), nth);
      if (ith >= use) return;
      split_range((int)total, ith, use, 16, &lo, &hi);
      if (n->op == OP_ADD) k_add(out, (const float *)P[n->in[0]], (const float *)P[n->in[1]], lo, hi);
      else k_silumul(out, (const float *)P[n->in[0]], (const float *)P[n->in[1]], lo, hi);
      return;
    }
    case OP_GATHER_ROWS: {
      int use = op_threads((double)R * n->p[0], nth);
      if (ith >= use) return;
      split_range(R, ith, use, 1, &lo, &hi);
      k_gather_rows(out, (const float *)P[n->in[0]], (const int32_t *)P[n->in[1]], n->p[0], lo, hi);
      return;
    }
    case OP_ATTENTION:
      run_attention(e, idx, ith, nth);
      return;
  }
}

static void step_task(void *arg, int ith, int nth) {
  llm_exec *e = arg;
  double t0 = ith == 0 && e->profile ? now_ms() : 0;
  for (int i = e->from; i < e->to; i++) {
    run_node(e, i, ith, nth);
    /* Profiled, the last node waits too: its time ends when every thread is done with it. */
    if (i + 1 < e->to || e->profile) pool_barrier(e->pool, nth);
    if (ith == 0 && e->profile) {
      double t1 = now_ms();
      e->times[1 + i] = t1 - t0;
      t0 = t1;
    }
  }
}

/*
 * Runs nodes [from, to) of the plan for a step whose symbolic dimensions have the
 * values d0..d3 (the first ndims are read), on `threads` threads of `pool` (1: the
 * calling thread alone, workers stay parked). Writes the step's milliseconds to
 * times[0] and, when `profile` is set, each node's to times[1 + i]. Returns 0, or
 * -1 when the arguments are out of the ranges the plan was made for.
 *
 * It may run on a thread other than the one that made the executable (a
 * nonblocking FFI call): nothing here touches JavaScript, and the caller keeps
 * every buffer of the plan alive and untouched until it returns.
 */
LLM_EXPORT int32_t llm_run(void *exec, void *pool, int32_t threads, int32_t from, int32_t to, int32_t d0, int32_t d1,
                           int32_t d2, int32_t d3, int32_t profile) {
  llm_exec *e = exec;
  if (!e || from < 0 || to > e->nnodes || from > to) return -1;
  const int32_t dims[LLM_MAX_DIMS] = {d0, d1, d2, d3};
  for (int k = 0; k < e->ndims; k++)
    if (dims[k] < 1 || dims[k] > e->max_dims[k]) return -1;
  if (threads > e->threads) threads = e->threads;
  if (threads > pool_size(pool)) threads = pool_size(pool);
  if (threads < 1) threads = 1;
  for (int i = from; i < to; i++) atomic_store_explicit(&e->claim[i], 0, memory_order_relaxed);
  e->pool = pool;
  for (int k = 0; k < LLM_MAX_DIMS; k++) e->dims[k] = k < e->ndims ? dims[k] : 0;
  e->from = from;
  e->to = to;
  e->profile = profile != 0;
  double t0 = now_ms();
  pool_run(pool, step_task, e, threads);
  e->times[0] = now_ms() - t0;
  return 0;
}

/* ---- Memory read bandwidth ---- */

typedef struct {
  const float *data;
  size_t n;
  double sums[64];
} bw_job;

static void bw_task(void *arg, int ith, int nth) {
  bw_job *j = arg;
  size_t per = j->n / (size_t)nth, lo = per * (size_t)ith, hi = ith == nth - 1 ? j->n : lo + per;
  const float *d = j->data;
  size_t i = lo;
#ifdef LLM_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= hi; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(d + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(d + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(d + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(d + i + 24));
  }
  float tmp[8];
  _mm256_storeu_ps(tmp, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  double s = 0;
  for (int k = 0; k < 8; k++) s += tmp[k];
#else
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; i + 4 <= hi; i += 4) {
    s0 += d[i];
    s1 += d[i + 1];
    s2 += d[i + 2];
    s3 += d[i + 3];
  }
  double s = (double)s0 + s1 + s2 + s3;
#endif
  for (; i < hi; i++) s += d[i];
  j->sums[ith] = s;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/*
 * Reads a float array of `bytes` bytes `reps` times with `threads` threads of
 * `pool`; returns the best rate in GB/s (1e9 bytes/s), or -1 if memory is short.
 */
LLM_EXPORT double llm_read_bandwidth(void *pool, size_t bytes, int32_t threads, int32_t reps) {
  bw_job j;
  memset(&j, 0, sizeof j);
  j.n = bytes / sizeof(float);
  float *data = llm_alloc(j.n * sizeof(float));
  if (!data) return -1;
  for (size_t i = 0; i < j.n; i++) data[i] = 1.0f;
  j.data = data;
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  double best = 0, check = 0;
  for (int r = 0; r < (reps < 1 ? 1 : reps); r++) {
    double t0 = now_s();
    pool_run(pool, bw_task, &j, threads);
    double dt = now_s() - t0;
    for (int i = 0; i < threads; i++) check += j.sums[i];
    double rate = (double)(j.n * sizeof(float)) / dt / 1e9;
    if (rate > best) best = rate;
  }
  free(data);
  /* The sums are consumed so the reads cannot be optimised away. */
  return check > 0 ? best : -1;
}
