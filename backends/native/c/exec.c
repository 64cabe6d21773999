/*
 * The exported API: memory, thread pools, encoded plans ("executables") and the
 * step interpreter, plus a memory-bandwidth probe. Every function here is called
 * from backends/native/backend.ts through Deno FFI; that side checks every shape,
 * offset and token id before a call, so the kernels trust their arguments.
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
  int nnodes, ntensors, max_T, threads;
  llm_node *nodes;
  uint8_t **ptr; /* tensor id -> address */
  llm_xq xq;     /* quantized activations, shared by the threads of a matmul */
  float *attn_scratch;
  size_t attn_per_thread; /* floats */
  /*
   * One work counter per node: matmul and attention hand out their work in
   * chunks that threads claim from it, so a thread that loses its core for a
   * while (a busy shared machine) delays its current chunk only, not a fixed
   * half of the op.
   */
  atomic_int *claim;
  /* The step being run. */
  llm_pool *pool;
  int pos, T, from, to;
} llm_exec;

/* Claims chunks of node `i` until none is left; returns -1 when done. */
static inline int claim_chunk(llm_exec *e, int i, int nchunks) {
  int c = atomic_fetch_add_explicit(&e->claim[i], 1, memory_order_relaxed);
  return c < nchunks ? c : -1;
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

static inline int rows_of(const llm_exec *e, int rows) { return rows < 0 ? e->T : rows; }

/*
 * Encodes a plan: `nodes` holds nnodes records of LLM_NODE_INTS int32 (layout of
 * llm_node), `addrs` the address of every tensor id (0 for ids no node uses).
 * Scratch for quantized activations and attention scores is sized here, once.
 */
LLM_EXPORT void llm_exec_free(void *p);

LLM_EXPORT void *llm_exec_new(const int32_t *nodes, int32_t nnodes, const uint64_t *addrs, int32_t ntensors,
                              int32_t max_T, int32_t threads) {
  llm_exec *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  e->nnodes = nnodes;
  e->ntensors = ntensors;
  e->max_T = max_T;
  e->threads = threads < 1 ? 1 : threads;
  e->nodes = malloc(sizeof(llm_node) * (size_t)(nnodes ? nnodes : 1));
  e->ptr = malloc(sizeof(uint8_t *) * (size_t)(ntensors ? ntensors : 1));
  e->claim = calloc((size_t)(nnodes ? nnodes : 1), sizeof(atomic_int));
  if (!e->nodes || !e->ptr || !e->claim) goto fail;
  memcpy(e->nodes, nodes, sizeof(llm_node) * (size_t)nnodes);
  for (int i = 0; i < ntensors; i++) e->ptr[i] = (uint8_t *)(uintptr_t)addrs[i];
  size_t xq_elems = 0, attn = 0;
  for (int i = 0; i < nnodes; i++) {
    const llm_node *n = &e->nodes[i];
    size_t rows = n->rows < 0 ? (size_t)max_T : (size_t)n->rows;
    if (n->op == OP_MATMUL && (n->dtype == DT_Q8_0 || n->dtype == DT_Q4_0)) {
      size_t el = rows * (size_t)n->p[0];
      if (el > xq_elems) xq_elems = el;
    }
    if (n->op == OP_ATTENTION) {
      size_t need = k_attention_scratch(n->p[0], n->p[1], n->p[2], n->p[4], n->dtype);
      if (need > attn) attn = need;
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
    if (!e->attn_scratch) goto fail;
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
  free(e->xq.q);
  free(e->xq.d);
  free(e->xq.s);
  free(e->attn_scratch);
  free(e);
}

/* Threads worth using for an op of `work` multiply-adds: tiny ops stay on thread 0. */
static inline int op_threads(double work, int nth) { return work < 32768.0 ? 1 : nth; }

/* Splits n rows into chunks of `align`-multiples: about 4 per thread, so a slow thread can be covered. */
static inline int chunk_rows(int n, int nth, int align) {
  int per = (n + 4 * nth - 1) / (4 * nth);
  per = (per + align - 1) / align * align;
  return per < align ? align : per;
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
    case OP_MATMUL: {
      int K = n->p[0], N = n->p[1];
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
      if (use == 1) {
        mm_float(out, x, P[n->in[1]], n->dtype, R, K, N, 0, N);
        return;
      }
      int rows = chunk_rows(N, use, 16), nchunks = (N + rows - 1) / rows;
      for (int c; (c = claim_chunk(e, idx, nchunks)) >= 0;) {
        lo = c * rows;
        hi = lo + rows < N ? lo + rows : N;
        mm_float(out, x, P[n->in[1]], n->dtype, R, K, N, lo, hi);
      }
      return;
    }
    case OP_ROPE: {
      int use = op_threads((double)R * n->p[0] * n->p[1] * 8, nth);
      if (ith >= use) return;
      double theta;
      memcpy(&theta, &n->p[5], sizeof theta);
      split_range(R, ith, use, 1, &lo, &hi);
      k_rope(out, (const float *)P[n->in[0]], n->p[0], n->p[1], theta, e->pos, lo, hi);
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
    case OP_LASTROW: {
      if (ith != 0) return;
      int in_rows = rows_of(e, n->p[1]);
      memcpy(out, (const float *)P[n->in[0]] + (size_t)(in_rows - 1) * n->p[0], (size_t)n->p[0] * sizeof(float));
      return;
    }
    case OP_ATTENTION: {
      llm_attn a;
      a.heads = n->p[0];
      a.kv_heads = n->p[1];
      a.head_dim = n->p[2];
      a.window = n->p[3];
      a.scale = n->f[0];
      a.pos = e->pos;
      a.kv_dtype = n->dtype;
      a.q = (const float *)P[n->in[0]];
      a.k_cache = P[n->in[3]];
      a.v_cache = P[n->in[4]];
      a.out = out;
      int use = op_threads((double)R * (e->pos + R) * a.heads * a.head_dim * 2, nth);
      /* First the new rows into the caches, then (after a barrier) attend. */
      if (ith < use) {
        split_range(R, ith, use, 1, &lo, &hi);
        k_attention_store(&a, (const float *)P[n->in[1]], (const float *)P[n->in[2]], lo, hi);
      }
      pool_barrier(e->pool, nth);
      if (ith >= use) return;
      float *scratch = e->attn_scratch + e->attn_per_thread * (size_t)ith;
      /* Interleaved items: later tokens attend over more rows, so contiguous ranges would be uneven. */
      int items = R * a.kv_heads;
      for (int w; (w = claim_chunk(e, idx, items)) >= 0;) k_attention(&a, R, w, w + 1, scratch);
      return;
    }
  }
}

static void step_task(void *arg, int ith, int nth) {
  llm_exec *e = arg;
  for (int i = e->from; i < e->to; i++) {
    run_node(e, i, ith, nth);
    if (i + 1 < e->to) pool_barrier(e->pool, nth);
  }
}

/*
 * Runs nodes [from, to) of the plan for a step of T new tokens at position pos, on
 * `threads` threads of `pool` (1: the calling thread alone, workers stay parked).
 * Returns 0, or -1 when the arguments are out of the ranges the plan was made for.
 */
LLM_EXPORT int32_t llm_run(void *exec, void *pool, int32_t pos, int32_t T, int32_t threads, int32_t from, int32_t to) {
  llm_exec *e = exec;
  if (!e || T < 1 || T > e->max_T || pos < 0 || from < 0 || to > e->nnodes || from > to) return -1;
  /* The caller checks this too: a step past a cache's capacity would write outside it. */
  for (int i = from; i < to; i++)
    if (e->nodes[i].op == OP_ATTENTION && (int64_t)pos + T > e->nodes[i].p[4]) return -1;
  if (threads > e->threads) threads = e->threads;
  if (threads > pool_size(pool)) threads = pool_size(pool);
  if (threads < 1) threads = 1;
  for (int i = from; i < to; i++) atomic_store_explicit(&e->claim[i], 0, memory_order_relaxed);
  e->pool = pool;
  e->pos = pos;
  e->T = T;
  e->from = from;
  e->to = to;
  pool_run(pool, step_task, e, threads);
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
