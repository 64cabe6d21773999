/**
 * The TypeScript backend's own behaviour beyond the conformance suite: its two modes
 * (steps in a worker it owns, or on the caller's thread) agree bit for bit; a token's
 * results do not depend on what else shares its step; a long step leaves the caller's
 * event loop free; errors in the worker reject; `dispose()` ends the worker so the
 * process can exit; and index inputs are checked in `writeInput`.
 */

import assert from "node:assert/strict";
import { TsBackend } from "../backends/ts/backend.ts";
import { stepLayout } from "../backends/ts/program.ts";
import { WorkerThread } from "../backends/ts/thread.ts";
import "../backends/builtin.ts";
import type { Backend, BackendOptions, DeviceTensor, Executable } from "../backends/contract.ts";
import { createBackend } from "../backends/registry.ts";
import { UnsupportedError } from "../backends/contract.ts";
import { GraphBuilder } from "../graph/builder.ts";
import type { DType, KvDType } from "../graph/dtype.ts";
import type { Graph, TensorSpec } from "../graph/ir.ts";
import { type ExecutionPlan, planGraph } from "../graph/plan.ts";
import { encodeWeights } from "../graph/weight_codec.ts";
import { randomF32 } from "./helpers.ts";
import { spawnDeno } from "./subprocess.ts";

const [V, D, HEADS, KV_HEADS, HEAD_DIM, F] = [16, 64, 4, 2, 16, 96];
const [PAGE_SIZE, PAGE_COUNT, PAGES_PER_SEQ] = [4, 8, 3];

/** A small decoder layer with every op and weight dtype, over a paged pool, reading the logits of `R` rows. */
interface LayerGraph {
  graph: Graph;
  ids: TensorSpec;
  positions: TensorSpec;
  seqOf: TensorSpec;
  pages: TensorSpec;
  rows: TensorSpec;
  logits: TensorSpec;
  caches: TensorSpec[];
  weights: { spec: TensorSpec; dtype: DType; shape: number[] }[];
}

function layerGraph(kvDType: KvDType): LayerGraph {
  const g = new GraphBuilder();
  const weights: LayerGraph["weights"] = [];
  const weight = (name: string, dtype: DType, shape: number[]) => {
    const spec = g.weight(name, dtype, shape);
    weights.push({ spec, dtype, shape });
    return spec;
  };
  const ids = g.input("ids", "i32", ["T"]);
  const positions = g.input("positions", "i32", ["T"]);
  const seqOf = g.input("seqOf", "i32", ["T"]);
  const pages = g.input("pages", "i32", ["S", PAGES_PER_SEQ]);
  const rows = g.input("rows", "i32", ["R"]);
  const kvDim = KV_HEADS * HEAD_DIM;
  const caches = ["kCache", "vCache"].map((name) => g.state(name, kvDType, [PAGE_COUNT * PAGE_SIZE, kvDim]));
  const x = g.embedding(ids, weight("table", "q8_0", [V, D]), "x");
  const h = g.rmsNorm(x, weight("norm", "f32", [D]), 1e-5, "h");
  const q = g.rope(g.matmul(h, weight("wq", "f16", [D, D]), "q"), positions, HEADS, HEAD_DIM, 10000, "qr");
  const k = g.rope(g.matmul(h, weight("wk", "bf16", [kvDim, D]), "k"), positions, KV_HEADS, HEAD_DIM, 10000, "kr");
  const v = g.matmul(h, weight("wv", "q4_0", [kvDim, D]), "v");
  const attn = g.attention(q, k, v, caches[0], caches[1], { positions, seqOf, pages }, {
    heads: HEADS,
    kvHeads: KV_HEADS,
    headDim: HEAD_DIM,
    scale: 1 / Math.sqrt(HEAD_DIM),
    window: 0,
    pageSize: PAGE_SIZE,
  }, "attn");
  const r = g.add(x, g.matmul(attn, weight("wo", "q8_0", [D, D]), "o"), "r");
  const gate = g.matmul(r, weight("wg", "q4_0", [F, D]), "gate");
  const up = g.matmul(r, weight("wu", "f32", [F, D]), "up");
  const down = g.matmul(g.siluMul(gate, up, "m"), weight("wd", "f16", [D, F]), "down");
  const picked = g.gatherRows(g.add(r, down, "r2"), rows, "picked");
  const logits = g.matmul(
    g.rmsNorm(picked, weight("norm2", "f32", [D]), 1e-5, "hn"),
    weight("head", "f32", [V, D]),
    "logits",
  );
  g.output(logits);
  return { graph: g.build(), ids, positions, seqOf, pages, rows, logits, caches, weights };
}

