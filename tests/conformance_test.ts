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
  /** f32 values (for weights, before encoding); i32 ids for id inputs. */
  values: Float32Array | Int32Array;
}

interface OpCase {
  label: string;
  op: Op;
  T: number;
  pos: number;
  inputs: CaseInput[];
}

function f32Input(name: string, shape: number[], seed: number, scale = 1): CaseInput {
  return { name, kind: "input", dtype: "f32", shape, values: randomF32(shape[0] * shape[1], seed, scale) };
}

function weight(name: string, dtype: DType, shape: number[], seed: number, scale = 1): CaseInput {
  return { name, kind: "weight", dtype, shape, values: randomF32(elementCount(shape), seed, scale) };
}

function cases(): OpCase[] {
  const out: OpCase[] = [];
  for (const dtype of WEIGHT_DTYPES) {
    for (const [T, K, N] of [[1, 64, 24], [3, 96, 17], [7, 128, 40], [33, 64, 9]]) {
      out.push({
        label: `matmul ${dtype} T=${T} K=${K} N=${N}`,
        op: { kind: "matmul" },
        T,
        pos: 0,
        inputs: [f32Input("x", [T, K], T * 7 + K), weight("w", dtype, [N, K], N * 13 + K, 0.5)],
      });
    }
    const V = 11, D = 64;
    out.push({
      label: `embedding ${dtype}`,
      op: { kind: "embedding" },
      T: 4,
      pos: 0,
      inputs: [
        { name: "ids", kind: "input", dtype: "i32", shape: [4], values: Int32Array.from([0, 10, 3, 3]) },
        weight("table", dtype, [V, D], 5),
      ],
    });
  }
  out.push({
    label: "matmul f32 K=40 (tails)",
    op: { kind: "matmul" },
    T: 5,
    pos: 0,
    inputs: [f32Input("x", [5, 40], 1), weight("w", "f32", [7, 40], 2)],
  });
  out.push({
    label: "rmsNorm",
    op: { kind: "rmsNorm", eps: 1e-5 },
    T: 3,
    pos: 0,
    inputs: [f32Input("x", [3, 40], 3, 4), weight("w", "f32", [40], 4)],
  });
  for (const pos of [0, 7]) {
    out.push({
      label: `rope pos=${pos}`,
      op: { kind: "rope", heads: 3, headDim: 8, theta: 10000 },
      T: 3,
      pos,
      inputs: [f32Input("x", [3, 24], 5 + pos)],
    });
  }
  out.push({
    label: "siluMul",
    op: { kind: "siluMul" },
    T: 3,
    pos: 0,
    inputs: [f32Input("gate", [3, 37], 6, 6), f32Input("up", [3, 37], 7)],
  });
  out.push({
    label: "add",
    op: { kind: "add" },
    T: 3,
    pos: 0,
    inputs: [f32Input("a", [3, 37], 8), f32Input("b", [3, 37], 9)],
  });
  out.push({ label: "lastRow", op: { kind: "lastRow" }, T: 3, pos: 0, inputs: [f32Input("x", [3, 37], 10)] });
  for (const kvDType of ["f32", "f16"] as const) {
    for (const [T, pos, window] of [[3, 5, 0], [1, 9, 0], [4, 6, 4], [6, 0, 0]]) {
      const [heads, kvHeads, headDim, cap] = [4, 2, 8, 16];
      const cache = (name: string, seed: number): CaseInput => {
        const values = randomF32(cap * kvHeads * headDim, seed);
        // An f16 cache starts from values it can hold.
        return {
          name,
          kind: "state",
          dtype: kvDType,
          shape: [cap, kvHeads * headDim],
          values: kvDType === "f16" ? values.map(Math.f16round) : values,
        };
      };
      out.push({
        label: `attention kv=${kvDType} T=${T} pos=${pos} window=${window}`,
        op: { kind: "attention", heads, kvHeads, headDim, scale: 1 / Math.sqrt(headDim), window },
        T,
        pos,
        inputs: [
          f32Input("q", [T, heads * headDim], 11, 2),
          f32Input("k", [T, kvHeads * headDim], 12, 2),
          f32Input("v", [T, kvHeads * headDim], 13),
          cache("kCache", 14),
          cache("vCache", 15),
        ],
      });
    }
  }
  return out;
}

