/**
 * The WebGPU backend end to end on the real TinyStories-656K model: greedy
 * generation reproduces the llama.cpp reference, logits agree with the ts backend,
 * a machine without an adapter gets a typed error, and a lost device errors the
 * generation stream instead of hanging it.
 *
 * Without a GPU adapter (Mesa's lavapipe counts) the model tests are skipped with a
 * message, except in CI (`CI=true`), where they run and fail.
 *
 * An f16 KV cache is checked against the reference within one f16 step (1e-3).
 *
 * Logits tolerance: max |webgpu - ts| ≤ 1e-5 × max(1, max |ts logit|) per prompt (the conformance f32 tolerance).
 * Both run f32 arithmetic on the same weights and differ only in summation order
 * (the observed worst on lavapipe is 5e-7 relative: 8e-6 on logits up to 16).
 */

import assert from "node:assert/strict";
import { loadModel, type Model } from "../mod.ts";
import { createBackend, registerBackend } from "../backends/registry.ts";
import {
  createWebGpuBackend,
  setNavigatorGpu,
  type WebGpuBackend,
  WebGpuDeviceLostError,
  WebGpuUnavailableError,
} from "../backends/webgpu/mod.ts";
import { type DType, WEIGHT_DTYPES } from "../graph/dtype.ts";
import { GraphBuilder } from "../graph/builder.ts";
import { planGraph } from "../graph/plan.ts";
import { decodeWeights, encodeWeights } from "../graph/weight_codec.ts";
import { referenceOp, type RefTensor } from "../backends/reference.ts";
import { type DeviceTensor, type Executable, UnsupportedError } from "../backends/contract.ts";
import { elementCount, resolveShape } from "../graph/ir.ts";
import type { ExecutionPlan } from "../graph/plan.ts";
import { parseConfig } from "../models/arch/config.ts";
import { buildLlamaGraph, type LlamaGraph } from "../models/arch/llama.ts";
import { readSafetensors } from "../models/files/safetensors.ts";
import { assertClose, randomF32, SHARED, STORY_DIR, watchEventLoop } from "./helpers.ts";

const LOGITS_TOLERANCE = 1e-5;

interface GreedyCase {
  prompt: string;
  prompt_ids: number[];
  greedy_ids: number[];
}

async function noAdapterReason(): Promise<string | undefined> {
  const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
  if (!gpu) return "navigator.gpu is not available";
  const adapter = await gpu.requestAdapter();
  return adapter ? undefined : "no GPU adapter is available (requestAdapter returned null)";
}

const inCI = Deno.env.get("CI") === "true";
const skipReason = await noAdapterReason();
if (skipReason) {
  console.log(
    inCI
      ? `WebGPU unavailable in CI (${skipReason}): the WebGPU tests will fail`
      : `skipping the WebGPU model tests: ${skipReason}`,
  );
}
const ignore = skipReason !== undefined && !inCI;

async function withModel(fn: (model: Model) => Promise<void>, options: { prefillChunk?: number } = {}) {
  const model = await loadModel(STORY_DIR, { backend: "webgpu", contextLength: 256, ...options });
  try {
    await fn(model);
  } finally {
    await model.dispose();
  }
}

Deno.test({
  name: "webgpu: greedy generation reproduces the llama.cpp reference (64 tokens per case)",
  ignore,
  fn: () =>
    withModel(async (model) => {
      assert.equal(model.backend.name, "webgpu");
      const ref = JSON.parse(await Deno.readTextFile(`${SHARED}/refs/story-greedy.json`));
      for (const c of ref.cases as GreedyCase[]) {
        const ids: number[] = [];
        const stream = model.generateTokens(c.prompt_ids, { temperature: 0, maxTokens: 64, ignoreEos: true });
        for await (const t of stream) ids.push(t.id);
        assert.deepEqual(ids, c.greedy_ids, `greedy ids of ${JSON.stringify(c.prompt)}`);
      }
    }),
});

