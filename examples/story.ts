/**
 * `deno task story [options] [prompt]`: streams a continuation of the prompt to stdout; progress and
 * statistics go to stderr. The prompt comes from the arguments, or from stdin when there are none and
 * stdin is not a terminal. Run with `--help` for the options.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { DEFAULT_MODEL_ID } from "../models/files/hub.ts";
import { backendNames } from "../backends/registry.ts";
import "../backends/builtin.ts";
import {
  LOAD_OPTIONS,
  loadCliModel,
  loadFlags,
  numberFlag,
  ProgressDisplay,
  runCli,
  SAMPLING_OPTIONS,
  samplingError,
  samplingFlags,
  WEIGHT_DTYPES,
} from "./_cli.ts";

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

Exit codes: 0 done, 1 the model cannot be loaded or generation failed, 2 bad options.`;

async function readStdin(): Promise<string> {
  const chunks: string[] = [];
  for await (const chunk of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) chunks.push(chunk);
  return chunks.join("").replace(/\r?\n$/, "");
}

async function main(progress: ProgressDisplay): Promise<void> {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    strict: true,
    options: {
      model: { type: "string" },
      ...LOAD_OPTIONS,
      "max-tokens": { type: "string" },
      ...SAMPLING_OPTIONS,
      stop: { type: "string", multiple: true },
      "ignore-eos": { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(HELP);
    return;
  }
  const load = loadFlags(values);
  const maxTokens = numberFlag("max-tokens", values["max-tokens"], { integer: true, min: 0 }) ?? 256;
  const sampling = samplingFlags(values);
  // A random seed when none is given, so that the statistics line can name it.
  const seed = sampling.seed ?? Math.floor(Math.random() * 2 ** 31);
  const stop = values.stop?.filter((s) => s !== "");

  let prompt = positionals.join(" ");
  if (positionals.length === 0 && !Deno.stdin.isTerminal()) prompt = await readStdin();

  const model = await loadCliModel(values.model ?? DEFAULT_MODEL_ID, load, progress);

  const abort = new AbortController();
  const onInterrupt = () => abort.abort(new DOMException("Interrupted", "AbortError"));
  Deno.addSignalListener("SIGINT", onInterrupt);
  const enc = new TextEncoder();
  try {
    let stream;
    try {
      stream = model.generate(prompt, {
        ...sampling,
        maxTokens,
        seed,
        stop,
        ignoreEos: values["ignore-eos"],
        signal: abort.signal,
      });
    } catch (e) {
      throw samplingError(e) ?? e;
    }
    await Deno.stdout.write(enc.encode(prompt));
    try {
      await stream.pipeThrough(new TextEncoderStream()).pipeTo(Deno.stdout.writable, { preventClose: true });
    } catch (e) {
      if (e instanceof Deno.errors.BrokenPipe) return; // the reader went away (`| head`): nothing left to do
      if (!abort.signal.aborted) throw e;
    }
    await Deno.stdout.write(enc.encode("\n"));
    const s = stream.stats;
    console.error(
      `\n${model.dir} on ${model.backend.name}, seed ${seed}: prompt ${s.promptTokens} tokens, ` +
        `generated ${s.generatedTokens} tokens (${s.stopReason ?? "interrupted"}); ` +
        `prefill ${s.prefillTokensPerSecond.toFixed(1)} tok/s, decode ${s.decodeTokensPerSecond.toFixed(1)} tok/s`,
    );
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
    await model.dispose();
  }
  if (abort.signal.aborted) Deno.exit(130);
}

if (import.meta.main) {
  const progress = new ProgressDisplay();
  await runCli("story", () => main(progress), () => progress.clear());
}
