/**
 * Fuzzing the model loader: CASES mutated copies of the story model folder (config.json, the
 * tokenizer files, generation_config.json and model.safetensors: bad fields, wrong types, huge
 * ids, truncation, header lengths, offsets, dtypes, shapes, NaN bytes, aliases), from a fixed
 * SEED, each loaded and run for a few tokens in its own subprocess (tests/fuzz_loader.ts) with a
 * timeout and a memory cap, alternately on the ts and native backends. A case passes when the
 * subprocess either loads and generates with every logit finite, or refuses the folder with one
 * line naming an error the engine threw on purpose; it fails on a signal, a timeout, an uncaught
 * error, a library's or the runtime's error (a TypeError from inside a dependency, an allocation
 * failure), non-finite logits, or a load of a folder the mutation made invalid.
 */

import assert from "node:assert/strict";
import { Rng } from "../models/generate/sampler.ts";
import { STORY_DIR } from "./helpers.ts";
import { safetensorsBytes } from "./safetensors_bytes.ts";
import { ROOT } from "./subprocess.ts";

/** The seed of every mutation: the same seed gives the same cases. */
const SEED = 13;
/** Mutated folders to load. */
const CASES = 256;
/** Subprocesses at a time (the suite's machines have 2 cores). */
const PARALLEL = 2;
/** Milliseconds a subprocess may take before it counts as a hang (a normal one takes 0.3-0.8 s). */
const TIMEOUT_MS = 10_000;
/**
 * The subprocess's V8 heap cap, and its data-segment cap (RLIMIT_DATA, which bounds array buffers too): 2 GiB,
 * since the ts backend's worker is a second V8 isolate whose reservations do not fit beside the first in 1 GiB.
 */
const HEAP_MB = 256;
const DATA_LIMIT_KB = 2 * 1024 * 1024;

const LOADER = `${ROOT}tests/fuzz_loader.ts`;
const BACKENDS = ["ts", "native"] as const;
type Backend = typeof BACKENDS[number];

/** What a mutation must lead to: a refusal (the folder is invalid), a load (still valid), or either. */
type Expect = "refuse" | "load" | "either";

/** A mutated folder: the files that differ from the story model's, and what must happen. */
interface Mutation {
  /** What was changed, for the failure report. */
  readonly what: string;
  /** The changed files by name, as bytes or text; every other file is the story model's. */
  readonly files: Readonly<Record<string, Uint8Array | string>>;
  /** What must happen. */
  readonly expect: Expect;
}

/** How a subprocess ended, as the test sees it. */
type Outcome =
  | { kind: "ok"; line: string }
  | { kind: "refused"; line: string }
  | { kind: "failed"; reason: string };

// ---------------------------------------------------------------------------------------------
// The story model, parsed once.

interface Story {
  readonly files: Record<string, string>;
  readonly weights: Uint8Array;
  readonly header: Record<string, TensorEntry | Record<string, string>>;
  readonly headerLength: number;
  /** Tensor names, sorted by offset. */
  readonly tensors: string[];
}

interface TensorEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

