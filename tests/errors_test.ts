/**
 * Every bad input gives a typed error naming the file, field or value; none
 * crashes, hangs or allocates gigabytes.
 */

import assert from "node:assert/strict";
import { ConfigError, ContextOverflowError, loadModel, SafetensorsError, SamplingOptionError } from "../mod.ts";
import { UnknownBackendError } from "../backends/registry.ts";
import { parseConfig } from "../models/arch/config.ts";
import { encodeSafetensors, parseSafetensors } from "../models/files/safetensors.ts";
import { WeightsError } from "../models/files/weights.ts";
import { STORY_DIR } from "./helpers.ts";
import { safetensorsBytes } from "./safetensors_bytes.ts";

const file = safetensorsBytes;
const f32 = (n: number) => new Uint8Array(n * 4);

Deno.test("safetensors: a valid file round-trips as zero-copy views", () => {
  const bytes = encodeSafetensors([
    { name: "a", dtype: "f32", shape: [2, 2], data: new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer) },
    { name: "b", dtype: "f16", shape: [3], data: new Uint8Array(6) },
  ], { format: "pt" });
  const parsed = parseSafetensors(bytes, "ok.safetensors");
  assert.equal(parsed.metadata.format, "pt");
  const a = parsed.tensors.get("a")!;
  assert.equal(a.data.buffer, bytes.buffer, "a view, not a copy");
  assert.deepEqual([...new Float32Array(a.data.slice().buffer)], [1, 2, 3, 4]);
  assert.equal(parsed.tensors.get("b")!.dtype, "f16");
});

Deno.test("safetensors: hostile and broken files give SafetensorsError naming the problem", () => {
  const ok = { t: { dtype: "F32", shape: [2], data_offsets: [0, 8] } };
  const cases: [string, Uint8Array, RegExp][] = [
    ["truncated before the header length", new Uint8Array(5), /truncated: 5 bytes/],
    ["header length past the end", file(ok, f32(2), 10_000), /header length 10000 is past the end/],
    ["header length of 2^60", file(ok, f32(2), 2 ** 60), /header length \d+ is past the end/],
    ["malformed JSON", file("{not json", f32(2)), /malformed header JSON/],
    ["header not an object", file("[1,2]"), /not a JSON object/],
    ["unknown dtype", file({ t: { dtype: "F31", shape: [2], data_offsets: [0, 8] } }, f32(2)), /unknown dtype "F31"/],
    ["unsupported dtype", file({ t: { dtype: "I64", shape: [1], data_offsets: [0, 8] } }, f32(2)), /dtype "I64"/],
    ["negative shape", file({ t: { dtype: "F32", shape: [-2], data_offsets: [0, 8] } }, f32(2)), /shape \[-2\]/],
    [
      "offsets past the data",
      file({ t: { dtype: "F32", shape: [4], data_offsets: [0, 16] } }, f32(2)),
      /outside the 8 data bytes/,
    ],
    [
      "reversed offsets",
      file({ t: { dtype: "F32", shape: [0], data_offsets: [8, 0] } }, f32(2)),
      /data_offsets \[8, 0\]/,
    ],
    [
      "offsets not a pair",
      file({ t: { dtype: "F32", shape: [2], data_offsets: [0] } }, f32(2)),
      /expected \[begin, end\]/,
    ],
    [
      "size not matching the shape",
      file({ t: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, f32(2)),
      /shape \[3\] and dtype F32 needs 12 bytes, but its data_offsets span 8/,
    ],
    [
      "huge shape",
      file({ t: { dtype: "F32", shape: [1e9, 1e9], data_offsets: [0, 8] } }, f32(2)),
      /needs 4000000000000000000 bytes/,
    ],
    [
      "overlapping tensors",
      file({
        a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
        b: { dtype: "F32", shape: [2], data_offsets: [4, 12] },
      }, f32(3)),
      /"a" and "b" overlap/,
    ],
    ["metadata not strings", file({ __metadata__: { a: 1 } }), /"__metadata__" field "a" is not a string/],
  ];
  for (const [what, bytes, message] of cases) {
    assert.throws(() => parseSafetensors(bytes, "bad.safetensors"), (e: unknown) => {
      assert.ok(e instanceof SafetensorsError, `${what}: ${e}`);
      assert.ok(e instanceof SyntaxError);
      assert.match(e.message, /^Invalid safetensors file "bad\.safetensors": /, what);
      assert.match(e.message, message, what);
      return true;
    }, what);
  }
});

Deno.test("config: missing and absurd fields give ConfigError naming the field and value", () => {
  const good = {
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    vocab_size: 100,
  };
  const c = parseConfig(good);
  assert.equal(c.numKvHeads, 4);
  assert.equal(c.headDim, 16);
  assert.equal(c.ropeTheta, 10000);
  const cases: [Record<string, unknown>, string, RegExp][] = [
    [{ ...good, hidden_size: undefined }, "hidden_size", /field "hidden_size" is missing/],
    [{ ...good, hidden_size: -64 }, "hidden_size", /is -64: expected an integer from 1/],
    [{ ...good, num_hidden_layers: 1e9 }, "num_hidden_layers", /is 1000000000/],
    [{ ...good, vocab_size: "100" }, "vocab_size", /is "100"/],
    [{ ...good, intermediate_size: 1.5 }, "intermediate_size", /is 1.5/],
    [{ ...good, num_key_value_heads: 3 }, "num_key_value_heads", /is 3: it must divide num_attention_heads \(4\)/],
    [{ ...good, num_attention_heads: 5 }, "num_attention_heads", /must divide hidden_size \(64\)/],
    [{ ...good, rms_norm_eps: 0 }, "rms_norm_eps", /is 0: expected a positive number/],
    [{ ...good, rope_theta: "big" }, "rope_theta", /is "big"/],
    [{ ...good, hidden_act: "gelu" }, "hidden_act", /only "silu"/],
    [{ ...good, architectures: ["GPT2LMHeadModel"] }, "architectures", /GPT2LMHeadModel/],
    [{ ...good, rope_scaling: { type: "linear", factor: 2 } }, "rope_scaling", /not supported/],
    [{ ...good, eos_token_id: 100 }, "eos_token_id", /below vocab_size \(100\)/],
    [{ ...good, sliding_window: 0 }, "sliding_window", /is 0/],
  ];
  for (const [raw, field, message] of cases) {
    assert.throws(() => parseConfig(raw, "x/config.json"), (e: unknown) => {
      assert.ok(e instanceof ConfigError, `${field}: ${e}`);
      assert.equal(e.field, field);
      assert.match(e.message, /^Invalid config "x\/config\.json": /);
      assert.match(e.message, message, field);
      return true;
    });
  }
  assert.throws(() => parseConfig([1, 2]), ConfigError);
});

/** A copy of the story model folder with `change` applied. */
async function brokenStory(change: (dir: string) => Promise<void>): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "llm-broken-" });
  for await (const e of Deno.readDir(STORY_DIR)) await Deno.copyFile(`${STORY_DIR}/${e.name}`, `${dir}/${e.name}`);
  await change(dir);
  return dir;
}

