/**
 * Continuous batching: sequences evaluated together share steps and give exactly
 * what each gives alone, on every backend; the shared KV pool shares, copies on
 * write, frees and refuses as it says; the caller's event loop stays responsive
 * while the steps compute.
 */

import assert from "node:assert/strict";
import { KvPoolFullError, loadModel, type Model, type Sequence } from "../mod.ts";
import { argmax } from "../models/generate/sampler.ts";
import { writeRandomModel } from "../examples/_random_model.ts";
import { assertClose, probeBackends, STORY_DIR, watchEventLoop } from "./helpers.ts";

/** The backends that can be created here (every one, under `CI=true`). */
async function backendNames(): Promise<string[]> {
  const names: string[] = [];
  for (const probe of await probeBackends()) {
    if ("skip" in probe) {
      if (Deno.env.get("CI") === "true") throw new Error(`Backend "${probe.name}" is unavailable in CI: ${probe.skip}`);
      console.log(`skipping backend "${probe.name}": ${probe.skip}`);
      continue;
    }
    probe.backend.dispose();
    names.push(probe.name);
  }
  return names;
}

/** Eight prompts of different lengths (ids of the story model, BOS first). */
const PROMPTS: number[][] = [3, 9, 1, 17, 5, 30, 12, 2].map((
  n,
  i,
) => [1, ...Array.from({ length: n }, (_, j) => 3 + ((i * 37 + j * 11) % 2000))]);

/** What one greedy run of a sequence gave: the ids and the logits of every step. */
interface Run {
  ids: number[];
  logits: Float32Array[];
}

/**
 * Evaluates `prompt` on a new sequence, then `steps` greedy tokens, keeping every
 * step's logits; starts once the model has run `startAfter` steps (so runs started
 * together join a batch at different times).
 */
async function greedy(model: Model, prompt: number[], steps: number, startAfter = 0): Promise<Run> {
  while (model.steps < startAfter) await new Promise((r) => setTimeout(r, 0));
  const seq = model.createSequence();
  try {
    const run: Run = { ids: [], logits: [] };
    let logits = await seq.evaluate(prompt);
    for (let i = 0; i < steps; i++) {
      run.logits.push(logits.slice());
      const id = argmax(logits);
      run.ids.push(id);
      logits = await seq.evaluate([id]);
    }
    return run;
  } finally {
    await seq.dispose();
  }
}

function assertSameRuns(batched: Run[], alone: Run[], what: string): void {
  batched.forEach((b, i) => {
    assert.deepEqual(b.ids, alone[i].ids, `${what}: sequence ${i}'s ids`);
    b.logits.forEach((l, s) => assertClose(l, alone[i].logits[s], 1e-5, `${what}: sequence ${i}, step ${s}`));
  });
}

Deno.test("batching: 8 sequences started at different times give exactly what each gives alone, on every backend", async (t) => {
  for (const backend of await backendNames()) {
    await t.step(backend, async () => {
      const model = await loadModel(STORY_DIR, { backend, contextLength: 128, prefillChunk: 16 });
      try {
        const alone: Run[] = [];
        const before = model.steps;
        for (const p of PROMPTS) alone.push(await greedy(model, p, 12));
        const aloneSteps = model.steps - before;
        const start = model.steps;
        const batched = await Promise.all(PROMPTS.map((p, i) => greedy(model, p, 12, start + 2 * i)));
        const batchedSteps = model.steps - start;
        assertSameRuns(batched, alone, backend);
        assert.ok(batchedSteps < aloneSteps / 2, `${batchedSteps} batched steps against ${aloneSteps} alone`);
        assert.equal(model.kvStats().usedPages, 0, "every page back in the pool");
      } finally {
        await model.dispose();
      }
    });
  }
});

Deno.test("batching: sampling stays per sequence (own seed, penalties) whatever shares the step", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 128 });
  try {
    const options = (i: number) => ({
      maxTokens: 20,
      temperature: 0.9,
      topP: 0.95,
      repetitionPenalty: 1.2,
      seed: 100 + i,
    });
    const ids = (i: number) =>
      Array.fromAsync(model.generateTokens(PROMPTS[i], options(i))).then((ts) => ts.map((t) => t.id));
    const alone: number[][] = [];
    for (let i = 0; i < 6; i++) alone.push(await ids(i));
    const together = await Promise.all(Array.from({ length: 6 }, (_, i) => ids(i)));
    assert.deepEqual(together, alone);
    assert.ok(new Set(alone.map((a) => a.join())).size > 1, "different seeds sample differently");
  } finally {
    await model.dispose();
  }
});

