/**
 * `deno task make-model SHAPE [--out DIR] [--dtype f32|f16] [--seed N] [--tokenizer DIR]`: writes a
 * random-weight model of a real shape as a Hugging Face folder that this engine and llama.cpp (through
 * the anchor kit) both load. SHAPE is a name (`stories15m`, `stories110m`, `tinyllama-1.1b`,
 * `minueza-32m-shape`) or a `config.json` file. The same shape, dtype and seed give the same bytes.
 *
 * Without `--out` the model goes to the cache: `$LLM_CACHE_DIR/models/<shape>-<dtype>-seed<N>`, or
 * `.cache/models/…` under the repository (ignored by git). The tokenizer comes from the minueza
 * folder, `../shared/models/minueza-32m-shape` beside the repository, unless `--tokenizer` says
 * otherwise.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type ShapeConfig, SHAPES, writeRandomModel } from "./_random_model.ts";
import { isCompleteModelDir, readEnv } from "../models/files/hub.ts";
import { choiceFlag, CliError, numberFlag, repoDir, runCli, sharedDir } from "./_cli.ts";

const HELP = `Usage: deno task make-model SHAPE [--out DIR] [--dtype f32|f16] [--seed N] [--tokenizer DIR] [--force]

Writes a random-weight model (config.json, model.safetensors, tokenizer files) and prints its folder.
  SHAPE            ${Object.keys(SHAPES).join(", ")}, or a config.json file
  --out DIR        where to write (default: the cache, $LLM_CACHE_DIR/models or .cache/models in the repository)
  --dtype TYPE     f32 (default) or f16 for the 2-D weights; norms are f32
  --seed N         seed of the weights (default 1); the same seed gives the same bytes
  --tokenizer DIR  folder to copy the tokenizer from (default ../shared/models/minueza-32m-shape)
  --force          rewrite a cached model even if it is complete (--out DIR is always written)
  --help           show this help`;

/** Options of {@link ensureRandomModel}. */
export interface EnsureOptions {
  dtype?: "f32" | "f16";
  seed?: number;
  /** Folder to write; default {@link randomModelDir}. */
  out?: string;
  /** Tokenizer folder; default {@link defaultTokenizerDir}. */
  tokenizerFrom?: string;
  /** Rewrite even when complete. */
  force?: boolean;
}

/** The folder of cached generated models: `$LLM_CACHE_DIR/models`, else `<repo>/.cache/models`. */
export function modelCacheDir(): string {
  const root = readEnv("LLM_CACHE_DIR") ?? (repoDir() ? `${repoDir()}/.cache` : undefined);
  if (!root) throw new CliError("Cannot choose a cache folder: set LLM_CACHE_DIR or pass --out DIR", 1);
  return `${root}/models`;
}

/** The cache folder of a generated model: `<cache>/<shape>-<dtype>-seed<N>`. */
export function randomModelDir(shape: string, dtype: "f32" | "f16" = "f32", seed = 1): string {
  const name = shape.replace(/^.*\//, "").replace(/\.json$/, "");
  return `${modelCacheDir()}/${name}-${dtype}-seed${seed}`;
}

/** The default tokenizer source: the minueza folder beside the repository (32002 tokens). */
export function defaultTokenizerDir(): string {
  const shared = sharedDir();
  if (!shared) throw new CliError("Cannot find the minueza tokenizer: pass --tokenizer DIR", 1);
  return `${shared}/models/minueza-32m-shape`;
}

/** The config of a shape name or a `config.json` path. */
export async function shapeConfig(shape: string): Promise<ShapeConfig> {
  if (Object.hasOwn(SHAPES, shape)) return SHAPES[shape];
  if (shape.endsWith(".json")) {
    try {
      return JSON.parse(await Deno.readTextFile(shape));
    } catch (e) {
      throw new CliError(`Cannot read shape "${shape}": ${(e as Error).message}`, 1);
    }
  }
  throw new CliError(
    `Unknown shape "${shape}": expected one of ${Object.keys(SHAPES).join(", ")}, or a config.json file`,
  );
}

/**
 * The folder of a random model of `shape`. A cached model of a named shape is reused when complete;
 * otherwise the model is written (into a temporary sibling, then renamed, so an interrupted run leaves
 * nothing half-written in place).
 */
export async function ensureRandomModel(shape: string, options: EnsureOptions = {}): Promise<string> {
  const dtype = options.dtype ?? "f32";
  const seed = options.seed ?? 1;
  const out = (options.out ?? randomModelDir(shape, dtype, seed)).replace(/\/+$/, "");
  // Reuse only a cached model of a named shape: its folder name says everything that went into it.
  const reusable = options.out === undefined && Object.hasOwn(SHAPES, shape) && !options.force;
  if (reusable && (await isCompleteModelDir(out))) return out;
  const config = await shapeConfig(shape);
  const tmp = `${out}.tmp-${Deno.pid}`;
  await Deno.mkdir(out.replace(/\/[^/]*$/, "") || "/", { recursive: true });
  try {
    await writeRandomModel(tmp, config, { dtype, seed, tokenizerFrom: options.tokenizerFrom ?? defaultTokenizerDir() });
    await Deno.remove(out, { recursive: true }).catch(() => {});
    await Deno.rename(tmp, out);
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
  return out;
}

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    strict: true,
    options: {
      out: { type: "string" },
      dtype: { type: "string" },
      seed: { type: "string" },
      tokenizer: { type: "string" },
      force: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(HELP);
    return;
  }
  if (positionals.length !== 1) throw new CliError(`Expected one SHAPE, got ${positionals.length} (see --help)`);
  const shape = positionals[0];
  await shapeConfig(shape); // fail on an unknown shape before anything else
  const dtype = choiceFlag("dtype", values.dtype, ["f32", "f16"] as const) ?? "f32";
  const seed = numberFlag("seed", values.seed, { integer: true, min: 0, max: 2 ** 31 - 1 }) ?? 1;
  const t0 = performance.now();
  const dir = await ensureRandomModel(shape, {
    dtype,
    seed,
    out: values.out,
    tokenizerFrom: values.tokenizer,
    force: values.force,
  });
  const bytes = (await Deno.stat(`${dir}/model.safetensors`)).size;
  console.error(
    `${shape} ${dtype} seed ${seed}: ${bytes} bytes of weights in ${(performance.now() - t0).toFixed(0)} ms`,
  );
  console.log(dir);
}

if (import.meta.main) await runCli("make-model", main);
