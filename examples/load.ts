/**
 * `deno task load`: a load run against the server. It starts `examples/serve.ts` in a subprocess
 * on a free loopback port, sends `--concurrency` streamed chat completions at once, polls `/health`
 * every 50 ms meanwhile, and reports time to first token, inter-token latency and `/health` latency
 * (p50 and p99) and the aggregate tok/s, as a table or `--json`. It stops the server, and exits 1 if
 * any request failed. Run with `--help` for the options.
 *
 * @module
 */

import { choiceFlag, CliError, DEFAULT_CHAT_MODEL_ID, numberFlag, parseToolArgs, runCli } from "./_cli.ts";
import { backendNames, KV_DTYPES, WEIGHT_DTYPES } from "../mod.ts";
import { stdout } from "./_stdout.ts";

const HELP = `Usage: deno task load [options]

Starts the server (examples/serve.ts, in a subprocess on a free port of 127.0.0.1), sends
--concurrency streamed chat completions at once, polls /health every 50 ms during the run, and
reports time to first token, inter-token latency and /health latency (p50, p99) and the aggregate
tok/s. Stops the server at the end. Exit codes: 0 every request answered in full, 1 a request failed
(or the server did not start, or the run timed out), 2 bad options.

Server:
  --model SOURCE        a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id
                        (default ${DEFAULT_CHAT_MODEL_ID})
  --template-file FILE  Jinja chat template, for a model without one (the story model)
  --backend NAME        ${backendNames().join(", ")} (default ts)
  --threads N           worker threads for backends that have them
  --context-length N    positions per sequence (default: the model's, at most 4096)
  --dtype TYPE          weight dtype: ${WEIGHT_DTYPES.join(", ")} (default: as stored)
  --kv-dtype TYPE       KV cache dtype: ${KV_DTYPES.join(" or ")} (default f32)
  --parallel N          the server's generations at once (default 4)

Load:
  --concurrency C       streamed chat completions sent at once (default 64); the server's queue
                        holds them all, so none is refused
  --max-tokens N        max_tokens of each (default 32)
  --prompt TEXT         the user message; each request adds its number (default "Tell me a story.")
  --timeout S           seconds the whole run may take, the server's start included (default 300)
  --json                one JSON object on stdout instead of the table
  -h, --help            show this help
  --version             show the version`;

/** How often `/health` is polled during the run. */
const HEALTH_INTERVAL_MS = 50;

/** p50, p99 and the largest of a set of milliseconds (nearest rank; 0 for none). */
export interface Percentiles {
  /** The median. */
  p50: number;
  /** The 99th percentile. */
  p99: number;
  /** The largest. */
  max: number;
  /** How many values. */
  count: number;
}

/** What a load run measured. */
export interface LoadReport {
  /** `--model`. */
  model: string;
  /** Where the server listened (it is stopped by the time the report is out). */
  url: string;
  /** `--backend`. */
  backend: string;
  /** The server's `--parallel`. */
  parallel: number;
  /** Requests sent at once (`--concurrency`). */
  concurrency: number;
  /** `max_tokens` of each request. */
  maxTokens: number;
  /** Requests answered in full. */
  completed: number;
  /** Requests that failed (the first few say why in {@link LoadReport.errors}). */
  failed: number;
  /** `/health` polls that failed. */
  healthFailures: number;
  /** Up to 10 failures' messages, requests' and polls'. */
  errors: string[];
  /** Completion tokens of the answered requests, as their `usage` says. */
  completionTokens: number;
  /** Milliseconds from the first request sent to the last one ended. */
  wallMs: number;
  /** Completion tokens per second over {@link LoadReport.wallMs}, all requests together. */
  tokS: number;
  /** Milliseconds from sending a request to its first content chunk. */
  timeToFirstTokenMs: Percentiles;
  /** Milliseconds between a request's successive content chunks (a token whose text is pending comes with the next). */
  interTokenMs: Percentiles;
  /** Milliseconds each `/health` poll took during the run. */
  healthMs: Percentiles;
}

