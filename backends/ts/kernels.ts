/**
 * Kernels of the TypeScript backend for everything but the weight-typed matmul
 * and embedding (see `matmul.ts`). Plain loops over typed arrays with offsets and
 * counts as numbers, so V8 compiles them to tight machine code; none allocates.
 *
 * Every kernel computes each row from that row's own inputs in one fixed order, so
 * a token's result is bit-identical whether its step holds 1 token or many.
 *
 * Shapes in comments: `x (T, D)` is T rows of D values, row-major.
 *
 * @module
 */

import { f16Table, f32ToF16 } from "../../graph/half.ts";

/** out (T, D) = x (T, D) / rms(x row) * w (D). */
export function rmsNorm(out: Float32Array, x: Float32Array, w: Float32Array, T: number, D: number, eps: number): void {
  for (let t = 0; t < T; t++) {
    const o = t * D;
    let ss = 0;
    for (let d = 0; d < D; d++) {
      const v = x[o + d];
      ss += v * v;
    }
    const inv = 1 / Math.sqrt(ss / D + eps);
    for (let d = 0; d < D; d++) out[o + d] = x[o + d] * inv * w[d];
  }
}

/**
 * Rotate-half rotary embedding of x (T, heads * headDim) into out (which may be x):
 * row `t` at position `positions[t]`. `invFreq[i] = theta^(-2i/headDim)`, computed
 * once per plan.
 */
export function rope(
  out: Float32Array,
  x: Float32Array,
  positions: Int32Array,
  T: number,
  heads: number,
  headDim: number,
  invFreq: Float64Array,
): void {
  const half = headDim >> 1;
  const row = heads * headDim;
  for (let t = 0; t < T; t++) {
    const p = positions[t];
    for (let i = 0; i < half; i++) {
      const angle = p * invFreq[i];
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const b = t * row + h * headDim + i;
        const x0 = x[b];
        const x1 = x[b + half];
        out[b] = x0 * c - x1 * s;
        out[b + half] = x1 * c + x0 * s;
      }
    }
  }
}

/** out (n) = silu(gate) * up. */
export function siluMul(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): void {
  for (let i = 0; i < n; i++) {
    const g = gate[i];
    out[i] = (g / (1 + Math.exp(-g))) * up[i];
  }
}

