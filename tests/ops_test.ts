/**
 * Unit tests of each op with hand-checked values, on the reference kernels and
 * on the TypeScript backend's kernels. (The conformance suite compares every
 * backend with the reference on random data.)
 */

import assert from "node:assert/strict";
import { referenceOp } from "../backends/reference.ts";
import * as k from "../backends/ts/kernels.ts";
import { matmulF32 } from "../backends/ts/matmul.ts";
import type { Op } from "../graph/ir.ts";
import { assertClose } from "./helpers.ts";

const f = (...v: number[]) => Float32Array.from(v);
const TOL = 1e-6;

Deno.test("siluMul: silu(g) * u", () => {
  const gate = f(0, 1, -1, 2);
  const up = f(1, 1, 1, 2);
  // silu(x) = x / (1 + e^-x): 0, 0.7310585786, -0.2689414214, 2 * 1.7615941560
  const want = [0, 0.7310585786, -0.2689414214, 3.5231883120];
  assertClose(
    referenceOp({ kind: "siluMul" }, [{ shape: [1, 4], data: gate }, { shape: [1, 4], data: up }], 0),
    want,
    TOL,
    "reference",
  );
  const out = new Float32Array(4);
  k.siluMul(out, gate, up, 4);
  assertClose(out, want, TOL, "ts");
});

Deno.test("rmsNorm: x / rms(x) * w", () => {
  const x = f(1, 2, 3, 4);
  const w = f(1, 1, 1, 2);
  // mean(x²) = 7.5, rms = 2.7386127875
  const want = [0.3651483717, 0.7302967433, 1.0954451150, 2.9211869734];
  const op: Op = { kind: "rmsNorm", eps: 0 };
  assertClose(referenceOp(op, [{ shape: [1, 4], data: x }, { shape: [4], data: w }], 0), want, TOL, "reference");
  const out = new Float32Array(4);
  k.rmsNorm(out, x, w, 1, 4, 0);
  assertClose(out, want, TOL, "ts");
});

Deno.test("matmul: x · Wᵀ", () => {
  const x = f(1, 2, 3, 4); // [[1, 2], [3, 4]]
  const w = f(1, 0, 0, 1, 1, 1); // rows [1, 0], [0, 1], [1, 1]
  const want = [1, 2, 3, 3, 4, 7];
  assertClose(
    referenceOp({ kind: "matmul" }, [{ shape: [2, 2], data: x }, { shape: [3, 2], data: w }], 0),
    want,
    TOL,
    "reference",
  );
  const out = new Float32Array(6);
  matmulF32(out, x, { dtype: "f32", shape: [3, 2], bytes: new Uint8Array(w.buffer), f32: w }, 2, 2, 3);
  assertClose(out, want, TOL, "ts");
  // Five tokens exercise both the 4-token block and the single-token tail.
  const x5 = f(1, 0, 0, 1, 1, 1, 2, 0, 0, 2);
  const out5 = new Float32Array(15);
  matmulF32(out5, x5, { dtype: "f32", shape: [3, 2], bytes: new Uint8Array(w.buffer), f32: w }, 5, 2, 3);
  assertClose(out5, [1, 0, 1, 0, 1, 1, 1, 1, 2, 2, 0, 2, 0, 2, 2], TOL, "ts, 5 tokens");
});

Deno.test("rope: rotate-half pairs (i, i + d/2) at position 1", () => {
  // headDim 4: angles 1 · 10000^0 = 1 and 1 · 10000^-0.5 = 0.01.
  const x = f(1, 2, 3, 4);
  const want = [
    1 * Math.cos(1) - 3 * Math.sin(1), // -1.9841106485
    2 * Math.cos(0.01) - 4 * Math.sin(0.01), // 1.9599006675
    3 * Math.cos(1) + 1 * Math.sin(1), // 2.4623779025
    4 * Math.cos(0.01) + 2 * Math.sin(0.01), // 4.0197996684
  ];
  assertClose(want, [-1.9841106485, 1.9599006675, 2.4623779025, 4.0197996684], 1e-9, "hand values");
  const op: Op = { kind: "rope", heads: 1, headDim: 4, theta: 10000 };
  assertClose(referenceOp(op, [{ shape: [1, 4], data: x }], 1), want, TOL, "reference");
  const out = new Float32Array(4);
  k.rope(out, x, 1, 1, 4, 1, Float64Array.from([1, 0.01]));
  assertClose(out, want, TOL, "ts");
});

