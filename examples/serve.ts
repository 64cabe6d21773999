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

import { KV_DTYPES, type Model, WEIGHT_DTYPES } from "../mod.ts";
import { startServer } from "../server/mod.ts";
import {
  CliError,
  DEFAULT_CHAT_MODEL_ID,
  LOAD_OPTIONS,
  loadCliModel,
  loadFlags,
  numberFlag,
  parseToolArgs,
  ProgressDisplay,
  runCli,
} from "./_cli.ts";
import { OutputClosedError, stdout } from "./_stdout.ts";

const HELP = `Usage: deno task serve [options]

Serves models over an OpenAI-compatible HTTP API (and a chat page at /).

Options:
  --model SOURCE        a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id; repeat to
                        serve several (default ${DEFAULT_CHAT_MODEL_ID}: LLM_MODELS_DIR,
                        the Hugging Face cache, then a download into the Hugging Face cache)
  --name ID             id clients pass as "model", one per --model (default: the folder name)
  --template-file FILE  Jinja chat template for models without one (or to override theirs)
  --backend NAME        ts, native or webgpu (default ts)
  --threads N           worker threads for backends that have them
  --context-length N    positions per sequence (default: the model's, at most 4096)
  --dtype TYPE          weight dtype: ${WEIGHT_DTYPES.join(", ")} (default: as stored)
  --kv-dtype TYPE       KV cache dtype: ${KV_DTYPES.join(" or ")} (default f32)
  --kv-cache-tokens N   the most tokens the KV cache pool shared by all requests may hold; it
                        grows on demand up to that (default 4 × the context length)
  --host HOST           address to listen on (default 127.0.0.1)
  --port N              port (default 8080; 0 picks a free one)
  --parallel N          generations at once, decoded together in shared steps; a request with
                        n choices takes n of them (default 4)
  --max-queue N         requests that may wait; more get 429 (default 16)
  --cache-mb N          prompt cache budget in MiB of KV cache (default 256; 0 disables)
  --max-body-kb N       largest request body in KiB (default 1024)
  --max-tokens N        max_tokens when a request gives none (default 512)
  --api-key KEY         require 'Authorization: Bearer KEY' on the API (repeat for several keys;
                        /health and the chat page stay open)
  --api-key-file FILE   read the keys from FILE, one per line (blank lines and # comments skipped)
  --allowed-hosts LIST  comma-separated host names the Host header may name besides this machine's
                        (checked always on a loopback address, and on any address once given)
  --header-timeout S    seconds a request's line and headers may take (default 30)
  --body-timeout S      seconds a request's body may take (default 30)
  --max-connections N   connections open at once; more get 503 (default 64)
  --debug               serve GET /debug/stats (counters and memory)
  -h, --help            show this help
  --version             show the version
`;

/** Says `text` on stdout; the server keeps serving when nobody reads its stdout any more. */
function announce(text: string): void {
  try {
    stdout.line(text);
  } catch (e) {
    if (!(e instanceof OutputClosedError)) throw e;
  }
}

/** A flag in seconds (fractions allowed), as milliseconds. */
function seconds(flag: string, value: string | undefined): number | undefined {
  const s = numberFlag(flag, value, { min: 0.001, max: 86_400 });
  return s === undefined ? undefined : s * 1000;
}

/** The keys of `--api-key` and `--api-key-file`; a key with spaces or an empty file is a {@link CliError}. */
async function apiKeys(flags: readonly string[], file: string | undefined): Promise<string[] | undefined> {
  const keys = [...flags];
  if (file !== undefined) {
    const lines = (await Deno.readTextFile(file)).split(/\r?\n/).map((l) => l.trim());
    const fromFile = lines.filter((l) => l !== "" && !l.startsWith("#"));
    if (fromFile.length === 0) throw new CliError(`Invalid --api-key-file "${file}": it holds no key`);
    keys.push(...fromFile);
  }
  for (const key of keys) {
    if (key === "" || /\s/.test(key)) throw new CliError("Invalid API key: expected a non-empty string without spaces");
  }
  return keys.length > 0 ? keys : undefined;
}

