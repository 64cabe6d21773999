/**
 * `deno task bench`: prefill and decode speed of the engine, optionally side by side with llama.cpp
 * (through the anchor kit) on the very same weights. Run with `--help` for the options.
 *
 * Measured as llama.cpp's `llama-batched-bench` measures: each rep starts `--parallel` generations
 * of the same prompt together (concurrent `model.generateTokens` calls, greedy, EOS ignored), which
 * the model's engine batches into shared steps. Prefill is the time until every generation has its
 * first token (all the prompts, and one token each), prefill tok/s = all prompt tokens / that time;
 * decode is the time from then until the last token, decode tok/s = all the single-token evaluations
 * in it / that time (aggregate); per-sequence decode tok/s is each generation's own rate, averaged.
 * With one generation this is what the anchor kit measures for llama.cpp. The prompt is the kit's
 * pseudo-random id list, so both engines do the same work. One warm-up rep, then the median of the reps.
 *
 * @module
 */

import {
  backendNames,
  DEFAULT_MODEL_ID,
  KV_DTYPES,
  loadModel,
  type Model,
  WEIGHT_DTYPES,
  type WeightDType,
} from "../mod.ts";
import { byteSize, type DType, elementCount } from "../backends/mod.ts";
import {
  choiceFlag,
  CliError,
  formatBytes,
  loadError,
  numberFlag,
  parseToolArgs,
  resolveCliModel,
  runCli,
  sharedDir,
} from "./_cli.ts";
import { ensureRandomModel, modelCacheDir } from "./_model_cache.ts";
import { SHAPES } from "./_random_model.ts";
import { stdout } from "./_stdout.ts";

/** The GGUF type llama.cpp converts each weight dtype to (it has no planar bf16 here). */
const GGUF_TYPE: Record<WeightDType, string | undefined> = {
  f32: "F32",
  f16: "F16",
  bf16: undefined,
  q8_0: "Q8_0",
  q4_0: "Q4_0",
};

const HELP = `Usage: deno task bench [options]

Prefill and decode tok/s of the engine (prompt P tokens, then N decoded, greedy, EOS ignored), optionally
side by side with llama.cpp through the anchor kit (../shared/anchor).

  --model M        "story" (the story model), a shape (${Object.keys(SHAPES).join(", ")}: a random-weight
                   model made on first use in the cache), or a model folder. Repeatable or a comma list.
                   Default: story,stories15m,minueza-32m-shape
  --backend B      ${backendNames().join(", ")} (default ts); repeatable or a comma list
  --dtype T        weight dtype to convert to at load: ${WEIGHT_DTYPES.join(", ")} (default: as stored, f32 here);
                   repeatable or a comma list
  --prompt P       prompt tokens (default 128)
  --gen N          decoded tokens after the first (default 128)
  --parallel LIST  generations decoding at once, a comma list giving one row each (default 1); each
                   has the prompt and decodes --gen tokens, and the rows show aggregate tok/s
  --threads N      backend threads (default: the backend's choice)
  --reps R         timed reps after one warm-up; medians are shown (default 3)
  --json           one JSON object per row on stdout instead of the table
  --llamacpp DIR   an installed copy of the anchor kit (cp -r ../shared/anchor DIR && cd DIR && npm ci):
                   converts each model to GGUF of the same type, runs its bench with 1 and 2 threads,
                   and shows llama.cpp's best prefill and decode and our ratios to them
  --llama-batched-bench PATH
                   llama.cpp's llama-batched-bench binary (e.g. /tmp/llama.cpp/build/bin/llama-batched-bench):
                   runs it on the same GGUF (converted with --llamacpp's kit, else ../shared/anchor's gguf.mjs)
                   with -npp P -ntg N -npl LIST per thread count, and shows its aggregate decode (S_TG) per row
  --llama-threads  thread counts for llama.cpp (default 1,2)
  --kv f32|f16     KV cache dtype, of this engine and of llama.cpp alike (default f32)
  --help           show this help
  --version        show the version`;