Deno.test("rope: position 0 is the identity", () => {
  const x = f(0.5, -1, 2, 3, 1, 1, 1, 1);
  const out = new Float32Array(8);
  k.rope(out, x, 1, 2, 4, 0, Float64Array.from([1, 0.01]));
  assertClose(out, x, 0, "ts");
});

Deno.test("attention: causal softmax with two query heads sharing one kv head", () => {
  // heads 2, kvHeads 1, headDim 2, scale 1, two new tokens at position 0.
  const q = f(1, 0, 0, 1, 1, 0, 0, 1);
  const kk = f(1, 0, 0, 1);
  const v = f(1, 2, 3, 4);
  const a = 1 / (1 + Math.exp(-1)); // softmax([1, 0])[0] = 0.7310585786
  const b = 1 - a;
  const want = [
    1,
    2,
    1,
    2, // token 0 sees only row 0
    a * 1 + b * 3,
    a * 2 + b * 4, // head 0 favours row 0: 1.5378828428, 2.5378828428
    b * 1 + a * 3,
    b * 2 + a * 4, // head 1 favours row 1: 2.4621171572, 3.4621171572
  ];
  assertClose(want.slice(4), [1.5378828428, 2.5378828428, 2.4621171572, 3.4621171572], 1e-9, "hand values");
  const op: Op = { kind: "attention", heads: 2, kvHeads: 1, headDim: 2, scale: 1, window: 0 };
  const refK = new Float32Array(8);
  const refV = new Float32Array(8);
  const ref = referenceOp(op, [
    { shape: [2, 4], data: q },
    { shape: [2, 2], data: kk },
    { shape: [2, 2], data: v },
    { shape: [4, 2], data: refK },
    { shape: [4, 2], data: refV },
  ], 0);
  assertClose(ref, want, TOL, "reference");
  const out = new Float32Array(8);
  const kc = new Float32Array(8);
  const vc = new Float32Array(8);
  k.attention(out, q, kk, v, kc, vc, new Float32Array(4), 2, 0, 2, 1, 2, 1, 0);
  assertClose(out, want, TOL, "ts");
  assertClose(kc, [1, 0, 0, 1, 0, 0, 0, 0], 0, "ts key cache");
  assertClose(vc, [1, 2, 3, 4, 0, 0, 0, 0], 0, "ts value cache");
});

Deno.test("attention: a window of 1 sees only the current token", () => {
  const op: Op = { kind: "attention", heads: 1, kvHeads: 1, headDim: 2, scale: 1, window: 1 };
  const out = new Float32Array(4);
  k.attention(
    out,
    f(1, 0, 1, 0),
    f(1, 0, 0, 1),
    f(1, 2, 3, 4),
    new Float32Array(8),
    new Float32Array(8),
    new Float32Array(4),
    2,
    0,
    1,
    1,
    2,
    1,
    1,
  );
  assertClose(out, [1, 2, 3, 4], TOL, "ts");
  const ref = referenceOp(op, [
    { shape: [2, 2], data: f(1, 0, 1, 0) },
    { shape: [2, 2], data: f(1, 0, 0, 1) },
    { shape: [2, 2], data: f(1, 2, 3, 4) },
    { shape: [4, 2], data: new Float32Array(8) },
    { shape: [4, 2], data: new Float32Array(8) },
  ], 0);
  assertClose(ref, [1, 2, 3, 4], TOL, "reference");
});

Deno.test("attention: softmax is stable for large scores", () => {
  // Scores 1000 and 0: exp without subtracting the max would overflow.
  const out = new Float32Array(2);
  k.attention(
    out,
    f(1000, 0),
    f(1, 0),
    f(5, 6),
    new Float32Array(4),
    new Float32Array(4),
    new Float32Array(2),
    1,
    1,
    1,
    1,
    2,
    1,
    0,
  );
  // Row 0 of the cache is zero (score 0); the new row scores 1000 and takes all the weight.
  assertClose(out, [5, 6], TOL, "ts");
  assert.ok(out.every(Number.isFinite));
});

Deno.test("embedding and lastRow copy rows", () => {
  const table = f(0, 0, 1, 1, 2, 2);
  assertClose(
    referenceOp({ kind: "embedding" }, [{ shape: [3], data: Int32Array.from([2, 0, 1]) }, {
      shape: [3, 2],
      data: table,
    }], 0),
    [2, 2, 0, 0, 1, 1],
    0,
    "reference embedding",
  );
  const out = new Float32Array(2);
  k.lastRow(out, f(1, 2, 3, 4, 5, 6), 3, 2);
  assertClose(out, [5, 6], 0, "ts lastRow");
});
