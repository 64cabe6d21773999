/**
 * `deno task bench`: prefill and decode speed of the engine, optionally side by side with llama.cpp
 * (through the anchor kit) on the very same weights. Run with `--help` for the options.
 *
 * Measured as the anchor kit measures llama.cpp: each rep starts from an empty sequence; prefill is
 * the P prompt tokens evaluated plus the first token picked (greedy), prefill tok/s = P / that time;
 * decode is the N following single-token steps, decode tok/s = N / that time. The prompt is the kit's
 * pseudo-random id list, so both engines do the same work. One warm-up rep, then the median of the reps.
 *
 * @module
 */

import {
  argmax,
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
  --threads N      backend threads (default: the backend's choice)
  --reps R         timed reps after one warm-up; medians are shown (default 3)
  --json           one JSON object per row on stdout instead of the table
  --llamacpp DIR   an installed copy of the anchor kit (cp -r ../shared/anchor DIR && cd DIR && npm ci):
                   converts each model to GGUF of the same type, runs its bench with 1 and 2 threads,
                   and shows llama.cpp's best prefill and decode and our ratios to them
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
  /** Prompt tokens per rep (`--prompt`). */
  promptTokens: number;
  /** Decoded tokens per rep after the first (`--gen`). */
  genTokens: number;
  /** `--threads`, or null for the backend's choice. */
  threads: number | null;
  /** Median prefill tokens per second. */
  prefillTokS: number;
  /** Median decode tokens per second. */
  decodeTokS: number;
  /** Milliseconds per decoded token at the median decode speed. */
  msPerToken: number;
  /** Every rep's prefill tokens per second. */
  prefillAll: number[];
  /** Every rep's decode tokens per second. */
  decodeAll: number[];
  /** Resident weight bytes (`model.weightBytes`). */
  weightBytes: number;
  /** Weight bytes read per decoded token (an untied embedding table is only indexed). */
  bytesPerToken: number;
  /** The measured read bandwidth at the row's thread count, in GB/s (with FFI only). */
  bandwidthGBs?: number;
  /** The decode tokens per second that bandwidth allows: bandwidth / bytes per token. */
  decodeCeiling?: number;
  /** The decode speed as a fraction of {@link BenchRow.decodeCeiling}. */
  ceilingFraction?: number;
  /** The weights read per token fit in the last-level cache: the ceiling does not bind. */
  fitsInCache?: boolean;
  /** llama.cpp on the same weights (with `--llamacpp`). */
  llama?: LlamaResult;
  /** Our prefill speed over llama.cpp's best. */
  prefillRatio?: number;
  /** Our decode speed over llama.cpp's best. */
  decodeRatio?: number;
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

/** Times `reps` runs (after one warm-up) of prefill + decode as the anchor kit does. */
export async function timeModel(
  model: Model,
  promptTokens: number,
  genTokens: number,
  reps: number,
): Promise<{ prefill: number[]; decode: number[] }> {
  const V = model.config.vocabSize;
  const prompt = kitPrompt(promptTokens, V);
  const prefill: number[] = [];
  const decode: number[] = [];
  for (let r = -1; r < reps; r++) {
    const seq = model.createSequence();
    try {
      const t0 = performance.now();
      let id = argmax(await seq.evaluate(prompt), V);
      const t1 = performance.now();
      for (let i = 0; i < genTokens; i++) id = argmax(await seq.evaluate([id]), V);
      const t2 = performance.now();
      if (r >= 0) {
        prefill.push(promptTokens / ((t1 - t0) / 1000));
        decode.push(genTokens / ((t2 - t1) / 1000));
      }
    } finally {
      await seq.dispose();
    }
  }
  return { prefill, decode };
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
  const graph = model.graph("last");
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

async function run(cmd: string, args: string[], cwd: string): Promise<string> {
  let out;
  try {
    out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  } catch (e) {
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

/** Converts `dir` to GGUF with the kit (cached) and runs its bench with each thread count. */
async function benchLlama(
  kit: string,
  label: string,
  dir: string,
  type: string,
  o: { prompt: number; gen: number; reps: number; threads: number[]; kv: string },
): Promise<LlamaResult> {
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
  const byThreads: LlamaResult["byThreads"] = {};
  for (const t of o.threads) {
    const args = [`${kit}/llamacpp.mjs`, "bench", gguf, "--prompt", String(o.prompt), "--gen", String(o.gen)];
    args.push("--reps", String(o.reps), "--threads", String(t), "--kv", o.kv, "--json");
    const line = (await run("node", args, kit)).trim().split("\n").pop()!;
    const r = JSON.parse(line);
    byThreads[t] = { prefill: r.prefill_tok_s.median, decode: r.decode_tok_s.median };
  }
  const entries = Object.entries(byThreads);
  const bestP = entries.reduce((a, b) => (b[1].prefill > a[1].prefill ? b : a));
  const bestD = entries.reduce((a, b) => (b[1].decode > a[1].decode ? b : a));
  return {
    gguf,
    type,
    kv: o.kv,
    prefillTokS: bestP[1].prefill,
    prefillThreads: Number(bestP[0]),
    decodeTokS: bestD[1].decode,
    decodeThreads: Number(bestD[0]),
    byThreads,
  };
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

async function main(): Promise<void> {
  const args = parseToolArgs("bench", HELP, {
    model: { type: "string", multiple: true },
    backend: { type: "string", multiple: true },
    dtype: { type: "string", multiple: true },
    prompt: { type: "string" },
    gen: { type: "string" },
    threads: { type: "string" },
    reps: { type: "string" },
    json: { type: "boolean" },
    llamacpp: { type: "string" },
    "llama-threads": { type: "string" },
    kv: { type: "string" },
  });
  if (!args) return;
  const { values } = args;
  const models = list(values.model, ["story", "stories15m", "minueza-32m-shape"]);
  const backends = list(values.backend, ["ts"]).map((b) => choiceFlag("backend", b, backendNames())!);
  const dtypes = list(values.dtype, ["stored"]).map((d) => d === "stored" ? d : choiceFlag("dtype", d, WEIGHT_DTYPES)!);
  const prompt = numberFlag("prompt", values.prompt, { integer: true, min: 1, max: 4096 }) ?? 128;
  const gen = numberFlag("gen", values.gen, { integer: true, min: 1, max: 4096 }) ?? 128;
  const threads = numberFlag("threads", values.threads, { integer: true, min: 1, max: 1024 });
  const reps = numberFlag("reps", values.reps, { integer: true, min: 1, max: 1000 }) ?? 3;
  const llamaThreads = list(values["llama-threads"] ? [values["llama-threads"]] : undefined, ["1", "2"]).map((t) =>
    numberFlag("llama-threads", t, { integer: true, min: 1, max: 1024 })!
  );
  const kvDtype = choiceFlag("kv", values.kv?.toLowerCase(), KV_DTYPES) ?? "f32";
  const kv = kvDtype.toUpperCase();
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

  const machine =
    `${navigator.hardwareConcurrency} CPUs, Deno ${Deno.version.deno}, ${Deno.build.os}-${Deno.build.arch}`;
  // The ceiling of a row uses the bandwidth at its thread count: 1 for the single-threaded ts backend,
  // else --threads, else 2 (the most these machines have).
  const rowThreads = (backend: string) => backend === "ts" ? 1 : threads ?? Math.min(2, navigator.hardwareConcurrency);
  const bandwidth = new Map<number, number>();
  const llc = lastLevelCache();
  for (const t of new Set(backends.map(rowThreads))) {
    const gbs = await readBandwidth(t);
    if (gbs) bandwidth.set(t, gbs);
  }
  if (!values.json) {
    stdout.line(
      `# bench: prompt ${prompt} tokens, ${gen} decoded, greedy, ${kvDtype} KV cache, median of ${reps} reps; ${machine}`,
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
    "prefill tok/s",
    "decode tok/s",
    "ms/token",
    "weight bytes",
  ];
  if (bandwidth.size) header.push("decode ceiling", "of ceiling");
  if (kit) header.push("llama.cpp prefill (thr)", "llama.cpp decode (thr)", "prefill ours/llama", "decode ours/llama");
  if (!values.json) {
    stdout.line(`| ${header.join(" | ")} |`);
    stdout.line(`|${header.map(() => "---").join("|")}|`);
  }

  let failures = 0;
  for (const spec of models) {
    let folder;
    try {
      folder = await modelFolder(spec);
    } catch (e) {
      throw e instanceof CliError ? e : loadError(spec, e);
    }
    for (const dtype of dtypes) {
      const llamaCache = new Map<string, LlamaResult>();
      for (const backend of backends) {
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
          model = await loadModel(folder.dir, {
            backend,
            threads,
            dtype: dtype === "stored" ? undefined : dtype,
            kvDtype,
            prefillChunk: Math.max(prompt, 64),
            contextLength: Math.min(prompt + gen + 16, maxPositions),
          });
        } catch (e) {
          if (e instanceof CliError) throw e;
          // One backend failing (no library, no adapter, unsupported dtype) does not stop the other rows.
          console.error(`bench: ${folder.label} on ${backend} (${dtype}): ${(e as Error).message}`);
          failures++;
          continue;
        }
        let row: BenchRow;
        try {
          const t = await timeModel(model, prompt, gen, reps);
          const { groups, bytesPerToken } = weightSummary(model);
          const decode = median(t.decode);
          row = {
            model: folder.label,
            dir: folder.dir,
            backend,
            dtype,
            kvDtype,
            groups,
            promptTokens: prompt,
            genTokens: gen,
            threads: threads ?? null,
            prefillTokS: median(t.prefill),
            decodeTokS: decode,
            msPerToken: 1000 / decode,
            prefillAll: t.prefill.map((x) => +x.toFixed(2)),
            decodeAll: t.decode.map((x) => +x.toFixed(2)),
            weightBytes: model.weightBytes,
            bytesPerToken,
          };
          const gbs = bandwidth.get(rowThreads(backend));
          if (gbs) {
            row.fitsInCache = llc !== undefined && bytesPerToken <= llc;
            row.bandwidthGBs = gbs;
            row.decodeCeiling = (gbs * 1e9) / bytesPerToken;
            row.ceilingFraction = decode / row.decodeCeiling;
          }
        } finally {
          await model.dispose();
        }
        if (kit) {
          const stored = JSON.parse(await Deno.readTextFile(`${folder.dir}/config.json`)).torch_dtype;
          const asStored = stored === "float16" ? "f16" : "f32";
          const type = GGUF_TYPE[dtype === "stored" ? asStored : dtype];
          if (type) {
            if (!llamaCache.has(type)) {
              try {
                llamaCache.set(
                  type,
                  await benchLlama(kit, folder.label, folder.dir, type, {
                    prompt,
                    gen,
                    reps,
                    threads: llamaThreads,
                    kv,
                  }),
                );
              } catch (e) {
                console.error(`bench: llama.cpp on ${folder.label} (${type}): ${(e as Error).message}`);
                failures++;
              }
            }
            row.llama = llamaCache.get(type);
            if (row.llama) {
              row.prefillRatio = row.prefillTokS / row.llama.prefillTokS;
              row.decodeRatio = row.decodeTokS / row.llama.decodeTokS;
            }
          }
        }
        if (values.json) {
          stdout.line(JSON.stringify(row));
          continue;
        }
        const cells = [
          row.model,
          row.backend + (threads ? ` (${threads} thr)` : ""),
          row.dtype,
          row.groups,
          String(row.promptTokens),
          fmt(row.prefillTokS),
          fmt(row.decodeTokS),
          fmt(row.msPerToken, 3),
          `${row.weightBytes} (${formatBytes(row.weightBytes)})`,
        ];
        if (bandwidth.size) {
          const cached = llc !== undefined && row.bytesPerToken <= llc ? " (fits in cache)" : "";
          cells.push(fmt(row.decodeCeiling, 0) + cached, `${fmt((row.ceilingFraction ?? NaN) * 100, 0)}%`);
        }
        if (kit) {
          const l = row.llama;
          cells.push(
            l ? `${fmt(l.prefillTokS)} (${l.prefillThreads})` : "n/a",
            l ? `${fmt(l.decodeTokS)} (${l.decodeThreads})` : "n/a",
            fmt(row.prefillRatio, 2),
            fmt(row.decodeRatio, 2),
          );
        }
        stdout.line(`| ${cells.join(" | ")} |`);
      }
    }
  }
  if (failures) throw new CliError(`${failures} row${failures > 1 ? "s" : ""} failed (see above)`, 1);
}

if (import.meta.main) await runCli("bench", main);
