/**
 * Finding a model's weights: every weight is checked once for NaN and ±Infinity at load (f32, f16
 * and bf16, norms included), naming the tensor and element, unless the caller opts out; and the
 * only `__metadata__` alias honoured is the tied embedding table, so a file cannot put one tensor
 * in another's place.
 */

import assert from "node:assert/strict";
import type { HostTensor } from "../backends/contract.ts";
import type { DType } from "../graph/dtype.ts";
import { decodeWeights, encodeWeights } from "../graph/weight_codec.ts";
import { elementCount } from "../graph/ir.ts";
import { loadModel, WeightsError } from "../mod.ts";
import { parseConfig } from "../models/arch/config.ts";
import { encodeSafetensors, parseSafetensors } from "../models/files/safetensors.ts";
import { findNonFinite } from "../models/files/weight_dtype.ts";
import { NonFiniteTensorError, readWeights } from "../models/files/weights.ts";
import { STORY_DIR } from "./helpers.ts";

const NORM = "model.layers.0.input_layernorm.weight";
const MATRIX = "model.layers.1.self_attn.v_proj.weight";
const UP = "model.layers.0.mlp.up_proj.weight";
const GATE = "model.layers.0.mlp.gate_proj.weight";

/** The story model's tensors (as copies) and metadata. */
async function storyTensors(): Promise<{ tensors: HostTensor[]; metadata: Record<string, string> }> {
  const parsed = parseSafetensors(await Deno.readFile(`${STORY_DIR}/model.safetensors`), "story");
  const tensors = [...parsed.tensors.values()].map((t) => ({ ...t, data: t.data.slice() }));
  return { tensors, metadata: { ...parsed.metadata } };
}

/** `t` stored as `dtype` (f32, f16 or bf16). */
function storedAs(t: HostTensor, dtype: "f32" | "f16" | "bf16"): HostTensor {
  const values = decodeWeights(t.dtype, t.data, elementCount(t.shape));
  return { ...t, dtype, data: encodeWeights(dtype, values, t.shape[t.shape.length - 1]) };
}

/** The bytes of `value` in `dtype`, for writing one element. */
function elementBytes(dtype: DType, value: number): Uint8Array {
  const bits: Record<"f32" | "f16" | "bf16", Uint8Array> = {
    f32: new Uint8Array(new Float32Array([value]).buffer),
    // f16 and bf16: exponent all ones, with a mantissa bit for NaN.
    f16: new Uint8Array(new Uint16Array([Number.isNaN(value) ? 0x7e00 : value > 0 ? 0x7c00 : 0xfc00]).buffer),
    bf16: new Uint8Array(new Uint16Array([Number.isNaN(value) ? 0x7fc0 : value > 0 ? 0x7f80 : 0xff80]).buffer),
  };
  return bits[dtype as "f32" | "f16" | "bf16"];
}

/** A copy of the story folder whose weight file holds `tensors` and `metadata`. */
async function storyWith(tensors: readonly HostTensor[], metadata: Record<string, string>): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "llm-weights-" });
  for await (const e of Deno.readDir(STORY_DIR)) {
    if (e.name !== "model.safetensors") await Deno.copyFile(`${STORY_DIR}/${e.name}`, `${dir}/${e.name}`);
  }
  await Deno.writeFile(`${dir}/model.safetensors`, encodeSafetensors(tensors, metadata));
  return dir;
}

async function storyConfig() {
  return parseConfig(JSON.parse(await Deno.readTextFile(`${STORY_DIR}/config.json`)), "config.json");
}

