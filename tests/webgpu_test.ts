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
import { referenceOp } from "../backends/reference.ts";
import { UnsupportedError } from "../backends/contract.ts";
import { assertClose, randomF32, SHARED, STORY_DIR } from "./helpers.ts";

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
          await exec.run({ dims: { T }, pos: 0 });
          const actual = new Float32Array(T * N);
          await exec.readOutput(out.id, actual, actual.length);
          const expected = referenceOp({ kind: "matmul" }, [
            { shape: [T, K], data: xs },
            { shape: [N, K], data: decodeWeights(dtype, bytes, N * K) },
          ], 0);
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
            await exec.run({ dims: { T }, pos: 0 });
            const actual = new Float32Array(T * N);
            await exec.readOutput(out.id, actual, actual.length);
            const expected = referenceOp({ kind: "matmul" }, [
              { shape: [T, K], data: xs },
              { shape: [N, K], data: decoded },
            ], 0);
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
              await exec.run({ dims: { T }, pos: 0 });
              const actual = new Float32Array(T * N);
              await exec.readOutput(out.id, actual, actual.length);
              const expected = referenceOp({ kind: "matmul" }, [{ shape: [T, K], data: xs }, {
                shape: [N, K],
                data: decoded,
              }], 0);
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
            await exec.run({ dims: { T: idValues.length }, pos: 0 });
            const actual = new Float32Array(idValues.length * K);
            await exec.readOutput(out.id, actual, actual.length);
            const expected = referenceOp({ kind: "embedding" }, [{ shape: [5], data: idValues }, {
              shape: [N, K],
              data: decoded,
            }], 0);
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