/** The nearest-rank percentiles of `values`. */
export function percentiles(values: readonly number[]): Percentiles {
  if (values.length === 0) return { p50: 0, p99: 0, max: 0, count: 0 };
  const sorted = [...values].sort((a, b) => a - b);
  const rank = (p: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
  return { p50: rank(0.5), p99: rank(0.99), max: sorted[sorted.length - 1], count: sorted.length };
}

/** The settings of a run, from the flags. */
interface LoadSettings {
  model: string;
  /** The id the server serves the model under (`--name`). */
  id: string;
  backend: string;
  parallel: number;
  concurrency: number;
  maxTokens: number;
  prompt: string;
  timeoutMs: number;
  json: boolean;
  /** The flags passed on to the server. */
  serverArgs: string[];
}

function settings(): LoadSettings | undefined {
  const parsed = parseToolArgs("load", HELP, {
    model: { type: "string" },
    "template-file": { type: "string" },
    backend: { type: "string" },
    threads: { type: "string" },
    "context-length": { type: "string" },
    dtype: { type: "string" },
    "kv-dtype": { type: "string" },
    parallel: { type: "string" },
    concurrency: { type: "string" },
    "max-tokens": { type: "string" },
    prompt: { type: "string" },
    timeout: { type: "string" },
    json: { type: "boolean" },
  });
  if (!parsed) return undefined;
  const v = parsed.values;
  const model = v.model ?? DEFAULT_CHAT_MODEL_ID;
  const backend = choiceFlag("backend", v.backend, backendNames()) ?? "ts";
  const parallel = numberFlag("parallel", v.parallel, { integer: true, min: 1, max: 1024 }) ?? 4;
  const concurrency = numberFlag("concurrency", v.concurrency, { integer: true, min: 1, max: 4096 }) ?? 64;
  const id = model.replace(/\/+$/, "").split("/").pop()!;
  const serverArgs = ["--model", model, "--name", id, "--backend", backend, "--parallel", String(parallel)];
  // The queue holds every request: a load run measures latency, not refusals.
  serverArgs.push("--max-queue", String(concurrency), "--max-connections", String(concurrency + 16));
  // Checked here so that a bad value is this tool's error, not the server's.
  const passed: [string, string | undefined][] = [
    ["threads", numberFlag("threads", v.threads, { integer: true, min: 1, max: 1024 })?.toString()],
    ["context-length", numberFlag("context-length", v["context-length"], { integer: true, min: 2 })?.toString()],
    ["dtype", choiceFlag("dtype", v.dtype, WEIGHT_DTYPES)],
    ["kv-dtype", choiceFlag("kv-dtype", v["kv-dtype"], KV_DTYPES)],
    ["template-file", v["template-file"]],
  ];
  for (const [flag, value] of passed) if (value !== undefined) serverArgs.push(`--${flag}`, value);
  return {
    model,
    id,
    backend,
    parallel,
    concurrency,
    maxTokens: numberFlag("max-tokens", v["max-tokens"], { integer: true, min: 1, max: 1 << 20 }) ?? 32,
    prompt: v.prompt ?? "Tell me a story.",
    timeoutMs: (numberFlag("timeout", v.timeout, { min: 1, max: 86_400 }) ?? 300) * 1000,
    json: v.json ?? false,
    serverArgs,
  };
}

/** The server subprocess, with the URL it listens on. */
interface Server {
  readonly url: string;
  /** Stops it (SIGTERM, then SIGKILL after 5 s) and waits for it to exit. */
  stop(): Promise<void>;
}

/** What the server printed on stderr, its last `n` lines. */
class Tail {
  #text = "";
  /** Adds output. */
  push(s: string): void {
    this.#text = (this.#text + s).slice(-8192);
  }
  /** The last `n` non-empty lines, joined with " | ". */
  lines(n = 3): string {
    return this.#text.trim().split("\n").filter((l) => l.trim() !== "").slice(-n).join(" | ");
  }
}

/** Starts `examples/serve.ts` on a free port of 127.0.0.1 and waits until it says where it listens. */
async function startServerProcess(args: readonly string[], deadline: number): Promise<Server> {
  const script = new URL("./serve.ts", import.meta.url).pathname;
  // The serve task's permissions, for the server alone.
  const flags = ["--allow-read", "--allow-write", "--allow-env", "--allow-net", "--allow-ffi"];
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...flags, script, ...args, "--host", "127.0.0.1", "--port", "0"],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable) {
      throw new CliError("Cannot start the server: run access is not granted (run with --allow-run)", 1);
    }
    throw e;
  }
  const errors = new Tail();
  const errorsDone = (async () => {
    for await (const s of child.stderr.pipeThrough(new TextDecoderStream())) errors.push(s);
  })();
  const out = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  const stop = async () => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch { /* it has just exited */ }
      const timer = setTimeout(() => !exited && child.kill("SIGKILL"), 5000);
      await status;
      clearTimeout(timer);
    }
    await out.cancel().catch(() => {});
    await errorsDone.catch(() => {});
  };
  let banner = "";
  const timeout = Promise.withResolvers<"timeout">();
  const timer = setTimeout(() => timeout.resolve("timeout"), Math.max(0, deadline - Date.now()));
  try {
    for (;;) {
      const url = /http:\/\/127\.0\.0\.1:\d+/.exec(banner)?.[0];
      if (url) {
        // The rest of its stdout is drained so that the server never blocks on a full pipe.
        (async () => {
          for (let r = await out.read(); !r.done; r = await out.read());
        })().catch(() => {});
        return { url, stop };
      }
      const r = await Promise.race([out.read(), timeout.promise]);
      if (r === "timeout") throw new CliError("The server did not start within --timeout", 1);
      if (r.done) {
        const code = (await status).code;
        await errorsDone.catch(() => {});
        throw new CliError(`The server exited (code ${code}) before listening: ${errors.lines() || "no output"}`, 1);
      }
      banner += r.value;
    }
  } catch (e) {
    await stop();
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

/** One request's measurements. */
interface RequestResult {
  /** Why it failed, or undefined when it was answered in full. */
  error?: string;
  /** Milliseconds to its first content chunk. */
  firstMs?: number;
  /** Milliseconds between its successive content chunks. */
  gapsMs: number[];
  /** `usage.completion_tokens`. */
  tokens: number;
}

/** Sends one streamed chat completion and reads it to its end, timing each content chunk. */
async function streamedChat(
  url: string,
  model: string,
  message: string,
  maxTokens: number,
  signal: AbortSignal,
): Promise<RequestResult> {
  const result: RequestResult = { gapsMs: [], tokens: 0 };
  const t0 = performance.now();
  let last = t0;
  try {
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model,
        messages: [{ role: "user", content: message }],
        max_tokens: maxTokens,
        stream: true,
        stream_options: { include_usage: true },
      }),
      signal,
    });
    if (res.status !== 200) {
      const body = await res.text();
      return { ...result, error: `status ${res.status}: ${body.slice(0, 200)}` };
    }
    let buffered = "";
    let done = false;
    for await (const text of res.body!.pipeThrough(new TextDecoderStream())) {
      buffered += text;
      let end: number;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice("data: ".length);
        if (data === "[DONE]") {
          done = true;
          continue;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) return { ...result, error: `error in the stream: ${chunk.error.message}` };
        if (chunk.usage) result.tokens = chunk.usage.completion_tokens;
        if (!chunk.choices?.[0]?.delta?.content) continue;
        const now = performance.now();
        if (result.firstMs === undefined) result.firstMs = now - t0;
        else result.gapsMs.push(now - last);
        last = now;
      }
    }
    if (!done) return { ...result, error: "the stream ended without [DONE]" };
    if (result.tokens < 1) return { ...result, error: "no completion tokens" };
    return result;
  } catch (e) {
    const reason = signal.aborted ? "timed out (--timeout)" : (e as Error).message;
    return { ...result, error: reason };
  }
}