Deno.test("weights: NaN and ±Infinity are refused at load in f32, f16 and bf16, norms too, naming tensor and element", async () => {
  const config = await storyConfig();
  const story = await storyTensors();
  const cases: ["f32" | "f16" | "bf16", string, number, number][] = [
    ["f32", NORM, 5, NaN],
    ["f32", MATRIX, 1234, Infinity],
    ["f32", "lm_head.weight", 262_143, -Infinity], // the tied table, stored once
    ["f16", NORM, 127, -Infinity],
    ["f16", MATRIX, 0, NaN],
    ["bf16", NORM, 64, Infinity],
    ["bf16", MATRIX, 8191, NaN],
  ];
  for (const [dtype, name, index, value] of cases) {
    const what = `${dtype} ${name}[${index}] = ${value}`;
    const tensors = story.tensors.map((t) => {
      if (t.name !== name) return dtype === "f32" ? t : storedAs(t, dtype);
      const copy = dtype === "f32" ? { ...t, data: t.data.slice() } : storedAs(t, dtype);
      const width = dtype === "f32" ? 4 : 2;
      copy.data.set(elementBytes(dtype, value), index * width);
      return copy;
    });
    const dir = await storyWith(tensors, story.metadata);
    try {
      await assert.rejects(() => readWeights(dir, config), (e: unknown) => {
        assert.ok(e instanceof NonFiniteTensorError && e instanceof WeightsError, `${what}: ${e}`);
        assert.equal(e.tensor, name, what);
        assert.equal(e.index, index, what);
        assert.ok(Object.is(e.value, value), `${what}: value ${e.value}`);
        assert.match(
          e.message,
          new RegExp(`tensor "${name}" in ".*model\\.safetensors" has element ${index} = ${value}: expected a finite`),
          what,
        );
        return true;
      }, what);
      // Through loadModel, the check is on by default, and checkWeights: false turns it off.
      if (dtype === "f32") {
        await assert.rejects(() => loadModel(dir), NonFiniteTensorError, what);
        await (await loadModel(dir, { checkWeights: false })).dispose();
      }
      // Opting out loads the values as stored (a norm as f32, so its NaN or Infinity survives).
      const loaded = await readWeights(dir, config, undefined, { checkWeights: false });
      const t = loaded.tensors.get(name === "lm_head.weight" ? "model.embed_tokens.weight" : name)!;
      assert.ok(findNonFinite(t), `${what}: kept when the check is off`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("weights: findNonFinite finds the first NaN or Infinity of every dtype, aligned or not", () => {
  const shape = [4, 32];
  const values = new Float32Array(128).map((_, i) => Math.sin(i));
  for (const dtype of ["f32", "f16", "bf16", "q8_0", "q4_0"] as const) {
    const data = encodeWeights(dtype, values, 32);
    assert.equal(findNonFinite({ name: "t", dtype, shape, data }), undefined, dtype);
    // The same bytes at an odd offset of a bigger buffer.
    const odd = new Uint8Array(data.byteLength + 1).subarray(1);
    odd.set(data);
    assert.equal(findNonFinite({ name: "t", dtype, shape, data: odd }), undefined, `${dtype}, misaligned`);
  }
  for (const dtype of ["f32", "f16", "bf16"] as const) {
    const data = encodeWeights(dtype, values, 32);
    const width = dtype === "f32" ? 4 : 2;
    data.set(elementBytes(dtype, -Infinity), 100 * width);
    data.set(elementBytes(dtype, NaN), 70 * width);
    const odd = new Uint8Array(data.byteLength + 1).subarray(1);
    odd.set(data);
    for (const bytes of [data, odd]) {
      const found = findNonFinite({ name: "t", dtype, shape, data: bytes })!;
      assert.equal(found.index, 70, dtype);
      assert.ok(Number.isNaN(found.value), dtype);
    }
  }
  // A block type's scale: the block's first element.
  const q8 = encodeWeights("q8_0", values, 32);
  new DataView(q8.buffer).setUint16(128 + 2 * 2, 0x7c00, true); // block 2's scale: +Infinity
  assert.deepEqual(findNonFinite({ name: "t", dtype: "q8_0", shape, data: q8 }), { index: 64, value: Infinity });
});

Deno.test("weights: a __metadata__ alias other than the tied table is refused, naming the entry", async () => {
  const config = await storyConfig();
  const story = await storyTensors();
  assert.deepEqual(story.metadata, { format: "pt", "model.embed_tokens.weight": "lm_head.weight" });
  const cases: [string, HostTensor[], Record<string, string>, RegExp][] = [
    [
      "up_proj dropped and aliased to gate_proj",
      story.tensors.filter((t) => t.name !== UP),
      { ...story.metadata, [UP]: GATE },
      new RegExp(
        `"__metadata__" entry "${UP}": "${GATE}" in ".*model\\.safetensors" would load tensor "${GATE}" in place of "${UP}": the only alias accepted is the tied`,
      ),
    ],
    [
      "up_proj stored and aliased too",
      story.tensors,
      { ...story.metadata, [UP]: GATE },
      new RegExp(`"__metadata__" entry "${UP}": "${GATE}".* would load tensor "${GATE}" in place of "${UP}"`),
    ],
    [
      "the final norm aliased to a layer's",
      story.tensors.filter((t) => t.name !== "model.norm.weight"),
      { ...story.metadata, "model.norm.weight": NORM },
      /"__metadata__" entry "model\.norm\.weight": "model\.layers\.0\.input_layernorm\.weight"/,
    ],
    [
      "a stored tensor that is not a weight of the layout, aliased",
      [...story.tensors, { name: "extra", dtype: "f32", shape: [1], data: new Uint8Array(4) }],
      { ...story.metadata, extra: GATE },
      /"__metadata__" entry "extra": ".*gate_proj\.weight" .*would load tensor/,
    ],
    [
      "the tied alias while both tables are stored",
      [...story.tensors, {
        ...story.tensors.find((t) => t.name === "lm_head.weight")!,
        name: "model.embed_tokens.weight",
      }],
      story.metadata,
      /"__metadata__" entry "model\.embed_tokens\.weight": "lm_head\.weight" .*aliases "model\.embed_tokens\.weight", which the files also store/,
    ],
  ];
  for (const [what, tensors, metadata, message] of cases) {
    const dir = await storyWith(tensors, metadata);
    try {
      await assert.rejects(() => readWeights(dir, config), (e: unknown) => {
        assert.ok(e instanceof WeightsError, `${what}: ${e}`);
        assert.match((e as Error).message, message, what);
        return true;
      }, what);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("weights: the tied table loads under either name, and free-text metadata is ignored", async () => {
  const config = await storyConfig();
  const story = await storyTensors();
  const head = story.tensors.find((t) => t.name === "lm_head.weight")!;
  const asEmbedding = story.tensors.map((t) => t === head ? { ...t, name: "model.embed_tokens.weight" } : t);
  const cases: [string, HostTensor[], Record<string, string>][] = [
    ["as stored (lm_head.weight, aliased)", story.tensors, story.metadata],
    ["stored as the embedding, the head aliased", asEmbedding, { "lm_head.weight": "model.embed_tokens.weight" }],
    ["free-text metadata beside", story.tensors, {
      ...story.metadata,
      note: GATE,
      "model.norm.weight": "model.norm.weight",
    }],
  ];
  for (const [what, tensors, metadata] of cases) {
    const dir = await storyWith(tensors, metadata);
    try {
      const loaded = await readWeights(dir, config);
      const table = loaded.tensors.get("model.embed_tokens.weight")!;
      assert.deepEqual(table.data, head.data, what);
      assert.equal(loaded.tensors.get(UP)!.data.byteLength, 384 * 128 * 4, what);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});
