/**
 * Weight-typed kernels of the TypeScript backend: `x · Wᵀ` and embedding row
 * lookup, one function per weight dtype, picked once when a plan is compiled.
 *
 * Every kernel is exact up to f64 accumulation: weights are decoded to the f32
 * values their dtype stands for (activations are never quantized), so a kernel
 * agrees with `backends/reference.ts` run on `decodeWeights` of the same bytes.
 *
 * - f16 and bf16 weights are decoded through 65536-entry lookup tables built once
 *   when the module loads.
 * - q8_0 reads the quants as an `Int8Array` and the f16 block scales through the
 *   f16 table; each block's dot product is summed first and then scaled once.
 * - q4_0 unpacks two nibbles per byte (element `j` low, `j + 16` high).
 *
 * Decode (one token) runs fused: the weights are decoded as they are read. Prefill
 * (several tokens) of f16 and bf16 decodes each weight row once into a scratch row
 * and then takes the dot product of that row with every token; q8_0 and q4_0
 * prefill runs the decode path's block sums for four tokens at a time, sharing each
 * load of the quants.
 *
 * A row's result does not depend on the step's T: every path sums the same products
 * in the same order (f32 products are exact in f64, and table-decoded f16/bf16 values
 * are exact f32), so a token gets bit-identical outputs alone or in a batch. Typed-array
 * views of a weight are made on its first use and cached, and the scratch arrays only
 * grow, so a step allocates nothing once the first has run.
 *
 * @module
 */

import { bf16ToF32, f16Table } from "../../graph/half.ts";
import type { DType, WeightDType } from "../../graph/dtype.ts";
import { QUANT_BLOCK } from "../../graph/dtype.ts";

/** A weight as the TypeScript backend holds it: typed views of its bytes. */
export interface TsWeight {
  /** The dtype its bytes are stored in. */
  readonly dtype: DType;
  /** Its shape, `[rows, cols]` for a matrix. */
  readonly shape: readonly number[];
  /** The raw bytes in the `graph/dtype.ts` layout. */
  readonly bytes: Uint8Array;
  /** f32 view, set when dtype is f32. */
  readonly f32?: Float32Array;
}

/** out (T, N) = x (T, K) · W (N, K)ᵀ. */
export type MatmulKernel = (out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number) => void;

/** out (T, D) = table rows ids (T). */
export type EmbeddingKernel = (out: Float32Array, ids: Int32Array, table: TsWeight, T: number, D: number) => void;

/** The f32 value of every f16 bit pattern (the table of `graph/half.ts`). */
const F16_TABLE: Float32Array = f16Table();
/** The f32 value of every bf16 bit pattern. */
const BF16_TABLE: Float32Array = new Float32Array(65536);
for (let h = 0; h < 65536; h++) BF16_TABLE[h] = bf16ToF32(h);

/** One decoded weight row, shared by the prefill paths; grows, never shrinks. */
let scratchRow = new Float32Array(1024);

function rowScratch(K: number): Float32Array {
  if (scratchRow.length < K) scratchRow = new Float32Array(Math.max(K, scratchRow.length * 2));
  return scratchRow;
}

/** Per-block sums of x for the q4_0 paths (blocks × tokens); grows, never shrinks. */
let scratchSums = new Float64Array(128);

function blockSums(nb: number): Float64Array {
  if (scratchSums.length < nb) scratchSums = new Float64Array(Math.max(nb, scratchSums.length * 2));
  return scratchSums;
}

// ---------------------------------------------------------------------------
// Cached typed-array views of a weight's bytes.

const U16_VIEWS = new WeakMap<Uint8Array, Uint16Array>();
const I8_VIEWS = new WeakMap<Uint8Array, Int8Array>();
const SCALE_VIEWS = new WeakMap<Uint8Array, Uint16Array>();

/** A 2-byte-aligned copy of `bytes` when they are not aligned (upload aligns them). */
function aligned2(bytes: Uint8Array): Uint8Array {
  return bytes.byteOffset % 2 === 0 ? bytes : bytes.slice();
}

/** The weight as 16-bit words (f16 and bf16). */
function u16View(w: TsWeight): Uint16Array {
  let v = U16_VIEWS.get(w.bytes);
  if (v === undefined) {
    const b = aligned2(w.bytes);
    v = new Uint16Array(b.buffer, b.byteOffset, b.byteLength >>> 1);
    U16_VIEWS.set(w.bytes, v);
  }
  return v;
}