async function readStory(): Promise<Story> {
  const files: Record<string, string> = {};
  for (const name of ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
    files[name] = await Deno.readTextFile(`${STORY_DIR}/${name}`);
  }
  files["special_tokens_map.json"] = await Deno.readTextFile(`${STORY_DIR}/special_tokens_map.json`);
  const weights = await Deno.readFile(`${STORY_DIR}/model.safetensors`);
  const headerLength = Number(new DataView(weights.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(weights.subarray(8, 8 + headerLength)));
  const tensors = Object.keys(header).filter((k) => k !== "__metadata__")
    .sort((a, b) => header[a].data_offsets[0] - header[b].data_offsets[0]);
  return { files, weights, header, headerLength, tensors };
}

// ---------------------------------------------------------------------------------------------
// Helpers for mutations.

const pick = <T>(rng: Rng, items: readonly T[]): T => items[Math.floor(rng.next() * items.length)];
const int = (rng: Rng, lo: number, hi: number): number => lo + Math.floor(rng.next() * (hi - lo + 1));
const clone = <T>(v: T): T => structuredClone(v);

/** A weight file with `header` (as JSON, or text) and the story's data bytes (or `data`). */
function withHeader(story: Story, header: unknown, data?: Uint8Array): Uint8Array {
  return safetensorsBytes(header, data ?? story.weights.subarray(8 + story.headerLength));
}

/** The story's weight file with its header length field set to `length`. */
function withHeaderLength(story: Story, length: bigint): Uint8Array {
  const out = story.weights.slice();
  new DataView(out.buffer).setBigUint64(0, length, true);
  return out;
}

/** The story's weight file with the f32 element `index` of tensor `name` given the bits `bits`. */
function withElementBits(story: Story, name: string, index: number, bits: number): Uint8Array {
  const out = story.weights.slice();
  const at = 8 + story.headerLength + (story.header[name] as TensorEntry).data_offsets[0] + index * 4;
  new DataView(out.buffer).setUint32(at, bits >>> 0, true);
  return out;
}

function elements(story: Story, name: string): number {
  return (story.header[name] as TensorEntry).shape.reduce((a, b) => a * b, 1);
}

/** Values no field should take, as JSON text (some are not JSON values of their own: 1e400 parses as Infinity). */
const HOSTILE_VALUES = [
  "-1",
  "0",
  "1",
  "2",
  "1.5",
  "1e9",
  "2147483648",
  "9007199254740993",
  "1e400",
  "-1e400",
  '"7"',
  '""',
  "null",
  "true",
  "[]",
  "[1,2]",
  "{}",
  '{"a":1}',
  '"' + "x".repeat(10_000) + '"',
];

/** `text` (a JSON object) with `path` set to the JSON text `value`. */
function setJson(text: string, path: (string | number)[], value: string): string {
  const obj = JSON.parse(text);
  let at = obj;
  for (const key of path.slice(0, -1)) at = at[key];
  const marker = "\u0000FUZZ\u0000";
  at[path[path.length - 1]] = marker;
  return JSON.stringify(obj).replace(JSON.stringify(marker), value);
}

/** `text` cut at a random point. */
function truncated(rng: Rng, text: string): string {
  return text.slice(0, int(rng, 0, text.length - 1));
}

// ---------------------------------------------------------------------------------------------
// The mutations, by file. Each returns the changed files and what must happen.

type Maker = (rng: Rng, story: Story) => Mutation;

const weightMutations: Maker[] = [
  (rng, s) => {
    const by = int(rng, 1, 5);
    return {
      what: `header length - ${by} (into the padding)`,
      files: { "model.safetensors": withHeaderLength(s, BigInt(s.headerLength - by)) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const by = int(rng, 1, 64);
    return {
      what: `header length + ${by}`,
      files: { "model.safetensors": withHeaderLength(s, BigInt(s.headerLength + by)) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const length = pick(rng, [0n, 1n, 2n ** 32n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n]);
    return {
      what: `header length ${length}`,
      files: { "model.safetensors": withHeaderLength(s, length) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const at = int(rng, 0, s.weights.length - 1);
    return {
      what: `truncated at byte ${at}`,
      files: { "model.safetensors": s.weights.subarray(0, at) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const extra = int(rng, 1, 4096);
    const out = new Uint8Array(s.weights.length + extra);
    out.set(s.weights);
    return { what: `${extra} trailing bytes`, files: { "model.safetensors": out }, expect: "refuse" };
  },
  (rng, s) => {
    const name = pick(rng, s.tensors);
    const h = clone(s.header);
    const e = h[name] as TensorEntry;
    const side = int(rng, 0, 1);
    const by = pick(rng, [-8, -4, -1, 1, 4, 8, 1 << 20]);
    e.data_offsets[side] += by;
    return {
      what: `"${name}" data_offsets[${side}] ${by > 0 ? "+" : ""}${by}`,
      files: { "model.safetensors": withHeader(s, h) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const name = pick(rng, s.tensors);
    const h = clone(s.header);
    (h[name] as TensorEntry).dtype = pick(rng, ["F16", "BF16", "F64", "I32", "U32", "F31", "f32", "", "I8"]);
    return {
      what: `"${name}" dtype ${(h[name] as TensorEntry).dtype}`,
      files: { "model.safetensors": withHeader(s, h) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const name = pick(rng, s.tensors);
    const h = clone(s.header);
    const e = h[name] as TensorEntry;
    const change = pick(rng, ["grow", "shrink", "swap", "flatten", "extra-dim", "negative", "fraction", "huge"]);
    if (change === "grow") e.shape[e.shape.length - 1] += 1;
    if (change === "shrink") e.shape[0] -= 1;
    if (change === "swap") e.shape.reverse();
    if (change === "flatten") e.shape = [e.shape.reduce((a, b) => a * b, 1)];
    if (change === "extra-dim") e.shape = [1, ...e.shape];
    if (change === "negative") e.shape[0] = -e.shape[0];
    if (change === "fraction") e.shape[0] += 0.5;
    if (change === "huge") e.shape = [2 ** 40, 2 ** 40, 0 + 2 ** 20];
    // A square matrix or a vector reversed is unchanged, and a 1-D tensor flattened too.
    const unchanged = JSON.stringify(e.shape) === JSON.stringify((s.header[name] as TensorEntry).shape);
    return {
      what: `"${name}" shape ${change}`,
      files: { "model.safetensors": withHeader(s, h) },
      expect: unchanged ? "load" : "refuse",
    };
  },
  (rng, s) => {
    const name = pick(rng, s.tensors);
    const index = int(rng, 0, elements(s, name) - 1);
    const [label, bits] = pick(
      rng,
      [
        ["NaN", 0x7fc00000],
        ["-NaN", 0xffc00000],
        ["signalling NaN", 0x7f800001],
        ["+Infinity", 0x7f800000],
        ["-Infinity", 0xff800000],
      ] as const,
    );
    return {
      what: `"${name}"[${index}] = ${label}`,
      files: { "model.safetensors": withElementBits(s, name, index, bits) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    // A low mantissa bit: the weight moves by at most a few ulps, the file stays valid.
    const name = pick(rng, s.tensors);
    const index = int(rng, 0, elements(s, name) - 1);
    const out = s.weights.slice();
    const at = 8 + s.headerLength + (s.header[name] as TensorEntry).data_offsets[0] + index * 4;
    out[at] ^= 1 << int(rng, 0, 7);
    return {
      what: `"${name}"[${index}] low mantissa bit flipped`,
      files: { "model.safetensors": out },
      expect: "load",
    };
  },
  (rng, s) => {
    const at = int(rng, 8, 8 + s.headerLength - 1);
    const out = s.weights.slice();
    const byte = pick(rng, [0x00, 0x20, 0x22, 0x2c, 0x30, 0x39, 0x5b, 0x5d, 0x7b, 0x7d, 0xff, int(rng, 0, 255)]);
    out[at] = byte;
    const same = byte === s.weights[at];
    return {
      what: `header byte ${at} = 0x${byte.toString(16)}`,
      files: { "model.safetensors": out },
      expect: same ? "load" : "either",
    };
  },
  (rng, s) => {
    const name = pick(rng, s.tensors);
    const h = clone(s.header);
    const e = h[name];
    delete h[name];
    const change = pick(rng, ["remove", "rename", "offsets-missing", "not-object"]);
    if (change === "rename") h[`${name}.x`] = e;
    if (change === "offsets-missing") h[name] = { ...(e as TensorEntry), data_offsets: undefined as never };
    if (change === "not-object") h[name] = pick(rng, [[1, 2], "x", 5, null]) as never;
    return { what: `"${name}" ${change}`, files: { "model.safetensors": withHeader(s, h) }, expect: "refuse" };
  },
  (rng, s) => {
    const target = pick(rng, s.tensors.filter((n) => n.startsWith("model.layers.")));
    const source = pick(rng, s.tensors.filter((n) => n !== target));
    const h = clone(s.header);
    (h.__metadata__ as Record<string, string>)[target] = source;
    return {
      what: `__metadata__ aliases "${target}" to "${source}"`,
      files: { "model.safetensors": withHeader(s, h) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    const h = clone(s.header);
    (h.__metadata__ as Record<string, unknown>)[pick(rng, ["format", "x"])] = pick(rng, [1, null, ["a"], { a: "b" }]);
    return {
      what: `__metadata__ value not a string`,
      files: { "model.safetensors": withHeader(s, h) },
      expect: "refuse",
    };
  },
  (rng, s) => {
    // Valid rewrites: keys reordered, more padding, free-text metadata, zero-size and unused tensors.
    const h = clone(s.header);
    const change = pick(rng, ["reorder", "padding", "metadata", "zero-size", "unused"]);
    let data: Uint8Array | undefined;
    let entries = Object.entries(h);
    if (change === "reorder") entries = entries.reverse();
    if (change === "metadata") (h.__metadata__ as Record<string, string>).note = "model.layers.0.mlp.up_proj.weight";
    const end = s.weights.length - 8 - s.headerLength;
    if (change === "zero-size") {
      entries.push(["empty.a", { dtype: "F32", shape: [0, 128], data_offsets: [0, 0] }]);
      entries.push(["empty.b", { dtype: "F16", shape: [4, 0], data_offsets: [end, end] }]);
    }
    if (change === "unused") {
      entries.push(["unused.weight", { dtype: "F32", shape: [3], data_offsets: [end, end + 12] }]);
      data = new Uint8Array(end + 12);
      data.set(s.weights.subarray(8 + s.headerLength));
    }
    const json = JSON.stringify(Object.fromEntries(entries));
    const padded = change === "padding" ? json + " ".repeat(int(rng, 1, 300)) : json;
    return {
      what: `valid rewrite: ${change}`,
      files: { "model.safetensors": withHeader(s, padded, data) },
      expect: "load",
    };
  },
  (rng, s) => {
    const text = JSON.stringify(s.header);
    const cut = int(rng, 1, text.length - 1);
    // The same length, the JSON cut short and padded with spaces.
    const header = text.slice(0, cut) + " ".repeat(text.length - cut);
    return {
      what: `header JSON cut at ${cut}`,
      files: { "model.safetensors": withHeader(s, header) },
      expect: "refuse",
    };
  },
];

const configFields = [
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "vocab_size",
  "max_position_embeddings",
  "rms_norm_eps",
  "rope_theta",
  "eos_token_id",
  "bos_token_id",
  "tie_word_embeddings",
  "hidden_act",
  "architectures",
  "rope_scaling",
  "torch_dtype",
  "head_dim",
  "sliding_window",
  "model_type",
];

/** The story's JSON file `name` with `path` set to the JSON text `value`, which must lead to `expect`. */
function withField(s: Story, name: string, path: (string | number)[], value: string, expect: Expect): Mutation {
  return {
    what: `${name} ${path.join(".")} = ${value.slice(0, 30)}`,
    files: { [name]: setJson(s.files[name], path, value) },
    expect,
  };
}

/** A maker setting one of `fields` of the JSON file `name` to one of `values`. */
const fieldMaker =
  (name: string, fields: readonly string[], values: readonly string[], expect: Expect): Maker => (rng, s) =>
    withField(s, name, [pick(rng, fields)], pick(rng, values), expect);

/** A maker cutting the JSON file `name` short at a random byte. */
const truncationMaker = (name: string, expect: Expect): Maker => (rng, s) => ({
  what: `${name} truncated`,
  files: { [name]: truncated(rng, s.files[name]) },
  expect,
});

/** A maker replacing the JSON file `name` with one of `texts`, none of them a valid file. */
const replacementMaker = (name: string, texts: readonly string[]): Maker => (rng) => {
  const text = pick(rng, texts);
  return { what: `${name} = ${JSON.stringify(text.slice(0, 12))}`, files: { [name]: text }, expect: "refuse" };
};

const configMutations: Maker[] = [
  fieldMaker("config.json", configFields, HOSTILE_VALUES, "either"),
  (rng, s) => {
    const field = pick(rng, configFields);
    const obj = JSON.parse(s.files["config.json"]);
    delete obj[field];
    return { what: `config.json without ${field}`, files: { "config.json": JSON.stringify(obj) }, expect: "either" };
  },
  truncationMaker("config.json", "refuse"),
  replacementMaker("config.json", ["", "[]", "null", "1", '"x"', "{", "[".repeat(100_000), "\u0000\u0001"]),
];

/** tokenizer.json's paths a mutation may set, with the story file's shape. */
function tokenizerPaths(rng: Rng, s: Story): (string | number)[] {
  const tok = JSON.parse(s.files["tokenizer.json"]);
  const vocab = Object.keys(tok.model.vocab);
  return pick(rng, [
    ["model", "vocab", pick(rng, vocab)],
    ["model", "merges", int(rng, 0, tok.model.merges.length - 1)],
    ["model", "merges"],
    ["model", "vocab"],
    ["model", "type"],
    ["model", "unk_token"],
    ["model", "byte_fallback"],
    ["added_tokens", int(rng, 0, tok.added_tokens.length - 1), "id"],
    ["added_tokens", int(rng, 0, tok.added_tokens.length - 1), "content"],
    ["added_tokens", int(rng, 0, tok.added_tokens.length - 1)],
    ["added_tokens"],
    ["normalizer"],
    ["normalizer", "normalizers", 1, "pattern"],
    ["pre_tokenizer"],
    ["decoder"],
    ["decoder", "decoders", 0, "type"],
    ["post_processor"],
    ["post_processor", "special_tokens", "<|start_story|>", "ids"],
    ["model"],
  ] as (string | number)[][]);
}

const tokenizerMutations: Maker[] = [
  (rng, s) => {
    const value = pick(rng, [...HOSTILE_VALUES, "2000000000", "-5", "2048", "65535", "[2000000000]"]);
    return withField(s, "tokenizer.json", tokenizerPaths(rng, s), value, "either");
  },
  (rng, s) => {
    // A vocabulary id at or past vocab_size (2048): the case (a sparse array walked for a minute).
    const token = pick(rng, Object.keys(JSON.parse(s.files["tokenizer.json"]).model.vocab));
    const id = pick(rng, [2048, 4096, 1_000_000, 2_000_000_000, 2 ** 31, 2 ** 53]);
    return withField(s, "tokenizer.json", ["model", "vocab", token], String(id), "refuse");
  },
  truncationMaker("tokenizer.json", "refuse"),
  (rng, s) => {
    const pattern = pick(rng, ["(a|a)*X", "(x+x+)+y", "[", "(?<n>a)\\k<m>", "a{99999999}"]);
    const normalizer = JSON.stringify({ type: "Replace", pattern: { Regex: pattern }, content: "" });
    return withField(s, "tokenizer.json", ["normalizer"], normalizer, "either");
  },
  replacementMaker("tokenizer.json", ["", "[]", "null", "{}", '{"model":null}', "[".repeat(100_000)]),
];

const TOKENIZER_CONFIG_FIELDS = [
  "bos_token",
  "eos_token",
  "unk_token",
  "pad_token",
  "add_bos_token",
  "add_eos_token",
  "model_max_length",
  "added_tokens_decoder",
  "chat_template",
  "legacy",
  "tokenizer_class",
];

const CHAT_TEMPLATES = [
  "{% for i in range(100000000) %}x{% endfor %}",
  "{{",
  "{% if %}",
  "{{ messages[0]['content'] * 100000000 }}",
  "{{ raise_exception('no') }}",
].map((t) => JSON.stringify(t));

const tokenizerConfigMutations: Maker[] = [
  fieldMaker("tokenizer_config.json", TOKENIZER_CONFIG_FIELDS, [
    ...HOSTILE_VALUES,
    '"<|nope|>"',
    '{"content":5}',
    '{"99999999999":{"content":"x"}}',
    '{"-1":{"content":"x","special":true}}',
  ], "either"),
  fieldMaker("tokenizer_config.json", ["chat_template"], CHAT_TEMPLATES, "either"),
  truncationMaker("tokenizer_config.json", "either"),
];

const otherMutations: Maker[] = [
  fieldMaker(
    "generation_config.json",
    ["eos_token_id", "bos_token_id", "pad_token_id"],
    [...HOSTILE_VALUES, "[2, 1000000000]", "[-1]"],
    "either",
  ),
  truncationMaker("generation_config.json", "either"),
  fieldMaker("special_tokens_map.json", ["bos_token", "eos_token", "pad_token", "unk_token"], HOSTILE_VALUES, "either"),
];

/** The mutation groups and their share of the cases. */
const GROUPS: [Maker[], number][] = [
  [weightMutations, 0.45],
  [configMutations, 0.2],
  [tokenizerMutations, 0.2],
  [tokenizerConfigMutations, 0.1],
  [otherMutations, 0.05],
];

function makeMutation(rng: Rng, story: Story): Mutation {
  let r = rng.next();
  for (const [makers, share] of GROUPS) {
    if (r < share) return pick(rng, makers)(rng, story);
    r -= share;
  }
  return pick(rng, weightMutations)(rng, story);
}

// ---------------------------------------------------------------------------------------------
// Running a case.

/** Messages the runtime writes for its own errors: a bug, never a refusal the engine meant. */
const RUNTIME_MESSAGES =
  /Cannot read properties|Cannot set properties|is not a function|is not iterable|is not a constructor|Cannot convert|Invalid array length|Invalid typed array length|Maximum call stack|allocation failed|Invalid string length|out of memory|Cannot destructure|is not defined|Offset is outside the bounds|Start offset .* is outside/;

/** Reads a loader's exit: one protocol line on stdout, nothing on stderr, the matching exit code. */
function judge(out: Deno.CommandOutput, timedOut: boolean, expect: Expect): Outcome {
  const stdout = new TextDecoder().decode(out.stdout).trim();
  const stderr = new TextDecoder().decode(out.stderr).trim();
  const tail = (stderr || stdout).split("\n").slice(0, 3).join(" | ").slice(0, 300);
  if (timedOut) return { kind: "failed", reason: `timed out after ${TIMEOUT_MS} ms` };
  if (out.signal) return { kind: "failed", reason: `killed by ${out.signal}: ${tail}` };
  const lines = stdout.split("\n");
  if (lines.length !== 1 || stderr) return { kind: "failed", reason: `exit ${out.code}, not one line: ${tail}` };
  const line = lines[0];
  if (out.code === 0 && line.startsWith("OK ")) {
    return expect === "refuse" ? { kind: "failed", reason: `loaded an invalid folder: ${line}` } : { kind: "ok", line };
  }
  if (out.code === 2 && line.startsWith("NONFINITE ")) {
    return { kind: "failed", reason: `loaded, but the logits are not finite: ${line}` };
  }
  const m = out.code === 1 ? line.match(/^ERROR (\S+) (\S+) (.*)$/) : null;
  if (!m) return { kind: "failed", reason: `exit ${out.code}: ${tail}` };
  const [, name, origin, message] = m;
  const engine = origin.startsWith(`file://${ROOT}`) && !origin.startsWith(`file://${ROOT}tests/`);
  if (!engine) return { kind: "failed", reason: `an error from outside the engine (${origin}): ${name}: ${message}` };
  if (RUNTIME_MESSAGES.test(message)) {
    return { kind: "failed", reason: `a runtime error in ${origin}: ${name}: ${message}` };
  }
  if (expect === "load") return { kind: "failed", reason: `refused a valid folder: ${name}: ${message}` };
  return { kind: "refused", line };
}

/** Loads `dir` on `backend` in a subprocess under the caps. */
async function runLoader(dir: string, backend: Backend, expect: Expect): Promise<Outcome> {
  const child = new Deno.Command("bash", {
    args: [
      "-c",
      `ulimit -d ${DATA_LIMIT_KB} && exec "$@"`,
      "bash",
      Deno.execPath(),
      "run",
      "--allow-read",
      "--allow-env",
      "--allow-ffi",
      `--v8-flags=--max-old-space-size=${HEAP_MB}`,
      LOADER,
      dir,
      backend,
    ],
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, TIMEOUT_MS);
  try {
    return judge(await child.output(), timedOut, expect);
  } finally {
    clearTimeout(timer);
  }
}

/** A folder holding the mutation's files, the story model's others linked (as the Hugging Face cache does). */
async function writeFolder(root: string, index: number, m: Mutation): Promise<string> {
  const dir = `${root}/case-${index}`;
  await Deno.mkdir(dir);
  for await (const e of Deno.readDir(STORY_DIR)) {
    const changed = m.files[e.name];
    if (changed === undefined) await Deno.symlink(`${STORY_DIR}/${e.name}`, `${dir}/${e.name}`);
    else if (typeof changed === "string") await Deno.writeTextFile(`${dir}/${e.name}`, changed);
    else await Deno.writeFile(`${dir}/${e.name}`, changed);
  }
  return dir;
}

Deno.test({
  name:
    `fuzz: ${CASES} mutated story folders load or are refused with a typed error, never crash, hang or load invalid`,
  // The subprocesses' pipes are read to the end; nothing is left open.
  fn: async () => {
    const story = await readStory();
    const root = await Deno.makeTempDir({ prefix: "llm-fuzz-" });
    try {
      // The unmutated folder loads on each backend: the harness works, and the native library is built.
      for (const backend of BACKENDS) {
        const base = await runLoader(STORY_DIR, backend, "load");
        assert.equal(
          base.kind,
          "ok",
          `the story model on ${backend} (deno task build:native?): ${JSON.stringify(base)}`,
        );
      }
      const rng = new Rng(SEED);
      const cases = Array.from({ length: CASES }, () => makeMutation(rng, story));
      const failures: string[] = [];
      const counts = { ok: 0, refused: 0, failed: 0 };
      let next = 0;
      const started = performance.now();
      const worker = async () => {
        while (next < cases.length) {
          const i = next++;
          const m = cases[i];
          const backend = BACKENDS[i % BACKENDS.length];
          const dir = await writeFolder(root, i, m);
          const outcome = await runLoader(dir, backend, m.expect);
          await Deno.remove(dir, { recursive: true });
          counts[outcome.kind]++;
          if (outcome.kind === "failed") failures.push(`#${i} ${backend} ${m.what}: ${outcome.reason}`);
        }
      };
      await Promise.all(Array.from({ length: PARALLEL }, worker));
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      console.log(
        `fuzz: ${CASES} cases in ${seconds} s: ${counts.ok} loaded, ${counts.refused} refused, ${counts.failed} failed`,
      );
      assert.deepEqual(failures, [], `${failures.length} of ${CASES} cases failed:\n${failures.join("\n")}`);
      // The mix exercises both outcomes.
      assert.ok(counts.ok >= CASES / 10 && counts.refused >= CASES / 3, JSON.stringify(counts));
    } finally {
      await Deno.remove(root, { recursive: true });
    }
  },
});
