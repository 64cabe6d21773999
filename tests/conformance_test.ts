/**
 * The conformance suite: every op of the closed op set, on every backend that
 * can be created here, against the reference kernels (`backends/reference.ts`).
 * Each case is a one-node graph run through the backend's real path (plan,
 * upload, compile, run, read back).
 *
 * Tolerances (max |difference| relative to max(1, max |expected|)), per weight
 * dtype: the reference decodes the very same stored weights, so only
 * accumulation order differs for float types; block-quantized matmuls may also
 * quantize the activations to 8 bits (as llama.cpp does), which costs more.
 *
 * Attention reads an f32 or f16 KV cache; with f16, the reference rounds each
 * written key and value to f16 too, and a backend may round a value the other way
 * (WGSL leaves the direction open), so the cache and the output get one f16 step.
 *
 * In CI (`CI=true`) a backend that cannot be created fails the suite instead of
 * being skipped.
 */

import assert from "node:assert/strict";
import type { Backend, DeviceTensor } from "../backends/contract.ts";
import { UnsupportedError } from "../backends/contract.ts";
import { referenceOp, type RefTensor } from "../backends/reference.ts";
import { GraphBuilder } from "../graph/builder.ts";
import { type DType, WEIGHT_DTYPES } from "../graph/dtype.ts";
import { type Dim, elementCount, type Op, type OpKind, type TensorSpec } from "../graph/ir.ts";
import { planGraph } from "../graph/plan.ts";
import { decodeWeights, encodeWeights } from "../graph/weight_codec.ts";
import { assertClose, probeBackends, randomF32 } from "./helpers.ts";

/** Tolerance per weight dtype (f32 for ops without weights). */
export const TOLERANCE: Record<DType, number> = {
  f32: 1e-5,
  f16: 1e-4,
  bf16: 1e-4,
  q8_0: 2e-2,
  q4_0: 2e-2,
  i32: 0,
};

/** Tolerance of attention and of its cache, per KV cache dtype: an f16 cache allows one f16 rounding step. */
export const KV_TOLERANCE: Record<"f32" | "f16", number> = { f32: 1e-5, f16: 1e-3 };

interface CaseInput {
  name: string;
  kind: "input" | "weight" | "state";
  dtype: DType;
  shape: number[];
  /** An input's shape in the graph (default: `T` rows, then `shape` past the first). */
  dims?: Dim[];
  /** f32 values (for weights, before encoding); i32 values for index inputs. */
  values: Float32Array | Int32Array;
}

interface OpCase {
  label: string;
  op: Op;
  /** The step's dimensions (the plan gets room for more). */
  dims: Record<string, number>;
  inputs: CaseInput[];
}

function f32Input(name: string, shape: number[], seed: number, scale = 1): CaseInput {
  return { name, kind: "input", dtype: "f32", shape, values: randomF32(shape[0] * shape[1], seed, scale) };
}

function i32Input(name: string, dims: Dim[], shape: number[], values: number[]): CaseInput {
  return { name, kind: "input", dtype: "i32", shape, dims, values: Int32Array.from(values) };
}

function weight(name: string, dtype: DType, shape: number[], seed: number, scale = 1): CaseInput {
  return { name, kind: "weight", dtype, shape, values: randomF32(elementCount(shape), seed, scale) };
}

/**
 * A paged-attention case: `seqs` gives, per page-table row, its pool pages; each
 * token is `[row, position]`. The pool (6 pages of 4 rows) starts with random rows,
 * so positions before a sequence's new tokens have keys and values to attend to.
 */
interface AttentionLayout {
  label: string;
  window: number;
  seqs: number[][];
  tokens: [number, number][];
}