/** The quants of a q8_0 weight as signed bytes. */
function q8Quants(w: TsWeight): Int8Array {
  let v = I8_VIEWS.get(w.bytes);
  if (v === undefined) {
    const b = w.bytes;
    v = new Int8Array(b.buffer, b.byteOffset, weightCount(w));
    I8_VIEWS.set(w.bytes, v);
  }
  return v;
}

/** The f16 block scales of a q8_0 or q4_0 weight. */
function scaleView(w: TsWeight): Uint16Array {
  let v = SCALE_VIEWS.get(w.bytes);
  if (v === undefined) {
    const count = weightCount(w);
    const start = w.dtype === "q8_0" ? count : count / 2;
    const b = aligned2(w.bytes.subarray(start, start + (count / QUANT_BLOCK) * 2));
    v = new Uint16Array(b.buffer, b.byteOffset, count / QUANT_BLOCK);
    SCALE_VIEWS.set(w.bytes, v);
  }
  return v;
}

function weightCount(w: TsWeight): number {
  let n = 1;
  for (const d of w.shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------
// Shared prefill step: one decoded weight row times every token.

/** out[t, n] = row · x[t] for every t < T, the row starting at `ro` in `row`. */
function rowTimesTokens(
  out: Float32Array,
  x: Float32Array,
  row: Float32Array,
  ro: number,
  n: number,
  T: number,
  K: number,
  N: number,
) {
  let t = 0;
  for (; t + 4 <= T; t += 4) {
    const x0 = t * K, x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (let k = 0; k < K; k++) {
      const wv = row[ro + k];
      s0 += wv * x[x0 + k];
      s1 += wv * x[x1 + k];
      s2 += wv * x[x2 + k];
      s3 += wv * x[x3 + k];
    }
    out[t * N + n] = s0;
    out[(t + 1) * N + n] = s1;
    out[(t + 2) * N + n] = s2;
    out[(t + 3) * N + n] = s3;
  }
  for (; t < T; t++) {
    const xo = t * K;
    let s = 0;
    for (let k = 0; k < K; k++) s += row[ro + k] * x[xo + k];
    out[t * N + n] = s;
  }
}

// ---------------------------------------------------------------------------
// Row decoders (prefill and embedding): `len` values of row `r` into dst at `o`.

function decodeRow16(table: Float32Array, H: Uint16Array, r: number, len: number, dst: Float32Array, o: number) {
  const src = r * len;
  for (let i = 0; i < len; i++) dst[o + i] = table[H[src + i]];
}

function decodeRowQ8(Q: Int8Array, S: Uint16Array, r: number, len: number, dst: Float32Array, o: number) {
  const nb = len / QUANT_BLOCK;
  for (let b = 0; b < nb; b++) {
    const d = F16_TABLE[S[r * nb + b]];
    const q = (r * nb + b) * QUANT_BLOCK;
    const p = o + b * QUANT_BLOCK;
    for (let j = 0; j < QUANT_BLOCK; j++) dst[p + j] = Q[q + j] * d;
  }
}

function decodeRowQ4(P: Uint8Array, S: Uint16Array, r: number, len: number, dst: Float32Array, o: number) {
  const nb = len / QUANT_BLOCK;
  for (let b = 0; b < nb; b++) {
    const d = F16_TABLE[S[r * nb + b]];
    const q = (r * nb + b) * 16;
    const p = o + b * QUANT_BLOCK;
    for (let j = 0; j < 16; j++) {
      const v = P[q + j];
      dst[p + j] = ((v & 15) - 8) * d;
      dst[p + j + 16] = ((v >> 4) - 8) * d;
    }
  }
}

// ---------------------------------------------------------------------------
// q8_0 and q4_0 prefill: the decode path's sums, four tokens sharing each quant load.

/**
 * out[t, n] for every t < T of q8_0 row `n`: per block, the int8 dot product with
 * x[t], scaled once, summed over the blocks in order (as {@link matmulQ8_0} decodes).
 */
function q8RowTimesTokens(
  out: Float32Array,
  x: Float32Array,
  Q: Int8Array,
  S: Uint16Array,
  n: number,
  T: number,
  K: number,
  N: number,
) {
  const nb = K / QUANT_BLOCK;
  const q0 = n * K, so = n * nb;
  let t = 0;
  for (; t + 4 <= T; t += 4) {
    const x0 = t * K, x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, end = o + QUANT_BLOCK;
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (let j = o; j < end; j++) {
        const qv = Q[q0 + j];
        a0 += qv * x[x0 + j];
        a1 += qv * x[x1 + j];
        a2 += qv * x[x2 + j];
        a3 += qv * x[x3 + j];
      }
      const d = F16_TABLE[S[so + b]];
      s0 += a0 * d;
      s1 += a1 * d;
      s2 += a2 * d;
      s3 += a3 * d;
    }
    out[t * N + n] = s0;
    out[(t + 1) * N + n] = s1;
    out[(t + 2) * N + n] = s2;
    out[(t + 3) * N + n] = s3;
  }
  for (; t < T; t++) {
    const x0 = t * K;
    let s0 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, end = o + QUANT_BLOCK;
      let a0 = 0;
      for (let j = o; j < end; j++) a0 += Q[q0 + j] * x[x0 + j];
      s0 += a0 * F16_TABLE[S[so + b]];
    }
    out[t * N + n] = s0;
  }
}