/** One step: per token [page-table row, position, token id]; the page table; the tokens whose logits are read. */
interface Step {
  tokens: [number, number, number][];
  pages: number[][];
  rows: number[];
}

/** A layer compiled on a backend with weights from fixed seeds and zeroed pools. */
async function compileLayer(backend: Backend, layer: LayerGraph) {
  const plan = planGraph(layer.graph, { T: 16, S: 4, R: 16 });
  const bindings = new Map<number, DeviceTensor>();
  layer.weights.forEach(({ spec, dtype, shape }, i) => {
    const values = randomF32(shape.reduce((a, b) => a * b), 100 + i, 0.5);
    const data = encodeWeights(dtype, values, shape[shape.length - 1]);
    bindings.set(spec.id, backend.upload({ name: spec.name, dtype, shape, data }));
  });
  const pools = layer.caches.map((c) => backend.createState(c.name, c.dtype, c.shape as number[]));
  layer.caches.forEach((c, i) => bindings.set(c.id, pools[i]));
  const exec = await backend.compile(plan, bindings);
  return { plan, exec, pools };
}

/** Runs a step and returns the logits of its rows. */
async function runStep(exec: Executable, layer: LayerGraph, step: Step): Promise<Float32Array> {
  const T = step.tokens.length;
  const input = (spec: TensorSpec, values: number[]) =>
    exec.writeInput(spec.id, Int32Array.from(values), values.length);
  input(layer.ids, step.tokens.map(([, , id]) => id));
  input(layer.positions, step.tokens.map(([, p]) => p));
  input(layer.seqOf, step.tokens.map(([s]) => s));
  input(layer.pages, step.pages.flat());
  input(layer.rows, step.rows);
  await exec.run({ dims: { T, S: step.pages.length, R: step.rows.length } });
  const out = new Float32Array(step.rows.length * V);
  await exec.readOutput(layer.logits.id, out, out.length);
  return out;
}

/** Tokens of page-table row `s` at positions `from .. from + n - 1`. */
function tokens(s: number, from: number, n: number): [number, number, number][] {
  return Array.from({ length: n }, (_, i) => [s, from + i, (s * 5 + from + i) % V] as [number, number, number]);
}

const PAGES = [[2, 0, 7], [5, 1, 6]];
const STEPS: Step[] = [
  // Two prompts in one step (5 and 3 tokens), the last logits of each.
  { tokens: [...tokens(0, 0, 5), ...tokens(1, 0, 3)], pages: PAGES, rows: [4, 7] },
  // Both decode; sequence 0 crosses into its second page.
  { tokens: [...tokens(0, 5, 1), ...tokens(1, 3, 1)], pages: PAGES, rows: [0, 1] },
  // Sequence 1 alone, as page-table row 0, every row read.
  { tokens: tokens(0, 4, 3).map(([, p, id]) => [0, p, id]), pages: [PAGES[1]], rows: [0, 1, 2] },
];

