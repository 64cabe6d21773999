/**
 * Reference kernels: the executable specification of every op, written for
 * clarity, accumulating in f64. The conformance suite compares each backend with
 * these. Weights arrive already decoded to f32.
 *
 * @module
 */

import type { DType } from "../graph/dtype.ts";
import type { Op } from "../graph/ir.ts";

/** A dense tensor for the reference kernels. */
export interface RefTensor {
  /** The resolved dimensions, row-major. */
  readonly shape: readonly number[];
  /** The values: f32, or i32 token ids. */
  readonly data: Float32Array | Int32Array;
  /**
   * How a state tensor stores its values (default `"f32"`): values written into an
   * `"f16"` KV cache are rounded to the nearest f16, as the backends store them.
   */
  readonly dtype?: DType;
}

/**
 * Runs one op. For attention, inputs 3 and 4 (the caches) are written in place, as
 * the op specifies.
 */
export function referenceOp(op: Op, inputs: readonly RefTensor[]): Float32Array {
  const [a, b] = inputs;
  const T = a.shape[0];
  switch (op.kind) {
    case "embedding": {
      const D = b.shape[1];
      const out = new Float32Array(T * D);
      for (let t = 0; t < T; t++) {
        const id = a.data[t];
        for (let d = 0; d < D; d++) out[t * D + d] = b.data[id * D + d];
      }
      return out;
    }
    case "rmsNorm": {
      const D = a.shape[1];
      const out = new Float32Array(T * D);
      for (let t = 0; t < T; t++) {
        let ss = 0;
        for (let d = 0; d < D; d++) ss += a.data[t * D + d] ** 2;
        const inv = 1 / Math.sqrt(ss / D + op.eps);
        for (let d = 0; d < D; d++) out[t * D + d] = a.data[t * D + d] * inv * b.data[d];
      }
      return out;
    }
    case "matmul": {
      const [K, N] = [a.shape[1], b.shape[0]];
      const out = new Float32Array(T * N);
      for (let t = 0; t < T; t++) {
        for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += a.data[t * K + k] * b.data[n * K + k];
          out[t * N + n] = s;
        }
      }
      return out;
    }
    case "rope": {
      const { heads, headDim, theta } = op;
      const half = headDim / 2;
      const out = Float32Array.from(a.data);
      for (let t = 0; t < T; t++) {
        for (let h = 0; h < heads; h++) {
          const base = t * heads * headDim + h * headDim;
          for (let i = 0; i < half; i++) {
            const angle = b.data[t] * theta ** (-2 * i / headDim);
            const [x0, x1] = [a.data[base + i], a.data[base + i + half]];
            out[base + i] = x0 * Math.cos(angle) - x1 * Math.sin(angle);
            out[base + i + half] = x1 * Math.cos(angle) + x0 * Math.sin(angle);
          }
        }
      }
      return out;
    }
    case "siluMul":
      return Float32Array.from(a.data, (g, i) => (g / (1 + Math.exp(-g))) * b.data[i]);
    case "add":
      return Float32Array.from(a.data, (x, i) => x + b.data[i]);
    case "gatherRows": {
      const D = a.shape[1];
      const R = b.shape[0];
      const out = new Float32Array(R * D);
      for (let r = 0; r < R; r++) out.set(a.data.subarray(b.data[r] * D, (b.data[r] + 1) * D), r * D);
      return out;
    }
    case "attention":
      return referenceAttention(op, inputs);
  }
}

function referenceAttention(
  op: Extract<Op, { kind: "attention" }>,
  [q, k, v, kCache, vCache, positions, seqOf, pages]: readonly RefTensor[],
): Float32Array {
  const { heads, kvHeads, headDim, scale, window, pageSize } = op;
  const T = q.shape[0];
  const kvDim = kvHeads * headDim;
  const perSeq = pages.shape[1];
  // The cache row of position j of the sequence of page-table row s.
  const row = (s: number, j: number) => pages.data[s * perSeq + Math.floor(j / pageSize)] * pageSize + j % pageSize;
  for (let t = 0; t < T; t++) {
    const at = row(seqOf.data[t], positions.data[t]) * kvDim;
    for (const [cache, rows] of [[kCache, k], [vCache, v]] as const) {
      const values = rows.data.subarray(t * kvDim, (t + 1) * kvDim);
      cache.data.set(cache.dtype === "f16" ? values.map(Math.f16round) : values, at);
    }
  }
  const out = new Float32Array(T * heads * headDim);
  for (let t = 0; t < T; t++) {
    const [s, p] = [seqOf.data[t], positions.data[t]];
    const start = window > 0 ? Math.max(0, p - window + 1) : 0;
    for (let h = 0; h < heads; h++) {
      const g = Math.floor(h / (heads / kvHeads));
      const scores: number[] = [];
      for (let j = start; j <= p; j++) {
        let sum = 0;
        const base = row(s, j) * kvDim + g * headDim;
        for (let d = 0; d < headDim; d++) sum += q.data[(t * heads + h) * headDim + d] * kCache.data[base + d];
        scores.push(sum * scale);
      }
      const max = Math.max(...scores);
      const exps = scores.map((x) => Math.exp(x - max));
      const total = exps.reduce((x, y) => x + y, 0);
      for (let d = 0; d < headDim; d++) {
        let acc = 0;
        for (let j = start; j <= p; j++) acc += exps[j - start] * vCache.data[row(s, j) * kvDim + g * headDim + d];
        out[(t * heads + h) * headDim + d] = acc / total;
      }
    }
  }
  return out;
}