const ATTENTION_LAYOUTS: AttentionLayout[] = [
  { label: "one sequence, 3 tokens at 5..7", window: 0, seqs: [[2, 0, 5, 1]], tokens: [[0, 5], [0, 6], [0, 7]] },
  { label: "one sequence, decode at 9", window: 0, seqs: [[3, 1, 4, 0]], tokens: [[0, 9]] },
  {
    label: "one sequence, a prompt from 0",
    window: 0,
    seqs: [[1, 2, 0, 0]],
    tokens: [0, 1, 2, 3, 4, 5].map((p) => [0, p]),
  },
  {
    label: "three sequences decoding",
    window: 0,
    seqs: [[1, 3, 0, 0], [4, 5, 0, 0], [2, 0, 0, 0]],
    tokens: [[0, 6], [1, 2], [2, 3]],
  },
  {
    label: "a decode and a prompt chunk, window 4",
    window: 4,
    seqs: [[0, 1, 2, 0], [3, 4, 0, 0]],
    tokens: [[0, 10], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4]],
  },
  {
    label: "two sequences sharing their first page",
    window: 0,
    seqs: [[0, 1, 0, 0], [0, 2, 0, 0]],
    tokens: [[0, 5], [1, 4], [1, 5]],
  },
];

function cases(): OpCase[] {
  const out: OpCase[] = [];
  for (const dtype of WEIGHT_DTYPES) {
    for (const [T, K, N] of [[1, 64, 24], [3, 96, 17], [7, 128, 40], [33, 64, 9]]) {
      out.push({
        label: `matmul ${dtype} T=${T} K=${K} N=${N}`,
        op: { kind: "matmul" },
        dims: { T },
        inputs: [f32Input("x", [T, K], T * 7 + K), weight("w", dtype, [N, K], N * 13 + K, 0.5)],
      });
    }
    const V = 11, D = 64;
    out.push({
      label: `embedding ${dtype}`,
      op: { kind: "embedding" },
      dims: { T: 4 },
      inputs: [i32Input("ids", ["T"], [4], [0, 10, 3, 3]), weight("table", dtype, [V, D], 5)],
    });
  }
  out.push({
    label: "matmul f32 K=40 (tails)",
    op: { kind: "matmul" },
    dims: { T: 5 },
    inputs: [f32Input("x", [5, 40], 1), weight("w", "f32", [7, 40], 2)],
  });
  out.push({
    label: "rmsNorm",
    op: { kind: "rmsNorm", eps: 1e-5 },
    dims: { T: 3 },
    inputs: [f32Input("x", [3, 40], 3, 4), weight("w", "f32", [40], 4)],
  });
  for (const positions of [[0, 1, 2], [7, 0, 1000]]) {
    out.push({
      label: `rope positions ${positions}`,
      op: { kind: "rope", heads: 3, headDim: 8, theta: 10000 },
      dims: { T: 3 },
      inputs: [f32Input("x", [3, 24], 5 + positions[0]), i32Input("positions", ["T"], [3], positions)],
    });
  }
  out.push({
    label: "siluMul",
    op: { kind: "siluMul" },
    dims: { T: 3 },
    inputs: [f32Input("gate", [3, 37], 6, 6), f32Input("up", [3, 37], 7)],
  });
  out.push({
    label: "add",
    op: { kind: "add" },
    dims: { T: 3 },
    inputs: [f32Input("a", [3, 37], 8), f32Input("b", [3, 37], 9)],
  });
  out.push({
    label: "gatherRows",
    op: { kind: "gatherRows" },
    dims: { T: 5, R: 3 },
    inputs: [f32Input("x", [5, 37], 10), i32Input("rows", ["R"], [3], [4, 0, 4])],
  });
  for (const kvDType of ["f32", "f16"] as const) {
    for (const layout of ATTENTION_LAYOUTS) {
      const [heads, kvHeads, headDim, pageSize, pageCount] = [4, 2, 8, 4, 6];
      const rows = pageSize * pageCount;
      const cache = (name: string, seed: number): CaseInput => {
        const values = randomF32(rows * kvHeads * headDim, seed);
        // An f16 cache starts from values it can hold.
        return {
          name,
          kind: "state",
          dtype: kvDType,
          shape: [rows, kvHeads * headDim],
          values: kvDType === "f16" ? values.map(Math.f16round) : values,
        };
      };
      const T = layout.tokens.length;
      const S = layout.seqs.length;
      const perSeq = layout.seqs[0].length;
      out.push({
        label: `attention kv=${kvDType}: ${layout.label}`,
        op: {
          kind: "attention",
          heads,
          kvHeads,
          headDim,
          scale: 1 / Math.sqrt(headDim),
          window: layout.window,
          pageSize,
        },
        dims: { T, S },
        inputs: [
          f32Input("q", [T, heads * headDim], 11, 2),
          f32Input("k", [T, kvHeads * headDim], 12, 2),
          f32Input("v", [T, kvHeads * headDim], 13),
          cache("kCache", 14),
          cache("vCache", 15),
          i32Input("positions", ["T"], [T], layout.tokens.map(([, p]) => p)),
          i32Input("seqOf", ["T"], [T], layout.tokens.map(([s]) => s)),
          i32Input("pages", ["S", perSeq], [S, perSeq], layout.seqs.flat()),
        ],
      });
    }
  }
  return out;
}

