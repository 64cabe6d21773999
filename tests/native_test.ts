/**
 * The native backend (C kernels through FFI): the story model's greedy ids and
 * logits against the references and the ts backend, with 1 and 2 threads; the
 * portable (scalar C11) build against the reference kernels, and its f16 KV cache
 * against the AVX2 build's; typed errors for mismatched shapes, bad inputs and a
 * missing or stale library.
 *
 * The optimised build is checked op by op by the conformance suite, which runs
 * every registered backend.
 */

import assert from "node:assert/strict";
import { loadModel } from "../mod.ts";
import type { Backend, DeviceTensor } from "../backends/contract.ts";
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
import { elementCount, type Graph, type Op } from "../graph/ir.ts";
import { planGraph } from "../graph/plan.ts";
import { f32BitsToF16 } from "../graph/half.ts";
import { decodeWeights, encodeWeights } from "../graph/weight_codec.ts";
import { assertClose, randomF32, SHARED, STORY_DIR } from "./helpers.ts";

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

// ---- Op checks shared by the optimised and the portable builds ----

interface OpCheck {
  label: string;
  op: Op;
  T: number;
  pos: number;
  /** The weight's dtype, or the KV cache's for attention. */
  dtype: DType;
  /** Matmul row length (default 96). */
  K?: number;
}

function opChecks(): OpCheck[] {
  const out: OpCheck[] = [];
  for (const dtype of WEIGHT_DTYPES) {
    // K = 320 is 10 quant blocks: one group of 8 (the SIMD path) and 2 left over; K = 100 leaves a float
    // tail; K = 1100 makes rows of 2 KiB or more, which decode takes 4 at a time, with a tail.
    for (const K of dtype.startsWith("q") ? [96, 320] : [100, 320, 1100]) {
      for (const T of [1, 2, 5, 9]) {
        out.push({ label: `matmul ${dtype} K=${K} T=${T}`, op: { kind: "matmul" }, T, pos: 0, dtype, K });
      }
    }
    out.push({ label: `embedding ${dtype}`, op: { kind: "embedding" }, T: 3, pos: 0, dtype });
  }
  out.push({ label: "rmsNorm", op: { kind: "rmsNorm", eps: 1e-5 }, T: 3, pos: 0, dtype: "f32" });
  out.push({ label: "rope", op: { kind: "rope", heads: 3, headDim: 10, theta: 500000 }, T: 4, pos: 11, dtype: "f32" });
  out.push({ label: "siluMul", op: { kind: "siluMul" }, T: 3, pos: 0, dtype: "f32" });
  out.push({ label: "add", op: { kind: "add" }, T: 3, pos: 0, dtype: "f32" });
  out.push({ label: "lastRow", op: { kind: "lastRow" }, T: 3, pos: 0, dtype: "f32" });
  // kvDim = 26: F16C converts 8 values at a time, the rest goes through the scalar conversion.
  for (const dtype of ["f32", "f16"] as DType[]) {
    for (const [T, pos, window] of [[5, 3, 0], [1, 12, 5], [9, 0, 3]]) {
      out.push({
        label: `attention kv=${dtype} T=${T} pos=${pos} window=${window}`,
        op: { kind: "attention", heads: 6, kvHeads: 2, headDim: 13, scale: 0.3, window },
        T,
        pos,
        dtype,
      });
    }
  }
  return out;
}

const TOL: Record<string, number> = { f32: 1e-5, f16: 1e-4, bf16: 1e-4, q8_0: 2e-2, q4_0: 2e-2 };