/** One benchmark result row. */
export interface BenchRow {
  /** The `--model` entry's label: "story", a shape name, or a folder's name. */
  model: string;
  /** The model folder. */
  dir: string;
  /** The backend's name. */
  backend: string;
  /** `--dtype`, or "stored". */
  dtype: string;
  /** The KV cache dtype (`--kv`). */
  kvDtype: string;
  /** Dtype of each tensor group, e.g. "embeddings q8_0, attention f16, ffn f16, norms f32". */
  groups: string;
  /** Prompt tokens per rep and generation (`--prompt`). */
  promptTokens: number;
  /** Decoded tokens per rep and generation after the first (`--gen`). */
  genTokens: number;
  /** Generations decoding at once (one of `--parallel`). */
  parallel: number;
  /** `--threads`, or null for the backend's choice. */
  threads: number | null;
  /** Median prefill tokens per second, all generations' prompt tokens together. */
  prefillTokS: number;
  /** Median decode tokens per second, all generations' tokens together. */
  decodeTokS: number;
  /** Median decode tokens per second of one generation (each generation's rate, averaged). */
  perSequenceDecodeTokS: number;
  /** Milliseconds per decoded token of one generation, at the median per-sequence speed. */
  msPerToken: number;
  /** Every rep's prefill tokens per second. */
  prefillAll: number[];
  /** Every rep's aggregate decode tokens per second. */
  decodeAll: number[];
  /** Resident weight bytes (`model.weightBytes`). */
  weightBytes: number;
  /** Weight bytes read per decode step (an untied embedding table is only indexed). */
  bytesPerToken: number;
  /** The measured read bandwidth at the row's thread count, in GB/s (with FFI only). */
  bandwidthGBs?: number;
  /**
   * The aggregate decode tokens per second that bandwidth allows: a step reads the weights once for
   * all its generations' tokens, so `parallel` × bandwidth / bytes per step (KV reads not counted).
   */
  decodeCeiling?: number;
  /** The decode speed as a fraction of {@link BenchRow.decodeCeiling}. */
  ceilingFraction?: number;
  /** The weights read per step fit in the last-level cache: the ceiling does not bind. */
  fitsInCache?: boolean;
  /** llama.cpp on the same weights through the anchor kit (with `--llamacpp`; one sequence, so parallel 1 rows). */
  llama?: LlamaResult;
  /** Our prefill speed over llama.cpp's best. */
  prefillRatio?: number;
  /** Our decode speed over llama.cpp's best. */
  decodeRatio?: number;
  /** llama-batched-bench at this row's parallel count (with `--llama-batched-bench`). */
  llamaBatched?: LlamaBatchedResult;
  /** Our aggregate decode speed over llama-batched-bench's best. */
  batchedDecodeRatio?: number;
}

/** llama.cpp's speeds on one model through the anchor kit, best over the thread counts tried. */
export interface LlamaResult {
  /** The GGUF file the kit converted the model to. */
  gguf: string;
  /** Its GGUF weight type ("F32", "Q8_0", …). */
  type: string;
  /** Its KV cache type ("F32" or "F16"). */
  kv: string;
  /** The best prefill tokens per second. */
  prefillTokS: number;
  /** The thread count of the best prefill. */
  prefillThreads: number;
  /** The best decode tokens per second. */
  decodeTokS: number;
  /** The thread count of the best decode. */
  decodeThreads: number;
  /** Prefill and decode tokens per second by thread count. */
  byThreads: Record<string, { prefill: number; decode: number }>;
}

/** llama-batched-bench's speeds at one parallel count (`-npl`), best over the thread counts tried. */
export interface LlamaBatchedResult {
  /** The GGUF file it ran. */
  gguf: string;
  /** Its GGUF weight type ("F32", "Q8_0", …). */
  type: string;
  /** Its KV cache type ("F32" or "F16"). */
  kv: string;
  /** Sequences decoding at once (`B` in its table, `pl` in its JSON lines). */
  parallel: number;
  /** The best aggregate prefill tokens per second (`S_PP t/s`). */
  prefillTokS: number;
  /** The thread count of the best prefill. */
  prefillThreads: number;
  /** The best aggregate decode tokens per second (`S_TG t/s`). */
  decodeTokS: number;
  /** The thread count of the best decode. */
  decodeThreads: number;
  /** Aggregate prefill and decode tokens per second by thread count. */
  byThreads: Record<string, { prefill: number; decode: number }>;
}

/** The anchor kit's prompt: `s = 12345`, `s = s * 1103515245 + 12345 mod 2^32`, id = 3 + s mod min(V - 3, 2000). */
export function kitPrompt(length: number, vocabSize: number): number[] {
  let s = 12345;
  const span = Math.min(vocabSize - 3, 2000);
  return Array.from({ length }, () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return 3 + (s % span);
  });
}