/** Builds the one-node graph of a case: its dims are symbolic so the plan is made for larger ones. */
function buildCase(c: OpCase): { specs: TensorSpec[]; out: TensorSpec; graph: ReturnType<GraphBuilder["build"]> } {
  const g = new GraphBuilder();
  const specs = c.inputs.map((i) =>
    i.kind === "input"
      ? g.input(i.name, i.dtype, i.dims ?? ["T", ...i.shape.slice(1)])
      : i.kind === "weight"
      ? g.weight(i.name, i.dtype, i.shape)
      : g.state(i.name, i.dtype, i.shape)
  );
  const op = c.op;
  const [a, b] = specs;
  const out = op.kind === "embedding"
    ? g.embedding(a, b, "out")
    : op.kind === "rmsNorm"
    ? g.rmsNorm(a, b, op.eps, "out")
    : op.kind === "matmul"
    ? g.matmul(a, b, "out")
    : op.kind === "rope"
    ? g.rope(a, b, op.heads, op.headDim, op.theta, "out")
    : op.kind === "siluMul"
    ? g.siluMul(a, b, "out")
    : op.kind === "add"
    ? g.add(a, b, "out")
    : op.kind === "gatherRows"
    ? g.gatherRows(a, b, "out")
    : g.attention(
      a,
      b,
      specs[2],
      specs[3],
      specs[4],
      {
        positions: specs[5],
        seqOf: specs[6],
        pages: specs[7],
      },
      op,
      "out",
    );
  g.output(out);
  return { specs, out, graph: g.build() };
}

/** Room for more than the case uses of every dimension, so the kernels see a plan larger than the step. */
function roomFor(dims: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(dims).map(([k, v]) => [k, Math.max(v, 8)]));
}