Deno.test("batching: a cancelled sequence frees its pages and the others go on unchanged", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 128 });
  try {
    const opts = { maxTokens: 24, temperature: 0 };
    const alone = [];
    for (const p of PROMPTS.slice(0, 4)) {
      alone.push((await Array.fromAsync(model.generateTokens(p, opts))).map((t) => t.id));
    }
    const streams = PROMPTS.slice(0, 4).map((p) => model.generateTokens(p, opts));
    const reads = streams.map(async (s, i) => {
      const ids: number[] = [];
      const reader = s.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return ids;
        ids.push(value.id);
        if (i === 1 && ids.length === 5) {
          await reader.cancel();
          return ids;
        }
      }
    });
    const got = await Promise.all(reads);
    assert.deepEqual(got[1], alone[1].slice(0, 5));
    for (const i of [0, 2, 3]) assert.deepEqual(got[i], alone[i], `sequence ${i}`);
    assert.equal(streams[1].stats.stopReason, "cancelled");
    assert.equal(model.kvStats().usedPages, 0);
    assert.equal(model.liveSequences, 0);
  } finally {
    await model.dispose();
  }
});

Deno.test("batching: the pool shares forked pages, copies a shared page only when written, and reuses freed pages", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 128 });
  try {
    const page = model.kvStats().pageSize;
    const a = model.createSequence();
    const prompt = PROMPTS[5]; // 31 tokens: one full page and a partial one
    await a.evaluate(prompt);
    const pages = Math.ceil(prompt.length / page);
    assert.equal(model.kvStats().usedPages, pages);
    const b = a.fork();
    assert.equal(model.kvStats().usedPages, pages, "a fork shares every page");
    assert.equal(b.kvBytes, a.kvBytes);
    // Both write into the shared partial page: the first writer copies it, the last holder keeps it.
    const [la, lb] = [(await a.evaluate([50])).slice(), (await b.evaluate([50])).slice()];
    assert.equal(model.kvStats().usedPages, pages + 1, "one copy of the partial page");
    assertClose(lb, la, 0, "the fork continues exactly as its parent");
    // Their caches diverge after the copy: different tokens, different logits, the common prefix untouched.
    const [na, nb] = [(await a.evaluate([60])).slice(), (await b.evaluate([70])).slice()];
    assert.notDeepEqual([...na], [...nb]);
    const c = model.createSequence();
    assertClose((await c.evaluate([...prompt, 50, 60])).slice(), na, 1e-5, "a's rows are its own");
    await Promise.all([a.dispose(), b.dispose(), c.dispose()]);
    assert.equal(model.kvStats().usedPages, 0);
    const capacity = model.kvStats().capacityTokens;
    for (let i = 0; i < 50; i++) {
      const s = model.createSequence();
      await s.evaluate(prompt);
      await s.dispose();
    }
    assert.equal(model.kvStats().capacityTokens, capacity, "disposed pages are reused, the pool does not grow");
  } finally {
    await model.dispose();
  }
});

Deno.test("batching: the pool grows on demand up to kvCacheTokens, then refuses with a KvPoolFullError", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 64, kvCacheTokens: 128 });
  try {
    assert.deepEqual(
      [model.kvStats().capacityTokens, model.kvStats().maxTokens],
      [64, 128],
      "one context's pages first",
    );
    const seqs: Sequence[] = [];
    for (let i = 0; i < 2; i++) {
      const s = model.createSequence();
      seqs.push(s);
      await s.evaluate(Array.from({ length: 60 }, (_, j) => 3 + j + i));
    }
    assert.equal(model.kvStats().capacityTokens, 128, "grown to hold both");
    const third = model.createSequence();
    await assert.rejects(() => third.evaluate([1, 2, 3]), (e: unknown) => {
      assert.ok(e instanceof KvPoolFullError);
      assert.match(e.message, /Cannot take 1 KV cache pages: 0 are free and the pool holds at most 128 tokens/);
      return true;
    });
    await seqs[0].dispose();
    await third.evaluate([1, 2, 3]); // room again
    await Promise.all([seqs[1].dispose(), third.dispose()]);
  } finally {
    await model.dispose();
  }
});

Deno.test("batching: 1,000 short generations leave no pages in use and no sequences alive", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 64 });
  try {
    // Ten at a time, so they batch; the first round grows the pool to what ten need at once.
    const round = (i: number) =>
      Promise.all(
        Array.from(
          { length: 10 },
          (_, j) => Array.fromAsync(model.generate(PROMPTS[j % 8], { maxTokens: 3, seed: i })),
        ),
      );
    await round(0);
    const capacity = model.kvStats().capacityTokens;
    for (let i = 1; i < 100; i++) await round(i);
    assert.equal(model.kvStats().usedPages, 0);
    assert.equal(model.liveSequences, 0);
    assert.equal(model.kvStats().capacityTokens, capacity, "the freed pages were reused: the pool did not grow again");
  } finally {
    await model.dispose();
  }
});

