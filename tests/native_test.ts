/**
 * The native backend (C kernels through FFI): the story model's greedy ids and
 * logits against the references and the ts backend, with 1 and 2 threads, alone
 * and batched with other sequences; the optimised and portable (scalar C11) builds
 * against the reference kernels, and the portable build's f16 KV cache against the
 * AVX2 build's; a row's result the same bits whatever else shares its step;
 * steps off the caller's thread (the event loop keeps running), profiling, and
 * calls made while a step runs; typed errors for mismatched shapes, index
 * operands the kernels could not trust, bad steps and a missing or stale library.
 *
 * The optimised build is also checked op by op by the conformance suite, which
 * runs every registered backend.
 */

import assert from "node:assert/strict";
import { loadModel } from "../mod.ts";
import type { Backend, DeviceTensor, Executable } from "../backends/contract.ts";
import { UnsupportedError } from "../backends/contract.ts";
import { referenceOp, type RefTensor } from "../backends/reference.ts";
import {
  BUILD_COMMAND,
  buildNative,
  createNativeBackend,
  measureReadBandwidth,
  NativeLibraryError,
} from "../backends/native/mod.ts";
import { GraphBuilder } from "../graph/builder.ts";
import { byteSize, type DType, WEIGHT_DTYPES } from "../graph/dtype.ts";
import { elementCount, type Graph, type Op, type TensorSpec } from "../graph/ir.ts";
import { type ExecutionPlan, planGraph } from "../graph/plan.ts";
import { f32BitsToF16 } from "../graph/half.ts";
import { decodeWeights, encodeWeights } from "../graph/weight_codec.ts";
import { assertClose, randomF32, SHARED, STORY_DIR, watchEventLoop } from "./helpers.ts";

interface GreedyCase {
  prompt: string;
  prompt_ids: number[];
  greedy_ids: number[];
}

const PROMPTS = [
  "Once upon a time",
  "The little dog ran to the park and saw a big red ball. He wanted to play with it, so he",
  "Lily and Ben were friends.",
];

for (const threads of [1, 2]) {
  Deno.test(`native: story greedy ids match the reference (${threads} thread${threads > 1 ? "s" : ""})`, async () => {
    const ref = JSON.parse(await Deno.readTextFile(`${SHARED}/refs/story-greedy.json`)) as { cases: GreedyCase[] };
    assert.ok(ref.cases.length >= 4);
    const model = await loadModel(STORY_DIR, { backend: "native", threads });
    try {
      for (const c of ref.cases) {
        const ids: number[] = [];
        const stream = model.generateTokens(c.prompt_ids, { temperature: 0, maxTokens: 64, ignoreEos: true });
        for await (const t of stream) ids.push(t.id);
        assert.equal(ids.length, 64);
        assert.deepEqual(ids, c.greedy_ids.slice(0, 64), `greedy ids of ${JSON.stringify(c.prompt)}`);
      }
    } finally {
      await model.dispose();
    }
  });
}

/** Max |a - b| relative to max |b|. */
function relativeError(a: Float32Array, b: Float32Array): number {
  let scale = 0, worst = 0;
  for (let i = 0; i < b.length; i++) {
    scale = Math.max(scale, Math.abs(b[i]));
    worst = Math.max(worst, Math.abs(a[i] - b[i]));
  }
  return worst / scale;
}

async function allLogits(dir: string, backend: string, options: Record<string, unknown>): Promise<Float32Array[]> {
  const model = await loadModel(dir, { backend, ...options });
  try {
    const out: Float32Array[] = [];
    for (const p of PROMPTS) {
      const seq = model.createSequence();
      out.push(Float32Array.from(await seq.evaluate(model.tokenizer.encode(p), { logits: "all" })));
      await seq.dispose();
    }
    return out;
  } finally {
    await model.dispose();
  }
}

Deno.test("native: story logits agree with the ts backend within 1e-4 (1 and 2 threads, chunked prefill)", async () => {
  const expected = await allLogits(STORY_DIR, "ts", {});
  for (const options of [{ threads: 1 }, { threads: 2 }, { threads: 2, prefillChunk: 7 }, {}]) {
    const actual = await allLogits(STORY_DIR, "native", options);
    actual.forEach((a, i) => {
      assert.equal(a.length, expected[i].length);
      const err = relativeError(a, expected[i]);
      assert.ok(err <= 1e-4, `prompt ${i} with ${JSON.stringify(options)}: relative error ${err}`);
    });
  }
});

Deno.test("native: a sequence's logits are the same bits alone and batched with 15 others", async () => {
  // Alone, a prompt is one step of its own tokens; batched, its tokens share steps (cut elsewhere by the
  // 64-token steps) with 15 other prompts, then its decode tokens share steps with 15 others' (T = 16).
  const model = await loadModel(STORY_DIR, { backend: "native", threads: 2 });
  try {
    const prompts = Array.from({ length: 16 }, (_, i) => model.tokenizer.encode(`${PROMPTS[i % 3]} ${i}`));
    const follow = [42, 7, 300];
    const run = async (seqIndex: number) => {
      const seq = model.createSequence();
      const prompt = Float32Array.from(await seq.evaluate(prompts[seqIndex], { logits: "all" }));
      const decode: Float32Array[] = [];
      for (const id of follow) decode.push(Float32Array.from(await seq.evaluate([id])));
      await seq.dispose();
      return { prompt, decode };
    };
    const alone: { prompt: Float32Array; decode: Float32Array[] }[] = [];
    for (let i = 0; i < 16; i++) alone.push(await run(i));
    const batched = await Promise.all(prompts.map((_, i) => run(i)));
    for (let i = 0; i < 16; i++) {
      assert.deepEqual(batched[i].prompt, alone[i].prompt, `prompt logits of sequence ${i}`);
      batched[i].decode.forEach((d, j) => assert.deepEqual(d, alone[i].decode[j], `decode ${j} of sequence ${i}`));
    }
  } finally {
    await model.dispose();
  }
});

// ---- One-op graphs, shared by the optimised and the portable builds ----

/** A graph operand of a test: an input written each step, a weight, or a state (a KV pool). */
interface Operand {
  readonly spec: TensorSpec;
  readonly ref: RefTensor;
  readonly values: Float32Array | Int32Array;
}