/** What the `/health` poller measured: the milliseconds each answered poll took, and why the others failed. */
interface PollResult {
  readonly times: number[];
  readonly errors: string[];
}

/**
 * The `/health` poller's worker: sent `{ url, intervalMs }` it polls until sent `"stop"`, then answers a
 * {@link PollResult}. It refers to nothing outside itself: its source text becomes the worker's module.
 */
function healthPollerWorker(): void {
  const scope = globalThis as unknown as {
    onmessage: ((e: MessageEvent<{ url: string; intervalMs: number } | "stop">) => void) | null;
    postMessage(message: { times: number[]; errors: string[] }): void;
  };
  const stop = new AbortController();
  const times: number[] = [];
  const errors: string[] = [];
  let polling: Promise<void> | undefined;
  const poll = async (url: string, intervalMs: number) => {
    while (!stop.signal.aborted) {
      const t0 = performance.now();
      try {
        const res = await fetch(`${url}/health`, { signal: stop.signal });
        const body = await res.json();
        if (res.status !== 200 || body.status !== "ok") errors.push(`/health: status ${res.status}`);
        else times.push(performance.now() - t0);
      } catch (e) {
        if (stop.signal.aborted) break;
        errors.push(`/health: ${(e as Error).message}`);
      }
      const wait = intervalMs - (performance.now() - t0);
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    }
  };
  scope.onmessage = async (e) => {
    if (e.data !== "stop") {
      polling ??= poll(e.data.url, e.data.intervalMs);
      return;
    }
    stop.abort();
    await polling;
    scope.postMessage({ times, errors });
  };
}

/**
 * Starts polling `/health` every {@link HEALTH_INTERVAL_MS} in a worker, so that this tool's own busy
 * event loop (reading every stream) does not count in the times; the returned function stops it and
 * gives what it measured. The worker's module is a blob of {@link healthPollerWorker}'s source, which
 * needs no read permission.
 */
