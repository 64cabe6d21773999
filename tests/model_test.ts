/**
 * The story model against the shared references, the KV cache against a full
 * forward, and the tokenizers against the reference library's output.
 */

import assert from "node:assert/strict";
import { loadModel, type LoadProgress, WeightsError } from "../mod.ts";
import { encodeSafetensors, parseSafetensors } from "../models/files/safetensors.ts";
import { TextTokenizer } from "../models/text/tokenizer.ts";
import { assertClose, MINUEZA_DIR, SHARED, STORY_DIR } from "./helpers.ts";

interface GreedyCase {
  prompt: string;
  prompt_ids: number[];
  greedy_ids: number[];
}

Deno.test("story model: greedy generation reproduces the reference ids (ts backend)", async () => {
  const ref = JSON.parse(await Deno.readTextFile(`${SHARED}/refs/story-greedy.json`)) as { cases: GreedyCase[] };
  assert.ok(ref.cases.length >= 4);
  const model = await loadModel(STORY_DIR, { backend: "ts" });
  try {
    for (const c of ref.cases) {
      assert.deepEqual(model.tokenizer.encode(c.prompt), c.prompt_ids, `prompt ids of ${JSON.stringify(c.prompt)}`);
      const ids: number[] = [];
      const stream = model.generateTokens(c.prompt, {
        temperature: 0,
        maxTokens: c.greedy_ids.length,
        ignoreEos: true,
      });
      for await (const t of stream) ids.push(t.id);
      assert.deepEqual(ids, c.greedy_ids, `greedy ids of ${JSON.stringify(c.prompt)}`);
      assert.equal(stream.stats.stopReason, "maxTokens");
    }
  } finally {
    await model.dispose();
  }
});

Deno.test("KV cache: incremental decoding gives the logits of a full forward (within 1e-5)", async () => {
  const model = await loadModel(STORY_DIR, { backend: "ts", prefillChunk: 8 });
  try {
    const ids = model.tokenizer.encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her dog and her big red ball.",
    );
    assert.ok(ids.length > 16, "long enough to span several chunks");
    const V = model.config.vocabSize;
    const full = model.createSequence();
    const all = await full.evaluate(ids, { logits: "all" });
    const inc = model.createSequence();
    await inc.evaluate(ids.slice(0, 5));
    for (let i = 5; i < ids.length; i++) {
      const logits = await inc.evaluate([ids[i]]);
      assertClose(logits, all.subarray(i * V, (i + 1) * V), 1e-5, `logits at position ${i}`);
    }
    assert.equal(inc.length, ids.length);
    assert.equal(inc.evaluatedTokens, ids.length);
    await full.dispose();
    await inc.dispose();
  } finally {
    await model.dispose();
  }
});

Deno.test("sequence: truncate rolls back, fork shares nothing mutable", async () => {
  const model = await loadModel(STORY_DIR, { backend: "ts" });
  try {
    const ids = model.tokenizer.encode("Tom had a red ball.");
    const a = model.createSequence();
    const base = Float32Array.from(await a.evaluate(ids));
    const b = a.fork();
    await a.evaluate([100, 200]);
    a.truncate(ids.length - 1);
    assert.deepEqual(a.tokens, ids.slice(0, -1));
    assertClose(await a.evaluate([ids.at(-1)!]), base, 1e-6, "logits after rollback");
    // The fork kept the original cache, untouched by a's later tokens.
    await b.evaluate([100]);
    const c = model.createSequence();
    await c.evaluate(ids);
    assertClose(await b.evaluate([200]), await c.evaluate([100, 200]), 1e-6, "fork continues like a fresh sequence");
    assert.throws(() => a.truncate(a.length + 1), RangeError);
  } finally {
    await model.dispose();
  }
});

for (const [name, dir] of [["story", STORY_DIR], ["minueza", MINUEZA_DIR]]) {
  Deno.test(`tokenizer (${name}): encode and decode equal the reference library`, async () => {
    const ref = JSON.parse(await Deno.readTextFile(`${SHARED}/refs/tokenizer-${name}.json`)) as {
      cases: { text: string; ids: number[]; ids_plain: number[]; decoded: string; decoded_skip_special: string }[];
    };
    const tok = await TextTokenizer.load(dir);
    assert.ok(ref.cases.length > 20);
    for (const c of ref.cases) {
      const label = JSON.stringify(c.text);
      assert.deepEqual(tok.encode(c.text), c.ids, `ids of ${label}`);
      assert.deepEqual(tok.encode(c.text, { addSpecialTokens: false }), c.ids_plain, `plain ids of ${label}`);
      assert.equal(tok.decode(c.ids), c.decoded, `decode of ${label}`);
      assert.equal(tok.decode(c.ids, { skipSpecialTokens: true }), c.decoded_skip_special, `decode (skip) of ${label}`);
    }
  });
}

Deno.test("tokenizer: BOS/EOS and special ids come from the configs", async () => {
  const story = await TextTokenizer.load(STORY_DIR);
  assert.equal(story.bosId, 1);
  assert.deepEqual(story.eosIds, [2]);
  assert.equal(story.chatTemplate, undefined);
  const minueza = await TextTokenizer.load(MINUEZA_DIR);
  assert.equal(minueza.encode("Hi")[0] === minueza.bosId, false, "add_bos_token is false");
  assert.deepEqual(minueza.eosIds, [32000]);
  assert.ok(minueza.specialIds.has(32001));
  assert.match(minueza.chatTemplate ?? "", /im_start/);
});