Deno.test("ts backend: the worker and the caller's thread give bit-identical logits and pools", async () => {
  for (const kvDType of ["f32", "f16"] as const) {
    const layer = layerGraph(kvDType);
    const results: { logits: Float32Array[]; pools: Uint8Array[] }[] = [];
    for (const worker of [true, false]) {
      const backend = new TsBackend({ worker });
      try {
        assert.match(backend.description, worker ? /in a worker/ : /on the caller's thread: worker: false/);
        const { exec, pools } = await compileLayer(backend, layer);
        const logits: Float32Array[] = [];
        for (const step of STEPS) logits.push(await runStep(exec, layer, step));
        const bytes = await Promise.all(pools.map((p) => backend.readTensor(p, 0, p.byteLength)));
        results.push({ logits, pools: bytes });
        assert.ok(logits.every((l) => l.every(Number.isFinite)), `${kvDType}: finite logits`);
        exec.dispose();
      } finally {
        backend.dispose();
      }
    }
    assert.deepEqual(results[0].logits, results[1].logits, `${kvDType} pool: logits`);
    assert.deepEqual(results[0].pools, results[1].pools, `${kvDType} pool: pool bytes`);
    assert.ok(results[0].pools[0].some((b) => b !== 0), `${kvDType} pool: the steps wrote the pool`);
  }
});

Deno.test('ts backend: createBackend("ts", { worker }) chooses the mode, and description says which', async () => {
  for (const worker of [true, false, undefined]) {
    const options: BackendOptions & { worker?: boolean } = { worker };
    const backend = await createBackend("ts", options);
    try {
      assert.equal(backend.name, "ts");
      assert.match(backend.description, worker === false ? /on the caller's thread: worker: false/ : /in a worker/);
    } finally {
      backend.dispose();
    }
  }
});

Deno.test("ts backend: a token's logits are bit-identical alone or sharing its step with 15 others", async () => {
  const layer = layerGraph("f32");
  const backend = new TsBackend();
  try {
    // The same prompt of sequence 0, then its decode at position 5 alone, or with 15 tokens of three other sequences.
    const prompt: Step = { tokens: tokens(0, 0, 5), pages: [PAGES[0]], rows: [4] };
    const alone: Step = { tokens: tokens(0, 5, 1), pages: [PAGES[0]], rows: [0] };
    // Sequences 1..3 prefill 7, 5 and 3 tokens on pages of their own.
    const crowded: Step = {
      tokens: [...tokens(0, 5, 1), ...tokens(1, 0, 7), ...tokens(2, 0, 5), ...tokens(3, 0, 3)],
      pages: [PAGES[0], [3, 4, 0], [6, 1, 0], [5, 0, 0]],
      rows: [0, 7, 12, 15, 3],
    };
    const logits: Float32Array[] = [];
    for (const decode of [alone, crowded]) {
      const { exec } = await compileLayer(backend, layer);
      await runStep(exec, layer, prompt);
      logits.push((await runStep(exec, layer, decode)).slice(0, V));
      exec.dispose();
    }
    assert.deepEqual(logits[1], logits[0]);
  } finally {
    backend.dispose();
  }
});

/** x [T, 2048] through four f32 matmuls by one 2048 × 2048 weight: about a second of work at T = 64. */
function bigMatmul() {
  const K = 2048;
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", K]);
  const w = g.weight("w", "f32", [K, K]);
  let h = x;
  for (let i = 0; i < 4; i++) h = g.matmul(h, w, `h${i}`);
  g.output(h);
  return { plan: planGraph(g.build(), { T: 64 }), x, w, out: h, K };
}

Deno.test("ts backend: a long step in the worker leaves the event loop free (a 10 ms timer lags < 50 ms)", async () => {
  const { plan, x, w, K } = bigMatmul();
  const backend = new TsBackend({ worker: true });
  try {
    const weights = randomF32(K * K, 7, 1 / Math.sqrt(K));
    const tensor = backend.upload({ name: "w", dtype: "f32", shape: [K, K], data: new Uint8Array(weights.buffer) });
    const exec = await backend.compile(plan, new Map([[w.id, tensor]]));
    exec.writeInput(x.id, randomF32(64 * K, 8), 64 * K);
    let last = performance.now();
    let maxLag = 0;
    let ticks = 0;
    const timer = setInterval(() => {
      const now = performance.now();
      maxLag = Math.max(maxLag, now - last - 10);
      last = now;
      ticks++;
    }, 10);
    const t0 = performance.now();
    const profile = new Float64Array(plan.order.length);
    try {
      await exec.run({ dims: { T: 64 } }, profile);
    } finally {
      clearInterval(timer);
    }
    const ms = performance.now() - t0;
    console.log(`step ${ms.toFixed(0)} ms, ${ticks} timer ticks, largest lag ${maxLag.toFixed(1)} ms`);
    // A step on the caller's thread would let no tick run at all.
    assert.ok(ticks > 0, `the timer ran during the ${ms.toFixed(0)} ms step`);
    assert.ok(maxLag < 50, `the 10 ms timer lagged ${maxLag.toFixed(1)} ms`);
    // The worker timed every node; a profile shorter than the plan is refused.
    assert.ok(profile.every((ms) => ms > 0), `node times ${[...profile]}`);
    await assert.rejects(() => exec.run({ dims: { T: 1 } }, new Float64Array(3)), {
      name: "RangeError",
      message: "Cannot profile 4 nodes into an array of 3",
    });
    exec.dispose();
  } finally {
    backend.dispose();
  }
});

Deno.test("ts backend: an error in the worker rejects the call with its name and message, and the worker goes on", async () => {
  const thread = await WorkerThread.start();
  try {
    await assert.rejects(() => thread.run(12345, false), {
      name: "TypeError",
      message: "Cannot run executable 12345: it is not compiled here",
    });
    // The worker is still there: a plan compiled after the error runs, and once freed is gone.
    const g = new GraphBuilder();
    const a = g.input("a", "f32", ["T", 4]);
    g.output(g.add(a, a, "out"));
    const plan = planGraph(g.build(), { T: 2 });
    await thread.compile(7, plan, new SharedArrayBuffer(stepLayout(plan).byteLength), []);
    await thread.run(7, false);
    thread.free(7);
    await assert.rejects(() => thread.run(7, false), { message: "Cannot run executable 7: it is not compiled here" });
    const backend = new TsBackend({ worker: true });
    try {
      const exec = await backend.compile(plan, new Map());
      exec.writeInput(a.id, Float32Array.of(1, 2, 3, 4), 4);
      await exec.run({ dims: { T: 1 } });
      const out = new Float32Array(4);
      await exec.readOutput(plan.graph.outputs[0], out, 4);
      assert.deepEqual([...out], [2, 4, 6, 8]);
    } finally {
      backend.dispose();
    }
  } finally {
    thread.stop();
  }
  await assert.rejects(() => thread.run(1, false), { message: "Cannot use the ts backend: it was disposed" });
});

/** Compiles `plan` in both modes and returns how each rejected. */
async function compileErrors(plan: ExecutionPlan, bind: (backend: Backend) => Map<number, DeviceTensor>) {
  const errors: Error[] = [];
  for (const worker of [true, false]) {
    const backend = new TsBackend({ worker });
    try {
      await backend.compile(plan, bind(backend)).then(() => assert.fail("compile should have failed"), (e) => {
        errors.push(e);
      });
    } finally {
      backend.dispose();
    }
  }
  return errors;
}

Deno.test("ts backend: a plan the worker refuses rejects compile with the same error as on the caller's thread", async () => {
  // Attention with an f32 key pool and an f16 value pool: the kernels read both alike.
  const g = new GraphBuilder();
  const q = g.input("q", "f32", ["T", 16]);
  const k = g.input("k", "f32", ["T", 16]);
  const index = {
    positions: g.input("positions", "i32", ["T"]),
    seqOf: g.input("seqOf", "i32", ["T"]),
    pages: g.input("pages", "i32", ["S", 1]),
  };
  const kc = g.state("kc", "f32", [4, 16]);
  const vc = g.state("vc", "f16", [4, 16]);
  const op = { heads: 1, kvHeads: 1, headDim: 16, scale: 1, window: 0, pageSize: 4 };
  g.output(g.attention(q, k, k, kc, vc, index, op, "out"));
  const plan = planGraph(g.build(), { T: 2, S: 1 });
  const [inWorker, inThread] = await compileErrors(plan, (backend) =>
    new Map([
      [kc.id, backend.createState("kc", "f32", [4, 16])],
      [vc.id, backend.createState("vc", "f16", [4, 16])],
    ]));
  assert.ok(inWorker instanceof UnsupportedError);
  assert.equal(inWorker.name, "UnsupportedError");
  assert.equal(inWorker.message, 'Backend "ts" cannot run attention with a "f32" key cache and a "f16" value cache');
  assert.deepEqual([inWorker.name, inWorker.message], [inThread.name, inThread.message]);

  // A hand-made graph whose matmul reads an i32 input as activations.
  const graph: Graph = {
    tensors: [
      { id: 0, name: "ids", kind: "input", dtype: "i32", shape: ["T", 4] },
      { id: 1, name: "w", kind: "weight", dtype: "f32", shape: [3, 4] },
      { id: 2, name: "out", kind: "activation", dtype: "f32", shape: ["T", 3] },
    ],
    nodes: [{ id: 0, op: { kind: "matmul" }, inputs: [0, 1], output: 2 }],
    inputs: [0],
    outputs: [2],
  };
  const errors = await compileErrors(
    planGraph(graph, { T: 2 }),
    (backend) => new Map([[1, backend.upload({ name: "w", dtype: "f32", shape: [3, 4], data: new Uint8Array(48) })]]),
  );
  for (const e of errors) {
    assert.equal(e.name, "TypeError");
    assert.equal(e.message, 'Cannot compile node 0 (matmul): its input 0 "ids" is i32 input, expected f32');
  }
});

Deno.test("ts backend: a bad index is refused in writeInput, in the worker mode too", async () => {
  const layer = layerGraph("f32");
  const backend = new TsBackend({ worker: true });
  try {
    const { exec } = await compileLayer(backend, layer);
    const write = (spec: TensorSpec, values: number[]) =>
      exec.writeInput(spec.id, Int32Array.from(values), values.length);
    assert.throws(() => write(layer.pages, [0, 1, PAGE_COUNT]), {
      name: "RangeError",
      message: `Cannot use page ${PAGE_COUNT} at index 2 of input "pages": expected an integer from 0 to ${
        PAGE_COUNT - 1
      }`,
    });
    assert.throws(() => write(layer.positions, [3, PAGES_PER_SEQ * PAGE_SIZE]), {
      name: "RangeError",
      message:
        `Cannot use position ${PAGES_PER_SEQ * PAGE_SIZE} at index 1 of input "positions": expected an integer ` +
        `from 0 to ${PAGES_PER_SEQ * PAGE_SIZE - 1}`,
    });
    assert.throws(() => write(layer.seqOf, [4]), {
      name: "RangeError",
      message: 'Cannot use page-table row 4 at index 0 of input "seqOf": expected an integer from 0 to 3',
    });
    assert.throws(() => write(layer.rows, [16]), {
      name: "RangeError",
      message: 'Cannot use row 16 at index 0 of input "rows": expected an integer from 0 to 15',
    });
    assert.throws(() => write(layer.ids, [V]), {
      name: "RangeError",
      message: `Cannot embed token id ${V}: expected an integer from 0 to ${V - 1}`,
    });
    exec.dispose();
    await assert.rejects(() => exec.run({ dims: { T: 1, S: 1, R: 1 } }), {
      message: "Cannot run the step: the executable was disposed",
    });
  } finally {
    backend.dispose();
  }
  await assert.rejects(() => backend.compile(planGraph(layer.graph, { T: 1, S: 1, R: 1 }), new Map()), {
    message: "Cannot compile: the ts backend was disposed",
  });
});

/** Runs a Deno subprocess to its end, killing it (and failing) after `seconds`. */
async function runWithin(seconds: number, args: string[], stdin?: string) {
  const child = spawnDeno(args, { stdin });
  const timer = setTimeout(() => child.kill("SIGKILL"), seconds * 1000);
  try {
    const out = await child.output();
    const dec = new TextDecoder();
    const [stdout, stderr] = [dec.decode(out.stdout), dec.decode(out.stderr)];
    assert.equal(out.signal, null, `the process was still running after ${seconds} s:\n${stdout}\n${stderr}`);
    assert.equal(out.code, 0, `exit code ${out.code}:\n${stdout}\n${stderr}`);
    return stdout;
  } finally {
    clearTimeout(timer);
  }
}

const BACKEND_URL = new URL("../backends/ts/backend.ts", import.meta.url).href;
const GRAPH_IMPORTS = `
import { TsBackend } from "${BACKEND_URL}";
import { GraphBuilder } from "${new URL("../graph/builder.ts", import.meta.url).href}";
import { planGraph } from "${new URL("../graph/plan.ts", import.meta.url).href}";
`;

Deno.test("ts backend: dispose() ends the worker, so the process exits", async () => {
  const script = `${GRAPH_IMPORTS}
const g = new GraphBuilder();
const a = g.input("a", "f32", ["T", 4]);
g.output(g.add(a, a, "out"));
const plan = planGraph(g.build(), { T: 1 });
const backend = new TsBackend({ worker: true });
const exec = await backend.compile(plan, new Map());
exec.writeInput(a.id, Float32Array.of(1, 2, 3, 4), 4);
await exec.run({ dims: { T: 1 } });
const out = new Float32Array(4);
await exec.readOutput(plan.graph.outputs[0], out, 4);
console.log(backend.description, [...out].join(","));
backend.dispose();
`;
  const stdout = await runWithin(20, ["eval", script]);
  assert.match(stdout, /in a worker\) 2,4,6,8/);
});

Deno.test("ts backend: an idle worker does not keep the process alive (a program that never disposes exits)", async () => {
  const script = `${GRAPH_IMPORTS}
const g = new GraphBuilder();
const a = g.input("a", "f32", ["T", 4]);
g.output(g.add(a, a, "out"));
const plan = planGraph(g.build(), { T: 1 });
const backend = new TsBackend({ worker: true });
const exec = await backend.compile(plan, new Map());
exec.writeInput(a.id, Float32Array.of(1, 2, 3, 4), 4);
await exec.run({ dims: { T: 1 } });
const out = new Float32Array(4);
await exec.readOutput(plan.graph.outputs[0], out, 4);
console.log(backend.description, [...out].join(","));
`;
  const stdout = await runWithin(20, ["eval", script]);
  assert.match(stdout, /in a worker\) 2,4,6,8/);
});