Deno.test("batching: a long prompt arriving does not stall a decoding sequence for its whole prefill", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 512, prefillChunk: 16 });
  try {
    const decoding = model.generateTokens(PROMPTS[0], { maxTokens: 200, temperature: 0, ignoreEos: true });
    const reader = decoding.getReader();
    await reader.read();
    const long = Array.from({ length: 240 }, (_, j) => 3 + (j * 7) % 2000);
    const before = decoding.stats.generatedTokens;
    const first = model.generateTokens(long, { maxTokens: 1 }).getReader().read();
    let during = 0;
    let prefilled = false;
    void first.then(() => prefilled = true);
    while (!prefilled) {
      const { done } = await reader.read();
      if (done) break;
      during++;
    }
    await first;
    await reader.cancel();
    // 240 prompt tokens in steps of 16 (one of them the decoder's): about 16 steps, each with a decode token.
    assert.ok(during >= 10, `${during} tokens decoded while a 240-token prompt was read (from ${before})`);
  } finally {
    await model.dispose();
  }
});

/** A random-weight model whose steps take long enough on the ts backend to show a blocked event loop. */
async function slowModelDir(): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "batching-slow-" });
  await writeRandomModel(dir, {
    architectures: ["LlamaForCausalLM"],
    hidden_size: 512,
    intermediate_size: 1536,
    num_hidden_layers: 4,
    num_attention_heads: 8,
    num_key_value_heads: 8,
    vocab_size: 2048,
    max_position_embeddings: 512,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: 2,
  }, { tokenizerFrom: STORY_DIR });
  return dir;
}

Deno.test("batching: the caller's event loop stays responsive while steps compute (ts and native)", async (t) => {
  const dir = await slowModelDir();
  try {
    for (const backend of (await backendNames()).filter((b) => b === "ts" || b === "native")) {
      await t.step(backend, async () => {
        const model = await loadModel(dir, { backend, prefillChunk: 64 });
        try {
          const loop = watchEventLoop();
          try {
            const prompt = Array.from({ length: 256 }, (_, j) => 3 + j);
            const started = performance.now();
            await Array.fromAsync(model.generateTokens(prompt, { maxTokens: 16, temperature: 0, ignoreEos: true }));
            const took = performance.now() - started;
            assert.ok(took > 100, `the generation took ${took.toFixed(0)} ms: too short to show anything`);
          } finally {
            loop.stop();
          }
          assert.ok(loop.worst() < 50, `a 10 ms timer lagged ${loop.worst().toFixed(1)} ms`);
        } finally {
          await model.dispose();
        }
      });
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("batching: AbortSignal.timeout stops a generation whose consumer never yields", async () => {
  const dir = await slowModelDir();
  try {
    const model = await loadModel(dir, { prefillChunk: 16 });
    try {
      const started = performance.now();
      const stream = model.generate(Array.from({ length: 400 }, (_, j) => 3 + j), {
        maxTokens: 100_000,
        ignoreEos: true,
        signal: AbortSignal.timeout(300),
      });
      await assert.rejects(async () => {
        for await (const _ of stream) { /* never waits on anything else */ }
      }, { name: "TimeoutError" });
      const took = performance.now() - started;
      assert.ok(took < 10_000, `stopped after ${took.toFixed(0)} ms`);
      assert.equal(model.kvStats().usedPages, 0);
    } finally {
      await model.dispose();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("batching: a step computes at most 256 rows of logits, so an 'all' evaluation past that spans steps", async () => {
  const tokens = Array.from({ length: 300 }, (_, j) => 3 + (j * 13) % 2000);
  const big = await loadModel(STORY_DIR, { contextLength: 512, prefillChunk: 512 });
  const small = await loadModel(STORY_DIR, { contextLength: 512, prefillChunk: 64 });
  try {
    const a = big.createSequence();
    const b = small.createSequence();
    const before = big.steps;
    const [la, lb] = [await a.evaluate(tokens, { logits: "all" }), await b.evaluate(tokens, { logits: "all" })];
    assert.equal(big.steps - before, 2, "256 rows, then 44");
    assert.equal(la.length, 300 * big.config.vocabSize);
    assertClose(la, lb, 1e-5, "every row's logits");
    await Promise.all([a.dispose(), b.dispose()]);
  } finally {
    await Promise.all([big.dispose(), small.dispose()]);
  }
});
