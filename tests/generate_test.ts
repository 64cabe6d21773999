/**
 * Generation streams: pull-driven, cancellable (also during a long prefill),
 * UTF-8 safe, stop conditions, seeds and statistics.
 */

import assert from "node:assert/strict";
import { loadModel, type Model } from "../mod.ts";
import { StopMatcher, StreamingDecoder } from "../models/text/detokenizer.ts";
import { TextTokenizer } from "../models/text/tokenizer.ts";
import { MINUEZA_DIR, registerInstrumentedTs, SHARED, STORY_DIR } from "./helpers.ts";
import { runDeno } from "./subprocess.ts";

/** The ts backend, counting the steps it runs. */
let steps = 0;
registerInstrumentedTs("counting-ts", () => {
  steps++;
});

async function withModel(fn: (m: Model) => Promise<void>, prefillChunk = 64): Promise<void> {
  const model = await loadModel(STORY_DIR, { backend: "counting-ts", prefillChunk });
  try {
    await fn(model);
  } finally {
    await model.dispose();
  }
}

async function collect(stream: ReadableStream<string>): Promise<string> {
  let text = "";
  for await (const piece of stream) text += piece;
  return text;
}

const tick = () => new Promise((r) => setTimeout(r, 5));

Deno.test("generate: nothing is computed until the consumer reads", () =>
  withModel(async (model) => {
    steps = 0;
    const stream = model.generate("Once upon a time", { maxTokens: 5, seed: 1 });
    await tick();
    assert.equal(steps, 0);
    assert.equal(stream.stats.generatedTokens, 0);
    const reader = stream.getReader();
    await reader.read();
    assert.ok(steps >= 1);
    const after = steps;
    await tick();
    assert.equal(steps, after, "no read-ahead");
    await reader.cancel();
  }));

Deno.test("generate: the library example pipes through TextEncoderStream", () =>
  withModel(async (model) => {
    const stream = model.generate("Once upon a time", { maxTokens: 20, temperature: 0.8, topP: 0.9, seed: 1 });
    const chunks: Uint8Array[] = [];
    await stream.pipeThrough(new TextEncoderStream()).pipeTo(
      new WritableStream({ write: (c) => void chunks.push(c) }),
    );
    const text = new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c])));
    assert.ok(text.length > 20, text);
    assert.equal(stream.stats.generatedTokens, 20);
    assert.equal(stream.stats.stopReason, "maxTokens");
    assert.ok(stream.stats.promptTokens > 3);
    assert.ok(stream.stats.prefillTokensPerSecond > 0 && stream.stats.decodeTokensPerSecond > 0);
  }));

Deno.test("generate: cancel() stops the computation", () =>
  withModel(async (model) => {
    const stream = model.generate("Once upon a time", { maxTokens: 200, seed: 3 });
    const reader = stream.getReader();
    for (let i = 0; i < 3; i++) await reader.read();
    await reader.cancel();
    const before = steps;
    await tick();
    assert.equal(steps, before);
    assert.equal(stream.stats.stopReason, "cancelled");
    assert.ok(stream.stats.generatedTokens < 10);
  }));

Deno.test("generate: an AbortSignal stops a long prompt between prefill chunks", () =>
  withModel(async (model) => {
    const prompt = "Lily and Tom played in the park with a big red ball. ".repeat(24);
    const n = model.tokenizer.encode(prompt).length;
    const chunks = Math.ceil(n / 4);
    assert.ok(chunks > 20, `${n} tokens`);
    const controller = new AbortController();
    steps = 0;
    const stream = model.generate(prompt, { maxTokens: 5, signal: controller.signal });
    const read = stream.getReader().read();
    setTimeout(() => controller.abort(), 0);
    await assert.rejects(read, { name: "AbortError" });
    assert.ok(steps < chunks, `ran ${steps} of ${chunks} chunks before stopping`);
  }, 4));