Deno.test("ts backend: dispose() during a long step rejects it, and the process exits after the current node", async () => {
  const script = `${GRAPH_IMPORTS}
const K = 2048;
const g = new GraphBuilder();
const x = g.input("x", "f32", ["T", K]);
const w = g.weight("w", "f32", [K, K]);
let h = x;
for (let i = 0; i < 64; i++) h = g.matmul(h, w, "h" + i);
g.output(h);
const plan = planGraph(g.build(), { T: 8 });
const backend = new TsBackend({ worker: true });
const tensor = backend.upload({ name: "w", dtype: "f32", shape: [K, K], data: new Uint8Array(K * K * 4) });
const exec = await backend.compile(plan, new Map([[w.id, tensor]]));
const step = exec.run({ dims: { T: 8 } });
setTimeout(() => backend.dispose(), 100);
await step.then(() => console.log("finished"), (e) => console.log("rejected:", e.message));
`;
  const stdout = await runWithin(30, ["eval", script]);
  assert.match(stdout, /rejected: Cannot use the ts backend: it was disposed/);
});

Deno.test("ts backend: without read access to its worker it runs on the caller's thread, or refuses worker: true", async () => {
  const script = `${GRAPH_IMPORTS}
const backend = new TsBackend();
const g = new GraphBuilder();
const a = g.input("a", "f32", ["T", 2]);
g.output(g.add(a, a, "out"));
const plan = planGraph(g.build(), { T: 1 });
const exec = await backend.compile(plan, new Map());
exec.writeInput(a.id, Float32Array.of(1, 2), 2);
await exec.run({ dims: { T: 1 } });
const out = new Float32Array(2);
await exec.readOutput(plan.graph.outputs[0], out, 2);
console.log(backend.description, [...out].join(","));
backend.dispose();
try {
  new TsBackend({ worker: true });
} catch (e) {
  console.log(e.name + ": " + e.message);
}
`;
  const stdout = await runWithin(20, ["run", "--no-prompt", "-"], script);
  assert.match(stdout, /on the caller's thread: no read access to its worker module\) 2,4/);
  assert.match(
    stdout,
    /UnsupportedError: Backend "ts" cannot run its steps in a worker here: no read access to its worker module/,
  );
});