async function runOpCheck(backend: Backend, c: OpCheck): Promise<void> {
  const g = new GraphBuilder();
  const K = c.K ?? 96, N = 37, D = 67, V = 9, cap = 16;
  const bindings = new Map<number, DeviceTensor>();
  const refs: RefTensor[] = [];
  const caches: { id: number; ref: Float32Array; dev: DeviceTensor }[] = [];
  const input = (name: string, width: number, seed: number, scale = 1) => {
    const data = randomF32(c.T * width, seed, scale);
    refs.push({ shape: [c.T, width], data });
    return { spec: g.input(name, "f32", ["T", width]), data };
  };
  const weight = (name: string, dtype: DType, shape: number[], seed: number) => {
    const values = randomF32(elementCount(shape), seed, 0.5);
    const bytes = encodeWeights(dtype, values, shape[shape.length - 1]);
    const spec = g.weight(name, dtype, shape);
    bindings.set(spec.id, backend.upload({ name, dtype, shape, data: bytes }));
    refs.push({ shape, data: decodeWeights(dtype, bytes, values.length) });
    return spec;
  };
  const inputs: { id: number; data: Float32Array | Int32Array }[] = [];
  const op = c.op;
  let outSpec;
  if (op.kind === "matmul") {
    const x = input("x", K, c.T);
    inputs.push({ id: x.spec.id, data: x.data });
    outSpec = g.matmul(x.spec, weight("w", c.dtype, [N, K], 3), "out");
  } else if (op.kind === "embedding") {
    const ids = Int32Array.from({ length: c.T }, (_, i) => (i * 5 + 2) % V);
    const spec = g.input("ids", "i32", ["T"]);
    refs.push({ shape: [c.T], data: ids });
    inputs.push({ id: spec.id, data: ids });
    outSpec = g.embedding(spec, weight("table", c.dtype, [V, 64], 4), "out");
  } else if (op.kind === "rmsNorm") {
    const x = input("x", D, 5, 3);
    inputs.push({ id: x.spec.id, data: x.data });
    outSpec = g.rmsNorm(x.spec, weight("w", "f32", [D], 6), op.eps, "out");
  } else if (op.kind === "rope") {
    const x = input("x", op.heads * op.headDim, 7);
    inputs.push({ id: x.spec.id, data: x.data });
    outSpec = g.rope(x.spec, op.heads, op.headDim, op.theta, "out");
  } else if (op.kind === "siluMul" || op.kind === "add") {
    const a = input("a", D, 8, 6), b = input("b", D, 9);
    inputs.push({ id: a.spec.id, data: a.data }, { id: b.spec.id, data: b.data });
    outSpec = op.kind === "add" ? g.add(a.spec, b.spec, "out") : g.siluMul(a.spec, b.spec, "out");
  } else if (op.kind === "lastRow") {
    const x = input("x", D, 10);
    inputs.push({ id: x.spec.id, data: x.data });
    outSpec = g.lastRow(x.spec, "out");
  } else {
    const kvDim = op.kvHeads * op.headDim;
    const q = input("q", op.heads * op.headDim, 11, 2), k = input("k", kvDim, 12, 2), v = input("v", kvDim, 13);
    inputs.push({ id: q.spec.id, data: q.data }, { id: k.spec.id, data: k.data }, { id: v.spec.id, data: v.data });
    const cacheSpecs = ["kCache", "vCache"].map((name, i) => {
      const spec = g.state(name, c.dtype, [cap, kvDim]);
      // An f16 cache starts from values it holds exactly; the reference rounds the rows written to f16 too.
      const ref = randomF32(cap * kvDim, 14 + i).map((x) => (c.dtype === "f16" ? Math.f16round(x) : x));
      const dev = backend.createState(name, c.dtype, [cap, kvDim]);
      assert.equal(dev.byteLength, byteSize(c.dtype, cap * kvDim));
      backend.writeTensor(dev, 0, encodeWeights(c.dtype, ref, kvDim));
      bindings.set(spec.id, dev);
      refs.push({ shape: [cap, kvDim], data: ref, dtype: c.dtype });
      caches.push({ id: spec.id, ref, dev });
      return spec;
    });
    outSpec = g.attention(q.spec, k.spec, v.spec, cacheSpecs[0], cacheSpecs[1], op, "out");
  }
  g.output(outSpec);
  const plan = planGraph(g.build(), { T: 12 });
  const exec = await backend.compile(plan, bindings);
  try {
    for (const i of inputs) exec.writeInput(i.id, i.data, i.data.length);
    await exec.run({ dims: { T: c.T }, pos: c.pos });
    const expected = referenceOp(op, refs, c.pos);
    const actual = new Float32Array(expected.length);
    await exec.readOutput(outSpec.id, actual, actual.length);
    assertClose(actual, expected, TOL[c.dtype], `${backend.description}: ${c.label}`);
    for (const cache of caches) {
      const bytes = await backend.readTensor(cache.dev, 0, cache.dev.byteLength);
      const got = decodeWeights(cache.dev.dtype, bytes, cache.ref.length);
      assertClose(got, cache.ref, 1e-6, `${c.label}: cache after the step`);
    }
  } finally {
    exec.dispose();
    for (const t of bindings.values()) backend.release(t);
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

// ---- f16 KV cache: the portable build against the AVX2 build ----

const F16_ATTN = { kind: "attention", heads: 4, kvHeads: 2, headDim: 11, scale: 0.25, window: 0 } as const;

/** An attention graph over caches of `cap` rows of dtypes `kd` and `vd`, bound on `backend`. */
function f16AttentionGraph(backend: Backend, cap: number, kd: DType = "f16", vd: DType = kd) {
  const g = new GraphBuilder();
  const { heads, kvHeads, headDim } = F16_ATTN;
  const kvDim = kvHeads * headDim;
  const q = g.input("q", "f32", ["T", heads * headDim]);
  const k = g.input("k", "f32", ["T", kvDim]), v = g.input("v", "f32", ["T", kvDim]);
  const kc = g.state("kCache", kd, [cap, kvDim]), vc = g.state("vCache", vd, [cap, kvDim]);
  const out = g.attention(q, k, v, kc, vc, F16_ATTN, "out");
  g.output(out);
  const caches = [backend.createState("kCache", kd, [cap, kvDim]), backend.createState("vCache", vd, [cap, kvDim])];
  const bindings = new Map<number, DeviceTensor>([[kc.id, caches[0]], [vc.id, caches[1]]]);
  return { plan: planGraph(g.build(), { T: cap }), bindings, caches, ids: { q: q.id, k: k.id, v: v.id, out: out.id } };
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

/** Runs `steps` on a fresh f16-cache graph; returns each step's output and the final cache bytes. */
async function runF16Attention(backend: Backend, steps: { T: number; pos: number; seed: number }[], overflow: boolean) {
  const cap = 16;
  const { heads, kvHeads, headDim } = F16_ATTN;
  const { plan, bindings, caches, ids } = f16AttentionGraph(backend, cap);
  const exec = await backend.compile(plan, bindings);
  try {
    const outputs: Float32Array[] = [];
    const written: Float32Array[][] = [[], []];
    for (const { T, pos, seed } of steps) {
      const k = roundingProbes(T * kvHeads * headDim, seed, overflow);
      const v = roundingProbes(T * kvHeads * headDim, seed + 1, overflow);
      exec.writeInput(ids.q, randomF32(T * heads * headDim, seed + 2), T * heads * headDim);
      exec.writeInput(ids.k, k, k.length);
      exec.writeInput(ids.v, v, v.length);
      await exec.run({ dims: { T }, pos });
      const out = new Float32Array(T * heads * headDim);
      await exec.readOutput(ids.out, out, out.length);
      outputs.push(out);
      written[0].push(k);
      written[1].push(v);
    }
    const bytes = await Promise.all(caches.map((c) => backend.readTensor(c, 0, c.byteLength)));
    return { outputs, bytes, written };
  } finally {
    exec.dispose();
    for (const c of caches) backend.release(c);
  }
}

Deno.test("native: the portable build's f16 KV cache matches the AVX2 build's bit for bit", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const library = await buildNative({ portable: true, out: `${dir}/libllm_native_portable.so` });
    const portable = await createNativeBackend({ library, threads: 2 });
    const simd = await createNativeBackend({ threads: 2 });
    try {
      assert.match(portable.description, /portable/);
      assert.ok(portable.supports("attention", "f16"));
      // A prefill then two decode steps, the rows of each step written in the cache's order.
      const steps = [{ T: 5, pos: 0, seed: 21 }, { T: 1, pos: 5, seed: 31 }, { T: 2, pos: 6, seed: 41 }];
      for (const overflow of [false, true]) {
        const a = await runF16Attention(portable, steps, overflow);
        const b = await runF16Attention(simd, steps, overflow);
        const what = overflow ? "with values past the f16 range" : "";
        for (const [i, name] of ["key", "value"].entries()) {
          // Both round to nearest even, as graph/convert.ts does: the same bits, row by row.
          const rows = a.written[i].flatMap((r) => Array.from(new Uint32Array(r.buffer), f32BitsToF16));
          const expected = new Uint8Array(a.bytes[i].byteLength);
          new Uint16Array(expected.buffer).set(rows);
          assert.deepEqual(a.bytes[i], expected, `portable ${name} cache ${what}`);
          assert.deepEqual(b.bytes[i], expected, `AVX2 ${name} cache ${what}`);
        }
        if (overflow) continue; // ±Infinity in the cache makes the outputs non-finite
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
    // Key and value caches of different dtypes: refused when compiling, before anything runs.
    for (const [kd, vd] of [["f16", "f32"], ["f32", "f16"]] as [DType, DType][]) {
      const mixed = f16AttentionGraph(backend, 8, kd, vd);
      await assert.rejects(() => backend.compile(mixed.plan, mixed.bindings), TypeError);
      for (const t of mixed.bindings.values()) backend.release(t);
    }

    const ok = tinyMatmul(backend, 32, [8, 32]);
    const exec = await backend.compile(ok.plan, ok.bindings);
    assert.throws(() => exec.writeInput(ok.x.id, new Float32Array(200), 200), RangeError);
    await assert.rejects(() => exec.run({ dims: { T: 5 }, pos: 0 }), RangeError);
    await assert.rejects(() => exec.run({ dims: { T: 0 }, pos: 0 }), RangeError);
    await assert.rejects(() => exec.readOutput(ok.x.id, new Float32Array(4), 4), RangeError);
    exec.dispose();
    await assert.rejects(() => exec.run({ dims: { T: 1 }, pos: 0 }), TypeError);

    // Token ids outside the table, and a step past the cache.
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