/** out (n) = a + b. */
export function add(out: Float32Array, a: Float32Array, b: Float32Array, n: number): void {
  for (let i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/** out (R, D) = rows `rows[r]` of x (·, D). */
export function gatherRows(out: Float32Array, x: Float32Array, rows: Int32Array, R: number, D: number): void {
  for (let r = 0; r < R; r++) {
    const src = rows[r] * D;
    const dst = r * D;
    for (let d = 0; d < D; d++) out[dst + d] = x[src + d];
  }
}

/** The attributes of an attention node, and the width of its page table. */
export interface AttentionShape {
  /** Query heads. */
  readonly heads: number;
  /** Key/value heads (divides `heads`). */
  readonly kvHeads: number;
  /** Values per head. */
  readonly headDim: number;
  /** Multiplies every score before the softmax. */
  readonly scale: number;
  /** Positions a token sees, itself included; 0: all of its sequence's. */
  readonly window: number;
  /** Cache rows per page. */
  readonly pageSize: number;
  /** Pages per page-table row (the page table's second dimension). */
  readonly pagesPerSeq: number;
}

/**
 * Scratch memory of one attention node, made once when a plan is compiled: sized
 * for the longest span a token can see (`pagesPerSeq × pageSize` positions).
 */
export interface AttentionScratch {
  /** The scores, then the softmax weights, of one (token, head): index `j - start`. */
  readonly scores: Float64Array;
  /** One head's output, accumulated in f64. */
  readonly acc: Float64Array;
  /** The cache row of the first position of each page the token sees. */
  readonly pageBase: Int32Array;
}

/** Scratch for an attention node of `shape` (see {@link AttentionScratch}). */
export function attentionScratch(shape: AttentionShape): AttentionScratch {
  return {
    scores: new Float64Array(shape.pagesPerSeq * shape.pageSize),
    acc: new Float64Array(shape.headDim),
    pageBase: new Int32Array(shape.pagesPerSeq),
  };
}

/**
 * The cache row of position `p` of page-table row `s`:
 * `pages[s][floor(p / pageSize)] * pageSize + p % pageSize`.
 */
function cacheRow(pages: Int32Array, s: number, p: number, a: AttentionShape): number {
  const page = (p / a.pageSize) | 0;
  return pages[s * a.pagesPerSeq + page] * a.pageSize + (p - page * a.pageSize);
}

/**
 * Fills `pageBase[i]` with the cache row of the first position of page `i` of
 * page-table row `s`, for the pages `first .. last`: one multiplication per page, so
 * the inner loops never divide.
 */
function fillPageBases(
  pageBase: Int32Array,
  pages: Int32Array,
  s: number,
  first: number,
  last: number,
  a: AttentionShape,
) {
  const o = s * a.pagesPerSeq;
  for (let i = first; i <= last; i++) pageBase[i] = pages[o + i] * a.pageSize;
}

/**
 * Paged causal grouped-query attention over an f32 KV pool (layout
 * `(pageCount * pageSize, kvHeads * headDim)`), as the `attention` op specifies:
 * first the k, v rows of all T tokens are written at their `(seqOf[t], positions[t])`
 * rows, then every token attends over its own sequence's positions
 * `max(0, p - window + 1) .. p`. Inputs are trusted: `writeInput` checked every index.
 */
export function attention(
  out: Float32Array,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  kCache: Float32Array,
  vCache: Float32Array,
  positions: Int32Array,
  seqOf: Int32Array,
  pages: Int32Array,
  T: number,
  a: AttentionShape,
  scratch: AttentionScratch,
): void {
  const { heads, kvHeads, headDim, scale, window, pageSize } = a;
  const kvDim = kvHeads * headDim;
  const qDim = heads * headDim;
  for (let t = 0; t < T; t++) {
    const dst = cacheRow(pages, seqOf[t], positions[t], a) * kvDim;
    const src = t * kvDim;
    for (let i = 0; i < kvDim; i++) {
      kCache[dst + i] = k[src + i];
      vCache[dst + i] = v[src + i];
    }
  }
  const { scores, acc, pageBase } = scratch;
  const group = heads / kvHeads;
  for (let t = 0; t < T; t++) {
    const p = positions[t];
    const start = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const firstPage = (start / pageSize) | 0;
    const lastPage = (p / pageSize) | 0;
    fillPageBases(pageBase, pages, seqOf[t], firstPage, lastPage, a);
    for (let h = 0; h < heads; h++) {
      const kvOff = ((h / group) | 0) * headDim;
      const qo = t * qDim + h * headDim;
      let max = -Infinity;
      for (let page = firstPage; page <= lastPage; page++) {
        const j0 = page * pageSize;
        const from = j0 > start ? j0 : start;
        const to = j0 + pageSize - 1 < p ? j0 + pageSize - 1 : p;
        for (let j = from; j <= to; j++) {
          const ko = (pageBase[page] + j - j0) * kvDim + kvOff;
          let s = 0;
          for (let d = 0; d < headDim; d++) s += q[qo + d] * kCache[ko + d];
          s *= scale;
          scores[j - start] = s;
          if (s > max) max = s;
        }
      }
      const inv = softmaxWeights(scores, p - start + 1, max);
      for (let d = 0; d < headDim; d++) acc[d] = 0;
      for (let page = firstPage; page <= lastPage; page++) {
        const j0 = page * pageSize;
        const from = j0 > start ? j0 : start;
        const to = j0 + pageSize - 1 < p ? j0 + pageSize - 1 : p;
        for (let j = from; j <= to; j++) {
          const wgt = scores[j - start];
          const vo = (pageBase[page] + j - j0) * kvDim + kvOff;
          for (let d = 0; d < headDim; d++) acc[d] += wgt * vCache[vo + d];
        }
      }
      for (let d = 0; d < headDim; d++) out[qo + d] = acc[d] * inv;
    }
  }
}

/** The f32 value of every f16 bit pattern. */
const F16_TABLE: Float32Array = f16Table();

/**
 * {@link attention} over an f16 KV pool held as bit patterns: written rows are
 * rounded to the nearest f16, and reads go through a table. A separate function
 * rather than a shared one over both array kinds: V8 then keeps each loop's
 * element loads monomorphic (mixing them was measured 10× slower).
 */
export function attentionF16(
  out: Float32Array,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  kCache: Uint16Array,
  vCache: Uint16Array,
  positions: Int32Array,
  seqOf: Int32Array,
  pages: Int32Array,
  T: number,
  a: AttentionShape,
  scratch: AttentionScratch,
): void {
  const { heads, kvHeads, headDim, scale, window, pageSize } = a;
  const kvDim = kvHeads * headDim;
  const qDim = heads * headDim;
  for (let t = 0; t < T; t++) {
    const dst = cacheRow(pages, seqOf[t], positions[t], a) * kvDim;
    const src = t * kvDim;
    for (let i = 0; i < kvDim; i++) {
      kCache[dst + i] = f32ToF16(k[src + i]);
      vCache[dst + i] = f32ToF16(v[src + i]);
    }
  }
  const { scores, acc, pageBase } = scratch;
  const group = heads / kvHeads;
  for (let t = 0; t < T; t++) {
    const p = positions[t];
    const start = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const firstPage = (start / pageSize) | 0;
    const lastPage = (p / pageSize) | 0;
    fillPageBases(pageBase, pages, seqOf[t], firstPage, lastPage, a);
    for (let h = 0; h < heads; h++) {
      const kvOff = ((h / group) | 0) * headDim;
      const qo = t * qDim + h * headDim;
      let max = -Infinity;
      for (let page = firstPage; page <= lastPage; page++) {
        const j0 = page * pageSize;
        const from = j0 > start ? j0 : start;
        const to = j0 + pageSize - 1 < p ? j0 + pageSize - 1 : p;
        for (let j = from; j <= to; j++) {
          const ko = (pageBase[page] + j - j0) * kvDim + kvOff;
          let s = 0;
          for (let d = 0; d < headDim; d++) s += q[qo + d] * F16_TABLE[kCache[ko + d]];
          s *= scale;
          scores[j - start] = s;
          if (s > max) max = s;
        }
      }
      const inv = softmaxWeights(scores, p - start + 1, max);
      for (let d = 0; d < headDim; d++) acc[d] = 0;
      for (let page = firstPage; page <= lastPage; page++) {
        const j0 = page * pageSize;
        const from = j0 > start ? j0 : start;
        const to = j0 + pageSize - 1 < p ? j0 + pageSize - 1 : p;
        for (let j = from; j <= to; j++) {
          const wgt = scores[j - start];
          const vo = (pageBase[page] + j - j0) * kvDim + kvOff;
          for (let d = 0; d < headDim; d++) acc[d] += wgt * F16_TABLE[vCache[vo + d]];
        }
      }
      for (let d = 0; d < headDim; d++) out[qo + d] = acc[d] * inv;
    }
  }
}

/** Replaces scores[0 .. n - 1] by exp(score - max) and returns 1 / their sum. */
function softmaxWeights(scores: Float64Array, n: number, max: number): number {
  let sum = 0;
  for (let j = 0; j < n; j++) {
    const e = Math.exp(scores[j] - max);
    scores[j] = e;
    sum += e;
  }
  return 1 / sum;
}
