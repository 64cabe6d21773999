/**
 * Where the tools keep the random-weight models they make: the cache folder
 * (`$LLM_CACHE_DIR/models`, else `.cache/models` in the repository), one folder per shape, dtype and
 * seed, written once and reused while complete.
 *
 * @module
 */

import { isCompleteModelDir } from "../mod.ts";
import { CliError, readEnvVar, repoDir, sharedDir } from "./_cli.ts";
import { type ShapeConfig, SHAPES, writeRandomModel } from "./_random_model.ts";

/** Options of {@link ensureRandomModel}. */
export interface EnsureOptions {
  /** Stored dtype of the 2-D weights. Default `"f32"`. */
  dtype?: "f32" | "f16";
  /** Seed of the weights. Default 1. */
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
  const root = readEnvVar("LLM_CACHE_DIR") ?? (repoDir() ? `${repoDir()}/.cache` : undefined);
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
