/**
 * `deno task graph [--model SRC] [--format text|dot]`: prints the model's batched step
 * graph (T tokens of S sequences over the shared KV pool, logits for R rows), as readable text or as Graphviz DOT (`deno task graph --format dot | dot -Tsvg > graph.svg`).
 *
 * @module
 */

import { DEFAULT_MODEL_ID, graphToDot, graphToText } from "../mod.ts";
import { choiceFlag, loadCliModel, parseToolArgs, type ProgressDisplay, runCli } from "./_cli.ts";
import { stdout } from "./_stdout.ts";

const HELP = `Usage: deno task graph [--model SRC] [--format text|dot]

Prints the model's step graph (T tokens of S sequences, logits for R rows) on stdout: one line per node (text, the default), or Graphviz DOT.
  --model SRC      a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id (default ${DEFAULT_MODEL_ID})
  --format FORMAT  text or dot
  --help           show this help
  --version        show the version`;

async function main(progress: ProgressDisplay): Promise<void> {
  const args = parseToolArgs("graph", HELP, {
    model: { type: "string" },
    format: { type: "string" },
  });
  if (!args) return;
  const { values } = args;
  const format = choiceFlag("format", values.format, ["text", "dot"] as const) ?? "text";
  const model = await loadCliModel(values.model ?? DEFAULT_MODEL_ID, {}, progress);
  try {
    const graph = model.graph();
    await stdout.write(`${format === "dot" ? graphToDot(graph) : graphToText(graph)}\n`);
  } finally {
    await model.dispose();
  }
}

// The progress display is quiet unless stderr is a terminal: the graph is often piped to a file or to dot.
if (import.meta.main) await runCli("graph", main);