/** xs[t * nb + b] = 8 × the sum of block `b` of x[t], for every t < T (the q4_0 offset). */
function fillBlockSums(xs: Float64Array, x: Float32Array, T: number, K: number) {
  const nb = K / QUANT_BLOCK;
  for (let t = 0; t < T; t++) {
    for (let b = 0; b < nb; b++) {
      let sum = 0;
      for (let j = t * K + b * QUANT_BLOCK, end = j + QUANT_BLOCK; j < end; j++) sum += x[j];
      xs[t * nb + b] = 8 * sum;
    }
  }
}

/**
 * out[t, n] for every t < T of q4_0 row `n`: per block, the nibble dot product with
 * x[t] less its block offset, scaled once (as {@link matmulQ4_0} decodes).
 */
function q4RowTimesTokens(
  out: Float32Array,
  x: Float32Array,
  xs: Float64Array,
  P: Uint8Array,
  S: Uint16Array,
  n: number,
  T: number,
  K: number,
  N: number,
) {
  const nb = K / QUANT_BLOCK;
  const p0 = n * (K >> 1), so = n * nb;
  let t = 0;
  for (; t + 4 <= T; t += 4) {
    const x0 = t * K, x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
    const c0 = t * nb, c1 = c0 + nb, c2 = c1 + nb, c3 = c2 + nb;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, p = p0 + b * 16;
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (let j = 0; j < 16; j++) {
        const v = P[p + j];
        const lo = v & 15, hi = v >> 4;
        const l = o + j, h = l + 16;
        a0 += lo * x[x0 + l] + hi * x[x0 + h];
        a1 += lo * x[x1 + l] + hi * x[x1 + h];
        a2 += lo * x[x2 + l] + hi * x[x2 + h];
        a3 += lo * x[x3 + l] + hi * x[x3 + h];
      }
      const d = F16_TABLE[S[so + b]];
      s0 += (a0 - xs[c0 + b]) * d;
      s1 += (a1 - xs[c1 + b]) * d;
      s2 += (a2 - xs[c2 + b]) * d;
      s3 += (a3 - xs[c3 + b]) * d;
    }
    out[t * N + n] = s0;
    out[(t + 1) * N + n] = s1;
    out[(t + 2) * N + n] = s2;
    out[(t + 3) * N + n] = s3;
  }
  for (; t < T; t++) {
    const x0 = t * K, c0 = t * nb;
    let s0 = 0;
    for (let b = 0; b < nb; b++) {
      const o = x0 + b * QUANT_BLOCK, p = p0 + b * 16;
      let a0 = 0;
      for (let j = 0; j < 16; j++) {
        const v = P[p + j];
        a0 += (v & 15) * x[o + j] + (v >> 4) * x[o + j + 16];
      }
      s0 += (a0 - xs[c0 + b]) * F16_TABLE[S[so + b]];
    }
    out[t * N + n] = s0;
  }
}

// ---------------------------------------------------------------------------
// f32

/**
 * f32 weights. Prefill (T ≥ 4): four tokens share each pass over a weight row, so the
 * weights are read a quarter as often. Decode: four weight rows share each load of x.
 */