/** A one-op graph under construction: its operands as the reference and the backend see them. */
class OpGraph {
  readonly g = new GraphBuilder();
  readonly operands: Operand[] = [];
  readonly bindings = new Map<number, DeviceTensor>();
  readonly states: { spec: TensorSpec; dev: DeviceTensor; ref: Float32Array }[] = [];
  constructor(readonly backend: Backend) {}

  /** An f32 input of `rows` rows (the graph's `T`) of `width`. */
  input(name: string, rows: number, width: number, seed: number, scale = 1): TensorSpec {
    const values = randomF32(rows * width, seed, scale);
    const spec = this.g.input(name, "f32", ["T", width]);
    this.operands.push({ spec, ref: { shape: [rows, width], data: values }, values });
    return spec;
  }

  /** An i32 index input with the graph dims `dims`. */
  index(name: string, dims: (number | string)[], shape: number[], values: readonly number[]): TensorSpec {
    const data = Int32Array.from(values);
    const spec = this.g.input(name, "i32", dims);
    this.operands.push({ spec, ref: { shape, data }, values: data });
    return spec;
  }

  weight(name: string, dtype: DType, shape: number[], seed: number, scale = 0.5): TensorSpec {
    const values = randomF32(elementCount(shape), seed, scale);
    const bytes = encodeWeights(dtype, values, shape[shape.length - 1]);
    const spec = this.g.weight(name, dtype, shape);
    this.bindings.set(spec.id, this.backend.upload({ name, dtype, shape, data: bytes }));
    this.operands.push({ spec, ref: { shape, data: decodeWeights(dtype, bytes, values.length) }, values });
    return spec;
  }

  /** A KV pool of `rows` rows starting with random values it holds exactly. */
  state(name: string, dtype: DType, rows: number, width: number, seed: number): TensorSpec {
    const ref = randomF32(rows * width, seed).map((x) => (dtype === "f16" ? Math.f16round(x) : x));
    const spec = this.g.state(name, dtype, [rows, width]);
    const dev = this.backend.createState(name, dtype, [rows, width]);
    assert.equal(dev.byteLength, byteSize(dtype, rows * width));
    this.backend.writeTensor(dev, 0, encodeWeights(dtype, ref, width));
    this.bindings.set(spec.id, dev);
    this.states.push({ spec, dev, ref });
    this.operands.push({ spec, ref: { shape: [rows, width], data: ref, dtype }, values: ref });
    return spec;
  }

  refs(specs: readonly TensorSpec[]): RefTensor[] {
    return specs.map((s) => this.operands.find((o) => o.spec.id === s.id)!.ref);
  }

  /** Writes every input, runs one step with `dims`, returns the output's first `count` values. */
  async run(exec: Executable, out: TensorSpec, dims: Record<string, number>, count: number): Promise<Float32Array> {
    for (const o of this.operands) {
      if (o.spec.kind === "input") exec.writeInput(o.spec.id, o.values, o.values.length);
    }
    await exec.run({ dims });
    const actual = new Float32Array(count);
    await exec.readOutput(out.id, actual, count);
    return actual;
  }

  release(): void {
    for (const t of this.bindings.values()) this.backend.release(t);
  }
}

interface OpCheck {
  label: string;
  op: Op;
  T: number;
  /** The weight's dtype, or the KV pool's for attention. */
  dtype: DType;
  /** Matmul row length (default 96). */
  K?: number;
  /** Rope and attention: each token's position; attention: each token's sequence (page-table row). */
  positions?: number[];
  seqOf?: number[];
}

/** The page table of the attention checks: 3 sequences over a pool of 8 pages of 4 rows, in scattered pages. */
const PAGE_SIZE = 4, POOL_PAGES = 8;
const PAGES = [[5, 2, 7, 0], [1, 6, 3, 4], [4, 0, 1, 2]];

function opChecks(): OpCheck[] {
  const out: OpCheck[] = [];
  for (const dtype of WEIGHT_DTYPES) {
    // K = 320 is 10 quant blocks: one group of 8 (the SIMD path) and 2 left over; K = 1056 is one chunk of 32
    // blocks and one more; K = 100 leaves a float tail; K = 1100 makes rows of 2 KiB or more, which decode
    // takes several at a time. T = 5, 9 and 40 run the batched tiles (and the quantized GEMM).
    for (const K of dtype.startsWith("q") ? [96, 320, 1056] : [100, 320, 1100]) {
      for (const T of [1, 2, 5, 9, 40]) {
        out.push({ label: `matmul ${dtype} K=${K} T=${T}`, op: { kind: "matmul" }, T, dtype, K });
      }
    }
    out.push({ label: `embedding ${dtype}`, op: { kind: "embedding" }, T: 3, dtype });
  }
  out.push({ label: "rmsNorm", op: { kind: "rmsNorm", eps: 1e-5 }, T: 3, dtype: "f32" });
  out.push({
    label: "rope at scattered positions",
    op: { kind: "rope", heads: 3, headDim: 10, theta: 500000 },
    T: 4,
    dtype: "f32",
    positions: [11, 0, 4095, 7],
  });
  out.push({ label: "siluMul", op: { kind: "siluMul" }, T: 3, dtype: "f32" });
  out.push({ label: "add", op: { kind: "add" }, T: 3, dtype: "f32" });
  out.push({ label: "gatherRows", op: { kind: "gatherRows" }, T: 5, dtype: "f32", positions: [4, 0, 4, 2] });
  // kvDim = 26: F16C converts 8 values at a time, the rest goes through the scalar conversion.
  const layouts: [string, number[], number[], number][] = [
    ["a prompt of 5 after 3", [3, 4, 5, 6, 7], [0, 0, 0, 0, 0], 0],
    ["3 sequences decoding", [12, 2, 15], [0, 1, 2], 0],
    ["a decode and a chunk, window 3", [14, 0, 1, 2, 3, 4], [1, 2, 2, 2, 2, 2], 3],
    ["a decode, window 5", [12], [2], 5],
  ];
  for (const dtype of ["f32", "f16"] as DType[]) {
    for (const [what, positions, seqOf, window] of layouts) {
      out.push({
        label: `attention kv=${dtype}: ${what}`,
        op: { kind: "attention", heads: 6, kvHeads: 2, headDim: 13, scale: 0.3, window, pageSize: PAGE_SIZE },
        T: positions.length,
        dtype,
        positions,
        seqOf,
      });
    }
  }
  return out;
}

const TOL: Record<string, number> = { f32: 1e-5, f16: 1e-4, bf16: 1e-4, q8_0: 2e-2, q4_0: 2e-2 };