function median(a: readonly number[]): number {
  const s = [...a].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Every timed rep's aggregate prefill and decode and per-sequence decode tokens per second. */
export interface Timings {
  /** Aggregate prefill tokens per second, per rep. */
  prefill: number[];
  /** Aggregate decode tokens per second, per rep. */
  decode: number[];
  /** Per-sequence decode tokens per second (averaged over the generations), per rep. */
  perSequence: number[];
}

/**
 * Times `reps` runs (after one warm-up) of `parallel` generations started together, each of
 * `promptTokens` prompt tokens and `genTokens` decoded after the first (see the module's doc).
 */
export async function timeModel(
  model: Model,
  promptTokens: number,
  genTokens: number,
  reps: number,
  parallel = 1,
): Promise<Timings> {
  const prompt = kitPrompt(promptTokens, model.config.vocabSize);
  const out: Timings = { prefill: [], decode: [], perSequence: [] };
  for (let r = -1; r < reps; r++) {
    const t0 = performance.now();
    const runs = await Promise.all(Array.from({ length: parallel }, () => timeGeneration(model, prompt, genTokens)));
    if (r < 0) continue;
    // The prefill phase ends when the last generation has its first token; the decode phase with the last token.
    const prefillEnd = Math.max(...runs.map((g) => g.first));
    const end = Math.max(...runs.map((g) => g.last));
    out.prefill.push((parallel * promptTokens) / ((prefillEnd - t0) / 1000));
    // The first token's arrival includes its own evaluation (the first decode step): genTokens - 1 follow it.
    out.decode.push((parallel * (genTokens - 1)) / ((end - prefillEnd) / 1000));
    out.perSequence.push(runs.reduce((a, g) => a + (genTokens - 1) / ((g.last - g.first) / 1000), 0) / parallel);
  }
  return out;
}

/**
 * One greedy generation of `genTokens` + 1 tokens (the first, then `genTokens` evaluated one at a
 * time, the last of them sampled only): when its first and last tokens arrived.
 */
async function timeGeneration(
  model: Model,
  prompt: readonly number[],
  genTokens: number,
): Promise<{ first: number; last: number }> {
  let first = 0;
  let count = 0;
  for await (const _ of model.generateTokens(prompt, { maxTokens: genTokens + 1, temperature: 0, ignoreEos: true })) {
    if (count++ === 0) first = performance.now();
  }
  const last = performance.now();
  if (count !== genTokens + 1) throw new Error(`Generated ${count} tokens, expected ${genTokens + 1}`);
  return { first, last };
}

function groupOf(name: string): string {
  if (name.includes("embed_tokens")) return "embeddings";
  if (name.includes("lm_head")) return "output";
  if (name.includes("norm")) return "norms";
  if (name.includes("self_attn")) return "attention";
  if (name.includes("mlp")) return "ffn";
  return "other";
}

/** Dtypes of each tensor group and the bytes read per decoded token, from the model's graph. */
export function weightSummary(model: Model): { groups: string; bytesPerToken: number } {
  const graph = model.graph();
  const groups = new Map<string, Set<DType>>();
  let bytes = 0;
  for (const t of graph.tensors) {
    if (t.kind !== "weight") continue;
    const g = groupOf(t.name);
    if (!groups.has(g)) groups.set(g, new Set());
    groups.get(g)!.add(t.dtype);
    const shape = t.shape as number[];
    const count = elementCount(shape);
    const size = byteSize(t.dtype, count, shape[shape.length - 1]);
    // An untied embedding table is only indexed (one row per token); a tied one is read whole as the output head.
    const indexedOnly = g === "embeddings" && !model.config.tieWordEmbeddings;
    bytes += indexedOnly ? size / shape[0] : size;
  }
  const order = ["embeddings", "attention", "ffn", "norms", "output", "other"];
  const text = order.filter((g) => groups.has(g)).map((g) => `${g} ${[...groups.get(g)!].join("/")}`).join(", ");
  return { groups: text, bytesPerToken: bytes };
}

/**
 * The last-level cache in bytes from Linux sysfs, or undefined. Deno wants --allow-all to read /sys,
 * so without it the file is read with `cat` where --allow-run permits.
 */
function lastLevelCache(): number | undefined {
  for (const index of [3, 2]) {
    const path = `/sys/devices/system/cpu/cpu0/cache/index${index}/size`;
    let text: string | undefined;
    try {
      text = Deno.readTextFileSync(path);
    } catch {
      try {
        if (Deno.permissions.querySync({ name: "run", command: "cat" }).state === "granted") {
          const out = new Deno.Command("cat", { args: [path], stdout: "piped", stderr: "null" }).outputSync();
          if (out.success) text = new TextDecoder().decode(out.stdout);
        }
      } catch {
        // no cat, or not Linux
      }
    }
    const m = /^(\d+)K$/.exec(text?.trim() ?? "");
    if (m) return Number(m[1]) * 1024;
  }
  return undefined;
}

/** The machine's read bandwidth in GB/s from the native backend, when FFI is granted. */
async function readBandwidth(threads: number): Promise<number | undefined> {
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return undefined;
  try {
    const { measureReadBandwidth } = await import("../backends/native/mod.ts"); // loaded only with FFI
    const gbs = await measureReadBandwidth({ threads });
    return gbs > 0 ? gbs : undefined;
  } catch (e) {
    console.error(`bench: cannot measure the read bandwidth: ${(e as Error).message}`);
    return undefined;
  }
}

async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  let out;
  try {
    out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable) {
      throw new CliError(`Cannot run "${cmd}": run access is not granted (run with --allow-run=${cmd})`, 1);
    }
    throw new CliError(`Cannot run "${cmd}": ${(e as Error).message}`, 1);
  }
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").slice(-3).join(" ");
    throw new CliError(`"${cmd} ${args.join(" ")}" failed (exit ${out.code}): ${err}`, 1);
  }
  return text;
}

