/**
 * The safetensors reference rules (Hugging Face's `safetensors` crate): sorted by (begin, end) the
 * tensors tile the data from offset 0 with no gap and no overlap, zero-size tensors included; the
 * file ends where the last tensor does; sizes are checked against shapes without overflow. Every
 * refusal is a SafetensorsError naming the file, the tensor and its offsets.
 */

import assert from "node:assert/strict";
import { loadModel, SafetensorsError } from "../mod.ts";
import { encodeSafetensors, parseSafetensors } from "../models/files/safetensors.ts";
import { STORY_DIR } from "./helpers.ts";
import { safetensorsBytes } from "./safetensors_bytes.ts";

/** A safetensors file with the given header JSON, padded with `padding` spaces, and data bytes. */
function file(header: unknown, data: Uint8Array, padding = 0): Uint8Array {
  return safetensorsBytes(JSON.stringify(header) + " ".repeat(padding), data);
}

/** `bytes` with its header length lowered by `by`. */
function shortenHeaderLength(bytes: Uint8Array, by: number): Uint8Array {
  const out = bytes.slice();
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, dv.getBigUint64(0, true) - BigInt(by), true);
  return out;
}

/** Asserts that parsing `bytes` fails with a SafetensorsError whose message matches every pattern. */
function assertRefused(bytes: Uint8Array, what: string, ...patterns: RegExp[]): void {
  assert.throws(() => parseSafetensors(bytes, "x.safetensors"), (e: unknown) => {
    assert.ok(e instanceof SafetensorsError, `${what}: ${e}`);
    assert.equal(e.file, "x.safetensors");
    assert.match(e.message, /^Invalid safetensors file "x\.safetensors": /, what);
    for (const p of patterns) assert.match(e.message, p, what);
    return true;
  }, what);
}

const F32 = (shape: number[], begin: number) => ({
  dtype: "F32",
  shape,
  data_offsets: [begin, begin + 4 * shape.reduce((a, b) => a * b, 1)],
});