/** Builds a check's one-op graph on `backend`: the graph helper, its output and the reference's inputs. */
function buildOpCheck(backend: Backend, c: OpCheck) {
  const og = new OpGraph(backend);
  const K = c.K ?? 96, N = 37, D = 67, V = 9;
  const op = c.op;
  const g = og.g;
  let out: TensorSpec, ins: TensorSpec[];
  if (op.kind === "matmul") {
    ins = [og.input("x", c.T, K, c.T), og.weight("w", c.dtype, [N, K], 3)];
    out = g.matmul(ins[0], ins[1], "out");
  } else if (op.kind === "embedding") {
    const ids = Array.from({ length: c.T }, (_, i) => (i * 5 + 2) % V);
    ins = [og.index("ids", ["T"], [c.T], ids), og.weight("table", c.dtype, [V, 64], 4)];
    out = g.embedding(ins[0], ins[1], "out");
  } else if (op.kind === "rmsNorm") {
    ins = [og.input("x", c.T, D, 5, 3), og.weight("w", "f32", [D], 6)];
    out = g.rmsNorm(ins[0], ins[1], op.eps, "out");
  } else if (op.kind === "rope") {
    ins = [og.input("x", c.T, op.heads * op.headDim, 7), og.index("positions", ["T"], [c.T], c.positions!)];
    out = g.rope(ins[0], ins[1], op.heads, op.headDim, op.theta, "out");
  } else if (op.kind === "siluMul" || op.kind === "add") {
    ins = [og.input("a", c.T, D, 8, 6), og.input("b", c.T, D, 9)];
    out = op.kind === "add" ? g.add(ins[0], ins[1], "out") : g.siluMul(ins[0], ins[1], "out");
  } else if (op.kind === "gatherRows") {
    const R = c.positions!.length;
    ins = [og.input("x", c.T, D, 10), og.index("rows", ["R"], [R], c.positions!)];
    out = g.gatherRows(ins[0], ins[1], "out");
  } else {
    const kvDim = op.kvHeads * op.headDim;
    ins = [
      og.input("q", c.T, op.heads * op.headDim, 11, 2),
      og.input("k", c.T, kvDim, 12, 2),
      og.input("v", c.T, kvDim, 13),
      og.state("kCache", c.dtype, POOL_PAGES * PAGE_SIZE, kvDim, 14),
      og.state("vCache", c.dtype, POOL_PAGES * PAGE_SIZE, kvDim, 15),
      og.index("positions", ["T"], [c.T], c.positions!),
      og.index("seqOf", ["T"], [c.T], c.seqOf!),
      og.index("pages", ["S", 4], [PAGES.length, 4], PAGES.flat()),
    ];
    out = g.attention(
      ins[0],
      ins[1],
      ins[2],
      ins[3],
      ins[4],
      { positions: ins[5], seqOf: ins[6], pages: ins[7] },
      op,
      "out",
    );
  }
  g.output(out);
  return { og, out, ins };
}

async function runOpCheck(backend: Backend, c: OpCheck): Promise<void> {
  const { og, out, ins } = buildOpCheck(backend, c);
  const R = c.op.kind === "gatherRows" ? c.positions!.length : 1;
  const plan = planGraph(og.g.build(), { T: 48, S: PAGES.length, R: 8 });
  const exec = await backend.compile(plan, og.bindings);
  try {
    const expected = referenceOp(c.op, og.refs(ins));
    const actual = await og.run(exec, out, { T: c.T, S: PAGES.length, R }, expected.length);
    assertClose(actual, expected, TOL[c.dtype], `${backend.description}: ${c.label}`);
    for (const s of og.states) {
      const bytes = await backend.readTensor(s.dev, 0, s.dev.byteLength);
      assertClose(decodeWeights(s.dev.dtype, bytes, s.ref.length), s.ref, 1e-6, `${c.label}: pool after the step`);
    }
  } finally {
    exec.dispose();
    og.release();
  }
}

Deno.test("native: every op matches the reference on the default build, 1 and 2 threads", async () => {
  for (const threads of [1, 2]) {
    const backend = await createNativeBackend({ threads });
    try {
      for (const c of opChecks()) await runOpCheck(backend, c);
    } finally {
      backend.dispose();
    }
  }
});

// ---- The same bits whatever else shares the step ----

/** `a` and `b` hold the same float bits (so -0 and 0, or two NaNs, are told apart as they are stored). */
function assertSameBits(a: Float32Array, b: Float32Array, what: string): void {
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length), y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  assert.equal(x.length, y.length, `${what}: length`);
  const at = x.findIndex((v, i) => v !== y[i]);
  assert.ok(at < 0, `${what}: value ${at} is ${a[at]}, alone ${b[at]}`);
}

Deno.test("native: a row's matmul, siluMul and attention outputs are the same bits in a step of 1 or of many", async () => {
  // Each row alone (T = 1) against the same rows in steps of 2 to 40 rows (the decode tiles, the batched
  // tiles, the quantized GEMM: its 512-bit tiles of 6 tokens and, at T = 8 and 9, its 256-bit tail tiles), on
  // 1 and 2 threads (threads split N differently, never a row's sum).
  for (const threads of [1, 2]) {
    const backend = await createNativeBackend({ threads });
    try {
      for (const dtype of WEIGHT_DTYPES) {
        for (const K of dtype.startsWith("q") ? [320, 1056, 2080] : [100, 1100]) {
          const c: OpCheck = { label: `matmul ${dtype} K=${K}`, op: { kind: "matmul" }, T: 40, dtype, K };
          await sameBitsByStep(backend, c, 1, [2, 3, 4, 5, 8, 9, 16, 40], threads);
        }
      }
      await sameBitsByStep(backend, { label: "siluMul", op: { kind: "siluMul" }, T: 6, dtype: "f32" }, 67, [3, 6]);
      const positions = [9, 14, 3, 1, 12, 5, 0, 15], seqOf = [0, 1, 2, 0, 2, 1, 1, 0];
      for (const dtype of ["f32", "f16"] as DType[]) {
        const op: Op = { kind: "attention", heads: 6, kvHeads: 2, headDim: 13, scale: 0.3, window: 0, pageSize: 4 };
        await sameAttentionBits(backend, { label: `attention ${dtype}`, op, T: 8, dtype, positions, seqOf });
      }
    } finally {
      backend.dispose();
    }
  }
});

