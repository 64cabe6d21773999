/**
 * `deno task graph [--model SRC] [--format text|dot] [--logits last|all]`: prints the model's forward
 * graph, as readable text or as Graphviz DOT (`deno task graph --format dot | dot -Tsvg > graph.svg`).
 *
 * @module
 */

import { DEFAULT_MODEL_ID, graphToDot, graphToText, type LogitsMode } from "../mod.ts";
import { choiceFlag, loadCliModel, parseToolArgs, type ProgressDisplay, runCli } from "./_cli.ts";
import { stdout } from "./_stdout.ts";

const HELP = `Usage: deno task graph [--model SRC] [--format text|dot] [--logits last|all]

Prints the model's forward graph on stdout: one line per node (text, the default), or Graphviz DOT.
  --model SRC      a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id (default ${DEFAULT_MODEL_ID})
  --format FORMAT  text or dot
  --logits MODE    last (logits of the last token, the decode graph) or all (every token's)
  --help           show this help
  --version        show the version`;

async function main(progress: ProgressDisplay): Promise<void> {
  const args = parseToolArgs("graph", HELP, {
    model: { type: "string" },
    format: { type: "string" },
    logits: { type: "string" },
  });
  if (!args) return;
  const { values } = args;
  const format = choiceFlag("format", values.format, ["text", "dot"] as const) ?? "text";
  const logits = choiceFlag<LogitsMode>("logits", values.logits, ["last", "all"]) ?? "last";
  const model = await loadCliModel(values.model ?? DEFAULT_MODEL_ID, {}, progress);
  try {
    const graph = model.graph(logits);
    await stdout.write(`${format === "dot" ? graphToDot(graph) : graphToText(graph)}\n`);
  } finally {
    await model.dispose();
  }
}

// The progress display is quiet unless stderr is a terminal: the graph is often piped to a file or to dot.
if (import.meta.main) await runCli("graph", main);
