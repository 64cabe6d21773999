/**
 * Unit tests of each op with hand-checked values, on the reference kernels and
 * on the TypeScript backend's kernels. (The conformance suite compares every
 * backend with the reference on random data.)
 */

import assert from "node:assert/strict";
import { referenceOp } from "../backends/reference.ts";
import * as k from "../backends/ts/kernels.ts";
import { embeddingF32, matmulF32 } from "../backends/ts/matmul.ts";
import { f32ToF16 } from "../graph/half.ts";
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
    referenceOp({ kind: "siluMul" }, [{ shape: [1, 4], data: gate }, { shape: [1, 4], data: up }]),
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
  assertClose(referenceOp(op, [{ shape: [1, 4], data: x }, { shape: [4], data: w }]), want, TOL, "reference");
  const out = new Float32Array(4);
  k.rmsNorm(out, x, w, 1, 4, 0);
  assertClose(out, want, TOL, "ts");
});

Deno.test("matmul: x · Wᵀ", () => {
  const x = f(1, 2, 3, 4); // [[1, 2], [3, 4]]
  const w = f(1, 0, 0, 1, 1, 1); // rows [1, 0], [0, 1], [1, 1]
  const want = [1, 2, 3, 3, 4, 7];
  assertClose(
    referenceOp({ kind: "matmul" }, [{ shape: [2, 2], data: x }, { shape: [3, 2], data: w }]),
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
  const positions = Int32Array.of(1);
  assertClose(referenceOp(op, [{ shape: [1, 4], data: x }, { shape: [1], data: positions }]), want, TOL, "reference");
  const out = new Float32Array(4);
  k.rope(out, x, positions, 1, 1, 4, Float64Array.from([1, 0.01]));
  assertClose(out, want, TOL, "ts");
});

Deno.test("rope: each row turns by its own position; position 0 is the identity", () => {
  // Rows at positions 0 and 1 (of two sequences, say): row 0 stays, row 1 turns as above.
  const x = f(0.5, -1, 2, 3, 1, 2, 3, 4);
  const want = [0.5, -1, 2, 3, -1.9841106485, 1.9599006675, 2.4623779025, 4.0197996684];
  const positions = Int32Array.of(0, 1);
  const out = new Float32Array(8);
  k.rope(out, x, positions, 2, 1, 4, Float64Array.from([1, 0.01]));
  assertClose(out.subarray(0, 4), x.subarray(0, 4), 0, "ts, position 0");
  assertClose(out, want, TOL, "ts");
  const op: Op = { kind: "rope", heads: 1, headDim: 4, theta: 10000 };
  assertClose(referenceOp(op, [{ shape: [2, 4], data: x }, { shape: [2], data: positions }]), want, TOL, "reference");
});

/** The attention attributes of these tests and a kernel call over them (`pageSize` rows per page). */
interface AttentionCase {
  heads: number;
  kvHeads: number;
  headDim: number;
  window: number;
  pageSize: number;
  /** Page table rows, each `pagesPerSeq` pages. */
  pages: number[][];
  /** Per token: [page-table row, position]. */
  tokens: [number, number][];
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  /** Pool rows. */
  rows: number;
  /** Initial pool contents (zeros when absent). */
  kCache?: Float32Array;
  vCache?: Float32Array;
}

/** Runs a case on the ts kernel and on the reference; returns both outputs and the ts caches. */
function runAttention(c: AttentionCase) {
  const kvDim = c.kvHeads * c.headDim;
  const pagesPerSeq = c.pages[0].length;
  const op = {
    kind: "attention" as const,
    heads: c.heads,
    kvHeads: c.kvHeads,
    headDim: c.headDim,
    scale: 1,
    window: c.window,
    pageSize: c.pageSize,
  };
  const positions = Int32Array.from(c.tokens.map(([, p]) => p));
  const seqOf = Int32Array.from(c.tokens.map(([s]) => s));
  const pages = Int32Array.from(c.pages.flat());
  const T = c.tokens.length;
  const pool = (init?: Float32Array) => init ? Float32Array.from(init) : new Float32Array(c.rows * kvDim);
  const [kc, vc] = [pool(c.kCache), pool(c.vCache)];
  const out = new Float32Array(T * c.heads * c.headDim);
  const shape = { ...op, pagesPerSeq };
  k.attention(out, c.q, c.k, c.v, kc, vc, positions, seqOf, pages, T, shape, k.attentionScratch(shape));
  const [refK, refV] = [pool(c.kCache), pool(c.vCache)];
  const ref = referenceOp(op, [
    { shape: [T, c.heads * c.headDim], data: c.q },
    { shape: [T, kvDim], data: c.k },
    { shape: [T, kvDim], data: c.v },
    { shape: [c.rows, kvDim], data: refK },
    { shape: [c.rows, kvDim], data: refV },
    { shape: [T], data: positions },
    { shape: [T], data: seqOf },
    { shape: [c.pages.length, pagesPerSeq], data: pages },
  ]);
  return { out, ref, kc, vc };
}

Deno.test("attention: causal softmax with two query heads sharing one kv head, through a page table", () => {
  // heads 2, kvHeads 1, headDim 2, scale 1, two new tokens at positions 0 and 1 of one
  // sequence whose first page (2 rows) is pool page 1: they land in pool rows 2 and 3.
  const a = 1 / (1 + Math.exp(-1)); // softmax([1, 0])[0] = 0.7310585786
  const b = 1 - a;
  const want = [
    1,
    2,
    1,
    2, // token 0 sees only position 0
    a * 1 + b * 3,
    a * 2 + b * 4, // head 0 favours position 0: 1.5378828428, 2.5378828428
    b * 1 + a * 3,
    b * 2 + a * 4, // head 1 favours position 1: 2.4621171572, 3.4621171572
  ];
  assertClose(want.slice(4), [1.5378828428, 2.5378828428, 2.4621171572, 3.4621171572], 1e-9, "hand values");
  const { out, ref, kc, vc } = runAttention({
    heads: 2,
    kvHeads: 1,
    headDim: 2,
    window: 0,
    pageSize: 2,
    pages: [[1, 0]],
    tokens: [[0, 0], [0, 1]],
    q: f(1, 0, 0, 1, 1, 0, 0, 1),
    k: f(1, 0, 0, 1),
    v: f(1, 2, 3, 4),
    rows: 4,
  });
  assertClose(ref, want, TOL, "reference");
  assertClose(out, want, TOL, "ts");
  assertClose(kc, [0, 0, 0, 0, 1, 0, 0, 1], 0, "ts key pool");
  assertClose(vc, [0, 0, 0, 0, 1, 2, 3, 4], 0, "ts value pool");
});

Deno.test("attention: a token sees its own sequence's earlier pages, and only them", () => {
  // Pages of one row. Sequence 0 holds position 0 in pool row 3 (key [1, 0], value [5, 6])
  // and decodes position 1 into row 1; sequence 1 prefills position 0 into row 0. Pool row 2
  // belongs to no one (key [9, 9], value [100, 100]) and must not be seen.
  const kCache = f(0, 0, 0, 0, 9, 9, 1, 0);
  const vCache = f(0, 0, 0, 0, 100, 100, 5, 6);
  const { out, ref, kc } = runAttention({
    heads: 1,
    kvHeads: 1,
    headDim: 2,
    window: 0,
    pageSize: 1,
    pages: [[3, 1], [0, 2]],
    tokens: [[0, 1], [1, 0]],
    q: f(1, 0, 0, 1),
    k: f(0, 0, 0, 1),
    v: f(1, 2, 7, 8),
    rows: 4,
    kCache,
    vCache,
  });
  // Token 0: scores [1 (row 3), 0 (row 1)] → a·[5, 6] + b·[1, 2]. Token 1: itself only.
  const a = 1 / (1 + Math.exp(-1));
  const want = [a * 5 + (1 - a) * 1, a * 6 + (1 - a) * 2, 7, 8];
  assertClose(ref, want, TOL, "reference");
  assertClose(out, want, TOL, "ts");
  assertClose(kc, [0, 1, 0, 0, 9, 9, 1, 0], 0, "ts key pool: rows 0 and 1 written, 2 and 3 kept");
});

Deno.test("attention: a window of 1 sees only the current token", () => {
  const { out, ref } = runAttention({
    heads: 1,
    kvHeads: 1,
    headDim: 2,
    window: 1,
    pageSize: 4,
    pages: [[0]],
    tokens: [[0, 0], [0, 1]],
    q: f(1, 0, 1, 0),
    k: f(1, 0, 0, 1),
    v: f(1, 2, 3, 4),
    rows: 4,
  });
  assertClose(out, [1, 2, 3, 4], TOL, "ts");
  assertClose(ref, [1, 2, 3, 4], TOL, "reference");
});

Deno.test("attention: softmax is stable for large scores", () => {
  // Scores 1000 and 0: exp without subtracting the max would overflow.
  const { out } = runAttention({
    heads: 1,
    kvHeads: 1,
    headDim: 2,
    window: 0,
    pageSize: 2,
    pages: [[0]],
    tokens: [[0, 1]],
    q: f(1000, 0),
    k: f(1, 0),
    v: f(5, 6),
    rows: 2,
  });
  // Position 0 of the pool is zero (score 0); the new row scores 1000 and takes all the weight.
  assertClose(out, [5, 6], TOL, "ts");
  assert.ok(out.every(Number.isFinite));
});

Deno.test("attention over an f16 pool stores f16 bit patterns and reads them back", () => {
  // One token at position 0 in pool row 1: 1/3 is stored as the f16 nearest to it.
  const shape = { heads: 1, kvHeads: 1, headDim: 2, scale: 1, window: 0, pageSize: 1, pagesPerSeq: 1 };
  const [kc, vc] = [new Uint16Array(4), new Uint16Array(4)];
  const out = new Float32Array(2);
  const [positions, seqOf, pages] = [Int32Array.of(0), Int32Array.of(0), Int32Array.of(1)];
  k.attentionF16(
    out,
    f(1, 1),
    f(1, 0),
    f(1 / 3, 2),
    kc,
    vc,
    positions,
    seqOf,
    pages,
    1,
    shape,
    k.attentionScratch(shape),
  );
  assert.deepEqual([...kc], [0, 0, f32ToF16(1), 0]);
  assert.deepEqual([...vc], [0, 0, f32ToF16(1 / 3), f32ToF16(2)]);
  assertClose(out, [Math.f16round(1 / 3), 2], 0, "ts: the output reads the stored f16 values");
});

Deno.test("embedding and gatherRows copy rows", () => {
  const table = f(0, 0, 1, 1, 2, 2);
  const ids = Int32Array.from([2, 0, 1]);
  assertClose(
    referenceOp({ kind: "embedding" }, [{ shape: [3], data: ids }, { shape: [3, 2], data: table }]),
    [2, 2, 0, 0, 1, 1],
    0,
    "reference embedding",
  );
  const rows = new Float32Array(6);
  embeddingF32(rows, ids, { dtype: "f32", shape: [3, 2], bytes: new Uint8Array(table.buffer), f32: table }, 3, 2);
  assertClose(rows, [2, 2, 0, 0, 1, 1], 0, "ts embedding");
  const x = f(1, 2, 3, 4, 5, 6);
  const picks = Int32Array.of(2, 0, 2);
  assertClose(
    referenceOp({ kind: "gatherRows" }, [{ shape: [3, 2], data: x }, { shape: [3], data: picks }]),
    [5, 6, 1, 2, 5, 6],
    0,
    "reference gatherRows",
  );
  const out = new Float32Array(6);
  k.gatherRows(out, x, picks, 3, 2);
  assertClose(out, [5, 6, 1, 2, 5, 6], 0, "ts gatherRows");
});