/** Runs rows 0 .. T-1 of the check's input in steps of each size of `steps`, and each row alone: the same bits. */
async function sameBitsByStep(
  backend: Backend,
  c: OpCheck,
  width: number,
  steps: number[],
  threads = 1,
): Promise<void> {
  const { og, out } = buildOpCheck(backend, c);
  const N = c.op.kind === "matmul" ? 37 : width;
  const plan = planGraph(og.g.build(), { T: c.T });
  const exec = await backend.compile(plan, og.bindings);
  try {
    for (const o of og.operands) if (o.spec.kind === "input") exec.writeInput(o.spec.id, o.values, o.values.length);
    const alone: Float32Array[] = [];
    const inputs = og.operands.filter((o) => o.spec.kind === "input");
    for (let t = 0; t < c.T; t++) {
      for (const o of inputs) {
        const w = o.values.length / c.T;
        exec.writeInput(o.spec.id, o.values.subarray(t * w, (t + 1) * w), w);
      }
      await exec.run({ dims: { T: 1 } });
      const row = new Float32Array(N);
      await exec.readOutput(out.id, row, N);
      alone.push(row);
    }
    for (const T of steps) {
      for (const o of inputs) exec.writeInput(o.spec.id, o.values, o.values.length);
      await exec.run({ dims: { T } });
      const rows = new Float32Array(T * N);
      await exec.readOutput(out.id, rows, rows.length);
      for (let t = 0; t < T; t++) {
        assertSameBits(
          rows.subarray(t * N, (t + 1) * N),
          alone[t],
          `${c.label}, row ${t} of ${T} (${threads} threads)`,
        );
      }
    }
  } finally {
    exec.dispose();
    og.release();
  }
}

/** Each token of a batch of 8 tokens of 3 sequences, alone in a step: its attention output has the same bits. */
async function sameAttentionBits(backend: Backend, c: OpCheck): Promise<void> {
  const run = async (tokens: number[]) => {
    const { og, out, ins } = buildOpCheck(backend, c);
    const kvDim = 26;
    for (const [i, pool] of [[1, og.states[0].ref], [2, og.states[1].ref]] as const) {
      const values = og.operands.find((o) => o.spec.id === ins[i].id)!.values;
      c.positions!.forEach((p, t) => {
        const row = PAGES[c.seqOf![t]][Math.floor(p / PAGE_SIZE)] * PAGE_SIZE + p % PAGE_SIZE;
        values.set(pool.subarray(row * kvDim, (row + 1) * kvDim), t * kvDim);
      });
    }
    const plan = planGraph(og.g.build(), { T: 8, S: 3 });
    const exec = await backend.compile(plan, og.bindings);
    try {
      const pick = (spec: TensorSpec) => {
        const o = og.operands.find((x) => x.spec.id === spec.id)!;
        const w = o.values.length / c.T;
        const v = o.values instanceof Int32Array
          ? new Int32Array(tokens.length * w)
          : new Float32Array(tokens.length * w);
        tokens.forEach((t, i) => v.set(o.values.subarray(t * w, (t + 1) * w), i * w));
        exec.writeInput(spec.id, v, v.length);
      };
      for (const spec of [ins[0], ins[1], ins[2], ins[5], ins[6]]) pick(spec);
      exec.writeInput(ins[7].id, Int32Array.from(PAGES.flat()), 12);
      await exec.run({ dims: { T: tokens.length, S: 3 } });
      const width = 6 * 13;
      const result = new Float32Array(tokens.length * width);
      await exec.readOutput(out.id, result, result.length);
      return result;
    } finally {
      exec.dispose();
      og.release();
    }
  };
  // Every token's key and value are the rows its position already holds in the pool, so the pool is the
  // same whichever tokens a step writes: a token reads the same rows alone and batched.
  const all = await run([0, 1, 2, 3, 4, 5, 6, 7]);
  for (let t = 0; t < 8; t++) {
    const alone = await run([t]);
    assertSameBits(all.subarray(t * 78, (t + 1) * 78), alone, `${c.label}: token ${t} of 8`);
  }
}

// ---- The portable build ----

