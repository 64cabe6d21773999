/**
 * Weight-typed kernels of the TypeScript backend: `x · Wᵀ` and embedding row
 * lookup, one function per weight dtype, picked once when a plan is compiled.
 *
 * @module
 */

import type { DType } from "../../graph/dtype.ts";

/** A weight as the TypeScript backend holds it: typed views of its bytes. */
export interface TsWeight {
  readonly dtype: DType;
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

/**
 * f32 weights. Four tokens share each pass over a weight row, so prefill reads the
 * weights a quarter as often; four partial sums keep the dependency chains short.
 */
export function matmulF32(out: Float32Array, x: Float32Array, w: TsWeight, T: number, K: number, N: number): void {
  const W = w.f32!;
  let t = 0;
  for (; t + 4 <= T; t += 4) {
    const x0 = t * K, x1 = x0 + K, x2 = x1 + K, x3 = x2 + K;
    for (let n = 0; n < N; n++) {
      const wo = n * K;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let k = 0; k < K; k++) {
        const wv = W[wo + k];
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
  }
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
    const o = ids[t] * D;
    out.set(W.subarray(o, o + D), t * D);
  }
}

/** Matmul kernels by weight dtype. */
export const MATMUL_KERNELS: Partial<Record<DType, MatmulKernel>> = { f32: matmulF32 };

/** Embedding kernels by table dtype. */
export const EMBEDDING_KERNELS: Partial<Record<DType, EmbeddingKernel>> = { f32: embeddingF32 };