/** Builds the one-node graph of a case: T is symbolic so the plan is made for a larger T. */
function buildCase(c: OpCase): { specs: TensorSpec[]; out: TensorSpec; graph: ReturnType<GraphBuilder["build"]> } {
  const g = new GraphBuilder();
  const dim = (shape: number[], kind: CaseInput["kind"]): Dim[] =>
    kind === "input" ? ["T", ...shape.slice(1)] : [...shape];
  const specs = c.inputs.map((i) =>
    i.kind === "input"
      ? g.input(i.name, i.dtype, dim(i.shape, i.kind))
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
    ? g.rope(a, op.heads, op.headDim, op.theta, "out")
    : op.kind === "siluMul"
    ? g.siluMul(a, b, "out")
    : op.kind === "add"
    ? g.add(a, b, "out")
    : op.kind === "lastRow"
    ? g.lastRow(a, "out")
    : g.attention(a, b, specs[2], specs[3], specs[4], op, "out");
  g.output(out);
  return { specs, out, graph: g.build() };
}

async function runCase(backend: Backend, c: OpCase): Promise<void> {
  const { specs, out, graph } = buildCase(c);
  const plan = planGraph(graph, { T: Math.max(c.T, 8) });
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
    await exec.run({ dims: { T: c.T }, pos: c.pos });
    const expected = referenceOp(c.op, refInputs, c.pos);
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

Deno.test("conformance: nodes after lastRow run on one row, whatever the step's T", async (t) => {
  // x [T, 32] → lastRow → rmsNorm → matmul [1, 24], planned for T = 16 and run with T = 5.
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", 32]);
  const norm = g.weight("norm", "f32", [32]);
  const w = g.weight("w", "f32", [24, 32]);
  const out = g.matmul(g.rmsNorm(g.lastRow(x, "last"), norm, 1e-6, "normed"), w, "out");
  g.output(out);
  const plan = planGraph(g.build(), { T: 16 });
  const xs = randomF32(5 * 32, 21);
  const nw = randomF32(32, 22);
  const ww = randomF32(24 * 32, 23);
  const last = referenceOp({ kind: "lastRow" }, [{ shape: [5, 32], data: xs }], 0);
  const normed = referenceOp({ kind: "rmsNorm", eps: 1e-6 }, [{ shape: [1, 32], data: last }, {
    shape: [32],
    data: nw,
  }], 0);
  const expected = referenceOp(
    { kind: "matmul" },
    [{ shape: [1, 32], data: normed }, { shape: [24, 32], data: ww }],
    0,
  );
  await onEachBackend(t, async (backend) => {
    const bytes = (a: Float32Array) => new Uint8Array(a.buffer);
    const bindings = new Map<number, DeviceTensor>([
      [norm.id, backend.upload({ name: "norm", dtype: "f32", shape: [32], data: bytes(nw) })],
      [w.id, backend.upload({ name: "w", dtype: "f32", shape: [24, 32], data: bytes(ww) })],
    ]);
    const exec = await backend.compile(plan, bindings);
    try {
      exec.writeInput(x.id, xs, xs.length);
      await exec.run({ dims: { T: 5 }, pos: 0 });
      const actual = new Float32Array(24);
      await exec.readOutput(out.id, actual, 24);
      assertClose(actual, expected, TOLERANCE.f32, `${backend.name}: lastRow chain`);
    } finally {
      exec.dispose();
    }
  });
});

Deno.test("conformance: a step past the smallest KV cache of any attention node is refused", async (t) => {
  // Two attention nodes over the same q, k, v: the first with 16 cache rows, the second with 8.
  const [heads, kvHeads, headDim] = [2, 1, 8];
  const g = new GraphBuilder();
  const q = g.input("q", "f32", ["T", heads * headDim]);
  const k = g.input("k", "f32", ["T", kvHeads * headDim]);
  const v = g.input("v", "f32", ["T", kvHeads * headDim]);
  const op = { kind: "attention", heads, kvHeads, headDim, scale: 0.25, window: 0 } as const;
  const caches = [16, 16, 8, 8].map((rows, i) => g.state(`c${i}`, "f32", [rows, kvHeads * headDim]));
  const a = g.attention(q, k, v, caches[0], caches[1], op, "a");
  const b = g.attention(q, k, v, caches[2], caches[3], op, "b");
  g.output(g.add(a, b, "out"));
  const plan = planGraph(g.build(), { T: 4 });
  await onEachBackend(t, async (backend) => {
    const bindings = new Map<number, DeviceTensor>(
      caches.map((c) => [c.id, backend.createState(c.name, "f32", c.shape as number[])]),
    );
    const exec = await backend.compile(plan, bindings);
    try {
      for (const x of [q, k, v]) {
        const n = 3 * (x.shape[1] as number);
        exec.writeInput(x.id, randomF32(n, x.id), n);
      }
      await exec.run({ dims: { T: 3 }, pos: 5 }); // rows 5..7 fit both caches
      await assert.rejects(() => exec.run({ dims: { T: 3 }, pos: 6 }), (e: unknown) => {
        assert.ok(e instanceof RangeError);
        assert.match((e as Error).message, /holds 8 positions/);
        return true;
      });
    } finally {
      exec.dispose();
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
      await exec.run({ dims: { T: 2 }, pos: 0 });
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
      assert.equal(backend.supports("conv" as OpKind, "f32"), false);
      assert.equal(backend.supports("toString" as OpKind, "f32"), false);
      assert.equal(backend.supports("add", "q8_0"), false);
    } finally {
      exec.dispose();
      backend.release(tensor);
    }
  });
});