Deno.test({
  name: "webgpu: an f16 KV cache holds the f16 keys and values of each step, and its rows copy and restore",
  ignore,
  fn: async () => {
    // What KvCache.copyTo/save/restore rely on: readTensor, writeTensor and copyTensor move the
    // f16 bytes of whole rows (kvDim 16: 32 bytes, 8 words a row), and attention reads rows put
    // there that way as it reads its own. WGSL may round a value to f16 either way, so values
    // are checked within one f16 step (1e-3, the conformance f16 KV tolerance).
    const backend = await createWebGpuBackend();
    const [heads, kvHeads, headDim, cap] = [4, 2, 8, 16];
    const kvDim = kvHeads * headDim;
    const rowBytes = kvDim * 2;
    const op = { kind: "attention", heads, kvHeads, headDim, scale: 1 / Math.sqrt(headDim), window: 0 } as const;
    const g = new GraphBuilder();
    const q = g.input("q", "f32", ["T", heads * headDim]);
    const k = g.input("k", "f32", ["T", kvDim]);
    const v = g.input("v", "f32", ["T", kvDim]);
    const kc = g.state("kc", "f16", [cap, kvDim]);
    const vc = g.state("vc", "f16", [cap, kvDim]);
    const out = g.attention(q, k, v, kc, vc, op, "out");
    g.output(out);
    const plan = planGraph(g.build(), { T: 8 });
    // A cache pair on the device, with the reference's copy of its values.
    const newCaches = (name: string) => {
      const [kd, vd] = ["k", "v"].map((c) => backend.createState(`${name}.${c}`, "f16", [cap, kvDim]));
      return { k: kd, v: vd, kRef: new Float32Array(cap * kvDim), vRef: new Float32Array(cap * kvDim) };
    };
    type Caches = ReturnType<typeof newCaches>;
    const execs: { dispose(): void }[] = [];
    const compile = async (c: Caches) => {
      const exec = await backend.compile(plan, new Map([[kc.id, c.k], [vc.id, c.v]]));
      execs.push(exec);
      return exec;
    };
    // Runs one step on caches `c` and checks its output and both whole caches against the reference.
    const step = async (exec: Awaited<ReturnType<typeof compile>>, c: Caches, T: number, pos: number) => {
      const qs = randomF32(T * heads * headDim, 100 + pos, 2);
      const ks = randomF32(T * kvDim, 200 + pos, 2);
      const vs = randomF32(T * kvDim, 300 + pos);
      exec.writeInput(q.id, qs, qs.length);
      exec.writeInput(k.id, ks, ks.length);
      exec.writeInput(v.id, vs, vs.length);
      await exec.run({ dims: { T }, pos });
      const actual = new Float32Array(T * heads * headDim);
      await exec.readOutput(out.id, actual, actual.length);
      const expected = referenceOp(op, [
        { shape: [T, heads * headDim], data: qs },
        { shape: [T, kvDim], data: ks },
        { shape: [T, kvDim], data: vs },
        { shape: [cap, kvDim], data: c.kRef, dtype: "f16" },
        { shape: [cap, kvDim], data: c.vRef, dtype: "f16" },
      ], pos);
      assertClose(actual, expected, 1e-3, `attention output at pos ${pos}`);
      for (const [device, ref] of [[c.k, c.kRef], [c.v, c.vRef]] as const) {
        const bytes = await backend.readTensor(device, 0, device.byteLength);
        assertClose(decodeWeights("f16", bytes, cap * kvDim), ref, 1e-3, `${device.name} after the step at ${pos}`);
      }
      return actual;
    };
    const a = newCaches("a");
    const b = newCaches("b");
    const c = newCaches("c");
    try {
      assert.equal(a.k.byteLength, cap * kvDim * 2);
      assert.deepEqual(await backend.readTensor(a.k, 0, a.k.byteLength), new Uint8Array(cap * rowBytes));
      const execA = await compile(a);
      await step(execA, a, 3, 0);
      await step(execA, a, 1, 3);
      // Rows 1..3 read from a row offset are the f16 values of those rows.
      const mid = await backend.readTensor(a.k, rowBytes, 3 * rowBytes);
      assertClose(decodeWeights("f16", mid, 3 * kvDim), a.kRef.subarray(kvDim, 4 * kvDim), 1e-3, "rows 1..3");

      // copyTo: the first 4 rows into b; the same next step then gives the same output there.
      for (const [src, dst] of [[a.k, b.k], [a.v, b.v]]) backend.copyTensor(src, dst, 4 * rowBytes);
      b.kRef.set(a.kRef.subarray(0, 4 * kvDim));
      b.vRef.set(a.vRef.subarray(0, 4 * kvDim));
      const execB = await compile(b);
      const fromB = await step(execB, b, 1, 4);
      const fromA = await step(execA, a, 1, 4);
      assertClose(fromB, fromA, 0, "a step after copyTensor");

      // save/restore: the 5 filled rows read as bytes, written back in two pieces at row offsets.
      for (const [src, dst] of [[a.k, c.k], [a.v, c.v]]) {
        const saved = await backend.readTensor(src, 0, 5 * rowBytes);
        backend.writeTensor(dst, 0, saved.subarray(0, 2 * rowBytes));
        backend.writeTensor(dst, 2 * rowBytes, saved.subarray(2 * rowBytes));
        assert.deepEqual(await backend.readTensor(dst, 2 * rowBytes, 3 * rowBytes), saved.subarray(2 * rowBytes));
      }
      c.kRef.set(a.kRef.subarray(0, 5 * kvDim));
      c.vRef.set(a.vRef.subarray(0, 5 * kvDim));
      const execC = await compile(c);
      const fromC = await step(execC, c, 2, 5);
      assertClose(fromC, await step(execA, a, 2, 5), 0, "a step after writeTensor");
    } finally {
      for (const e of execs) e.dispose();
      for (const t of [a, b, c].flatMap((x) => [x.k, x.v])) backend.release(t);
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
      const g = new GraphBuilder();
      const op = { kind: "attention", heads: 2, kvHeads: 1, headDim: 4, scale: 0.5, window: 0 } as const;
      const qkv = ["q", "k", "v"].map((n, i) => g.input(n, "f32", ["T", i === 0 ? 8 : 4]));
      const kc = g.state("kc", "f16", [4, 4]);
      const vc = g.state("vc", "f32", [4, 4]);
      g.output(g.attention(qkv[0], qkv[1], qkv[2], kc, vc, op, "out"));
      const bindings = new Map([
        [kc.id, backend.createState("kc", "f16", [4, 4])],
        [vc.id, backend.createState("vc", "f32", [4, 4])],
      ]);
      await assert.rejects(
        () => backend.compile(planGraph(g.build(), { T: 1 }), bindings),
        (e: Error) => e instanceof UnsupportedError && /"f16" key cache and a "f32" value cache/.test(e.message),
      );
      // Heads of an odd dim would start mid-word in an f16 cache (kvDim 2 × 3 is even).
      const h = new GraphBuilder();
      const odd = { kind: "attention", heads: 2, kvHeads: 2, headDim: 3, scale: 0.5, window: 0 } as const;
      const [q6, k6, v6] = ["q", "k", "v"].map((n) => h.input(n, "f32", ["T", 6]));
      const [kc6, vc6] = ["kc", "vc"].map((n) => h.state(n, "f16", [4, 6]));
      h.output(h.attention(q6, k6, v6, kc6, vc6, odd, "out"));
      const oddBindings = new Map([kc6, vc6].map((t) => [t.id, backend.createState(t.name, "f16", [4, 6])]));
      await assert.rejects(
        () => backend.compile(planGraph(h.build(), { T: 1 }), oddBindings),
        (e: Error) => e instanceof UnsupportedError && /head dim 3/.test(e.message),
      );
    } finally {
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
        await exec.run({ dims: { T: 1 }, pos: 0 });
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
      assert.throws(() => model.createSequence(), WebGpuDeviceLostError);
    }),
});