async function rejectsWith(dir: string, cls: abstract new (...args: never[]) => Error, message: RegExp) {
  try {
    await assert.rejects(() => loadModel(dir), (e: unknown) => {
      assert.ok(e instanceof cls, `${e}`);
      assert.match((e as Error).message, message);
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("loadModel: missing files name the file, or what a library caller can pass", async () => {
  // The library names no CLI flag: the tools add "--model DIR" themselves (tests/cli_test.ts).
  await assert.rejects(() => loadModel("/nonexistent/model"), (e: unknown) => {
    assert.match((e as Error).message, /"\/nonexistent\/model".*pass a local model folder, or set LLM_MODELS_DIR/);
    assert.doesNotMatch((e as Error).message, /--model/);
    return true;
  });
  await rejectsWith(
    await brokenStory((d) => Deno.remove(`${d}/config.json`)),
    Deno.errors.NotFound,
    /config\.json": the file does not exist/,
  );
  await rejectsWith(
    await brokenStory((d) => Deno.remove(`${d}/tokenizer.json`)),
    Deno.errors.NotFound,
    /tokenizer\.json/,
  );
  await rejectsWith(
    await brokenStory((d) => Deno.remove(`${d}/model.safetensors`)),
    Deno.errors.NotFound,
    /no \*\.safetensors file/,
  );
});

Deno.test("loadModel: broken config, truncated weights, wrong shapes and missing tensors", async () => {
  await rejectsWith(
    await brokenStory((d) => Deno.writeTextFile(`${d}/config.json`, "{oops")),
    SyntaxError,
    /config\.json/,
  );
  await rejectsWith(
    await brokenStory(async (d) => {
      const c = JSON.parse(await Deno.readTextFile(`${d}/config.json`));
      await Deno.writeTextFile(`${d}/config.json`, JSON.stringify({ ...c, hidden_size: 1e12 }));
    }),
    ConfigError,
    /hidden_size/,
  );
  await rejectsWith(
    await brokenStory(async (d) => {
      const bytes = await Deno.readFile(`${d}/model.safetensors`);
      await Deno.writeFile(`${d}/model.safetensors`, bytes.subarray(0, bytes.length - 1000));
    }),
    SafetensorsError,
    /model\.safetensors.*outside the/,
  );
  await rejectsWith(
    await brokenStory(async (d) => {
      const c = JSON.parse(await Deno.readTextFile(`${d}/config.json`));
      await Deno.writeTextFile(`${d}/config.json`, JSON.stringify({ ...c, intermediate_size: 256 }));
    }),
    WeightsError,
    /"model\.layers\.0\.mlp\.gate_proj\.weight" has shape \[384,128\], but the config implies \[256,128\]/,
  );
  await rejectsWith(
    await brokenStory(async (d) => {
      const c = JSON.parse(await Deno.readTextFile(`${d}/config.json`));
      await Deno.writeTextFile(`${d}/config.json`, JSON.stringify({ ...c, num_hidden_layers: 3 }));
    }),
    WeightsError,
    /"model\.layers\.2\.input_layernorm\.weight" is missing/,
  );
});

Deno.test("loadModel: bad options give typed errors", async () => {
  await assert.rejects(() => loadModel(STORY_DIR, { backend: "cuda" }), (e: unknown) => {
    assert.ok(e instanceof UnknownBackendError);
    assert.match((e as Error).message, /backend "cuda": expected one of "ts"/);
    return true;
  });
  await assert.rejects(() => loadModel(STORY_DIR, { dtype: "q3_k" as never }), {
    name: "TypeError",
    message: /dtype "q3_k"/,
  });
  await assert.rejects(() => loadModel(STORY_DIR, { kvDtype: "q8_0" as never }), {
    name: "TypeError",
    message: /kvDtype "q8_0": expected one of f32, f16/,
  });
  await assert.rejects(() => loadModel(STORY_DIR, { contextLength: 100_000 }), {
    name: "RangeError",
    message: /100000/,
  });
  await assert.rejects(() => loadModel(STORY_DIR, { prefillChunk: 0 }), {
    name: "RangeError",
    message: /prefillChunk 0/,
  });
});

Deno.test("generate: a prompt past the context and bad sampling options are refused at once", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 32 });
  try {
    const long = "Lily went to the park. ".repeat(20);
    assert.throws(() => model.generate(long), (e: unknown) => {
      assert.ok(e instanceof ContextOverflowError && e instanceof RangeError);
      assert.match(e.message, /the context holds 32/);
      return true;
    });
    const bad: [Record<string, unknown>, string][] = [
      [{ temperature: -1 }, "temperature"],
      [{ temperature: NaN }, "temperature"],
      [{ topK: 1.5 }, "topK"],
      [{ topP: 0 }, "topP"],
      [{ topP: 1.5 }, "topP"],
      [{ minP: 2 }, "minP"],
      [{ repetitionPenalty: 0 }, "repetitionPenalty"],
      [{ frequencyPenalty: Infinity }, "frequencyPenalty"],
      [{ penaltyLastN: -1 }, "penaltyLastN"],
      [{ seed: 1.5 }, "seed"],
      [{ logitBias: { 5000: 1 } }, "logitBias"],
      [{ logitBias: { 5: NaN } }, "logitBias"],
    ];
    for (const [opts, option] of bad) {
      assert.throws(() => model.generate("Hi", opts), (e: unknown) => {
        assert.ok(e instanceof SamplingOptionError, `${option}: ${e}`);
        assert.equal(e.option, option);
        assert.match(e.message, new RegExp(`"${option}"`));
        return true;
      });
    }
    assert.throws(() => model.generate("Hi", { maxTokens: -1 }), { name: "RangeError", message: /maxTokens -1/ });
    assert.throws(() => model.generate("Hi", { stop: [""] }), { name: "TypeError", message: /stop string/ });
    const seq = model.createSequence();
    await assert.rejects(() => seq.evaluate([5000]), { name: "RangeError", message: /token id 5000/ });
    await assert.rejects(() => seq.evaluate([]), RangeError);
    await assert.rejects(() => seq.evaluate(new Array(40).fill(5)), ContextOverflowError);
    await seq.dispose();
  } finally {
    await model.dispose();
  }
});

Deno.test("generate: reaching the end of the context ends the stream cleanly", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 16 });
  try {
    const stream = model.generate("Once upon a time", { maxTokens: 100, ignoreEos: true, seed: 1 });
    for await (const _ of stream) { /* drain */ }
    assert.equal(stream.stats.stopReason, "context");
    assert.equal(stream.stats.promptTokens + stream.stats.generatedTokens, 17);
  } finally {
    await model.dispose();
  }
});