function startHealthPoller(url: string): () => Promise<PollResult> {
  const source = new Blob([`(${healthPollerWorker.toString()})();`], { type: "text/javascript" });
  const moduleUrl = URL.createObjectURL(source);
  const worker = new Worker(moduleUrl, { type: "module" });
  const result = new Promise<PollResult>((resolve, reject) => {
    worker.onmessage = (e: MessageEvent<PollResult>) => resolve(e.data);
    worker.onerror = (e) => {
      e.preventDefault();
      reject(new Error(`The /health poller failed: ${e.message}`));
    };
  });
  worker.postMessage({ url, intervalMs: HEALTH_INTERVAL_MS });
  return async () => {
    worker.postMessage("stop");
    try {
      return await result;
    } finally {
      worker.terminate();
      URL.revokeObjectURL(moduleUrl);
    }
  };
}

/** Whether the served model can chat, from `/v1/models`. */
async function checkChat(url: string, id: string): Promise<void> {
  const list = await (await fetch(`${url}/v1/models`)).json();
  const entry = list.data.find((m: { id: string }) => m.id === id);
  if (!entry) throw new CliError(`The server does not serve "${id}"`, 1);
  if (!entry.capabilities?.chat_completions) {
    throw new CliError(`Model "${id}" has no chat template: pass one with --template-file FILE`, 2);
  }
}

/** Runs the load against a started server. */
async function runLoad(o: LoadSettings, url: string, deadline: number): Promise<LoadReport> {
  const id = o.id;
  await checkChat(url, id);
  const timeout = AbortSignal.timeout(Math.max(1, deadline - Date.now()));
  const stopHealth = startHealthPoller(url);
  const t0 = performance.now();
  const results = await Promise.all(
    Array.from(
      { length: o.concurrency },
      (_, i) => streamedChat(url, id, `${o.prompt} (${i + 1})`, o.maxTokens, timeout),
    ),
  );
  const wallMs = performance.now() - t0;
  const polled = await stopHealth();
  const ok = results.filter((r) => r.error === undefined);
  const errors = [...results.flatMap((r, i) => r.error === undefined ? [] : [`request ${i + 1}: ${r.error}`])];
  errors.push(...polled.errors);
  const completionTokens = ok.reduce((a, r) => a + r.tokens, 0);
  return {
    model: o.model,
    url,
    backend: o.backend,
    parallel: o.parallel,
    concurrency: o.concurrency,
    maxTokens: o.maxTokens,
    completed: ok.length,
    failed: results.length - ok.length,
    healthFailures: polled.errors.length,
    errors: errors.slice(0, 10),
    completionTokens,
    wallMs,
    tokS: completionTokens / (wallMs / 1000),
    timeToFirstTokenMs: percentiles(ok.flatMap((r) => r.firstMs === undefined ? [] : [r.firstMs])),
    interTokenMs: percentiles(ok.flatMap((r) => r.gapsMs)),
    healthMs: percentiles(polled.times),
  };
}

/** The report as a table. */
function printTable(r: LoadReport): void {
  const ms = (n: number) => n.toFixed(1);
  stdout.line(
    `# load: ${r.concurrency} streamed chat completions at once, max_tokens ${r.maxTokens}; server --parallel ` +
      `${r.parallel}, ${r.model} on ${r.backend}`,
  );
  stdout.line("| measure | p50 ms | p99 ms | max ms | count |");
  stdout.line("|---|---|---|---|---|");
  const rows: [string, Percentiles][] = [
    ["time to first token", r.timeToFirstTokenMs],
    ["inter-token latency", r.interTokenMs],
    [`/health latency (polled every ${HEALTH_INTERVAL_MS} ms)`, r.healthMs],
  ];
  for (const [what, p] of rows) stdout.line(`| ${what} | ${ms(p.p50)} | ${ms(p.p99)} | ${ms(p.max)} | ${p.count} |`);
  stdout.line(
    `${r.completed} of ${r.concurrency} requests answered, ${r.completionTokens} tokens in ${
      (r.wallMs / 1000).toFixed(2)
    } s: ${r.tokS.toFixed(1)} tok/s aggregate`,
  );
}

async function main(): Promise<void> {
  const o = settings();
  if (!o) return;
  const deadline = Date.now() + o.timeoutMs;
  const server = await startServerProcess(o.serverArgs, deadline);
  let report: LoadReport;
  try {
    report = await runLoad(o, server.url, deadline);
  } finally {
    await server.stop();
  }
  if (o.json) stdout.line(JSON.stringify(report));
  else printTable(report);
  if (report.failed > 0 || report.healthFailures > 0) {
    for (const e of report.errors) console.error(`load: ${e}`);
    throw new CliError(
      `${report.failed} of ${report.concurrency} requests and ${report.healthFailures} /health polls failed`,
      1,
    );
  }
}

if (import.meta.main) await runCli("load", main);
