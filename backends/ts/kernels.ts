/**
 * Kernels of the TypeScript backend for everything but the weight-typed matmul
 * (see `matmul.ts`). Plain loops over typed arrays with offsets and counts as
 * numbers, so V8 compiles them to tight machine code; none allocates.
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
 * Rotate-half rotary embedding in place on x (T, heads * headDim), positions
 * `pos .. pos + T - 1`. `invFreq[i] = theta^(-2i/headDim)`, computed once per plan.
 */
export function rope(
  out: Float32Array,
  x: Float32Array,
  T: number,
  heads: number,
  headDim: number,
  pos: number,
  invFreq: Float64Array,
): void {
  const half = headDim >> 1;
  const row = heads * headDim;
  for (let t = 0; t < T; t++) {
    const p = pos + t;
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

/** out (1, D) = x row T-1. */
export function lastRow(out: Float32Array, x: Float32Array, T: number, D: number): void {
  out.set(x.subarray((T - 1) * D, T * D));
}

/**
 * Causal grouped-query attention over the KV cache (layout `(capacity, kvHeads * headDim)`).
 * Appends k, v (T, kvHeads * headDim) at row `pos`, then for each new token and head
 * computes softmax(q·Kᵀ · scale) · V over the visible rows. `scores` has room for
 * `pos + T` values.
 */
export function attention(
  out: Float32Array,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  kCache: Float32Array,
  vCache: Float32Array,
  scores: Float32Array,
  T: number,
  pos: number,
  heads: number,
  kvHeads: number,
  headDim: number,
  scale: number,
  window: number,
): void {
  const kvDim = kvHeads * headDim;
  const qDim = heads * headDim;
  kCache.set(k.subarray(0, T * kvDim), pos * kvDim);
  vCache.set(v.subarray(0, T * kvDim), pos * kvDim);
  const group = heads / kvHeads;
  for (let t = 0; t < T; t++) {
    const p = pos + t;
    const start = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    for (let h = 0; h < heads; h++) {
      const kvOff = ((h / group) | 0) * headDim;
      const qo = t * qDim + h * headDim;
      for (let j = start; j <= p; j++) {
        const ko = j * kvDim + kvOff;
        let s = 0;
        for (let d = 0; d < headDim; d++) s += q[qo + d] * kCache[ko + d];
        scores[j] = s * scale;
      }
      const inv = softmaxWeights(scores, start, p);
      for (let d = 0; d < headDim; d++) out[qo + d] = 0;
      for (let j = start; j <= p; j++) {
        const wgt = scores[j] * inv;
        const vo = j * kvDim + kvOff;
        for (let d = 0; d < headDim; d++) out[qo + d] += wgt * vCache[vo + d];
      }
    }
  }
}

/** The f32 value of every f16 bit pattern. */
const F16_TABLE: Float32Array = f16Table();

/**
 * {@link attention} over an f16 KV cache held as bit patterns: appended rows are
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
  scores: Float32Array,
  T: number,
  pos: number,
  heads: number,
  kvHeads: number,
  headDim: number,
  scale: number,
  window: number,
): void {
  const kvDim = kvHeads * headDim;
  const qDim = heads * headDim;
  for (let i = 0, o = pos * kvDim; i < T * kvDim; i++, o++) {
    kCache[o] = f32ToF16(k[i]);
    vCache[o] = f32ToF16(v[i]);
  }
  const group = heads / kvHeads;
  for (let t = 0; t < T; t++) {
    const p = pos + t;
    const start = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    for (let h = 0; h < heads; h++) {
      const kvOff = ((h / group) | 0) * headDim;
      const qo = t * qDim + h * headDim;
      for (let j = start; j <= p; j++) {
        const ko = j * kvDim + kvOff;
        let s = 0;
        for (let d = 0; d < headDim; d++) s += q[qo + d] * F16_TABLE[kCache[ko + d]];
        scores[j] = s * scale;
      }
      const inv = softmaxWeights(scores, start, p);
      for (let d = 0; d < headDim; d++) out[qo + d] = 0;
      for (let j = start; j <= p; j++) {
        const wgt = scores[j] * inv;
        const vo = j * kvDim + kvOff;
        for (let d = 0; d < headDim; d++) out[qo + d] += wgt * F16_TABLE[vCache[vo + d]];
      }
    }
  }
}

/** Replaces scores[start..end] by exp(score - max) and returns 1 / their sum. */
function softmaxWeights(scores: Float32Array, start: number, end: number): number {
  let max = -Infinity;
  for (let j = start; j <= end; j++) if (scores[j] > max) max = scores[j];
  let sum = 0;
  for (let j = start; j <= end; j++) {
    const e = Math.exp(scores[j] - max);
    scores[j] = e;
    sum += e;
  }
  return 1 / sum;
}