async function newerThan(a: string, b: string): Promise<boolean> {
  try {
    return ((await Deno.stat(a)).mtime?.getTime() ?? 0) >= ((await Deno.stat(b)).mtime?.getTime() ?? Infinity);
  } catch {
    return false;
  }
}

/** `dir` as a GGUF of `type`, converted with the kit's `gguf.mjs` into the cache (once, until the weights change). */
async function ensureGguf(kit: string, label: string, dir: string, type: string): Promise<string> {
  const ggufDir = `${modelCacheDir()}/gguf`;
  await Deno.mkdir(ggufDir, { recursive: true });
  const gguf = `${ggufDir}/${label.replace(/[^\w.-]+/g, "_")}-${type}.gguf`;
  const weights = (await Array.fromAsync(Deno.readDir(dir))).find((e) => e.name.endsWith(".safetensors"));
  if (!weights || !(await newerThan(gguf, `${dir}/${weights.name}`))) {
    // Converted beside the target and renamed over it, so a conversion cut short is never taken for a whole file.
    const partial = `${ggufDir}/.${gguf.slice(ggufDir.length + 1, -".gguf".length)}.${Deno.pid}.partial.gguf`;
    try {
      await run("node", [`${kit}/gguf.mjs`, dir, partial, "--type", type], kit);
      await Deno.rename(partial, gguf);
    } finally {
      await Deno.remove(partial).catch(() => {});
    }
  }
  return gguf;
}

/** The best (largest) of `byThreads` by `key`, with its thread count. */
function best(byThreads: Record<string, { prefill: number; decode: number }>, key: "prefill" | "decode") {
  const [threads, speeds] = Object.entries(byThreads).reduce((a, b) => (b[1][key] > a[1][key] ? b : a));
  return { tokS: speeds[key], threads: Number(threads) };
}

/** Runs the kit's bench on `gguf` with each thread count. */
async function benchLlama(
  kit: string,
  gguf: string,
  type: string,
  o: { prompt: number; gen: number; reps: number; threads: number[]; kv: string },
): Promise<LlamaResult> {
  const byThreads: LlamaResult["byThreads"] = {};
  for (const t of o.threads) {
    const args = [`${kit}/llamacpp.mjs`, "bench", gguf, "--prompt", String(o.prompt), "--gen", String(o.gen)];
    args.push("--reps", String(o.reps), "--threads", String(t), "--kv", o.kv, "--json");
    const line = (await run("node", args, kit)).trim().split("\n").pop()!;
    const r = JSON.parse(line);
    byThreads[t] = { prefill: r.prefill_tok_s.median, decode: r.decode_tok_s.median };
  }
  const p = best(byThreads, "prefill");
  const d = best(byThreads, "decode");
  return {
    gguf,
    type,
    kv: o.kv,
    prefillTokS: p.tokS,
    prefillThreads: p.threads,
    decodeTokS: d.tokS,
    decodeThreads: d.threads,
    byThreads,
  };
}