Deno.test("config without tie_word_embeddings: the weight files decide", async () => {
  const { writeRandomModel } = await import("../examples/_random_model.ts");
  const dropTie = async (dir: string) => {
    const c = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
    delete c.tie_word_embeddings;
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(c));
  };
  // The story model stores its one table as lm_head.weight, aliased in __metadata__: tied.
  const story = await Deno.makeTempDir({ prefix: "llm-tie-" });
  for await (const e of Deno.readDir(STORY_DIR)) await Deno.copyFile(`${STORY_DIR}/${e.name}`, `${story}/${e.name}`);
  await dropTie(story);
  // A model with two distinct tables: untied.
  const untied = await Deno.makeTempDir({ prefix: "llm-tie-" });
  const shape = {
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 1,
    num_attention_heads: 2,
    vocab_size: 2048,
    tie_word_embeddings: false,
  };
  await writeRandomModel(untied, shape, { tokenizerFrom: STORY_DIR, seed: 3 });
  await dropTie(untied);
  const a = await loadModel(story);
  const b = await loadModel(untied);
  try {
    assert.equal(a.config.tieWordEmbeddings, true);
    assert.equal(b.config.tieWordEmbeddings, false);
    assert.ok(b.graph().tensors.some((t) => t.name === "lm_head.weight"));
    const ref = await loadModel(STORY_DIR);
    const ids = ref.tokenizer.encode("Once upon a time");
    assertClose(await a.createSequence().evaluate(ids), await ref.createSequence().evaluate(ids), 0, "same logits");
    await ref.dispose();
  } finally {
    await a.dispose();
    await b.dispose();
    await Deno.remove(story, { recursive: true });
    await Deno.remove(untied, { recursive: true });
  }
});

Deno.test("loadModel: converting to a dtype is reported as progress, after the tensors load; load time is kept", async () => {
  const events: LoadProgress[] = [];
  const model = await loadModel(STORY_DIR, { dtype: "q8_0", onProgress: (p) => events.push(p) });
  try {
    const tensors = events.filter((e) => e.phase === "tensors");
    const converts = events.filter((e) => e.phase === "convert");
    assert.equal(tensors.length, 20);
    assert.deepEqual(
      converts.map((e) => [e.converted, e.total, e.dtype]),
      Array.from({ length: 20 }, (_, i) => [i + 1, 20, "q8_0"]),
    );
    assert.deepEqual(new Set(converts.map((e) => e.name)), new Set(tensors.map((e) => e.name)));
    assert.ok(events.indexOf(converts[0]) > events.indexOf(tensors.at(-1)!), "conversion follows the reading");
    assert.ok(model.loadMs > 0 && model.loadMs < 60_000, `${model.loadMs} ms`);
  } finally {
    await model.dispose();
  }
  // Nothing to convert: no convert events.
  const plain: LoadProgress[] = [];
  await (await loadModel(STORY_DIR, { onProgress: (p) => plain.push(p) })).dispose();
  assert.ok(plain.length > 0 && plain.every((e) => e.phase !== "convert"));
});

Deno.test("loadModel checks every weight for NaN and ±Infinity unless checkWeights is false", async () => {
  const parsed = parseSafetensors(await Deno.readFile(`${STORY_DIR}/model.safetensors`), "story");
  const name = "model.layers.1.mlp.down_proj.weight";
  const tensors = [...parsed.tensors.values()].map((t) => ({ ...t, data: t.data.slice() }));
  const bad = tensors.find((t) => t.name === name)!;
  bad.data.set(new Uint8Array(new Float32Array([NaN]).buffer), 4 * 77);
  const dir = await Deno.makeTempDir({ prefix: "llm-check-weights-" });
  try {
    for await (const e of Deno.readDir(STORY_DIR)) {
      if (e.name !== "model.safetensors") await Deno.copyFile(`${STORY_DIR}/${e.name}`, `${dir}/${e.name}`);
    }
    await Deno.writeFile(`${dir}/model.safetensors`, encodeSafetensors(tensors, parsed.metadata));
    for (const options of [{}, { checkWeights: true }]) {
      await assert.rejects(() => loadModel(dir, options), (e: unknown) => {
        assert.ok(e instanceof WeightsError && e.name === "NonFiniteTensorError", String(e));
        assert.match(e.message, new RegExp(`"${name}" .* element 77 = NaN`));
        return true;
      }, JSON.stringify(options));
    }
    // Opted out, it loads, and the NaN reaches the logits (which is what the check is for).
    const model = await loadModel(dir, { checkWeights: false });
    try {
      const seq = model.createSequence();
      const logits = await seq.evaluate(model.tokenizer.encode("Once upon a time"));
      assert.ok(logits.some(Number.isNaN));
      await seq.dispose();
    } finally {
      await model.dispose();
    }
    await assert.rejects(() => loadModel(dir, { checkWeights: "no" as unknown as boolean }), {
      name: "TypeError",
      message: /Invalid checkWeights "no": expected a boolean/,
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
