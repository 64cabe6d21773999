/**
 * Generation against an impatient or careless caller: cancel() stops a prompt's evaluation within a
 * chunk and says "cancelled"; refused and abandoned generations give their sequences back (counted
 * exactly, and as memory in a subprocess with the garbage collector exposed); strict generation
 * options.
 */

import assert from "node:assert/strict";
import { loadModel, type Model, SamplingOptionError } from "../mod.ts";
import { registerInstrumentedTs, STORY_DIR } from "./helpers.ts";
import { ROOT, runDeno } from "./subprocess.ts";

/** The ts backend, counting its steps and running `onStep` (when set) before each. */
let steps = 0;
let onStep: ((step: number) => void) | undefined;
registerInstrumentedTs("hardening-ts", () => {
  steps++;
  onStep?.(steps);
});

const CHUNK = 16;

async function withModel(fn: (m: Model) => Promise<void>): Promise<void> {
  const model = await loadModel(STORY_DIR, { backend: "hardening-ts", prefillChunk: CHUNK });
  try {
    await fn(model);
  } finally {
    onStep = undefined;
    await model.dispose();
  }
}

/** A prompt of 470 to 500 tokens: most of the story model's 512 positions, some 30 chunks of 16. */
function longPrompt(model: Model): number[] {
  const sentence = "Lily and Tom played in the park with a big red ball. ";
  let text = "";
  while (model.tokenizer.encode(text).length < 470) text += sentence;
  const ids = model.tokenizer.encode(text);
  assert.ok(ids.length < 500 && ids.length < model.contextLength, `${ids.length} tokens`);
  return ids;
}

Deno.test("cancel() during a long prefill stops within a chunk and says cancelled", () =>
  withModel(async (model) => {
    const prompt = longPrompt(model);
    const chunks = Math.ceil(prompt.length / CHUNK);
    const stream = model.generate(prompt, { maxTokens: 5, seed: 1 });
    const reader = stream.getReader();
    let cancelled: Promise<void> | undefined;
    let stepsAtCancel = 0;
    steps = 0;
    onStep = (n) => {
      if (n === 3 && !cancelled) {
        stepsAtCancel = n;
        cancelled = reader.cancel();
      }
    };
    const read = reader.read();
    const result = await read;
    assert.ok(cancelled, "the prefill reached its third chunk");
    await cancelled;
    const after = steps - stepsAtCancel;
    assert.ok(after <= 2, `${after} of the ${chunks - 3} remaining chunks ran after cancel()`);
    assert.equal(result.done, true);
    assert.equal(stream.stats.stopReason, "cancelled");
    assert.equal(stream.stats.generatedTokens, 0);
    // The model is fine afterwards: a greedy generation gives what a fresh model gives.
    onStep = undefined;
    const again = await Array.fromAsync(model.generateTokens("Once upon a time", { temperature: 0, maxTokens: 8 }));
    const fresh = await loadModel(STORY_DIR, { backend: "ts" });
    const expected = await Array.fromAsync(fresh.generateTokens("Once upon a time", { temperature: 0, maxTokens: 8 }));
    await fresh.dispose();
    assert.deepEqual(again.map((t) => t.id), expected.map((t) => t.id));
  }));

Deno.test("TokenGenerator.cancel() stops a prefill in flight: next() resolves to undefined soon after", () =>
  withModel(async (model) => {
    const prompt = longPrompt(model);
    const seq = model.createSequence();
    const gen = model.continueSequence(seq, prompt, { maxTokens: 5, seed: 1 });
    steps = 0;
    let stepsAtCancel = 0;
    onStep = (n) => {
      if (n === 4 && stepsAtCancel === 0) {
        stepsAtCancel = n;
        gen.cancel();
      }
    };
    assert.equal(await gen.next(), undefined);
    await gen.settled();
    assert.ok(steps - stepsAtCancel <= 2, `${steps - stepsAtCancel} chunks ran after cancel()`);
    assert.equal(gen.stats.stopReason, "cancelled");
    assert.equal(await gen.next(), undefined);
    // What the sequence holds is a prefix of the prompt, whole chunks only.
    assert.ok(seq.length % CHUNK === 0 && seq.length < prompt.length, `${seq.length} positions`);
    assert.deepEqual(seq.tokens, prompt.slice(0, seq.length));
    await seq.dispose();
  }));