/** One result line of `llama-batched-bench --output-format jsonl`, the fields read from it. */
export interface BatchedLine {
  /** Sequences (`-npl`). */
  pl: number;
  /** Aggregate prompt tokens per second. */
  speed_pp: number;
  /** Aggregate generated tokens per second. */
  speed_tg: number;
}

/** The result lines of llama-batched-bench's JSON-lines output (it prints nothing else on stdout). */
export function parseBatchedBench(stdout: string): BatchedLine[] {
  const rows: BatchedLine[] = [];
  for (const line of stdout.split("\n")) {
    if (!line.trim().startsWith("{")) continue;
    const r = JSON.parse(line);
    if (![r.pl, r.speed_pp, r.speed_tg].every((v) => typeof v === "number" && Number.isFinite(v))) {
      throw new CliError(`Unexpected llama-batched-bench line (no numeric pl, speed_pp, speed_tg): ${line}`, 1);
    }
    rows.push({ pl: r.pl, speed_pp: r.speed_pp, speed_tg: r.speed_tg });
  }
  return rows;
}

/**
 * Runs llama-batched-bench on `gguf` for every parallel count at once (`-npl`), once per thread count,
 * with a context that holds every sequence; gives its speeds per parallel count.
 */
async function benchLlamaBatched(
  binary: string,
  gguf: string,
  type: string,
  o: { prompt: number; gen: number; parallel: number[]; threads: number[]; kv: string },
): Promise<Map<number, LlamaBatchedResult>> {
  const context = Math.max(...o.parallel) * (o.prompt + o.gen + 1);
  const byParallel = new Map<number, LlamaBatchedResult["byThreads"]>();
  for (const t of o.threads) {
    const args = ["-m", gguf, "-c", String(context), "-npp", String(o.prompt), "-ntg", String(o.gen)];
    args.push("-npl", o.parallel.join(","), "-t", String(t), "-ctk", o.kv.toLowerCase(), "-ctv", o.kv.toLowerCase());
    args.push("--output-format", "jsonl");
    for (const r of parseBatchedBench(await run(binary, args))) {
      if (!byParallel.has(r.pl)) byParallel.set(r.pl, {});
      byParallel.get(r.pl)![t] = { prefill: r.speed_pp, decode: r.speed_tg };
    }
  }
  const out = new Map<number, LlamaBatchedResult>();
  for (const parallel of o.parallel) {
    const byThreads = byParallel.get(parallel);
    if (!byThreads) throw new CliError(`llama-batched-bench gave no result for ${parallel} sequences`, 1);
    const p = best(byThreads, "prefill");
    const d = best(byThreads, "decode");
    out.set(parallel, {
      gguf,
      type,
      kv: o.kv,
      parallel,
      prefillTokS: p.tokS,
      prefillThreads: p.threads,
      decodeTokS: d.tokS,
      decodeThreads: d.threads,
      byThreads,
    });
  }
  return out;
}

function list(values: string[] | undefined, fallback: string[]): string[] {
  const out = (values ?? []).flatMap((v) => v.split(",")).map((v) => v.trim()).filter((v) => v !== "");
  return out.length ? out : fallback;
}

/** The folder and label of a `--model` entry. */
async function modelFolder(spec: string): Promise<{ label: string; dir: string; dtype?: "f32" }> {
  if (spec === "story") return { label: "story", dir: await resolveCliModel(DEFAULT_MODEL_ID) };
  if (Object.hasOwn(SHAPES, spec)) {
    return { label: spec, dir: await ensureRandomModel(spec, { dtype: "f32", seed: 1 }) };
  }
  try {
    if ((await Deno.stat(spec)).isDirectory) return { label: spec.replace(/\/+$/, "").split("/").pop()!, dir: spec };
  } catch {
    // not a folder: try it as a model source below
  }
  return { label: spec, dir: await resolveCliModel(spec) };
}

function fmt(n: number | undefined, digits = 1): string {
  return n === undefined || !Number.isFinite(n) ? "" : n.toFixed(digits);
}

/** The settings of a run, from the flags. */
interface BenchSettings {
  models: string[];
  backends: string[];
  dtypes: ("stored" | WeightDType)[];
  prompt: number;
  gen: number;
  parallel: number[];
  threads: number | undefined;
  reps: number;
  json: boolean;
  llamaThreads: number[];
  kvDtype: "f32" | "f16";
  /** The anchor kit (`--llamacpp`). */
  kit: string | undefined;
  /** The llama-batched-bench binary (`--llama-batched-bench`). */
  batched: string | undefined;
  /** The kit whose gguf.mjs converts for llama-batched-bench: `--llamacpp`'s, else the shared one. */
  converter: string | undefined;
}

