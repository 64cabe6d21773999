/**
 * The fuzz test's subprocess (tests/fuzz_test.ts): loads the model folder `Deno.args[0]` on the
 * backend `Deno.args[1]`, evaluates a prompt and a few greedy steps, checking every logit is
 * finite, and streams a short generation. It prints one line and exits:
 *
 * - `OK <tokens>`: loaded and generated, every logit finite (exit 0);
 * - `NONFINITE <step> <index> <value>`: loaded, but a logit was NaN or ±Infinity (exit 2);
 * - `ERROR <name> <frame> <message>`: a thrown error, with where it was created (`<frame>`: the
 *   first stack frame's file, or `-`) so the test can tell the engine's typed errors from a
 *   library's or the runtime's (exit 1).
 *
 * Anything else (a signal, an abort, an uncaught error with a stack trace) is a crash.
 *
 * @module
 */

import { loadModel } from "../models/model.ts"; // not mod.ts: the process starts faster without the chat and server code

const [dir, backend] = Deno.args;

/** The file of the first stack frame of `e`, or "-". */
function originOf(e: Error): string {
  const frame = (e.stack ?? "").split("\n").find((line) => line.trimStart().startsWith("at "));
  const file = frame?.match(/\(?((?:file|npm|ext|node|https?):[^\s)]*?)(?::\d+:\d+)?\)?$/)?.[1];
  return file ?? "-";
}

/** Index of the first non-finite value, or -1. */
function firstNonFinite(values: Float32Array): number {
  for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i])) return i;
  return -1;
}

/** Loads, evaluates and generates; the line to print and the exit code. */
async function run(): Promise<[string, number]> {
  const model = await loadModel(dir, { backend, contextLength: 32, prefillChunk: 8 });
  try {
    const seq = model.createSequence();
    let ids = model.tokenizer.encode("Once upon a time");
    for (let step = 0; step < 4; step++) {
      const logits = await seq.evaluate(ids);
      const bad = firstNonFinite(logits);
      if (bad >= 0) return [`NONFINITE ${step} ${bad} ${logits[bad]}`, 2];
      let best = 0;
      for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
      ids = [best];
    }
    await seq.dispose();
    let tokens = 0;
    for await (const t of model.generateTokens("The dog", { maxTokens: 4, temperature: 0, ignoreEos: true })) {
      if (!Number.isFinite(t.logprob)) return [`NONFINITE generate ${tokens} ${t.logprob}`, 2];
      tokens++;
    }
    return [`OK ${tokens}`, 0];
  } finally {
    await model.dispose();
  }
}

try {
  const [line, code] = await run();
  console.log(line);
  Deno.exit(code);
} catch (e) {
  const err = e instanceof Error ? e : new Error(String(e));
  const message = err.message.replace(/\s+/g, " ").slice(0, 500);
  console.log(`ERROR ${err.name} ${originOf(err)} ${message}`);
  Deno.exit(1);
}
