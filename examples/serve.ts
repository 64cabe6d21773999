/**
 * `deno task serve`: an OpenAI-compatible server with a chat page.
 *
 * ```sh
 * deno task serve --model Felladrin/Minueza-32M-UltraChat --port 8080
 * curl http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \
 *   -d '{"model":"Minueza-32M-UltraChat","messages":[{"role":"user","content":"Hi!"}]}'
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import { loadModel, type Model } from "../models/model.ts";
import { startServer } from "../server/mod.ts";

const HELP = `Usage: deno task serve [options]

Serves models over an OpenAI-compatible HTTP API (and a chat page at /).

Options:
  --model SOURCE        model folder or Hugging Face id; repeat to serve several
                        (default Felladrin/Minueza-32M-UltraChat)
  --name ID             id clients pass as "model", one per --model (default: the folder name)
  --template-file FILE  Jinja chat template for models without one (or to override theirs)
  --backend NAME        ts, native or webgpu (default ts)
  --threads N           worker threads for backends that have them
  --context-length N    positions per sequence (default: the model's, at most 4096)
  --dtype TYPE          weight dtype: f32, f16, bf16, q8_0, q4_0 (default: as stored)
  --host HOST           address to listen on (default 127.0.0.1)
  --port N              port (default 8080; 0 picks a free one)
  --parallel N          generations at once (default 2)
  --max-queue N         requests that may wait; more get 429 (default 16)
  --cache-mb N          prompt cache budget in MiB of KV cache (default 256; 0 disables)
  --max-body-kb N       largest request body in KiB (default 1024)
  --max-tokens N        max_tokens when a request gives none (default 512)
  --debug               serve GET /debug/stats (counters and memory)
  -h, --help            show this help
`;

function fail(message: string): never {
  console.error(`serve: ${message}\nRun with --help for usage.`);
  Deno.exit(2);
}

function int(name: string, v: string | undefined, min: number): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) fail(`Invalid --${name} "${v}": expected an integer ≥ ${min}`);
  return n;
}

function parse() {
  try {
    return parseArgs({
      args: Deno.args,
      options: {
        model: { type: "string", multiple: true },
        name: { type: "string", multiple: true },
        "template-file": { type: "string" },
        backend: { type: "string" },
        threads: { type: "string" },
        "context-length": { type: "string" },
        dtype: { type: "string" },
        host: { type: "string", default: "127.0.0.1" },
        port: { type: "string", default: "8080" },
        parallel: { type: "string" },
        "max-queue": { type: "string" },
        "cache-mb": { type: "string" },
        "max-body-kb": { type: "string" },
        "max-tokens": { type: "string" },
        debug: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
      allowPositionals: false,
    }).values;
  } catch (e) {
    return fail((e as Error).message);
  }
}
const args = parse();
if (args.help) {
  console.log(HELP);
  Deno.exit(0);
}

const sources = args.model ?? ["Felladrin/Minueza-32M-UltraChat"];
const names = args.name ?? [];
if (names.length > sources.length) fail(`Got ${names.length} --name options for ${sources.length} models`);
const template = args["template-file"] !== undefined ? await Deno.readTextFile(args["template-file"]) : undefined;
const loaded: { id: string; model: Model; template?: string }[] = [];
const disposeAll = async () => {
  for (const m of loaded) await m.model.dispose();
};
try {
  for (const [i, source] of sources.entries()) {
    const model = await loadModel(source, {
      backend: args.backend,
      threads: int("threads", args.threads, 1),
      contextLength: int("context-length", args["context-length"], 2),
      dtype: args.dtype as never,
    });
    const id = names[i] ?? source.replace(/\/+$/, "").split("/").pop()!;
    loaded.push({ id, model, template });
  }
  const cacheMb = int("cache-mb", args["cache-mb"], 0);
  const bodyKb = int("max-body-kb", args["max-body-kb"], 1);
  const server = await startServer({
    models: loaded,
    hostname: args.host,
    port: int("port", args.port, 0),
    parallel: int("parallel", args.parallel, 1),
    maxQueue: int("max-queue", args["max-queue"], 0),
    cacheBytes: cacheMb === undefined ? undefined : cacheMb * 1024 * 1024,
    maxBodyBytes: bodyKb === undefined ? undefined : bodyKb * 1024,
    defaultMaxTokens: int("max-tokens", args["max-tokens"], 1),
    debug: args.debug,
  });
  console.log(`Serving ${loaded.map((m) => m.id).join(", ")} on ${server.url} (chat page at ${server.url}/)`);
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    console.log("Shutting down");
    await server.close();
    await disposeAll();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await server.finished;
} catch (e) {
  await disposeAll();
  console.error(`serve: ${(e as Error).message}`);
  Deno.exit(1);
}