async function runCase(backend: Backend, c: OpCase): Promise<void> {
  const { specs, out, graph } = buildCase(c);
  const plan = planGraph(graph, roomFor(c.dims));
  const bindings = new Map<number, DeviceTensor>();
  const refInputs: RefTensor[] = [];
  const states: { spec: TensorSpec; device: DeviceTensor; ref: Float32Array }[] = [];
  c.inputs.forEach((i, idx) => {
    const spec = specs[idx];
    if (i.kind === "weight") {
      const rowLength = i.shape[i.shape.length - 1];
      const bytes = encodeWeights(i.dtype, i.values as Float32Array, rowLength);
      bindings.set(spec.id, backend.upload({ name: i.name, dtype: i.dtype, shape: i.shape, data: bytes }));
      refInputs.push({ shape: i.shape, data: decodeWeights(i.dtype, bytes, i.values.length) });
    } else if (i.kind === "state") {
      if (!backend.supports(c.op.kind, i.dtype)) {
        assert.throws(() => backend.createState(i.name, i.dtype, i.shape), UnsupportedError);
        return;
      }
      const device = backend.createState(i.name, i.dtype, i.shape);
      const values = i.values as Float32Array;
      backend.writeTensor(device, 0, encodeWeights(i.dtype, values, i.shape[1]));
      bindings.set(spec.id, device);
      const ref = Float32Array.from(values);
      states.push({ spec, device, ref });
      refInputs.push({ shape: i.shape, data: ref, dtype: i.dtype });
    } else {
      refInputs.push({ shape: i.shape, data: i.values });
    }
  });
  // The operand dtype: the weight's, or the KV cache's for attention.
  const operand = c.inputs.find((i) => i.kind !== "input");
  const dtype = operand?.dtype ?? "f32";
  const tolerance = operand?.kind === "state" ? KV_TOLERANCE[dtype as "f32" | "f16"] : TOLERANCE[dtype];
  if (!backend.supports(c.op.kind, dtype)) {
    if (operand?.kind === "state") return; // createState refused it above

    await assert.rejects(() => backend.compile(plan, bindings), UnsupportedError);
    return;
  }
  const exec = await backend.compile(plan, bindings);
  try {
    c.inputs.forEach((i, idx) => {
      if (i.kind === "input") exec.writeInput(specs[idx].id, i.values, i.values.length);
    });
    await exec.run({ dims: c.dims });
    const expected = referenceOp(c.op, refInputs);
    const actual = new Float32Array(expected.length);
    await exec.readOutput(out.id, actual, expected.length);
    assertClose(actual, expected, tolerance, `${backend.name}: ${c.label}`);
    for (const s of states) {
      const bytes = await backend.readTensor(s.device, 0, s.device.byteLength);
      const got = decodeWeights(s.device.dtype, bytes, s.ref.length);
      assertClose(got, s.ref, tolerance, `${backend.name}: ${c.label}, ${s.spec.name} after the step`);
    }
  } finally {
    exec.dispose();
    for (const t of bindings.values()) backend.release(t);
  }
}

/**
 * Runs `fn` as a step per backend that can be created here, disposing the backend
 * after. One that cannot is skipped with its reason, except under `CI=true`, where
 * that fails the test.
 */
async function onEachBackend(
  t: Deno.TestContext,
  fn: (backend: Backend, t: Deno.TestContext) => Promise<void>,
  label = (name: string) => name,
): Promise<void> {
  for (const probe of await probeBackends()) {
    if ("skip" in probe) {
      if (Deno.env.get("CI") === "true") throw new Error(`Backend "${probe.name}" is unavailable in CI: ${probe.skip}`);
      console.log(`skipping backend "${probe.name}": ${probe.skip}`);
      continue;
    }
    const { backend } = probe;
    await t.step(label(probe.name), async (t) => {
      try {
        await fn(backend, t);
      } finally {
        backend.dispose();
      }
    });
  }
}

Deno.test("conformance: every op on every backend matches the reference kernels", async (t) => {
  await onEachBackend(t, async (backend, t) => {
    for (const c of cases()) await t.step(c.label, () => runCase(backend, c));
  }, (name) => `backend ${name}`);
});

Deno.test("conformance: nodes after gatherRows run on its R rows, whatever the step's T", async (t) => {
  // x [T, 32] → gatherRows [R, 32] → rmsNorm → matmul [R, 24], planned for T = R = 16 and run with T = 5, R = 2.
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", 32]);
  const rows = g.input("rows", "i32", ["R"]);
  const norm = g.weight("norm", "f32", [32]);
  const w = g.weight("w", "f32", [24, 32]);
  const out = g.matmul(g.rmsNorm(g.gatherRows(x, rows, "picked"), norm, 1e-6, "normed"), w, "out");
  g.output(out);
  const plan = planGraph(g.build(), { T: 16, R: 16 });
  const xs = randomF32(5 * 32, 21);
  const nw = randomF32(32, 22);
  const ww = randomF32(24 * 32, 23);
  const picks = Int32Array.of(4, 1);
  const picked = referenceOp({ kind: "gatherRows" }, [{ shape: [5, 32], data: xs }, { shape: [2], data: picks }]);
  const normed = referenceOp({ kind: "rmsNorm", eps: 1e-6 }, [{ shape: [2, 32], data: picked }, {
    shape: [32],
    data: nw,
  }]);
  const expected = referenceOp({ kind: "matmul" }, [{ shape: [2, 32], data: normed }, { shape: [24, 32], data: ww }]);
  await onEachBackend(t, async (backend) => {
    const bytes = (a: Float32Array) => new Uint8Array(a.buffer);
    const bindings = new Map<number, DeviceTensor>([
      [norm.id, backend.upload({ name: "norm", dtype: "f32", shape: [32], data: bytes(nw) })],
      [w.id, backend.upload({ name: "w", dtype: "f32", shape: [24, 32], data: bytes(ww) })],
    ]);
    const exec = await backend.compile(plan, bindings);
    try {
      exec.writeInput(x.id, xs, xs.length);
      exec.writeInput(rows.id, picks, 2);
      await exec.run({ dims: { T: 5, R: 2 } });
      const actual = new Float32Array(48);
      await exec.readOutput(out.id, actual, 48);
      assertClose(actual, expected, TOLERANCE.f32, `${backend.name}: gatherRows chain`);
    } finally {
      exec.dispose();
    }
  });
});