Deno.test("generate: stops at EOS unless ignoreEos, at a stop string, and at maxTokens", async () => {
  const ref = JSON.parse(await Deno.readTextFile(`${SHARED}/refs/story-greedy.json`));
  const c = ref.cases[0];
  const eosAt = c.greedy_ids.indexOf(2);
  assert.ok(eosAt >= 0, "the first reference case reaches EOS");
  await withModel(async (model) => {
    const tokens = model.generateTokens(c.prompt, { temperature: 0 });
    const ids: number[] = [];
    for await (const t of tokens) ids.push(t.id);
    assert.deepEqual(ids, c.greedy_ids.slice(0, eosAt + 1));
    assert.equal(tokens.stats.stopReason, "eos");

    const full = await collect(model.generate(c.prompt, { temperature: 0, ignoreEos: true, maxTokens: 64 }));
    const stop = "Tim";
    assert.ok(full.includes(stop), full);
    const stopped = model.generate(c.prompt, { temperature: 0, ignoreEos: true, maxTokens: 64, stop: [stop] });
    const text = await collect(stopped);
    assert.equal(text, full.slice(0, full.indexOf(stop)));
    assert.equal(stopped.stats.stopReason, "stop");

    const none = model.generate(c.prompt, { maxTokens: 0 });
    assert.equal(await collect(none), "");
    assert.equal(none.stats.generatedTokens, 0);
  });
});

Deno.test("generate: the same seed gives the same text; token stream carries log-probabilities", () =>
  withModel(async (model) => {
    const opts = { maxTokens: 40, temperature: 1, topK: 0, topP: 1, minP: 0, seed: 42 };
    const a = await collect(model.generate("The cat", opts));
    const b = await collect(model.generate("The cat", opts));
    const other = await collect(model.generate("The cat", { ...opts, seed: 43 }));
    assert.equal(a, b);
    assert.notEqual(a, other);

    const seq = model.createSequence();
    const prompt = model.tokenizer.encode("The cat");
    const logits = await seq.evaluate(prompt);
    let max = -Infinity;
    for (const l of logits) max = Math.max(max, l);
    let sum = 0;
    for (const l of logits) sum += Math.exp(l - max);
    const [first] = await Array.fromAsync(model.generateTokens(prompt, { temperature: 0, maxTokens: 1 }));
    assert.ok(Math.abs(first.logprob - (logits[first.id] - max - Math.log(sum))) < 1e-6);
    assert.ok(first.logprob <= 0);
    await seq.dispose();
  }));

Deno.test("streaming decoder: characters split across byte-fallback tokens come out whole", async () => {
  const tok = await TextTokenizer.load(MINUEZA_DIR);
  const text = "Birds 🦜🫠 and ꙮ 𝔘 日本語 ü done";
  const ids = tok.encode(text, { addSpecialTokens: false });
  const decoder = new StreamingDecoder(tok, []);
  const pieces = ids.map((id) => decoder.push(id));
  assert.ok(pieces.some((p) => p === ""), "some token completes no character on its own");
  assert.ok(pieces.every((p) => !p.includes("\uFFFD")), JSON.stringify(pieces));
  assert.equal(pieces.join("") + decoder.flush(), text);
});

Deno.test("streaming decoder: the first piece keeps its space after the prompt", async () => {
  const tok = await TextTokenizer.load(STORY_DIR);
  // This tokenizer splits "Once upon a time there" as …, "upon a tim", "e ", "ther", "e".
  const ids = tok.encode("Once upon a time there");
  const decoder = new StreamingDecoder(tok, ids.slice(0, 5));
  assert.equal(tok.decode(ids.slice(0, 5), { skipSpecialTokens: true }), "Once upon a tim");
  assert.equal(ids.slice(5).map((id) => decoder.push(id)).join(""), "e there");
  const fromBos = new StreamingDecoder(tok, ids.slice(0, 1));
  assert.equal(ids.slice(1).map((id) => fromBos.push(id)).join(""), "Once upon a time there");
});