export function matmulF32(out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number): void {
  const W = w.f32!;
  if (T >= 4) {
    for (let n = 0; n < N; n++) rowTimesTokens(out, x, W, n * K, n, T, K, N);
    return;
  }
  let t = 0;
  // Single tokens (decode): four weight rows share each load of x.
  for (; t < T; t++) {
    const xo = t * K;
    const oo = t * N;
    let n = 0;
    for (; n + 4 <= N; n += 4) {
      const w0 = n * K, w1 = w0 + K, w2 = w1 + K, w3 = w2 + K;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let k = 0; k < K; k++) {
        const xv = x[xo + k];
        s0 += W[w0 + k] * xv;
        s1 += W[w1 + k] * xv;
        s2 += W[w2 + k] * xv;
        s3 += W[w3 + k] * xv;
      }
      out[oo + n] = s0;
      out[oo + n + 1] = s1;
      out[oo + n + 2] = s2;
      out[oo + n + 3] = s3;
    }
    for (; n < N; n++) {
      const wo = n * K;
      let s = 0;
      for (let k = 0; k < K; k++) s += W[wo + k] * x[xo + k];
      out[oo + n] = s;
    }
  }
}

/** f32 embedding rows. */
export function embeddingF32(out: Float32Array, ids: Int32Array, table: TsWeight, T: number, D: number): void {
  const W = table.f32!;
  for (let t = 0; t < T; t++) {
    const src = ids[t] * D;
    const dst = t * D;
    for (let d = 0; d < D; d++) out[dst + d] = W[src + d];
  }
}

// ---------------------------------------------------------------------------
// f16 and bf16: the same loops over 16-bit words, decoded through a table.

function matmul16(
  table: Float32Array,
  out: Float32Array,
  x: Float32Array,
  w: TsWeight,
  T: number,
  K: number,
  N: number,
) {
  const H = u16View(w);
  if (T > 1) {
    const row = rowScratch(K);
    for (let n = 0; n < N; n++) {
      decodeRow16(table, H, n, K, row, 0);
      rowTimesTokens(out, x, row, 0, n, T, K, N);
    }
    return;
  }
  let n = 0;
  for (; n + 4 <= N; n += 4) {
    const w0 = n * K, w1 = w0 + K, w2 = w1 + K, w3 = w2 + K;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (let k = 0; k < K; k++) {
      const xv = x[k];
      s0 += table[H[w0 + k]] * xv;
      s1 += table[H[w1 + k]] * xv;
      s2 += table[H[w2 + k]] * xv;
      s3 += table[H[w3 + k]] * xv;
    }
    out[n] = s0;
    out[n + 1] = s1;
    out[n + 2] = s2;
    out[n + 3] = s3;
  }
  for (; n < N; n++) {
    const wo = n * K;
    let s = 0;
    for (let k = 0; k < K; k++) s += table[H[wo + k]] * x[k];
    out[n] = s;
  }
}

/** f16 weights (decoded through a lookup table). */
export function matmulF16(out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number): void {
  matmul16(F16_TABLE, out, x, w, T, K, N);
}

/** bf16 weights (decoded through a lookup table). */
export function matmulBF16(out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number): void {
  matmul16(BF16_TABLE, out, x, w, T, K, N);
}

/** f16 embedding rows. */
export function embeddingF16(out: Float32Array, ids: Int32Array, table: TsWeight, T: number, D: number): void {
  const H = u16View(table);
  for (let t = 0; t < T; t++) decodeRow16(F16_TABLE, H, ids[t], D, out, t * D);
}

/** bf16 embedding rows. */
export function embeddingBF16(out: Float32Array, ids: Int32Array, table: TsWeight, T: number, D: number): void {
  const H = u16View(table);
  for (let t = 0; t < T; t++) decodeRow16(BF16_TABLE, H, ids[t], D, out, t * D);
}

// ---------------------------------------------------------------------------
// q8_0

/** q8_0 weights: per block, the int8 dot product with x, scaled once. */
export function matmulQ8_0(out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number): void {
  const Q = q8Quants(w);
  const S = scaleView(w);
  if (T > 1) {
    for (let n = 0; n < N; n++) q8RowTimesTokens(out, x, Q, S, n, T, K, N);
    return;
  }
  const nb = K / QUANT_BLOCK;
  let n = 0;
  // Four weight rows share each load of x.
  for (; n + 4 <= N; n += 4) {
    const q0 = n * K, q1 = q0 + K, q2 = q1 + K, q3 = q2 + K, so = n * nb;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, end = o + QUANT_BLOCK;
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (let j = o; j < end; j++) {
        const xv = x[j];
        a0 += Q[q0 + j] * xv;
        a1 += Q[q1 + j] * xv;
        a2 += Q[q2 + j] * xv;
        a3 += Q[q3 + j] * xv;
      }
      s0 += a0 * F16_TABLE[S[so + b]];
      s1 += a1 * F16_TABLE[S[so + nb + b]];
      s2 += a2 * F16_TABLE[S[so + 2 * nb + b]];
      s3 += a3 * F16_TABLE[S[so + 3 * nb + b]];
    }
    out[n] = s0;
    out[n + 1] = s1;
    out[n + 2] = s2;
    out[n + 3] = s3;
  }
  for (; n < N; n++) {
    const q0 = n * K, so = n * nb;
    let s0 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, end = o + QUANT_BLOCK;
      let a0 = 0;
      for (let j = o; j < end; j++) a0 += Q[q0 + j] * x[j];
      s0 += a0 * F16_TABLE[S[so + b]];
    }
    out[n] = s0;
  }
}

