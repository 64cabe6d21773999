/**
 * `deno task story [options] [prompt]`: streams a continuation of the prompt to stdout; progress and
 * statistics go to stderr. The prompt comes from the arguments, or from stdin when there are none and
 * stdin is not a terminal. Run with `--help` for the options.
 *
 * @module
 */

import { backendNames, DEFAULT_MODEL_ID, type GenerationStats, type Model, WEIGHT_DTYPES } from "../mod.ts";
import {
  GENERATION_OPTIONS,
  generationFlags,
  LOAD_OPTIONS,
  loadCliModel,
  loadFlags,
  parseToolArgs,
  type ProgressDisplay,
  runCli,
  samplingError,
  speedText,
} from "./_cli.ts";
import { stdout } from "./_stdout.ts";

const HELP = `Usage: deno task story [options] [prompt...]

Streams a story that continues the prompt to stdout (the prompt is echoed first). Without a prompt
argument, reads the prompt from stdin when stdin is not a terminal. Progress and statistics go to stderr.

Model:
  --model SRC          a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id
                       (default ${DEFAULT_MODEL_ID}: LLM_MODELS_DIR, the Hugging Face cache, the bundled
                       ../shared/models/story, then a download into the Hugging Face cache)
  --backend NAME       compute backend: ${backendNames().join(", ")} (default ts)
  --dtype TYPE         hold the weights as ${WEIGHT_DTYPES.join(", ")} (default: as stored)
  --kv-dtype TYPE      hold the KV cache as f32 or f16 (default f32)
  --context-length N   positions the KV cache holds (default: the model's, at most 4096)
  --threads N          worker threads of the backend (default: its choice)

Generation:
  --max-tokens N       most tokens to generate (default 256)
  --temperature T      0 is greedy (default 0.8)
  --top-k K            keep the K most likely tokens, 0 keeps all (default 40)
  --top-p P            nucleus sampling, 1 keeps all (default 0.95)
  --min-p P            drop tokens below P × the most likely, 0 keeps all (default 0.05)
  --repeat-penalty R   penalty on the last 64 tokens, 1 is off (default 1)
  --seed N             random seed: the same seed gives the same text (default: random)
  --stop TEXT          stop before TEXT (repeatable)
  --ignore-eos         keep generating past the end-of-story token
  --help               show this help
  --version            show the version

Ctrl-C stops the story: the statistics are still printed, and the exit code is 130.
Exit codes: 0 done, 1 the model cannot be loaded or generation failed, 2 bad options, 130 interrupted.`;

async function readStdin(): Promise<string> {
  const chunks: string[] = [];
  for await (const chunk of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) chunks.push(chunk);
  return chunks.join("").replace(/\r?\n$/, "");
}

/** The statistics line: where, what and how fast. */
function statsLine(model: Model, seed: number, s: GenerationStats, interrupted: boolean): string {
  return `${model.dir} on ${model.backend.name}, seed ${seed}: prompt ${s.promptTokens} tokens, ` +
    `generated ${s.generatedTokens} tokens (${interrupted ? "interrupted" : s.stopReason}); ` +
    `load ${model.loadMs.toFixed(0)} ms, ${speedText(s)}`;
}

async function main(progress: ProgressDisplay): Promise<void> {
  const args = parseToolArgs("story", HELP, {
    model: { type: "string" },
    ...LOAD_OPTIONS,
    ...GENERATION_OPTIONS,
    stop: { type: "string", multiple: true },
    "ignore-eos": { type: "boolean" },
  }, true);
  if (!args) return;
  const { values, positionals } = args;
  const load = loadFlags(values);
  const generation = generationFlags(values);
  // A random seed when none is given, so that the statistics line can name it.
  const seed = generation.seed ?? Math.floor(Math.random() * 2 ** 31);
  const stop = values.stop?.filter((s) => s !== "");

  let prompt = positionals.join(" ");
  if (positionals.length === 0 && !Deno.stdin.isTerminal()) prompt = await readStdin();

  const model = await loadCliModel(values.model ?? DEFAULT_MODEL_ID, load, progress);

  // Ctrl-C aborts the generation; the signal is checked between tokens and the pieces are written one
  // by one (not piped into Deno.stdout.writable, which an abort would close), so the statistics follow.
  const abort = new AbortController();
  const onInterrupt = () => abort.abort(new DOMException("Interrupted", "AbortError"));
  Deno.addSignalListener("SIGINT", onInterrupt);
  try {
    let stream;
    try {
      stream = model.generate(prompt, {
        ...generation,
        seed,
        stop,
        ignoreEos: values["ignore-eos"],
        signal: abort.signal,
      });
    } catch (e) {
      throw samplingError(e) ?? e;
    }
    await stdout.write(prompt);
    try {
      for await (const piece of stream) await stdout.write(piece);
    } catch (e) {
      if (!abort.signal.aborted) throw e;
    }
    await stdout.write("\n");
    console.error(`\n${statsLine(model, seed, stream.stats, abort.signal.aborted)}`);
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
    await model.dispose();
  }
  if (abort.signal.aborted) Deno.exit(130);
}

if (import.meta.main) await runCli("story", main);