Deno.test({
  name: "webgpu: logits of every position agree with the ts backend",
  ignore,
  fn: async () => {
    const ts = await loadModel(STORY_DIR, { backend: "ts", contextLength: 256 });
    try {
      // A prefill chunk of 6 runs both matmul kernels: tiled for full chunks, matrix-vector for the rest.
      await withModel(async (gpu) => {
        const prompts = [
          "Once upon a time",
          "The little dog ran to the park and saw a big red ball. He wanted to play with it all day.",
          "Lily and Ben",
        ];
        for (const prompt of prompts) {
          const ids = ts.encodePrompt(prompt);
          const a = ts.createSequence();
          const b = gpu.createSequence();
          try {
            const expected = await a.evaluate(ids, { logits: "all" });
            const actual = await b.evaluate(ids, { logits: "all" });
            assertClose(actual, expected, LOGITS_TOLERANCE, `logits of ${JSON.stringify(prompt)}`);
            // Decode steps after the prompt agree too.
            const next = [5, 17, 300];
            for (const id of next) {
              assertClose(await b.evaluate([id]), await a.evaluate([id]), LOGITS_TOLERANCE, `decode after "${prompt}"`);
            }
          } finally {
            await a.dispose();
            await b.dispose();
          }
        }
      }, { prefillChunk: 6 });
    } finally {
      await ts.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: the workgroup decode kernel (the default on GPUs) matches the reference for every weight dtype",
  ignore,
  fn: async () => {
    // The conformance suite runs the default kernel of this machine's adapter ("rows" on
    // lavapipe); this runs the other one. Weights are unpacked exactly and summed in f32,
    // so the f32 tolerance holds for every dtype.
    const backend = await createWebGpuBackend({ decodeKernel: "workgroup" });
    try {
      assert.equal(backend.decodeKernel, "workgroup");
      const shapes = WEIGHT_DTYPES.flatMap((dtype) => [[dtype, 1, 64, 24], [dtype, 4, 96, 17]] as const);
      for (const [dtype, T, K, N] of [...shapes, ["f32", 2, 37, 5] as const]) {
        const g = new GraphBuilder();
        const x = g.input("x", "f32", ["T", K]);
        const w = g.weight("w", dtype, [N, K]);
        const out = g.matmul(x, w, "out");
        g.output(out);
        const xs = randomF32(T * K, T + K);
        const bytes = encodeWeights(dtype, randomF32(N * K, N * K, 0.5), K);
        const device = backend.upload({ name: "w", dtype, shape: [N, K], data: bytes });
        const exec = await backend.compile(planGraph(g.build(), { T: 8 }), new Map([[w.id, device]]));
        try {
          exec.writeInput(x.id, xs, xs.length);
          await exec.run({ dims: { T } });
          const actual = new Float32Array(T * N);
          await exec.readOutput(out.id, actual, actual.length);
          const expected = referenceOp({ kind: "matmul" }, [
            { shape: [T, K], data: xs },
            { shape: [N, K], data: decodeWeights(dtype, bytes, N * K) },
          ]);
          assertClose(actual, expected, 1e-5, `matmul ${dtype} T=${T} K=${K} N=${N}`);
        } finally {
          exec.dispose();
          backend.release(device);
        }
      }
    } finally {
      backend.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: the shared-memory prefill kernel (the default on GPUs) matches the reference for every weight dtype",
  ignore,
  fn: async () => {
    // Lavapipe defaults to the register-tiled kernel; this forces the one that stages tiles
    // in workgroup memory. T = 70 and 33 span several 32-row tiles (the last partial), N = 45
    // and 80 several 32-column ones, and K walks 32 at a time: 40 ends in a partial K tile,
    // 37 takes the element-by-element path (no quads), and quantized K (whole 32-blocks)
    // takes 2 or 3 tiles. 4096-byte bindings split the larger weights by rows, so some cases
    // run one dispatch per part. Six distinct pipelines, each compiled once.
    const backend = await createWebGpuBackend({ prefillKernel: "shared", maxBindingBytes: 4096 });
    try {
      assert.equal(backend.prefillKernel, "shared");
      const cases: [DType, number, number][] = [
        ["f32", 40, 45], // 7200 bytes: 2 parts
        ["f32", 37, 45], // no quads, 2 parts
        ["f16", 40, 45],
        ["bf16", 40, 45],
        ["q8_0", 64, 45],
        ["q4_0", 96, 45],
        ["q4_0", 96, 80], // 4320 bytes: 2 parts
      ];
      for (const [dtype, K, N] of cases) {
        const g = new GraphBuilder();
        const x = g.input("x", "f32", ["T", K]);
        const w = g.weight("w", dtype, [N, K]);
        const out = g.matmul(x, w, "out");
        g.output(out);
        const bytes = encodeWeights(dtype, randomF32(N * K, N + K, 0.5), K);
        const device = backend.upload({ name: "w", dtype, shape: [N, K], data: bytes });
        const decoded = decodeWeights(dtype, bytes, N * K);
        const exec = await backend.compile(planGraph(g.build(), { T: 70 }), new Map([[w.id, device]]));
        try {
          for (const T of [70, 33]) {
            const xs = randomF32(T * K, T * K);
            exec.writeInput(x.id, xs, xs.length);
            await exec.run({ dims: { T } });
            const actual = new Float32Array(T * N);
            await exec.readOutput(out.id, actual, actual.length);
            const expected = referenceOp({ kind: "matmul" }, [
              { shape: [T, K], data: xs },
              { shape: [N, K], data: decoded },
            ]);
            assertClose(actual, expected, 1e-5, `shared matmul ${dtype} T=${T} K=${K} N=${N}`);
          }
        } finally {
          exec.dispose();
          backend.release(device);
        }
      }
    } finally {
      backend.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: greedy generation with the shared-memory prefill kernel reproduces the llama.cpp reference",
  ignore,
  fn: async () => {
    // The prompts (8 to 13 tokens) run as one prefill step each, through the shared kernel.
    registerBackend("webgpu", () => createWebGpuBackend({ prefillKernel: "shared" }));
    try {
      await withModel(async (model) => {
        assert.equal((model.backend as WebGpuBackend).prefillKernel, "shared");
        const ref = JSON.parse(await Deno.readTextFile(`${SHARED}/refs/story-greedy.json`));
        for (const c of ref.cases as GreedyCase[]) {
          const ids: number[] = [];
          const stream = model.generateTokens(c.prompt_ids, { temperature: 0, maxTokens: 64, ignoreEos: true });
          for await (const t of stream) ids.push(t.id);
          assert.deepEqual(ids, c.greedy_ids, `greedy ids of ${JSON.stringify(c.prompt)}`);
        }
      });
    } finally {
      registerBackend("webgpu", () => createWebGpuBackend());
    }
  },
});

Deno.test({
  name: "webgpu: weights larger than one binding are split by rows (matmul and embedding, every dtype)",
  ignore,
  fn: async () => {
    // 256-byte bindings: from 1 row per part (f32, K = 64) to 7 (q4_0).
    const backend = await createWebGpuBackend({ maxBindingBytes: 256 });
    try {
      for (const dtype of WEIGHT_DTYPES) {
        const [N, K] = [24, 64];
        const bytes = encodeWeights(dtype, randomF32(N * K, 7, 0.5), K);
        const device = backend.upload({ name: "w", dtype, shape: [N, K], data: bytes });
        const decoded = decodeWeights(dtype, bytes, N * K);
        try {
          await assert.rejects(() => backend.readTensor(device, 0, 4), TypeError);
          for (const T of [1, 5]) {
            const g = new GraphBuilder();
            const x = g.input("x", "f32", ["T", K]);
            const w = g.weight("w", dtype, [N, K]);
            const out = g.matmul(x, w, "out");
            g.output(out);
            const xs = randomF32(T * K, T);
            const exec = await backend.compile(planGraph(g.build(), { T: 8 }), new Map([[w.id, device]]));
            try {
              exec.writeInput(x.id, xs, xs.length);
              await exec.run({ dims: { T } });
              const actual = new Float32Array(T * N);
              await exec.readOutput(out.id, actual, actual.length);
              const expected = referenceOp({ kind: "matmul" }, [{ shape: [T, K], data: xs }, {
                shape: [N, K],
                data: decoded,
              }]);
              assertClose(actual, expected, 1e-5, `split matmul ${dtype} T=${T}`);
            } finally {
              exec.dispose();
            }
          }
          const g = new GraphBuilder();
          const ids = g.input("ids", "i32", ["T"]);
          const table = g.weight("w", dtype, [N, K]);
          const out = g.embedding(ids, table, "out");
          g.output(out);
          const idValues = Int32Array.from([0, 23, 7, 12, 7]);
          const exec = await backend.compile(planGraph(g.build(), { T: 8 }), new Map([[table.id, device]]));
          try {
            exec.writeInput(ids.id, idValues, idValues.length);
            await exec.run({ dims: { T: idValues.length } });
            const actual = new Float32Array(idValues.length * K);
            await exec.readOutput(out.id, actual, actual.length);
            const expected = referenceOp({ kind: "embedding" }, [{ shape: [5], data: idValues }, {
              shape: [N, K],
              data: decoded,
            }]);
            assertClose(actual, expected, 0, `split embedding ${dtype}`);
          } finally {
            exec.dispose();
          }
        } finally {
          backend.release(device);
        }
      }
      // A tensor that cannot be split names the limit.
      assert.throws(
        () => backend.upload({ name: "big", dtype: "f32", shape: [128], data: new Uint8Array(512) }),
        /maxStorageBufferBindingSize \(256 bytes\)/,
      );
    } finally {
      backend.dispose();
    }
  },
});

/** A one-node attention graph over a paged pool: its inputs, caches and output. */
function pagedAttention(
  op: { heads: number; kvHeads: number; headDim: number; scale: number; window: number; pageSize: number },
  poolRows: number,
  perSeq: number,
  kvDType: "f32" | "f16",
  vDType: "f32" | "f16" = kvDType,
) {
  const g = new GraphBuilder();
  const kvDim = op.kvHeads * op.headDim;
  const q = g.input("q", "f32", ["T", op.heads * op.headDim]);
  const k = g.input("k", "f32", ["T", kvDim]);
  const v = g.input("v", "f32", ["T", kvDim]);
  const positions = g.input("positions", "i32", ["T"]);
  const seqOf = g.input("seqOf", "i32", ["T"]);
  const pages = g.input("pages", "i32", ["S", perSeq]);
  const kc = g.state("kc", kvDType, [poolRows, kvDim]);
  const vc = g.state("vc", vDType, [poolRows, kvDim]);
  const out = g.attention(q, k, v, kc, vc, { positions, seqOf, pages }, op, "out");
  g.output(out);
  return { graph: g.build(), q, k, v, positions, seqOf, pages, kc, vc, out };
}

Deno.test({
  name: "webgpu: an f16 KV pool holds each step's keys and values at their pages, and its pages copy and restore",
  ignore,
  fn: async () => {
    // What the engine's KV pool relies on: readTensor, writeTensor and copyTensor move the f16
    // bytes of whole pages (kvDim 16: 32 bytes a row, 4 rows a page), within one pool tensor
    // (copy-on-write of a shared page, through the scratch buffer) and between tensors, and
    // attention reads pages put there that way as it reads its own. WGSL may round a value
    // to f16 either way, so values are checked within one f16 step (1e-3, the conformance
    // f16 KV tolerance).
    const backend = await createWebGpuBackend();
    const [heads, kvHeads, headDim, pageSize, pageCount, perSeq] = [4, 2, 8, 4, 6, 4];
    const [poolRows, kvDim] = [pageSize * pageCount, kvHeads * headDim];
    const pageBytes = pageSize * kvDim * 2;
    const op = {
      kind: "attention",
      heads,
      kvHeads,
      headDim,
      scale: 1 / Math.sqrt(headDim),
      window: 0,
      pageSize,
    } as const;
    const a = pagedAttention(op, poolRows, perSeq, "f16");
    const plan = planGraph(a.graph, { T: 8, S: 2 });
    // A pool pair on the device, with the reference's copy of its values.
    const newPool = (name: string) => {
      const [k, v] = ["k", "v"].map((c) => backend.createState(`${name}.${c}`, "f16", [poolRows, kvDim]));
      return { k, v, kRef: new Float32Array(poolRows * kvDim), vRef: new Float32Array(poolRows * kvDim) };
    };
    type Pool = ReturnType<typeof newPool>;
    const execs: { dispose(): void }[] = [];
    const compile = async (pool: Pool) => {
      const exec = await backend.compile(plan, new Map([[a.kc.id, pool.k], [a.vc.id, pool.v]]));
      execs.push(exec);
      return exec;
    };
    // One step: tokens [page-table row, position], with q/k/v rows from `seed`; checks the
    // output and both whole caches against the reference, and returns the output.
    const step = async (
      exec: Awaited<ReturnType<typeof compile>>,
      pool: Pool,
      tables: number[][],
      tokens: [number, number][],
      seeds: number[],
    ) => {
      const T = tokens.length;
      const rowsOf = (n: number, base: number, scale: number) => {
        const out = new Float32Array(T * n);
        seeds.forEach((seed, t) => out.set(randomF32(n, base + seed, scale), t * n));
        return out;
      };
      const [qs, ks, vs] = [rowsOf(heads * headDim, 100, 2), rowsOf(kvDim, 200, 2), rowsOf(kvDim, 300, 1)];
      const index = {
        positions: Int32Array.from(tokens.map(([, p]) => p)),
        seqOf: Int32Array.from(tokens.map(([s]) => s)),
        pages: Int32Array.from(tables.flat()),
      };
      for (const [tensor, values] of [[a.q, qs], [a.k, ks], [a.v, vs]] as const) {
        exec.writeInput(tensor.id, values, values.length);
      }
      for (const name of ["positions", "seqOf", "pages"] as const) {
        exec.writeInput(a[name].id, index[name], index[name].length);
      }
      await exec.run({ dims: { T, S: tables.length } });
      const actual = new Float32Array(T * heads * headDim);
      await exec.readOutput(a.out.id, actual, actual.length);
      const expected = referenceOp(op, [
        { shape: [T, heads * headDim], data: qs },
        { shape: [T, kvDim], data: ks },
        { shape: [T, kvDim], data: vs },
        { shape: [poolRows, kvDim], data: pool.kRef, dtype: "f16" },
        { shape: [poolRows, kvDim], data: pool.vRef, dtype: "f16" },
        { shape: [T], data: index.positions },
        { shape: [T], data: index.seqOf },
        { shape: [tables.length, perSeq], data: index.pages },
      ]);
      assertClose(actual, expected, 1e-3, `attention output of ${JSON.stringify(tokens)}`);
      for (const [device, ref] of [[pool.k, pool.kRef], [pool.v, pool.vRef]] as const) {
        const bytes = await backend.readTensor(device, 0, device.byteLength);
        assertClose(
          decodeWeights("f16", bytes, ref.length),
          ref,
          1e-3,
          `${device.name} after ${JSON.stringify(tokens)}`,
        );
      }
      return actual;
    };
    const p = newPool("p");
    const c = newPool("c");
    const width = heads * headDim;
    try {
      assert.equal(p.k.byteLength, poolRows * kvDim * 2);
      assert.deepEqual(await backend.readTensor(p.k, 0, p.k.byteLength), new Uint8Array(poolRows * kvDim * 2));
      const execP = await compile(p);
      // Sequence A (pages 2, 0): a prompt of 3, then a decode at 3 fills page 2.
      const tableA = [2, 0, 0, 0];
      await step(execP, p, [tableA], [[0, 0], [0, 1], [0, 2]], [0, 1, 2]);
      await step(execP, p, [tableA], [[0, 3]], [3]);
      // Page 2 read from its offset is the f16 values of A's positions 0..3.
      const page2 = await backend.readTensor(p.k, 2 * pageBytes, pageBytes);
      const at = (page: number) => page * pageSize * kvDim;
      assertClose(decodeWeights("f16", page2, pageSize * kvDim), p.kRef.subarray(at(2), at(3)), 1e-3, "page 2");

      // Copy-on-write within the pool: page 2 into page 5, the first page of sequence B (pages 5, 4).
      for (const t of [p.k, p.v]) backend.copyTensor(t, t, pageBytes, 2 * pageBytes, 5 * pageBytes);
      for (const ref of [p.kRef, p.vRef]) ref.copyWithin(at(5), at(2), at(3));
      // A and B decode their position 4 in one step from the same token: the same output.
      const both = await step(execP, p, [tableA, [5, 4, 0, 0]], [[0, 4], [1, 4]], [4, 4]);
      assertClose(both.subarray(width), both.subarray(0, width), 0, "two sequences with a copied page");

      // Between tensors at offsets, and save/restore: page 2 of p into page 3 of c (copyTensor
      // for keys; readTensor and writeTensor in two pieces for values), then C (pages 3, 1)
      // decodes position 4 like A did.
      backend.copyTensor(p.k, c.k, pageBytes, 2 * pageBytes, 3 * pageBytes);
      const saved = await backend.readTensor(p.v, 2 * pageBytes, pageBytes);
      backend.writeTensor(c.v, 3 * pageBytes, saved.subarray(0, 64));
      backend.writeTensor(c.v, 3 * pageBytes + 64, saved.subarray(64));
      assert.deepEqual(await backend.readTensor(c.v, 3 * pageBytes, pageBytes), saved);
      c.kRef.set(p.kRef.subarray(at(2), at(3)), at(3));
      c.vRef.set(p.vRef.subarray(at(2), at(3)), at(3));
      const execC = await compile(c);
      const fromC = await step(execC, c, [[3, 1, 0, 0]], [[0, 4]], [4]);
      assertClose(fromC, both.subarray(0, width), 0, "a step after copyTensor and writeTensor at offsets");

      // Copies move whole words; overlapping ranges within one tensor are refused.
      for (
        const [src, dst, len, from, to] of [[p.k, c.k, 6, 2, 0], [p.k, c.k, 8, 0, 2], [p.k, p.k, 30, 0, 64]] as const
      ) {
        assert.throws(() => backend.copyTensor(src, dst, len, from, to), {
          name: "RangeError",
          message: new RegExp(
            `Cannot copy ${len} bytes from offset ${from} of "${src.name}" to offset ${to} of ` +
              `"${dst.name}" on WebGPU: it copies whole 4-byte words`,
          ),
        });
      }
      assert.throws(() => backend.copyTensor(p.k, p.k, 64, 0, 32), /the ranges overlap/);
      // An odd length may end a tensor (its buffer is padded to a word).
      const [w1, w2] = [1, 2].map((i) =>
        backend.upload({ name: `w${i}`, dtype: "f16", shape: [3], data: encodeWeights("f16", randomF32(3, i), 3) })
      );
      backend.copyTensor(w1, w2, 6);
      assert.deepEqual(await backend.readTensor(w2, 0, 6), await backend.readTensor(w1, 0, 6));
      for (const w of [w1, w2]) backend.release(w);
    } finally {
      for (const e of execs) e.dispose();
      for (const t of [p, c].flatMap((x) => [x.k, x.v])) backend.release(t);
      backend.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: KV cache dtypes other than f32 and f16, odd f16 rows and mixed caches are refused",
  ignore,
  fn: async () => {
    const backend = await createWebGpuBackend();
    try {
      assert.equal(backend.supports("attention", "f16"), true);
      assert.equal(backend.supports("attention", "bf16"), false);
      for (const dtype of ["bf16", "q8_0", "i32"] as const) {
        assert.throws(() => backend.createState("c", dtype, [4, 32]), UnsupportedError);
      }
      assert.throws(() => backend.createState("c", "f16", [4, 7]), RangeError);
      // Both caches of one attention node have one dtype.
      const op = { heads: 2, kvHeads: 1, headDim: 4, scale: 0.5, window: 0, pageSize: 2 };
      const mixed = pagedAttention(op, 4, 2, "f16", "f32");
      const bindings = new Map([
        [mixed.kc.id, backend.createState("kc", "f16", [4, 4])],
        [mixed.vc.id, backend.createState("vc", "f32", [4, 4])],
      ]);
      await assert.rejects(
        () => backend.compile(planGraph(mixed.graph, { T: 1, S: 1 }), bindings),
        (e: Error) => e instanceof UnsupportedError && /"f16" key cache and a "f32" value cache/.test(e.message),
      );
      // Heads of an odd dim would start mid-word in an f16 cache (kvDim 2 × 3 is even).
      const odd = pagedAttention({ ...op, kvHeads: 2, headDim: 3 }, 4, 2, "f16");
      const oddBindings = new Map([odd.kc, odd.vc].map((t) => [t.id, backend.createState(t.name, "f16", [4, 6])]));
      await assert.rejects(
        () => backend.compile(planGraph(odd.graph, { T: 1, S: 1 }), oddBindings),
        (e: Error) => e instanceof UnsupportedError && /head dim 3/.test(e.message),
      );
    } finally {
      backend.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: rope stays accurate at large positions (the angle is reduced in integers)",
  ignore,
  fn: async () => {
    // An f32 angle would be off by about |angle| × 6e-8 (6e-5 rad at position 1000); the
    // kernel reduces it modulo 2π exactly, so every position keeps the f32 tolerance.
    const backend = await createWebGpuBackend();
    try {
      const positions = [0, 1, 1000, 65_537, 1_000_003, 2 ** 24 + 1, 2 ** 31 - 1];
      const T = positions.length;
      for (const theta of [10_000, 500_000]) {
        const op = { kind: "rope", heads: 2, headDim: 16, theta } as const;
        const g = new GraphBuilder();
        const x = g.input("x", "f32", ["T", 32]);
        const pos = g.input("positions", "i32", ["T"]);
        const out = g.rope(x, pos, op.heads, op.headDim, theta, "out");
        g.output(out);
        const exec = await backend.compile(planGraph(g.build(), { T: 8 }), new Map());
        try {
          const xs = randomF32(T * 32, theta);
          const ps = Int32Array.from(positions);
          exec.writeInput(x.id, xs, xs.length);
          exec.writeInput(pos.id, ps, T);
          await exec.run({ dims: { T } });
          const actual = new Float32Array(T * 32);
          await exec.readOutput(out.id, actual, actual.length);
          const expected = referenceOp(op, [{ shape: [T, 32], data: xs }, { shape: [T], data: ps }]);
          assertClose(actual, expected, 1e-5, `rope theta ${theta} at positions ${positions}`);
        } finally {
          exec.dispose();
        }
      }
    } finally {
      backend.dispose();
    }
  },
});

/** The story model's graph on a backend, with its real weights and a fresh pool; steps of tokens of several sequences. */
class StoryBatch {
  static readonly pageSize = 8;
  static readonly pagesPerSeq = 8;
  static readonly poolPages = 128;
  readonly exec: Executable;
  readonly llama: LlamaGraph;
  readonly plan: ExecutionPlan;
  readonly vocab: number;
  /** Weight and state values for the reference run (states updated in place, as the op does). */
  readonly #values = new Map<number, Float32Array | Int32Array>();
  readonly #backend: WebGpuBackend;
  readonly #tensors: DeviceTensor[];

  private constructor(
    backend: WebGpuBackend,
    exec: Executable,
    llama: LlamaGraph,
    plan: ExecutionPlan,
    vocab: number,
    tensors: DeviceTensor[],
  ) {
    [this.#backend, this.exec, this.llama, this.plan, this.vocab, this.#tensors] = [
      backend,
      exec,
      llama,
      plan,
      vocab,
      tensors,
    ];
  }

  static async create(backend: WebGpuBackend, maxDims = { T: 48, S: 16, R: 16 }): Promise<StoryBatch> {
    const config = parseConfig(JSON.parse(await Deno.readTextFile(`${STORY_DIR}/config.json`)));
    const file = await readSafetensors(`${STORY_DIR}/model.safetensors`);
    const llama = buildLlamaGraph(config, {
      poolPages: StoryBatch.poolPages,
      pageSize: StoryBatch.pageSize,
      pagesPerSeq: StoryBatch.pagesPerSeq,
      weightDType: () => "f32",
    });
    const bindings = new Map<number, DeviceTensor>();
    const values = new Map<number, Float32Array>();
    for (const t of llama.graph.tensors) {
      if (t.kind === "weight") {
        // The tied embedding is stored as the output head.
        const host = file.tensors.get(t.name) ?? file.tensors.get("lm_head.weight")!;
        bindings.set(t.id, backend.upload({ ...host, name: t.name }));
        values.set(t.id, decodeWeights("f32", host.data, elementCount(host.shape)));
      } else if (t.kind === "state") {
        const shape = t.shape as number[];
        bindings.set(t.id, backend.createState(t.name, t.dtype, shape));
        values.set(t.id, new Float32Array(elementCount(shape)));
      }
    }
    const plan = planGraph(llama.graph, maxDims);
    const exec = await backend.compile(plan, bindings);
    const batch = new StoryBatch(backend, exec, llama, plan, config.vocabSize, [...bindings.values()]);
    for (const [id, v] of values) batch.#values.set(id, v);
    return batch;
  }

  /** The pool page of position block `j` of sequence `s`: scattered, distinct for every (s, j). */
  static page(s: number, j: number): number {
    return ((j * 16 + s) * 37) % StoryBatch.poolPages;
  }

  /**
   * Writes one step's inputs: tokens `[sequence, position, token id]`, page-table rows of
   * the sequences `seqs` (each token's sequence must be among them), logits of `rows`.
   */
  write(tokens: readonly (readonly [number, number, number])[], seqs: readonly number[], rows: readonly number[]) {
    const { llama, exec } = this;
    const perSeq = StoryBatch.pagesPerSeq;
    const inputs: [number, Int32Array][] = [
      [llama.tokens.id, Int32Array.from(tokens, ([, , id]) => id)],
      [llama.positions.id, Int32Array.from(tokens, ([, p]) => p)],
      [llama.seqOf.id, Int32Array.from(tokens, ([s]) => seqs.indexOf(s))],
      [
        llama.pages.id,
        Int32Array.from(
          { length: seqs.length * perSeq },
          (_, i) => StoryBatch.page(seqs[Math.floor(i / perSeq)], i % perSeq),
        ),
      ],
      [llama.logitRows.id, Int32Array.from(rows)],
    ];
    for (const [id, data] of inputs) exec.writeInput(id, data, data.length);
    return new Map(inputs);
  }

  /** Runs a step on the GPU (see {@link StoryBatch.write}) and returns its logits, `rows.length` rows. */
  async step(
    tokens: readonly (readonly [number, number, number])[],
    seqs: readonly number[],
    rows: readonly number[],
    reference = false,
  ): Promise<{ gpu: Float32Array; reference?: Float32Array }> {
    const inputs = this.write(tokens, seqs, rows);
    const dims = { T: tokens.length, S: seqs.length, R: rows.length };
    await this.exec.run({ dims });
    const gpu = new Float32Array(rows.length * this.vocab);
    await this.exec.readOutput(this.llama.logits.id, gpu, gpu.length);
    return { gpu, reference: reference ? this.#reference(inputs, dims) : undefined };
  }

  /** The plan run node by node with the reference kernels, on the reference's weights and pool. */
  #reference(inputs: Map<number, Int32Array>, dims: Record<string, number>): Float32Array {
    const { graph } = this.plan;
    const values = new Map<number, Float32Array | Int32Array>([...this.#values, ...inputs]);
    const ref = (id: number): RefTensor => {
      const t = graph.tensors[id];
      return { shape: resolveShape(t.shape, dims), data: values.get(id)!, dtype: t.dtype };
    };
    for (const id of this.plan.order) {
      const node = graph.nodes[id];
      values.set(node.output, referenceOp(node.op, node.inputs.map(ref)));
    }
    return values.get(this.llama.logits.id) as Float32Array;
  }

  dispose(): void {
    this.exec.dispose();
    for (const t of this.#tensors) this.#backend.release(t);
  }
}

/** Token ids of a sequence's history and next token, from a seed. */
function storyTokens(seed: number, n: number): number[] {
  return Array.from(randomF32(n, seed), (x) => 3 + Math.floor((x + 1) * 1000));
}

for (const kernels of [{}, { decodeKernel: "workgroup", prefillKernel: "shared" }] as const) {
  const label = "decodeKernel" in kernels
    ? "the GPU kernels (workgroup decode, shared prefill)"
    : "the default kernels";
  Deno.test({
    name: `webgpu: a token's logits are the same alone as among 16 sequences, and match the reference (${label})`,
    ignore,
    fn: async () => {
      // 16 sequences of the story model with histories of 2 to 47 tokens on scattered pages,
      // each prefilled in its own step; then each one's next token is decoded alone (T = 1,
      // the matrix-vector kernel), with two others (T = 3) and among all 16 (T = 16, the
      // matrix-matrix kernel). The batched step is also checked against the reference kernels
      // run node by node (f64, on the same pool), within the f32 logits tolerance.
      const backend = await createWebGpuBackend(kernels);
      const story = await StoryBatch.create(backend);
      try {
        const seqs = Array.from({ length: 16 }, (_, s) => s);
        const lengths = seqs.map((s) => 2 + 3 * s);
        const ids = seqs.map((s) => storyTokens(s + 1, lengths[s] + 1));
        for (const s of seqs) {
          const tokens = ids[s].slice(0, lengths[s]).map((id, p) => [s, p, id] as const);
          const { gpu, reference } = await story.step(tokens, [s], [tokens.length - 1], true);
          assertClose(gpu, reference!, LOGITS_TOLERANCE, `prefill of sequence ${s}`);
        }
        const next = (s: number) => [s, lengths[s], ids[s][lengths[s]]] as const;
        const V = story.vocab;
        const alone: Float32Array[] = [];
        for (const s of seqs) alone.push((await story.step([next(s)], [s], [0])).gpu);
        const three = (await story.step([5, 0, 11].map(next), [0, 5, 11], [0, 1, 2])).gpu;
        const { gpu: all, reference } = await story.step(seqs.map(next), seqs, seqs, true);
        assertClose(all, reference!, LOGITS_TOLERANCE, "the batched decode step against the reference");
        // On lavapipe the default kernels sum every row in the same order whatever T: bit-identical.
        // The GPU kernels sum a row in a different order at T ≤ 4 (64 lanes) than above (tiles).
        const tolerance = "decodeKernel" in kernels ? LOGITS_TOLERANCE : 0;
        for (const s of seqs) {
          assertClose(all.subarray(s * V, (s + 1) * V), alone[s], tolerance, `sequence ${s} among 16 and alone`);
        }
        [5, 0, 11].forEach((s, r) =>
          assertClose(three.subarray(r * V, (r + 1) * V), alone[s], tolerance, `sequence ${s} among 3 and alone`)
        );
      } finally {
        story.dispose();
        backend.dispose();
      }
    },
  });
}

Deno.test({
  name: "webgpu: a step writes only the values it uses and records one command encoder",
  ignore,
  fn: async () => {
    // The per-step cost must not grow with the plan's room (T 48, S 16, R 16): a decode step
    // of one sequence writes its 5 inputs' used values (the page table for its one row) and
    // the 16-byte step uniform, nothing else, and submits one command encoder.
    const backend = await createWebGpuBackend();
    const story = await StoryBatch.create(backend);
    const queue = backend.device.queue;
    const writes: [string, number][] = [];
    let encoders = 0;
    const writeBuffer = queue.writeBuffer.bind(queue);
    const createCommandEncoder = backend.device.createCommandEncoder.bind(backend.device);
    Object.assign(queue, {
      writeBuffer: (buffer: GPUBuffer, offset: number, data: BufferSource, dataOffset?: number, size?: number) => {
        const bytes = size === undefined ? data.byteLength : size * ((data as Int32Array).BYTES_PER_ELEMENT ?? 1);
        writes.push([buffer.label, bytes]);
        return writeBuffer(buffer, offset, data, dataOffset, size);
      },
    });
    Object.assign(backend.device, {
      createCommandEncoder: (d?: GPUCommandEncoderDescriptor) => {
        encoders++;
        return createCommandEncoder(d);
      },
    });
    try {
      for (const [seqs, perStep] of [[[3], 1], [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 10]] as const) {
        writes.length = 0;
        story.write(seqs.map((s) => [s, 4, 7 + s]), seqs, seqs.map((_, i) => i));
        encoders = 0;
        await story.exec.run({ dims: { T: perStep, S: perStep, R: perStep } });
        assert.equal(encoders, 1, "command encoders of one step");
        const values = 4 * perStep;
        assert.deepEqual(writes, [
          ["index inputs", values], // tokens
          ["index inputs", values], // positions
          ["index inputs", values], // sequence rows
          ["index inputs", values * StoryBatch.pagesPerSeq], // the page table's rows of the step
          ["index inputs", values], // logit rows
          ["step", 16],
        ]);
      }
    } finally {
      delete (queue as { writeBuffer?: unknown }).writeBuffer;
      delete (backend.device as { createCommandEncoder?: unknown }).createCommandEncoder;
      story.dispose();
      backend.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: a long generation leaves the event loop responsive (a 10 ms timer lags under 50 ms)",
  ignore,
  fn: async () => {
    // 160 decode steps of 4 sequences, each awaited with its read-back, as the engine loop
    // runs them; the GPU's work (lavapipe: CPU threads) happens off the main thread.
    const backend = await createWebGpuBackend();
    const story = await StoryBatch.create(backend);
    const loop = watchEventLoop();
    try {
      const seqs = [0, 1, 2, 3];
      const started = performance.now();
      for (let i = 0; i < 160; i++) {
        await story.step(seqs.map((s) => [s, i % 64, 3 + ((i * 7 + s) % 2000)]), seqs, seqs);
      }
      const elapsed = performance.now() - started;
      const worst = loop.worst();
      assert.ok(worst < 50, `the event loop lagged ${worst.toFixed(1)} ms during ${elapsed.toFixed(0)} ms of steps`);
    } finally {
      loop.stop();
      story.dispose();
      backend.dispose();
    }
  },
});

Deno.test({
  name: "webgpu: a dispatch of more than 65535 workgroups spreads over a two-dimensional grid",
  ignore,
  fn: async () => {
    // add over 65537 workgroups of 64: the grid is 65535 × 2, with 65533 spare workgroups.
    const backend = await createWebGpuBackend();
    try {
      const width = 64 * 65537;
      const g = new GraphBuilder();
      const a = g.input("a", "f32", ["T", width]);
      const b = g.input("b", "f32", ["T", width]);
      const out = g.add(a, b, "out");
      g.output(out);
      const exec = await backend.compile(planGraph(g.build(), { T: 1 }), new Map());
      try {
        const [av, bv] = [randomF32(width, 1), randomF32(width, 2)];
        exec.writeInput(a.id, av, width);
        exec.writeInput(b.id, bv, width);
        await exec.run({ dims: { T: 1 } });
        const actual = new Float32Array(width);
        await exec.readOutput(out.id, actual, width);
        assertClose(actual, av.map((x, i) => x + bv[i]), 0, "add over a two-dimensional grid");
      } finally {
        exec.dispose();
      }
    } finally {
      backend.dispose();
    }
  },
});

Deno.test("webgpu: without an adapter, createBackend and loadModel throw WebGpuUnavailableError", async () => {
  setNavigatorGpu({ requestAdapter: () => Promise.resolve(null) } as unknown as GPU);
  try {
    await assert.rejects(() => createBackend("webgpu"), WebGpuUnavailableError);
    await assert.rejects(
      () => loadModel(STORY_DIR, { backend: "webgpu" }),
      (e: Error) => e instanceof WebGpuUnavailableError && /no GPU adapter/.test(e.message),
    );
    // Bad options are refused before any adapter is asked for.
    await assert.rejects(() => createWebGpuBackend({ decodeKernel: "fast" as "rows" }), /Invalid decodeKernel "fast"/);
    await assert.rejects(
      () => createWebGpuBackend({ prefillKernel: "fast" as "tiled" }),
      /Invalid prefillKernel "fast"/,
    );
    await assert.rejects(() => createWebGpuBackend({ maxBindingBytes: 0.5 }), RangeError);
  } finally {
    setNavigatorGpu(undefined);
  }
});

Deno.test({
  name: "webgpu: a lost device errors the generation stream instead of hanging it",
  ignore,
  fn: () =>
    withModel(async (model) => {
      const stream = model.generateTokens("Once upon a time", { temperature: 0, maxTokens: 64, ignoreEos: true });
      const reader = stream.getReader();
      for (let i = 0; i < 3; i++) assert.equal((await reader.read()).done, false);
      (model.backend as WebGpuBackend).device.destroy();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const hang = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error("The stream hung after the device was lost")), 30_000);
      });
      const drain = async () => {
        for (;;) {
          if ((await reader.read()).done) throw new Error("The stream ended normally after the device was lost");
        }
      };
      try {
        await assert.rejects(() => Promise.race([drain(), hang]), WebGpuDeviceLostError);
      } finally {
        clearTimeout(timer);
      }
      // The backend keeps refusing work rather than hanging.
      assert.throws(() => model.backend.createState("kv", "f32", [4, 4]), WebGpuDeviceLostError);
    }),
});