async function main(progress: ProgressDisplay): Promise<void> {
  const parsed = parseToolArgs("serve", HELP, {
    model: { type: "string", multiple: true },
    name: { type: "string", multiple: true },
    "template-file": { type: "string" },
    ...LOAD_OPTIONS,
    "kv-cache-tokens": { type: "string" },
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "8080" },
    parallel: { type: "string" },
    "max-queue": { type: "string" },
    "cache-mb": { type: "string" },
    "max-body-kb": { type: "string" },
    "max-tokens": { type: "string" },
    "api-key": { type: "string", multiple: true },
    "api-key-file": { type: "string" },
    "allowed-hosts": { type: "string" },
    "header-timeout": { type: "string" },
    "body-timeout": { type: "string" },
    "max-connections": { type: "string" },
    debug: { type: "boolean", default: false },
  });
  if (!parsed) return;
  const args = parsed.values;
  const load = {
    ...loadFlags(args),
    kvCacheTokens: numberFlag("kv-cache-tokens", args["kv-cache-tokens"], { integer: true, min: 1 }),
  };
  const cacheMb = numberFlag("cache-mb", args["cache-mb"], { integer: true, min: 0 });
  const bodyKb = numberFlag("max-body-kb", args["max-body-kb"], { integer: true, min: 1 });
  const options = {
    hostname: args.host,
    port: numberFlag("port", args.port, { integer: true, min: 0, max: 65535 }),
    parallel: numberFlag("parallel", args.parallel, { integer: true, min: 1 }),
    maxQueue: numberFlag("max-queue", args["max-queue"], { integer: true, min: 0 }),
    cacheBytes: cacheMb === undefined ? undefined : cacheMb * 1024 * 1024,
    maxBodyBytes: bodyKb === undefined ? undefined : bodyKb * 1024,
    defaultMaxTokens: numberFlag("max-tokens", args["max-tokens"], { integer: true, min: 1 }),
    headersTimeoutMs: seconds("header-timeout", args["header-timeout"]),
    bodyTimeoutMs: seconds("body-timeout", args["body-timeout"]),
    maxConnections: numberFlag("max-connections", args["max-connections"], { integer: true, min: 1 }),
    debug: args.debug,
    apiKeys: await apiKeys(args["api-key"] ?? [], args["api-key-file"]),
    allowedHosts: args["allowed-hosts"]?.split(",").map((h) => h.trim()).filter((h) => h !== ""),
  };
  const sources = args.model ?? [DEFAULT_CHAT_MODEL_ID];
  const names = args.name ?? [];
  if (names.length > sources.length) {
    throw new CliError(`Got ${names.length} --name options for ${sources.length} models`);
  }
  const template = args["template-file"] !== undefined ? await Deno.readTextFile(args["template-file"]) : undefined;

  const loaded: { id: string; model: Model; template?: string }[] = [];
  const disposeAll = async () => {
    for (const m of loaded) await m.model.dispose();
  };
  try {
    for (const [i, source] of sources.entries()) {
      // The first model's display is the one runCli clears on an error.
      const model = await loadCliModel(source, load, i === 0 ? progress : new ProgressDisplay());
      const id = names[i] ?? source.replace(/\/+$/, "").split("/").pop()!;
      loaded.push({ id, model, template });
    }
    const server = await startServer({ models: loaded, ...options });
    announce(`Serving ${loaded.map((m) => m.id).join(", ")} on ${server.url} (chat page at ${server.url}/)`);
    let stopping = false;
    const stop = async () => {
      if (stopping) return;
      stopping = true;
      announce("Shutting down");
      await server.close();
      await disposeAll();
      Deno.exit(0);
    };
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
    await server.finished;
  } catch (e) {
    await disposeAll();
    throw e;
  }
}

if (import.meta.main) await runCli("serve", main);