Deno.test("conformance: index inputs and step dimensions outside the plan are refused", async (t) => {
  // Attention over a pool of 3 pages of 4 rows, page tables of 2 pages (positions below 8), room for S = 2.
  const [heads, kvHeads, headDim, pageSize] = [2, 1, 8, 4];
  const g = new GraphBuilder();
  const q = g.input("q", "f32", ["T", heads * headDim]);
  const k = g.input("k", "f32", ["T", kvHeads * headDim]);
  const v = g.input("v", "f32", ["T", kvHeads * headDim]);
  const positions = g.input("positions", "i32", ["T"]);
  const seqOf = g.input("seqOf", "i32", ["T"]);
  const pages = g.input("pages", "i32", ["S", 2]);
  const op = { heads, kvHeads, headDim, scale: 0.25, window: 0, pageSize };
  const caches = [0, 1].map((i) => g.state(`c${i}`, "f32", [12, kvHeads * headDim]));
  g.output(g.attention(q, k, v, caches[0], caches[1], { positions, seqOf, pages }, op, "out"));
  const plan = planGraph(g.build(), { T: 4, S: 2 });
  await onEachBackend(t, async (backend) => {
    const bindings = new Map<number, DeviceTensor>(
      caches.map((c) => [c.id, backend.createState(c.name, "f32", c.shape as number[])]),
    );
    const exec = await backend.compile(plan, bindings);
    try {
      const refused = (id: number, values: number[], message: string) =>
        assert.throws(() => exec.writeInput(id, Int32Array.from(values), values.length), {
          name: "RangeError",
          message,
        });
      refused(
        positions.id,
        [0, 8],
        'Cannot use position 8 at index 1 of input "positions": expected an integer from 0 to 7',
      );
      refused(
        positions.id,
        [-1],
        'Cannot use position -1 at index 0 of input "positions": expected an integer from 0 to 7',
      );
      refused(
        seqOf.id,
        [2],
        'Cannot use page-table row 2 at index 0 of input "seqOf": expected an integer from 0 to 1',
      );
      refused(pages.id, [0, 1, 2, 3], 'Cannot use page 3 at index 3 of input "pages": expected an integer from 0 to 2');
      for (const x of [q, k, v]) {
        const n = 3 * (x.shape[1] as number);
        exec.writeInput(x.id, randomF32(n, x.id), n);
      }
      exec.writeInput(positions.id, Int32Array.of(0, 1, 4), 3);
      exec.writeInput(seqOf.id, Int32Array.of(0, 0, 1), 3);
      exec.writeInput(pages.id, Int32Array.of(2, 0, 1, 0), 4);
      await exec.run({ dims: { T: 3, S: 2 } });
      const bad: Record<string, number>[] = [{ T: 5, S: 1 }, { T: 0, S: 1 }, { T: 1, S: 3 }, { T: 1 }];
      for (const dims of bad) {
        await assert.rejects(() => exec.run({ dims }), RangeError);
      }
    } finally {
      exec.dispose();
      for (const t of bindings.values()) backend.release(t);
    }
  });
});