/** q8_0 embedding rows. */
export function embeddingQ8_0(out: Float32Array, ids: Int32Array, table: TsWeight, T: number, D: number): void {
  const Q = q8Quants(table);
  const S = scaleView(table);
  for (let t = 0; t < T; t++) decodeRowQ8(Q, S, ids[t], D, out, t * D);
}

// ---------------------------------------------------------------------------
// q4_0

/** q4_0 weights: per block, the nibble dot product with x, scaled once. */
export function matmulQ4_0(out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number): void {
  const P = w.bytes;
  const S = scaleView(w);
  // Σ (q - 8) x = Σ q x - 8 Σ x: the block sums of x are taken once for every row.
  const nb = K / QUANT_BLOCK;
  const xs = blockSums(T * nb);
  fillBlockSums(xs, x, T, K);
  if (T > 1) {
    for (let n = 0; n < N; n++) q4RowTimesTokens(out, x, xs, P, S, n, T, K, N);
    return;
  }
  const half = K >> 1;
  let n = 0;
  // Four weight rows share each load of x.
  for (; n + 4 <= N; n += 4) {
    const p0 = n * half, p1 = p0 + half, p2 = p1 + half, p3 = p2 + half, so = n * nb;
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, p = b * 16;
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (let j = 0; j < 16; j++) {
        const xl = x[o + j], xh = x[o + j + 16];
        const v0 = P[p0 + p + j], v1 = P[p1 + p + j], v2 = P[p2 + p + j], v3 = P[p3 + p + j];
        a0 += (v0 & 15) * xl + (v0 >> 4) * xh;
        a1 += (v1 & 15) * xl + (v1 >> 4) * xh;
        a2 += (v2 & 15) * xl + (v2 >> 4) * xh;
        a3 += (v3 & 15) * xl + (v3 >> 4) * xh;
      }
      const c = xs[b];
      s0 += (a0 - c) * F16_TABLE[S[so + b]];
      s1 += (a1 - c) * F16_TABLE[S[so + nb + b]];
      s2 += (a2 - c) * F16_TABLE[S[so + 2 * nb + b]];
      s3 += (a3 - c) * F16_TABLE[S[so + 3 * nb + b]];
    }
    out[n] = s0;
    out[n + 1] = s1;
    out[n + 2] = s2;
    out[n + 3] = s3;
  }
  for (; n < N; n++) {
    const p0 = n * half, so = n * nb;
    let s0 = 0;
    for (let b = 0; b < nb; b++) {
      const o = b * QUANT_BLOCK, p = p0 + b * 16;
      let a0 = 0;
      for (let j = 0; j < 16; j++) {
        const v0 = P[p + j];
        a0 += (v0 & 15) * x[o + j] + (v0 >> 4) * x[o + j + 16];
      }
      s0 += (a0 - xs[b]) * F16_TABLE[S[so + b]];
    }
    out[n] = s0;
  }
}

/** q4_0 embedding rows. */
export function embeddingQ4_0(out: Float32Array, ids: Int32Array, table: TsWeight, T: number, D: number): void {
  const P = table.bytes;
  const S = scaleView(table);
  for (let t = 0; t < T; t++) decodeRowQ4(P, S, ids[t], D, out, t * D);
}

/** Matmul kernels by weight dtype. */
export const MATMUL_KERNELS: Readonly<Record<WeightDType, MatmulKernel>> = {
  f32: matmulF32,
  f16: matmulF16,
  bf16: matmulBF16,
  q8_0: matmulQ8_0,
  q4_0: matmulQ4_0,
};

/** Embedding kernels by table dtype. */
export const EMBEDDING_KERNELS: Readonly<Record<WeightDType, EmbeddingKernel>> = {
  f32: embeddingF32,
  f16: embeddingF16,
  bf16: embeddingBF16,
  q8_0: embeddingQ8_0,
  q4_0: embeddingQ4_0,
};
