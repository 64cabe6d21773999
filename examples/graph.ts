/**
 * `deno task graph [--model SRC] [--format text|dot] [--logits last|all]`: prints the model's forward
 * graph, as readable text or as Graphviz DOT (`deno task graph --format dot | dot -Tsvg > graph.svg`).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { graphToDot, graphToText } from "../graph/format.ts";
import { DEFAULT_MODEL_ID } from "../models/files/hub.ts";
import { choiceFlag, loadCliModel, ProgressDisplay, runCli } from "./_cli.ts";

const HELP = `Usage: deno task graph [--model SRC] [--format text|dot] [--logits last|all]

Prints the model's forward graph on stdout: one line per node (text, the default), or Graphviz DOT.
  --model SRC      a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id (default ${DEFAULT_MODEL_ID})
  --format FORMAT  text or dot
  --logits MODE    last (logits of the last token, the decode graph) or all (every token's)
  --help           show this help`;

async function main(progress: ProgressDisplay): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    strict: true,
    options: {
      model: { type: "string" },
      format: { type: "string" },
      logits: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(HELP);
    return;
  }
  const format = choiceFlag("format", values.format, ["text", "dot"] as const) ?? "text";
  const logits = choiceFlag("logits", values.logits, ["last", "all"] as const) ?? "last";
  const model = await loadCliModel(values.model ?? DEFAULT_MODEL_ID, {}, progress);
  try {
    const graph = model.graph(logits);
    console.log(format === "dot" ? graphToDot(graph) : graphToText(graph));
  } finally {
    await model.dispose();
  }
}

if (import.meta.main) {
  // Quiet unless stderr is a terminal: the graph is often piped to a file or to dot.
  const progress = new ProgressDisplay();
  await runCli("graph", () => main(progress), () => progress.clear());
}