Deno.test("cancel() during a decode step keeps the stop reason cancelled", () =>
  withModel(async (model) => {
    const stream = model.generate("Once upon a time", { maxTokens: 50, ignoreEos: true, seed: 2 });
    const reader = stream.getReader();
    await reader.read(); // the prompt's step and the first decode step
    let cancelled: Promise<void> | undefined;
    onStep = () => {
      cancelled ??= reader.cancel();
    };
    const pending = reader.read();
    await pending;
    assert.ok(cancelled, "a step ran during the read");
    await cancelled;
    assert.equal(stream.stats.stopReason, "cancelled");
    assert.ok(stream.stats.generatedTokens < 50);
  }));

Deno.test("an aborted signal during a long prefill still rejects with its reason (and stops)", () =>
  withModel(async (model) => {
    const prompt = longPrompt(model);
    const controller = new AbortController();
    steps = 0;
    onStep = (n) => {
      if (n === 3) controller.abort(new Error("caller gave up"));
    };
    const stream = model.generate(prompt, { maxTokens: 5, signal: controller.signal });
    await assert.rejects(stream.getReader().read(), { message: "caller gave up" });
    assert.ok(steps <= 5, `${steps} chunks ran`);
    assert.equal(stream.stats.stopReason, "cancelled");
  }));

Deno.test("a refused generate() takes no sequence (1,000 refusals of each kind)", () =>
  withModel(async (model) => {
    const refusals: [string, Record<string, unknown>][] = [
      ["maxTokens", { maxTokens: -1 }],
      ["stop", { stop: [""] }],
      ["stop", { stop: "the" }],
      ["logitBias", { logitBias: { "0x2": 1 } }],
      ["temperature", { temperature: -1 }],
      ["signal", { signal: "soon" }],
    ];
    assert.equal(model.liveSequences, 0);
    for (const [option, opts] of refusals) {
      for (let i = 0; i < 1000; i++) {
        assert.throws(() => model.generate("Hi", opts), (e: Error) => e.message.includes(option), option);
      }
      assert.equal(model.liveSequences, 0, `after 1,000 refusals of ${option}`);
    }
    // A working generation takes one and gives it back, its KV pages with it.
    await Array.fromAsync(model.generate("Hi", { maxTokens: 2, seed: 1 }));
    assert.equal(model.liveSequences, 0);
    assert.equal(model.kvStats().usedPages, 0);
  }));

Deno.test("generation options are checked strictly, each error naming the option and the value", () =>
  withModel(async (model) => {
    assert.throws(() => model.generate("Hi", { stop: "the" as unknown as string[] }), {
      name: "TypeError",
      message: /Invalid stop "the": expected an array/,
    });
    assert.throws(() => model.generate("Hi", { stop: ["ok", 5 as unknown as string] }), {
      name: "TypeError",
      message: /stop string 5/,
    });
    assert.throws(() => model.generate("Hi", { maxTokens: "5" as unknown as number }), {
      name: "RangeError",
      message: /maxTokens "5"/,
    });
    assert.throws(() => model.generate("Hi", { ignoreEos: 1 as unknown as boolean }), {
      name: "TypeError",
      message: /ignoreEos 1/,
    });
    for (const key of ["", "0x2", " 2 ", "1e3", "02", "-1", "2.0", "2048"]) {
      assert.throws(() => model.generate("Hi", { logitBias: { [key]: 1 } }), (e: unknown) => {
        assert.ok(e instanceof SamplingOptionError, String(e));
        assert.equal(e.option, "logitBias");
        assert.ok(e.message.includes(JSON.stringify(key)), e.message);
        return true;
      }, JSON.stringify(key));
    }
    assert.throws(() => model.generate("Hi", { logitBias: new Map([[1, 2]]) as unknown as Record<number, number> }), {
      name: "SamplingOptionError",
      message: /a Map, expected an object/,
    });
    const all: Record<number, number> = {};
    for (let id = 0; id < model.config.vocabSize; id++) all[id] = -Infinity;
    assert.throws(() => model.generate("Hi", { logitBias: all }), {
      name: "SamplingOptionError",
      message: /bans every one of the 2048 tokens/,
    });
    // Every token but one banned: that one is all there is to generate.
    delete all[42];
    const ids = (await Array.fromAsync(model.generateTokens("Hi", { logitBias: all, maxTokens: 4, seed: 3 })))
      .map((t) => t.id);
    assert.deepEqual(ids, [42, 42, 42, 42]);
    // -100 on every token (OpenAI's ban value) shifts them all alike: the greedy text is unchanged.
    const shifted: Record<number, number> = {};
    for (let id = 0; id < model.config.vocabSize; id++) shifted[id] = -100;
    const greedy = { temperature: 0, maxTokens: 6 };
    const plain = await Array.fromAsync(model.generateTokens("Once upon a time", greedy));
    const biased = await Array.fromAsync(model.generateTokens("Once upon a time", { ...greedy, logitBias: shifted }));
    assert.deepEqual(biased.map((t) => t.id), plain.map((t) => t.id));
  }));