/** The kit in the shared folder beside the repository (its gguf.mjs needs no npm packages). */
function sharedKit(): string | undefined {
  const shared = sharedDir();
  return shared === undefined ? undefined : `${shared}/anchor`;
}

async function settings(): Promise<BenchSettings | undefined> {
  const args = parseToolArgs("bench", HELP, {
    model: { type: "string", multiple: true },
    backend: { type: "string", multiple: true },
    dtype: { type: "string", multiple: true },
    prompt: { type: "string" },
    gen: { type: "string" },
    parallel: { type: "string", multiple: true },
    threads: { type: "string" },
    reps: { type: "string" },
    json: { type: "boolean" },
    llamacpp: { type: "string" },
    "llama-batched-bench": { type: "string" },
    "llama-threads": { type: "string" },
    kv: { type: "string" },
  });
  if (!args) return undefined;
  const { values } = args;
  const kit = values.llamacpp?.replace(/\/+$/, "");
  if (kit) {
    try {
      await Deno.stat(`${kit}/llamacpp.mjs`);
      await Deno.stat(`${kit}/node_modules/node-llama-cpp`);
    } catch {
      throw new CliError(
        `Invalid --llamacpp "${kit}": expected an installed anchor kit (llamacpp.mjs and node_modules; run npm ci there)`,
      );
    }
  }
  const batched = values["llama-batched-bench"];
  const converter = kit ?? sharedKit();
  if (batched !== undefined) {
    try {
      if (!(await Deno.stat(batched)).isFile) throw new Error("not a file");
    } catch {
      throw new CliError(`Invalid --llama-batched-bench "${batched}": expected the llama-batched-bench binary`);
    }
    // Asked before the engine's rows run, which take minutes.
    if (Deno.permissions.querySync({ name: "run", command: batched }).state !== "granted") {
      throw new CliError(
        `Cannot run --llama-batched-bench "${batched}": run access is not granted (run with --allow-run=${batched})`,
        1,
      );
    }
    try {
      await Deno.stat(`${converter}/gguf.mjs`);
    } catch {
      throw new CliError(
        `Cannot convert models for --llama-batched-bench: no gguf.mjs in "${converter}" (give the kit with --llamacpp DIR)`,
      );
    }
  }
  return {
    models: list(values.model, ["story", "stories15m", "minueza-32m-shape"]),
    backends: list(values.backend, ["ts"]).map((b) => choiceFlag("backend", b, backendNames())!),
    dtypes: list(values.dtype, ["stored"]).map((d) =>
      d === "stored" ? "stored" : choiceFlag("dtype", d, WEIGHT_DTYPES)!
    ),
    prompt: numberFlag("prompt", values.prompt, { integer: true, min: 1, max: 4096 }) ?? 128,
    // The decode rate is measured over the tokens after the first: there must be one.
    gen: numberFlag("gen", values.gen, { integer: true, min: 2, max: 4096 }) ?? 128,
    parallel: [
      ...new Set(
        list(values.parallel, ["1"]).map((p) => numberFlag("parallel", p, { integer: true, min: 1, max: 256 })!),
      ),
    ],
    threads: numberFlag("threads", values.threads, { integer: true, min: 1, max: 1024 }),
    reps: numberFlag("reps", values.reps, { integer: true, min: 1, max: 1000 }) ?? 3,
    json: values.json ?? false,
    llamaThreads: list(values["llama-threads"] ? [values["llama-threads"]] : undefined, ["1", "2"]).map((t) =>
      numberFlag("llama-threads", t, { integer: true, min: 1, max: 1024 })!
    ),
    kvDtype: choiceFlag("kv", values.kv?.toLowerCase(), KV_DTYPES) ?? "f32",
    kit,
    batched,
    converter,
  };
}

/** The largest step the bench's model is planned for: every prompt in one step, up to 2048 tokens (llama.cpp's -b). */
function prefillChunk(o: BenchSettings): number {
  return Math.max(64, Math.min(2048, o.prompt * Math.max(...o.parallel)));
}