Deno.test("stop matcher: holds back possible stop prefixes and cuts at the first stop", () => {
  const m = new StopMatcher(["</s>", "END"]);
  assert.equal(m.push("hello <"), "hello ");
  assert.equal(m.push("/"), "");
  assert.equal(m.push("x> E"), "</x> ");
  assert.equal(m.push("ND and more"), "");
  assert.ok(m.stopped);
  const n = new StopMatcher(["abc"]);
  assert.equal(n.push("xxab"), "xx");
  assert.equal(n.flush(), "ab");
  assert.throws(() => new StopMatcher([""]), TypeError);
});

Deno.test("generate: a generation cancelled mid-step leaves nothing behind for the next one", () =>
  withModel(async (model) => {
    const opts = { temperature: 0, maxTokens: 12 };
    const expected = await collect(model.generate("The dog ran", opts));
    for (let i = 0; i < 3; i++) {
      const reader = model.generate("Lily and Tom played with a ball in the garden", opts).getReader();
      const pending = reader.read();
      await reader.cancel();
      await pending.catch(() => {});
      assert.equal(await collect(model.generate("The dog ran", opts)), expected);
    }
  }, 4));

Deno.test("generate: a timer signal stops a consumer that never yields, long before the end", async () => {
  // The plain ts backend: every step resolves at once, and this loop never waits on anything else.
  const model = await loadModel(STORY_DIR, { backend: "ts" });
  try {
    const stream = model.generate("Once upon a time", { maxTokens: 100_000, ignoreEos: true, seed: 1 });
    for await (const _ of stream) { /* the full run, for comparison */ }
    const full = stream.stats.generatedTokens;
    assert.equal(stream.stats.stopReason, "context");

    const t0 = performance.now();
    const timed = model.generate("Once upon a time", {
      maxTokens: 100_000,
      ignoreEos: true,
      seed: 1,
      signal: AbortSignal.timeout(50),
    });
    await assert.rejects(async () => {
      for await (const _ of timed) { /* never yields */ }
    }, { name: "TimeoutError" });
    const ms = performance.now() - t0;
    assert.ok(timed.stats.generatedTokens < full / 2, `${timed.stats.generatedTokens} of ${full} tokens in ${ms} ms`);
    assert.equal(timed.stats.stopReason, "cancelled");
  } finally {
    await model.dispose();
  }
});

Deno.test("generate: the time to first token counts from the generate call, the prompt included", () =>
  withModel(async (model) => {
    const stream = model.generate("Once upon a time", { maxTokens: 3, seed: 1 });
    assert.equal(stream.stats.timeToFirstTokenMs, 0);
    await new Promise((r) => setTimeout(r, 30));
    await collect(stream);
    const s = stream.stats;
    assert.ok(s.timeToFirstTokenMs >= 30 + s.prefillMs - 1, `${s.timeToFirstTokenMs} ms, prefill ${s.prefillMs} ms`);
    assert.ok(s.prefillMs > 0);
  }));

/** The `ts` code blocks of a file's JSDoc, without the leading ` * `. */
async function docExamples(path: string): Promise<string[]> {
  const text = await Deno.readTextFile(new URL(path, import.meta.url));
  return [...text.matchAll(/```ts[^\n]*\n([\s\S]*?)```/g)].map((m) => m[1].replace(/^\s*\* ?/gm, ""));
}

Deno.test("the library examples that pipe into stdout leave it open for what follows", async () => {
  const root = new URL("..", import.meta.url);
  const piping: string[] = [];
  for (const file of ["../mod.ts", "../models/model.ts"]) {
    for (const code of await docExamples(file)) if (code.includes("Deno.stdout.writable")) piping.push(code);
  }
  assert.equal(piping.length, 2, "the mod.ts and loadModel examples");
  for (const code of piping) {
    const script = `import { loadModel } from "${new URL("mod.ts", root)}";\n` +
      code.replace(/^import .*\n/m, "") + '\nconsole.log("still open");\n';
    const r = await runDeno(["run", "--allow-read", "--allow-env", "-"], { stdin: script });
    assert.equal(r.code, 0, `${code}\n${r.stderr}`);
    assert.match(r.stdout, /still open\n$/);
  }
});