Deno.test("conformance: every backend checks inputs, outputs, token ids, byte ranges and op kinds alike", async (t) => {
  // ids [T] → embedding (V = 6 rows of 4) → out, and an f32 input x that is not an output.
  const g = new GraphBuilder();
  const ids = g.input("ids", "i32", ["T"]);
  const x = g.input("x", "f32", ["T", 4]);
  const table = g.weight("table", "f32", [6, 4]);
  const out = g.add(g.embedding(ids, table, "rows"), x, "out");
  g.output(out);
  const plan = planGraph(g.build(), { T: 2 });
  const values = randomF32(24, 31);
  await onEachBackend(t, async (backend) => {
    const tensor = backend.upload({ name: "table", dtype: "f32", shape: [6, 4], data: new Uint8Array(values.buffer) });
    const exec = await backend.compile(plan, new Map([[table.id, tensor]]));
    try {
      assert.throws(() => exec.writeInput(out.id, new Float32Array(8), 8), {
        name: "TypeError",
        message: `Cannot write input ${out.id}: it is not a graph input`,
      });
      const fits = plan.slots[x.id]!.bytes / 4;
      assert.throws(() => exec.writeInput(x.id, new Float32Array(fits + 1), fits + 1), {
        name: "RangeError",
        message: `Cannot write ${fits + 1} values to input "x": it holds ${fits}`,
      });
      assert.throws(() => exec.writeInput(x.id, new Float32Array(8), 1.5), RangeError);
      for (const bad of [6, -1]) {
        assert.throws(() => exec.writeInput(ids.id, Int32Array.of(0, bad), 2), {
          name: "RangeError",
          message: `Cannot embed token id ${bad}: expected an integer from 0 to 5`,
        });
      }
      assert.throws(() => exec.writeInput(ids.id, Float32Array.of(0.5), 1), RangeError);
      exec.writeInput(ids.id, Int32Array.of(5, 0), 2);
      exec.writeInput(x.id, new Float32Array(8), 8);
      await exec.run({ dims: { T: 2 } });
      const dst = new Float32Array(8);
      await exec.readOutput(out.id, dst, 8);
      assertClose(dst, [...values.subarray(20, 24), ...values.subarray(0, 4)], TOLERANCE.f32, `${backend.name}: rows`);
      await assert.rejects(() => exec.readOutput(x.id, dst, 4), {
        name: "RangeError",
        message: `Cannot read 4 values of output ${x.id}: it is not a graph output`,
      });
      await assert.rejects(() => exec.readOutput(out.id, new Float32Array(2), 4), {
        name: "RangeError",
        message: "Cannot read 4 values into an array of 2",
      });
      await assert.rejects(() => exec.readOutput(out.id, dst, -1), RangeError);
      assert.throws(() => backend.writeTensor(tensor, 92, new Uint8Array(8)), {
        name: "RangeError",
        message: 'Cannot access bytes 92..100 of "table": it holds 96',
      });
      await assert.rejects(() => backend.readTensor(tensor, -4, 4), RangeError);
      assert.throws(() => backend.copyTensor(tensor, tensor, 100), RangeError);
      assert.throws(() => backend.copyTensor(tensor, tensor, 32, 0, 16), {
        name: "RangeError",
        message: 'Cannot copy bytes 0..32 of "table" over 16..48 of itself: the ranges overlap',
      });
      assert.throws(() => backend.copyTensor(tensor, tensor, 32, 70, 0), RangeError);
      // A copy within one tensor (a KV page moved in the pool): rows 0..1 over rows 4..5.
      backend.copyTensor(tensor, tensor, 32, 0, 64);
      const copied = new Float32Array((await backend.readTensor(tensor, 0, 96)).buffer);
      assert.deepEqual([...copied.subarray(16, 24)], [...values.subarray(0, 8)]);
      assert.deepEqual([...copied.subarray(0, 16)], [...values.subarray(0, 16)]);
      assert.equal(backend.supports("conv" as OpKind, "f32"), false);
      assert.equal(backend.supports("toString" as OpKind, "f32"), false);
      assert.equal(backend.supports("add", "q8_0"), false);
    } finally {
      exec.dispose();
      backend.release(tensor);
    }
  });
});