/** llama.cpp's results for a model, computed once per GGUF type and shared by its rows. */
interface LlamaResults {
  kit?: LlamaResult;
  batched?: Map<number, LlamaBatchedResult>;
}

async function main(): Promise<void> {
  const o = await settings();
  if (!o) return;
  const { prompt, gen, threads, reps, kvDtype } = o;
  const kv = kvDtype.toUpperCase();
  const machine =
    `${navigator.hardwareConcurrency} CPUs, Deno ${Deno.version.deno}, ${Deno.build.os}-${Deno.build.arch}`;
  // The ceiling of a row uses the bandwidth at its thread count: 1 for the single-threaded ts backend,
  // else --threads, else 2 (the most these machines have).
  const rowThreads = (backend: string) => backend === "ts" ? 1 : threads ?? Math.min(2, navigator.hardwareConcurrency);
  const bandwidth = new Map<number, number>();
  const llc = lastLevelCache();
  for (const t of new Set(o.backends.map(rowThreads))) {
    const gbs = await readBandwidth(t);
    if (gbs) bandwidth.set(t, gbs);
  }
  if (!o.json) {
    stdout.line(
      `# bench: prompt ${prompt} tokens, ${gen} decoded, greedy, ${kvDtype} KV cache, ${
        o.parallel.join("/")
      } generations at once, median of ${reps} reps; ${machine}`,
    );
    stdout.line(
      bandwidth.size
        ? `# memory read bandwidth (native backend): ${
          [...bandwidth].map(([t, g]) => `${g.toFixed(1)} GB/s with ${t} thread${t > 1 ? "s" : ""}`).join(", ")
        }`
        : "# memory read bandwidth: not measured (needs the native backend's measureReadBandwidth)",
    );
  }

  const header = [
    "model",
    "backend",
    "dtype",
    "tensor dtypes",
    "prompt",
    "parallel",
    "prefill tok/s",
    "decode tok/s",
    "per-seq decode tok/s",
    "ms/token",
    "weight bytes",
  ];
  if (bandwidth.size) header.push("decode ceiling", "of ceiling");
  if (o.kit) {
    header.push("llama.cpp prefill (thr)", "llama.cpp decode (thr)", "prefill ours/llama", "decode ours/llama");
  }
  if (o.batched) header.push("llama-batched-bench decode (thr)", "decode ours/batched");
  if (!o.json) {
    stdout.line(`| ${header.join(" | ")} |`);
    stdout.line(`|${header.map(() => "---").join("|")}|`);
  }

  let failures = 0;
  for (const spec of o.models) {
    let folder;
    try {
      folder = await modelFolder(spec);
    } catch (e) {
      throw e instanceof CliError ? e : loadError(spec, e);
    }
    for (const dtype of o.dtypes) {
      const llamaCache = new Map<string, LlamaResults>();
      for (const backend of o.backends) {
        let model: Model;
        try {
          const maxPositions = Number(
            JSON.parse(await Deno.readTextFile(`${folder.dir}/config.json`)).max_position_embeddings ?? 4096,
          );
          if (prompt + gen > maxPositions) {
            throw new CliError(
              `Invalid --prompt ${prompt} with --gen ${gen}: "${spec}" holds at most ${maxPositions} positions`,
            );
          }
          const contextLength = Math.min(prompt + gen + 16, maxPositions);
          model = await loadModel(folder.dir, {
            backend,
            threads,
            dtype: dtype === "stored" ? undefined : dtype,
            kvDtype,
            prefillChunk: prefillChunk(o),
            contextLength,
            kvCacheTokens: Math.max(...o.parallel) * contextLength,
          });
        } catch (e) {
          if (e instanceof CliError) throw e;
          // One backend failing (no library, no adapter, unsupported dtype) does not stop the other rows.
          console.error(`bench: ${folder.label} on ${backend} (${dtype}): ${(e as Error).message}`);
          failures++;
          continue;
        }
        const rows: BenchRow[] = [];
        try {
          const { groups, bytesPerToken } = weightSummary(model);
          for (const parallel of o.parallel) {
            const t = await timeModel(model, prompt, gen, reps, parallel);
            const decode = median(t.decode);
            const perSequence = median(t.perSequence);
            const row: BenchRow = {
              model: folder.label,
              dir: folder.dir,
              backend,
              dtype,
              kvDtype,
              groups,
              promptTokens: prompt,
              genTokens: gen,
              parallel,
              threads: threads ?? null,
              prefillTokS: median(t.prefill),
              decodeTokS: decode,
              perSequenceDecodeTokS: perSequence,
              msPerToken: 1000 / perSequence,
              prefillAll: t.prefill.map((x) => +x.toFixed(2)),
              decodeAll: t.decode.map((x) => +x.toFixed(2)),
              weightBytes: model.weightBytes,
              bytesPerToken,
            };
            const gbs = bandwidth.get(rowThreads(backend));
            if (gbs) {
              row.fitsInCache = llc !== undefined && bytesPerToken <= llc;
              row.bandwidthGBs = gbs;
              row.decodeCeiling = (parallel * gbs * 1e9) / bytesPerToken;
              row.ceilingFraction = decode / row.decodeCeiling;
            }
            rows.push(row);
          }
        } finally {
          await model.dispose();
        }
        if (o.kit || o.batched) {
          const stored = JSON.parse(await Deno.readTextFile(`${folder.dir}/config.json`)).torch_dtype;
          const asStored = stored === "float16" ? "f16" : "f32";
          const type = GGUF_TYPE[dtype === "stored" ? asStored : dtype];
          if (type) {
            if (!llamaCache.has(type)) {
              const results: LlamaResults = {};
              llamaCache.set(type, results);
              try {
                const gguf = await ensureGguf((o.kit ?? o.converter)!, folder.label, folder.dir, type);
                const common = { prompt, gen, threads: o.llamaThreads, kv };
                if (o.kit) results.kit = await benchLlama(o.kit, gguf, type, { ...common, reps });
                if (o.batched) {
                  results.batched = await benchLlamaBatched(o.batched, gguf, type, { ...common, parallel: o.parallel });
                }
              } catch (e) {
                console.error(`bench: llama.cpp on ${folder.label} (${type}): ${(e as Error).message}`);
                failures++;
              }
            }
            const results = llamaCache.get(type)!;
            for (const row of rows) addLlama(row, results);
          }
        }
        for (const row of rows) stdout.line(o.json ? JSON.stringify(row) : tableLine(row, o, bandwidth.size > 0, llc));
      }
    }
  }
  if (failures) throw new CliError(`${failures} row${failures > 1 ? "s" : ""} failed (see above)`, 1);
}