Deno.test("native: the portable C11 build compiles and matches the reference and the ts backend", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const library = await buildNative({ portable: true, out: `${dir}/libllm_native_portable.so` });
    const backend = await createNativeBackend({ library, threads: 2 });
    try {
      assert.match(backend.description, /portable/);
      for (const c of opChecks()) await runOpCheck(backend, c);
    } finally {
      backend.dispose();
    }
    // The whole model through the portable kernels (the registry uses LLM_NATIVE_LIB, not set here, so
    // compare through a backend created directly: the logits of one prompt against the ts backend).
    const expected = await allLogits(STORY_DIR, "ts", {});
    const nativeModel = await loadModelWith(library);
    try {
      const seq = nativeModel.createSequence();
      const got = await seq.evaluate(nativeModel.tokenizer.encode(PROMPTS[1]), { logits: "all" });
      assert.ok(relativeError(got, expected[1]) <= 1e-4);
      await seq.dispose();
    } finally {
      await nativeModel.dispose();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Loads the story model on a native backend built from `library`, registered under a private name. */
async function loadModelWith(library: string) {
  const { registerBackend } = await import("../backends/registry.ts");
  registerBackend("native-portable-test", (o) => createNativeBackend({ ...o, library }));
  return await loadModel(STORY_DIR, { backend: "native-portable-test" });
}

// ---- f16 KV pool: the portable build against the AVX2 build ----

const F16_ATTN = { kind: "attention", heads: 4, kvHeads: 2, headDim: 11, scale: 0.25, window: 0, pageSize: 4 } as const;

/** An attention graph over a pool of `pages` pages with dtypes `kd` and `vd`, bound on `backend`. */
function f16AttentionGraph(backend: Backend, pages: number, kd: DType = "f16", vd: DType = kd) {
  const g = new GraphBuilder();
  const { heads, kvHeads, headDim, pageSize } = F16_ATTN;
  const kvDim = kvHeads * headDim, rows = pages * pageSize;
  const q = g.input("q", "f32", ["T", heads * headDim]);
  const k = g.input("k", "f32", ["T", kvDim]), v = g.input("v", "f32", ["T", kvDim]);
  const positions = g.input("positions", "i32", ["T"]), seqOf = g.input("seqOf", "i32", ["T"]);
  const table = g.input("pages", "i32", ["S", pages]);
  const kc = g.state("kCache", kd, [rows, kvDim]), vc = g.state("vCache", vd, [rows, kvDim]);
  const out = g.attention(q, k, v, kc, vc, { positions, seqOf, pages: table }, F16_ATTN, "out");
  g.output(out);
  const caches = [backend.createState("kCache", kd, [rows, kvDim]), backend.createState("vCache", vd, [rows, kvDim])];
  const bindings = new Map<number, DeviceTensor>([[kc.id, caches[0]], [vc.id, caches[1]]]);
  const ids = { q: q.id, k: k.id, v: v.id, positions: positions.id, seqOf: seqOf.id, pages: table.id, out: out.id };
  return { plan: planGraph(g.build(), { T: rows, S: 1 }), bindings, caches, ids };
}

/**
 * Values that probe the f32 -> f16 rounding: ties to even at 1, in the subnormals and
 * at the smallest subnormal, the largest finite half and what rounds down to it,
 * values past the range (to ±Infinity) when `overflow`, and random values between.
 */
function roundingProbes(n: number, seed: number, overflow: boolean): Float32Array {
  const ties = [1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1.5 * 2 ** -24, 2 ** -25, 3 * 2 ** -25, 2 ** -26];
  const edges = [65504, 65519, -65519, 6.1e-5, 2 ** -14 - 2 ** -25, -0, 1e-30, 0.1, -3.3333];
  const special = overflow ? [65520, -70000, 3e38] : [];
  const out = randomF32(n, seed, 2);
  [...ties, ...edges, ...special].forEach((x, i) => (out[(i * 7) % n] = x));
  return out;
}

/**
 * Runs `steps` of one sequence on a fresh f16 pool of 4 pages, its page table [3, 0, 2, 1] so that its
 * positions 0.. fill pool rows in that order; returns each step's output, the rows written, and the pool.
 */
async function runF16Attention(backend: Backend, steps: { T: number; pos: number; seed: number }[], overflow: boolean) {
  const { heads, kvHeads, headDim } = F16_ATTN;
  const table = [3, 0, 2, 1];
  const { plan, bindings, caches, ids } = f16AttentionGraph(backend, table.length);
  const exec = await backend.compile(plan, bindings);
  try {
    const outputs: Float32Array[] = [];
    // Per position, the key and value row written there.
    const written: Float32Array[][] = [[], []];
    exec.writeInput(ids.pages, Int32Array.from(table), table.length);
    for (const { T, pos, seed } of steps) {
      const k = roundingProbes(T * kvHeads * headDim, seed, overflow);
      const v = roundingProbes(T * kvHeads * headDim, seed + 1, overflow);
      exec.writeInput(ids.q, randomF32(T * heads * headDim, seed + 2), T * heads * headDim);
      exec.writeInput(ids.k, k, k.length);
      exec.writeInput(ids.v, v, v.length);
      exec.writeInput(ids.positions, Int32Array.from({ length: T }, (_, i) => pos + i), T);
      exec.writeInput(ids.seqOf, new Int32Array(T), T);
      await exec.run({ dims: { T, S: 1 } });
      const out = new Float32Array(T * heads * headDim);
      await exec.readOutput(ids.out, out, out.length);
      outputs.push(out);
      const kvDim = kvHeads * headDim;
      for (let i = 0; i < T; i++) {
        written[0][pos + i] = k.subarray(i * kvDim, (i + 1) * kvDim);
        written[1][pos + i] = v.subarray(i * kvDim, (i + 1) * kvDim);
      }
    }
    const bytes = await Promise.all(caches.map((c) => backend.readTensor(c, 0, c.byteLength)));
    return { outputs, bytes, written, table };
  } finally {
    exec.dispose();
    for (const c of caches) backend.release(c);
  }
}

Deno.test("native: the portable build's f16 KV pool matches the AVX2 build's bit for bit", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const library = await buildNative({ portable: true, out: `${dir}/libllm_native_portable.so` });
    const portable = await createNativeBackend({ library, threads: 2 });
    const simd = await createNativeBackend({ threads: 2 });
    try {
      assert.match(portable.description, /portable/);
      assert.ok(portable.supports("attention", "f16"));
      // A prefill then two decode steps, over 16 positions in 4 scattered pages.
      const steps = [{ T: 5, pos: 0, seed: 21 }, { T: 1, pos: 5, seed: 31 }, { T: 10, pos: 6, seed: 41 }];
      for (const overflow of [false, true]) {
        const a = await runF16Attention(portable, steps, overflow);
        const b = await runF16Attention(simd, steps, overflow);
        const what = overflow ? "with values past the f16 range" : "";
        const kvDim = F16_ATTN.kvHeads * F16_ATTN.headDim;
        for (const [i, name] of ["key", "value"].entries()) {
          // Both round to nearest even, as graph/convert.ts does: the same bits, each row where its page puts it.
          const expected = new Uint16Array(a.bytes[i].byteLength / 2);
          a.written[i].forEach((row, pos) => {
            const poolRow = a.table[Math.floor(pos / 4)] * 4 + pos % 4;
            expected.set(Array.from(new Uint32Array(row.slice().buffer), f32BitsToF16), poolRow * kvDim);
          });
          const bytes = new Uint8Array(expected.buffer);
          assert.deepEqual(a.bytes[i], bytes, `portable ${name} pool ${what}`);
          assert.deepEqual(b.bytes[i], bytes, `AVX2 ${name} pool ${what}`);
        }
        if (overflow) continue; // ±Infinity in the pool makes the outputs non-finite
        a.outputs.forEach((out, i) => assertClose(out, b.outputs[i], 1e-5, `step ${i}: portable against AVX2`));
      }
    } finally {
      portable.dispose();
      simd.dispose();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- Steps off the caller's thread ----

/** A plan of one f32 matmul [T, 1024] · [4096, 1024]ᵀ (16 MiB of weights: several ms a step, so nonblocking). */
async function bigMatmul(backend: Backend, seed = 1) {
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", 1024]);
  const w = g.weight("w", "f32", [4096, 1024]);
  const out = g.matmul(x, w, "out");
  g.output(out);
  const plan = planGraph(g.build(), { T: 16 });
  const values = randomF32(4096 * 1024, seed, 0.05);
  const dev = backend.upload({ name: "w", dtype: "f32", shape: [4096, 1024], data: new Uint8Array(values.buffer) });
  const exec = await backend.compile(plan, new Map([[w.id, dev]]));
  const xs = randomF32(16 * 1024, seed + 1);
  exec.writeInput(x.id, xs, xs.length);
  const expected = (T: number) =>
    referenceOp({ kind: "matmul" }, [{ shape: [T, 1024], data: xs.subarray(0, T * 1024) }, {
      shape: [4096, 1024],
      data: values,
    }]);
  return { plan, exec, dev, x, out, xs, expected };
}

/** A plan of one tiny add (a step far below a millisecond: it runs on the calling thread). */
async function tinyAdd(backend: Backend) {
  const g = new GraphBuilder();
  const a = g.input("a", "f32", ["T", 8]), b = g.input("b", "f32", ["T", 8]);
  const out = g.add(a, b, "out");
  g.output(out);
  const exec = await backend.compile(planGraph(g.build(), { T: 1 }), new Map());
  exec.writeInput(a.id, Float32Array.of(1, 2, 3, 4, 5, 6, 7, 8), 8);
  exec.writeInput(b.id, new Float32Array(8).fill(0.5), 8);
  return { exec, out };
}

Deno.test("native: a long step runs off the calling thread: a timer fires before it resolves", async () => {
  // 32 chained matmuls [T, 1024] · [1024, 1024]ᵀ: over 500 M multiply-adds at T = 16, tens of ms on one thread.
  // syncStepMs 0: however fast this machine runs it, the step runs off the calling thread.
  const backend = await createNativeBackend({ threads: 1, syncStepMs: 0 });
  try {
    const g = new GraphBuilder();
    const x = g.input("x", "f32", ["T", 1024]);
    const w = g.weight("w", "f32", [1024, 1024]);
    let h = x;
    for (let i = 0; i < 32; i++) h = g.matmul(h, w, `h${i}`);
    g.output(h);
    const values = randomF32(1024 * 1024, 2, 0.05);
    const dev = backend.upload({ name: "w", dtype: "f32", shape: [1024, 1024], data: new Uint8Array(values.buffer) });
    const exec = await backend.compile(planGraph(g.build(), { T: 16 }), new Map([[w.id, dev]]));
    const xs = randomF32(16 * 1024, 3);
    exec.writeInput(x.id, xs, xs.length);
    for (let i = 0; i < 3; i++) {
      let fired = false;
      setTimeout(() => (fired = true), 1);
      await exec.run({ dims: { T: 16 } });
      // A step on the calling thread would have held the timer until it returned.
      assert.ok(fired, `step ${i}: the timer did not fire while it ran`);
    }
    const rows = new Float32Array(16 * 1024);
    await exec.readOutput(h.id, rows, rows.length);
    assert.ok(rows.every(Number.isFinite) && rows.some((v) => v !== 0), "the chain's output");
    exec.dispose();
    backend.release(dev);
  } finally {
    backend.dispose();
  }
});

Deno.test("native: the event loop lags under 50 ms through a long generation of back-to-back steps", async () => {
  // About 1.5 s of steps awaited back to back with no other yield: tiny steps (on the calling thread, in
  // runs bounded by executable.ts's BLOCKED_MS) and long ones (off it), on 2 threads.
  const backend = await createNativeBackend({ threads: 2 });
  try {
    const big = await bigMatmul(backend);
    const tiny = await tinyAdd(backend);
    const loop = watchEventLoop();
    try {
      const end = performance.now() + 1500;
      let steps = 0;
      while (performance.now() < end) {
        for (let i = 0; i < 200; i++) await tiny.exec.run({ dims: { T: 1 } });
        await big.exec.run({ dims: { T: (steps++ % 16) + 1 } });
      }
      // One more timer turn, so a lag at the very end is measured too.
      await new Promise((resolve) => setTimeout(resolve, 20));
    } finally {
      loop.stop();
    }
    assert.ok(loop.worst() < 50, `a 10 ms timer lagged ${loop.worst().toFixed(1)} ms`);
    const sum = new Float32Array(8);
    await tiny.exec.readOutput(tiny.out.id, sum, 8);
    assert.deepEqual([...sum], [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]);
    big.exec.dispose();
    tiny.exec.dispose();
    backend.release(big.dev);
  } finally {
    backend.dispose();
  }
});

Deno.test("native: while a step runs, its inputs, outputs and tensors refuse writes and frees wait", async () => {
  const backend = await createNativeBackend({ threads: 2, syncStepMs: 0 });
  try {
    const { exec, dev, x, out, xs, expected } = await bigMatmul(backend);
    const pending = exec.run({ dims: { T: 16 } });
    assert.throws(() => exec.writeInput(x.id, xs, 16), { name: "TypeError", message: /while a step .* runs/ });
    await assert.rejects(() => exec.readOutput(out.id, new Float32Array(4), 4), TypeError);
    assert.throws(() => backend.writeTensor(dev, 0, new Uint8Array(4)), {
      name: "TypeError",
      message: 'Cannot write tensor "w" while a step that uses it runs: await its run() first',
    });
    assert.throws(() => backend.copyTensor(dev, dev, 4, 0, 8), TypeError);
    // A read waits for the step and gets the bytes as they are after it.
    const read = backend.readTensor(dev, 0, 16);
    // A second executable's step waits for this one: they share the thread pool.
    const other = await tinyAdd(backend);
    const queued = other.exec.run({ dims: { T: 1 } });
    await pending;
    assert.equal((await read).byteLength, 16);
    await queued;
    const got = new Float32Array(16 * 4096);
    await exec.readOutput(out.id, got, got.length);
    assertClose(got, expected(16), 1e-5, "the step's output");

    // Disposing the executable and releasing its weight while a step runs: both wait for it.
    const last = exec.run({ dims: { T: 8 } });
    exec.dispose();
    backend.release(dev);
    await last;
    await assert.rejects(() => exec.run({ dims: { T: 1 } }), TypeError);
    await assert.rejects(() => backend.readTensor(dev, 0, 4), TypeError);
    other.exec.dispose();

    // And the backend itself.
    const again = await bigMatmul(backend, 5);
    const final = again.exec.run({ dims: { T: 16 } });
    backend.dispose();
    await final;
    assert.throws(() => again.exec.writeInput(again.x.id, again.xs, 16), TypeError);
  } finally {
    backend.dispose();
  }
});

Deno.test("native: profiling adds each node's time, on and off the calling thread", async () => {
  for (const syncStepMs of [0, 10]) await profileSteps(syncStepMs);
  await assert.rejects(() => createNativeBackend({ syncStepMs: 11 }), RangeError);
  await assert.rejects(() => createNativeBackend({ syncStepMs: -1 }), RangeError);
});

async function profileSteps(syncStepMs: number): Promise<void> {
  const backend = await createNativeBackend({ threads: 2, syncStepMs });
  try {
    const g = new GraphBuilder();
    const x = g.input("x", "f32", ["T", 1024]);
    const w = g.weight("w", "f32", [4096, 1024]);
    const h = g.matmul(x, w, "h");
    const out = g.add(h, h, "out");
    g.output(out);
    const plan = planGraph(g.build(), { T: 16 });
    const values = randomF32(4096 * 1024, 3, 0.05);
    const dev = backend.upload({ name: "w", dtype: "f32", shape: [4096, 1024], data: new Uint8Array(values.buffer) });
    const exec = await backend.compile(plan, new Map([[w.id, dev]]));
    exec.writeInput(x.id, randomF32(16 * 1024, 4), 16 * 1024);
    for (const T of [16, 1]) {
      const profile = new Float64Array(plan.order.length);
      await exec.run({ dims: { T } }, profile);
      await exec.run({ dims: { T } }, profile);
      assert.ok(profile.every((ms) => Number.isFinite(ms) && ms >= 0), `T=${T}: ${profile}`);
      const matmul = plan.order.indexOf(plan.graph.nodes.find((n) => n.op.kind === "matmul")!.id);
      assert.ok(profile[matmul] > 0, `syncStepMs ${syncStepMs}, T=${T}: the matmul took ${profile[matmul]} ms`);
    }
    await assert.rejects(() => exec.run({ dims: { T: 1 } }, new Float64Array(1)), RangeError);
    exec.dispose();
    backend.release(dev);
  } finally {
    backend.dispose();
  }
}

Deno.test("native: automatic threads give the same bits as one thread on batched and single steps", async () => {
  const one = await createNativeBackend({ threads: 1 }), auto = await createNativeBackend();
  try {
    const results: Float32Array[][] = [];
    for (const backend of [one, auto]) {
      const { exec, dev, out } = await bigMatmul(backend, 9);
      const got: Float32Array[] = [];
      // Enough steps of each class for the tuner to time both thread counts.
      for (let i = 0; i < 8; i++) {
        for (const T of [1, 16]) {
          await exec.run({ dims: { T } });
          const rows = new Float32Array(T * 4096);
          await exec.readOutput(out.id, rows, rows.length);
          got.push(rows);
        }
      }
      results.push(got);
      exec.dispose();
      backend.release(dev);
    }
    results[1].forEach((r, i) => assertSameBits(r, results[0][i], `step ${i}`));
  } finally {
    one.dispose();
    auto.dispose();
  }
});

// ---- Errors ----

function tinyMatmul(backend: Backend, xWidth: number, wShape: number[]) {
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", 32]);
  const w = g.weight("w", "f32", [8, 32]);
  g.output(g.matmul(x, w, "out"));
  const good = g.build();
  // A graph as plain data can say anything: widen the input past what the weight takes.
  const graph: Graph = {
    ...good,
    tensors: good.tensors.map((t) => (t.id === x.id ? { ...t, shape: ["T", xWidth] } : t)),
  };
  const plan = planGraph(graph, { T: 4 });
  const data = encodeWeights("f32", randomF32(wShape[0] * wShape[1], 1), wShape[1]);
  const dev = backend.upload({ name: "w", dtype: "f32", shape: wShape, data });
  return { plan, bindings: new Map([[w.id, dev]]), x, dev };
}

Deno.test("native: mismatched shapes, bad steps and bad token ids give typed errors", async () => {
  const backend = await createNativeBackend({ threads: 1 });
  try {
    // The input is 48 wide but the weight rows are 32 long.
    const bad = tinyMatmul(backend, 48, [8, 32]);
    await assert.rejects(() => backend.compile(bad.plan, bad.bindings), TypeError);
    // A bound weight of another shape.
    const wrong = tinyMatmul(backend, 32, [8, 64]);
    await assert.rejects(() => backend.compile(wrong.plan, wrong.bindings), TypeError);
    // Bytes that do not fit the shape.
    assert.throws(
      () => backend.upload({ name: "w", dtype: "q8_0", shape: [2, 32], data: new Uint8Array(10) }),
      RangeError,
    );
    // Unsupported state dtype, and shapes that are not positive integers.
    assert.throws(() => backend.createState("c", "q8_0", [4, 32]), UnsupportedError);
    assert.throws(() => backend.createState("c", "f16", [-2, -2]), RangeError);
    assert.throws(() => backend.createState("c", "f16", [2.5, 4]), RangeError);
    // Key and value pools of different dtypes: refused when compiling, before anything runs.
    for (const [kd, vd] of [["f16", "f32"], ["f32", "f16"]] as [DType, DType][]) {
      const mixed = f16AttentionGraph(backend, 2, kd, vd);
      await assert.rejects(() => backend.compile(mixed.plan, mixed.bindings), TypeError);
      for (const t of mixed.bindings.values()) backend.release(t);
    }

    const ok = tinyMatmul(backend, 32, [8, 32]);
    const exec = await backend.compile(ok.plan, ok.bindings);
    assert.throws(() => exec.writeInput(ok.x.id, new Float32Array(200), 200), RangeError);
    for (const dims of [{ T: 5 }, { T: 0 }, { T: 1.5 }, {}]) {
      await assert.rejects(() => exec.run({ dims: dims as Record<string, number> }), RangeError);
    }
    await assert.rejects(() => exec.readOutput(ok.x.id, new Float32Array(4), 4), RangeError);
    exec.dispose();
    await assert.rejects(() => exec.run({ dims: { T: 1 } }), TypeError);

    // Token ids outside the table, and a prompt past the context.
    const model = await loadModel(STORY_DIR, { backend: "native", contextLength: 16 });
    try {
      const seq = model.createSequence();
      await assert.rejects(() => seq.evaluate([model.config.vocabSize]), RangeError);
      await assert.rejects(() => seq.evaluate([-1]), RangeError);
      await assert.rejects(() => seq.evaluate([1.5]), RangeError);
      await assert.rejects(() => seq.evaluate(new Array(17).fill(1)), RangeError);
      await seq.dispose();
    } finally {
      await model.dispose();
    }
  } finally {
    backend.dispose();
  }
  assert.throws(() => backend.upload({ name: "w", dtype: "f32", shape: [1], data: new Uint8Array(4) }), TypeError);
});

/** An attention graph (pool of 3 pages of 4 rows) as plain data, changed by `edit` before it is planned. */
function attentionPlan(edit: (graph: Graph) => Graph, poolRows = 12): { plan: ExecutionPlan; caches: TensorSpec[] } {
  const g = new GraphBuilder();
  const q = g.input("q", "f32", ["T", 16]), k = g.input("k", "f32", ["T", 8]), v = g.input("v", "f32", ["T", 8]);
  const positions = g.input("positions", "i32", ["T"]), seqOf = g.input("seqOf", "i32", ["T"]);
  const pages = g.input("pages", "i32", ["S", 2]);
  const caches = [0, 1].map((i) => g.state(`c${i}`, "f32", [12, 8]));
  const op = { heads: 2, kvHeads: 1, headDim: 8, scale: 0.25, window: 0, pageSize: 4 };
  g.output(g.attention(q, k, v, caches[0], caches[1], { positions, seqOf, pages }, op, "out"));
  const graph = edit(g.build());
  const resized = graph.tensors.map((t) => (t.kind === "state" ? { ...t, shape: [poolRows, 8] } : t));
  return { plan: planGraph({ ...graph, tensors: resized }, { T: 4, S: 2 }), caches };
}

Deno.test("native: index operands the kernels could not trust are refused when compiling", async () => {
  const backend = await createNativeBackend({ threads: 1 });
  try {
    const compile = async (plan: ExecutionPlan, poolRows = 12) => {
      const bindings = new Map<number, DeviceTensor>();
      for (const t of plan.graph.tensors) {
        if (t.kind === "state") bindings.set(t.id, backend.createState(t.name, "f32", [poolRows, 8]));
      }
      try {
        const exec = await backend.compile(plan, bindings);
        exec.dispose();
      } finally {
        for (const b of bindings.values()) backend.release(b);
      }
    };
    await compile(attentionPlan((g) => g).plan); // as built: accepted
    const retype = (name: string, dtype: DType) => (g: Graph): Graph => ({
      ...g,
      tensors: g.tensors.map((t) => (t.name === name ? { ...t, dtype } : t)),
    });
    // Positions stored as floats: IndexChecks bounds only i32 inputs, so the kernel would read float bits.
    await assert.rejects(() => compile(attentionPlan(retype("positions", "f32")).plan), {
      name: "TypeError",
      message: /positions "positions" is "f32", expected "i32"/,
    });
    // A page table that is not a graph input (a weight has no writeInput, so nothing checks it).
    const asWeight = (g: Graph): Graph => ({
      ...g,
      inputs: g.inputs.filter((id) => g.tensors[id].name !== "pages"),
      tensors: g.tensors.map((t) => (t.name === "pages" ? { ...t, kind: "weight" } : t)),
    });
    await assert.rejects(() => compile(attentionPlan(asWeight).plan), TypeError);
    // A pool that is not whole pages: page 2's last rows would lie past its end.
    await assert.rejects(() => compile(attentionPlan((g) => g, 10).plan, 10), {
      name: "TypeError",
      message: /a pool of 10 rows is not whole pages of 4/,
    });
    // A plan whose output slot lies over the positions input: a kernel would overwrite checked indices.
    const { plan } = attentionPlan((g) => g);
    const positions = plan.graph.tensors.find((t) => t.name === "positions")!.id;
    const slots = plan.slots.map((
      s,
      id,
    ) => (id === plan.graph.outputs[0] ? { ...s!, offset: plan.slots[positions]!.offset } : s));
    await assert.rejects(() => compile({ ...plan, slots }), { name: "TypeError", message: /overlaps index input/ });
  } finally {
    backend.dispose();
  }
});

Deno.test("native: a missing or stale library gives NativeLibraryError naming the build command", async () => {
  const missing = await createNativeBackend({ library: "/nonexistent/libllm_native.so" }).then(
    () => assert.fail("expected an error"),
    (e) => e,
  );
  assert.ok(missing instanceof NativeLibraryError, String(missing));
  assert.match(missing.message, /deno task build:native/);
  assert.match(missing.message, /nonexistent/);
  assert.equal(BUILD_COMMAND, "deno task build:native");

  // A library compiled from the same files but stamped with another version.
  const dir = await Deno.makeTempDir();
  try {
    const src = new URL("../backends/native/c/", import.meta.url).pathname;
    const files = [...Deno.readDirSync(src)].filter((e) => e.name.endsWith(".c")).map((e) => `${src}${e.name}`);
    const out = `${dir}/libstale.so`;
    const res = await new Deno.Command("cc", {
      args: [
        "-std=c11",
        "-O1",
        "-fPIC",
        "-shared",
        "-pthread",
        '-DLLM_ABI="0000stale0000000"',
        "-o",
        out,
        ...files,
        "-lm",
      ],
    }).output();
    assert.ok(res.success, new TextDecoder().decode(res.stderr));
    const stale = await createNativeBackend({ library: out }).then(() => assert.fail("expected an error"), (e) => e);
    assert.ok(stale instanceof NativeLibraryError, String(stale));
    assert.match(stale.message, /other sources/);
    assert.match(stale.message, /deno task build:native/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("native: the library-load error names the path and the build command, and Deno's prefix once", async () => {
  const path = "/nonexistent/dir/libllm_native.so";
  const e = await createNativeBackend({ library: path }).then(() => assert.fail("expected an error"), (e) => e);
  assert.ok(e instanceof NativeLibraryError, String(e));
  const message = (e as NativeLibraryError).message;
  assert.ok(message.startsWith(`Cannot load the native library "${path}": `), message);
  assert.ok((message.match(/Could not open library/gi) ?? []).length <= 1, message);
  // The reason follows the path once: the dlopen text without its own copy of the path.
  assert.equal(message.split(path).length - 1, 1, message);
  assert.ok(message.endsWith(`Build it with \`${BUILD_COMMAND}\``), message);
  assert.equal((e as NativeLibraryError).path, path);
});

Deno.test("native: measureReadBandwidth returns a plausible rate", async () => {
  for (const threads of [1, 2]) {
    const gbps = await measureReadBandwidth({ bytes: 64 << 20, threads, reps: 2 });
    assert.ok(Number.isFinite(gbps) && gbps > 0.1 && gbps < 10000, `bandwidth ${gbps} GB/s`);
  }
  await assert.rejects(() => measureReadBandwidth({ threads: 0 }), RangeError);
});