Deno.test("penaltyLastN past the context reserves no memory for it and acts as the context", () =>
  withModel(async (model) => {
    const before = Deno.memoryUsage().external;
    const streams = Array.from(
      { length: 4 },
      () =>
        model.generate("Once upon a time", { penaltyLastN: 2 ** 31, repetitionPenalty: 1.3, maxTokens: 8, seed: 4 }),
    );
    const grown = Deno.memoryUsage().external - before;
    assert.ok(grown < 64e6, `4 generations with penaltyLastN 2**31 took ${(grown / 1e6).toFixed(0)} MB`);
    const texts = [];
    for (const s of streams) texts.push((await Array.fromAsync(s)).join(""));
    const atContext = (await Array.fromAsync(
      model.generate("Once upon a time", {
        penaltyLastN: model.contextLength,
        repetitionPenalty: 1.3,
        maxTokens: 8,
        seed: 4,
      }),
    )).join("");
    for (const t of texts) assert.equal(t, atContext);
  }));

/**
 * Runs `body` in a subprocess with the garbage collector exposed, after a prelude that loads the
 * story model on the ts backend as `model` and defines `settle()` (collect and let finalizers run);
 * returns what the body printed as JSON.
 */
async function inSubprocess(body: string): Promise<Record<string, number>> {
  const script = `import { loadModel } from "${new URL("mod.ts", `file://${ROOT}`)}";
const gc = (globalThis as unknown as { gc: () => void }).gc;
const settle = async () => {
  for (let i = 0; i < 6; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 5));
  }
};
const model = await loadModel(${JSON.stringify(STORY_DIR)}, { backend: "ts" });
${body}
await model.dispose();
`;
  const r = await runDeno(["run", "--v8-flags=--expose-gc", "--allow-read", "--allow-env", "-"], { stdin: script });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

Deno.test("1,000 refused generations leave memory where it started (subprocess, after GC)", async () => {
  const r = await inSubprocess(`
await settle();
const m0 = Deno.memoryUsage();
for (let i = 0; i < 1000; i++) {
  for (const opts of [{ maxTokens: -1 }, { stop: [""] }]) {
    try { model.generate("Once upon a time", opts); } catch { /* refused */ }
  }
}
await settle();
const m1 = Deno.memoryUsage();
console.log(JSON.stringify({ live: model.liveSequences, external: m1.external - m0.external, rss: m1.rss - m0.rss }));
`);
  assert.equal(r.live, 0);
  assert.ok(r.external < 4e6, `external grew ${(r.external / 1e6).toFixed(1)} MB`);
  assert.ok(r.rss < 32e6, `rss grew ${(r.rss / 1e6).toFixed(1)} MB`);
});

Deno.test("1,000 streams read once and dropped give their sequences back (subprocess, after GC)", async () => {
  // Collected every 25 streams, as a program that waits on anything would be; without the fix every
  // one of them stays alive (some 0.9 MB of KV cache each).
  const r = await inSubprocess(`
await Array.fromAsync(model.generate("Once upon a time", { maxTokens: 2, seed: 0 }));
await settle();
const m0 = Deno.memoryUsage();
let peak = 0;
for (let i = 0; i < 1000; i++) {
  await model.generate("Once upon a time", { maxTokens: 50, seed: i }).getReader().read();
  if (i % 25 === 24) {
    await settle();
    peak = Math.max(peak, model.liveSequences);
  }
}
await settle();
const m1 = Deno.memoryUsage();
console.log(JSON.stringify({ live: model.liveSequences, peak, external: m1.external - m0.external, rss: m1.rss - m0.rss }));
`);
  assert.ok(r.live <= 3, `${r.live} sequences left`);
  assert.ok(r.peak <= 8, `${r.peak} sequences alive after a collection`);
  assert.ok(r.external < 4e6, `external grew ${(r.external / 1e6).toFixed(1)} MB`);
  assert.ok(r.rss < 64e6, `rss grew ${(r.rss / 1e6).toFixed(1)} MB`);
});