/** Puts llama.cpp's results beside a row: the kit's single-sequence bench on parallel 1 rows, llama-batched-bench on each. */
function addLlama(row: BenchRow, results: LlamaResults): void {
  if (results.kit && row.parallel === 1) {
    row.llama = results.kit;
    row.prefillRatio = row.prefillTokS / results.kit.prefillTokS;
    row.decodeRatio = row.decodeTokS / results.kit.decodeTokS;
  }
  const batched = results.batched?.get(row.parallel);
  if (batched) {
    row.llamaBatched = batched;
    row.batchedDecodeRatio = row.decodeTokS / batched.decodeTokS;
  }
}

/** A row of the table. */
function tableLine(row: BenchRow, o: BenchSettings, withCeiling: boolean, llc: number | undefined): string {
  const cells = [
    row.model,
    row.backend + (o.threads ? ` (${o.threads} thr)` : ""),
    row.dtype,
    row.groups,
    String(row.promptTokens),
    String(row.parallel),
    fmt(row.prefillTokS),
    fmt(row.decodeTokS),
    fmt(row.perSequenceDecodeTokS),
    fmt(row.msPerToken, 3),
    `${row.weightBytes} (${formatBytes(row.weightBytes)})`,
  ];
  if (withCeiling) {
    const cached = llc !== undefined && row.bytesPerToken <= llc ? " (fits in cache)" : "";
    cells.push(fmt(row.decodeCeiling, 0) + cached, `${fmt((row.ceilingFraction ?? NaN) * 100, 0)}%`);
  }
  if (o.kit) {
    const l = row.llama;
    cells.push(
      l ? `${fmt(l.prefillTokS)} (${l.prefillThreads})` : "n/a",
      l ? `${fmt(l.decodeTokS)} (${l.decodeThreads})` : "n/a",
      fmt(row.prefillRatio, 2),
      fmt(row.decodeRatio, 2),
    );
  }
  if (o.batched) {
    const b = row.llamaBatched;
    cells.push(b ? `${fmt(b.decodeTokS)} (${b.decodeThreads})` : "n/a", fmt(row.batchedDecodeRatio, 2));
  }
  return `| ${cells.join(" | ")} |`;
}

if (import.meta.main) await runCli("bench", main);
