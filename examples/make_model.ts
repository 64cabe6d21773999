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

import { choiceFlag, CliError, numberFlag, parseToolArgs, runCli } from "./_cli.ts";
import { ensureRandomModel, shapeConfig } from "./_model_cache.ts";
import { SHAPES } from "./_random_model.ts";
import { stdout } from "./_stdout.ts";

const HELP = `Usage: deno task make-model SHAPE [--out DIR] [--dtype f32|f16] [--seed N] [--tokenizer DIR] [--force]

Writes a random-weight model (config.json, model.safetensors, tokenizer files) and prints its folder.
  SHAPE            ${Object.keys(SHAPES).join(", ")}, or a config.json file
  --out DIR        where to write (default: the cache, $LLM_CACHE_DIR/models or .cache/models in the repository)
  --dtype TYPE     f32 (default) or f16 for the 2-D weights; norms are f32
  --seed N         seed of the weights (default 1); the same seed gives the same bytes
  --tokenizer DIR  folder to copy the tokenizer from (default ../shared/models/minueza-32m-shape)
  --force          rewrite a cached model even if it is complete (--out DIR is always written)
  --help           show this help
  --version        show the version`;

async function main(): Promise<void> {
  const args = parseToolArgs("make-model", HELP, {
    out: { type: "string" },
    dtype: { type: "string" },
    seed: { type: "string" },
    tokenizer: { type: "string" },
    force: { type: "boolean" },
  }, true);
  if (!args) return;
  const { values, positionals } = args;
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
  stdout.line(dir);
}

if (import.meta.main) await runCli("make-model", main);