Deno.test("safetensors: a header length shortened by 1 to 5 bytes (into the padding) is refused, not shifted", async () => {
  // The story model's header ends in 5 spaces, so each shortened length still parses as JSON.
  const story = await Deno.readFile(`${STORY_DIR}/model.safetensors`);
  const header = new TextDecoder().decode(
    story.subarray(8, 8 + Number(new DataView(story.buffer).getBigUint64(0, true))),
  );
  assert.ok(header.endsWith("     "), "the story header has 5 bytes of padding");
  assert.equal(parseSafetensors(story, "x.safetensors").tensors.size, 20);
  for (let by = 1; by <= 5; by++) {
    assertRefused(
      shortenHeaderLength(story, by),
      `header length - ${by}`,
      new RegExp(`last tensor "model\\.norm\\.weight" \\[\\d+, \\d+\\] ends at \\d+: ${by} trailing bytes`),
    );
  }
  // The same on a small file written by the encoder's rules, and through loadModel.
  const small = file({ a: F32([2], 0), b: F32([3], 8) }, new Uint8Array(20), 5);
  assert.equal(parseSafetensors(small, "x.safetensors").tensors.size, 2);
  for (let by = 1; by <= 5; by++) {
    assertRefused(shortenHeaderLength(small, by), `small, - ${by}`, /"b" \[8, 20\] ends at 20: \d trailing bytes/);
  }
  const dir = await Deno.makeTempDir({ prefix: "llm-shifted-" });
  try {
    for await (const e of Deno.readDir(STORY_DIR)) await Deno.copyFile(`${STORY_DIR}/${e.name}`, `${dir}/${e.name}`);
    await Deno.writeFile(`${dir}/model.safetensors`, shortenHeaderLength(story, 3));
    await assert.rejects(() => loadModel(dir), (e: unknown) => {
      assert.ok(e instanceof SafetensorsError, `${e}`);
      assert.match(e.message, /model\.safetensors.*3 trailing bytes/);
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("safetensors: trailing bytes, gaps and overlaps are refused, naming the tensors and offsets", () => {
  const cases: [string, Uint8Array, RegExp][] = [
    [
      "trailing bytes after the last tensor",
      file({ a: F32([2], 0) }, new Uint8Array(12)),
      /last tensor "a" \[0, 8\] ends at 8: 4 trailing bytes/,
    ],
    [
      "a gap at the start",
      file({ a: F32([2], 4) }, new Uint8Array(12)),
      /tensor "a" has data_offsets \[4, 12\], leaving a gap of 4 bytes at the start/,
    ],
    [
      "a gap between tensors",
      file({ a: F32([2], 0), b: F32([2], 12) }, new Uint8Array(20)),
      /tensor "b" has data_offsets \[12, 20\], leaving a gap of 4 bytes after "a" \[0, 8\]/,
    ],
    [
      "two tensors on the same bytes",
      file({ a: F32([2], 0), b: F32([2], 0) }, new Uint8Array(8)),
      /tensors "a" and "b" overlap: data_offsets \[0, 8\] and \[0, 8\]/,
    ],
    [
      "a zero-size tensor inside another",
      file({ a: F32([2], 0), z: { dtype: "F32", shape: [0], data_offsets: [4, 4] } }, new Uint8Array(8)),
      /tensors "a" and "z" overlap: data_offsets \[0, 8\] and \[4, 4\]/,
    ],
    ["data but no tensor", file({ __metadata__: { format: "pt" } }, new Uint8Array(4)), /lists no tensor, but 4/],
    [
      "a shape whose product passes 2^64",
      file({ a: { dtype: "F32", shape: [2 ** 32, 2 ** 32, 2 ** 32, 1], data_offsets: [0, 8] } }, f32Bytes(2)),
      /tensor "a" of shape \[4294967296,4294967296,4294967296,1\] and dtype F32 needs 316912650057057350374175801344 bytes, but its data_offsets span 8 bytes \(\[0, 8\]\)/,
    ],
  ];
  for (const [what, bytes, message] of cases) assertRefused(bytes, what, message);
});

/** `n` zero f32 values as bytes. */
function f32Bytes(n: number): Uint8Array {
  return new Uint8Array(n * 4);
}

Deno.test("safetensors: zero-size tensors are valid anywhere in the tiling, in any header order", () => {
  const z = (at: number) => ({ dtype: "F32", shape: [0, 4], data_offsets: [at, at] });
  const bytes = file({ a: F32([2], 0), z0: z(0), b: F32([1], 8), z8: z(8), z12: z(12) }, f32Bytes(3));
  const parsed = parseSafetensors(bytes, "x.safetensors");
  assert.deepEqual([...parsed.tensors.keys()], ["a", "z0", "b", "z8", "z12"]);
  for (const name of ["z0", "z8", "z12"]) {
    const t = parsed.tensors.get(name)!;
    assert.deepEqual(t.shape, [0, 4]);
    assert.equal(t.data.byteLength, 0);
  }
  assert.equal(parsed.tensors.get("b")!.data.byteLength, 4);
  // A file of zero-size tensors only has no data at all.
  assert.equal(parseSafetensors(file({ z: z(0) }, new Uint8Array(0)), "x.safetensors").tensors.size, 1);
});

Deno.test("safetensors: the encoder's files obey the rules, padding and all", () => {
  for (let n = 0; n < 8; n++) {
    const name = "t".repeat(n + 1); // header lengths of every residue mod 8
    const bytes = encodeSafetensors([
      { name, dtype: "f32", shape: [2], data: new Uint8Array(8) },
      { name: `${name}2`, dtype: "bf16", shape: [3], data: new Uint8Array(6) },
      { name: `${name}3`, dtype: "f16", shape: [0], data: new Uint8Array(0) },
    ]);
    assert.equal(parseSafetensors(bytes, "x.safetensors").tensors.size, 3);
  }
});
