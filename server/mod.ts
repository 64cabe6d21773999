/**
 * An OpenAI-compatible HTTP server for loaded models. {@link startServer}
 * listens through a small HTTP/1.1 layer of its own (`http1.ts`: header and
 * body timeouts, a connection cap, which `Deno.serve` lacks);
 * {@link createHandler} gives the bare handler, for `Deno.serve` or tests.
 *
 * Endpoints: `POST /v1/chat/completions` and `POST /v1/completions`
 * (server-sent events with `stream: true`, else one JSON object; `usage` with
 * `prompt_tokens_details.cached_tokens`), `GET /v1/models`, `GET /health`, and a
 * chat web page at `/`. Requests never name files: the models are fixed when
 * the server starts. Errors are JSON in the OpenAI shape
 * `{ error: { message, type, param, code } }`. Each model object of
 * `/v1/models` carries, beyond OpenAI's fields, `capabilities:
 * { chat_completions, completions }`: a model without a chat template answers
 * only `/v1/completions`. `GET /health` answers `{ status, models, running,
 * queued, kv }`, `kv` being each model's shared KV pool (`Model.kvStats()`) by id.
 *
 * Up to `parallel` generations run at once, and the model's engine batches
 * their steps together (continuous batching); more requests wait in a queue,
 * then get `429`. A request may ask for `n` choices (1 to 16): it takes `n`
 * slots at once (`n` above `parallel` is a `400` naming `n`), its prompt is
 * evaluated once and its sequence forked for the other choices (sharing the
 * prompt's KV pages), and choice `i` samples with `seed + i` when a seed is
 * given. Streamed, each chunk carries its choice's `index`; `usage` counts the
 * prompt once and the tokens of every choice.
 *
 * The door: optional API keys (`Authorization: Bearer`, `401`; `/health` and
 * the page stay open), POST bodies only as `application/json` (`415`), on a
 * loopback address only this machine's `Host` names or `allowedHosts`
 * (`403`). A prompt longer than the context could hold at any tokenization is
 * refused before tokenizing; long ones are tokenized in a worker once the
 * request has its slot. A client that goes away (also while queued or in the
 * prompt) stops its generation within one prefill chunk, also when nothing
 * reads its response any more. In chat prompts,
 * special tokens come only from the template, never from message text.
 *
 * @example Serve a model folder on 127.0.0.1:8080 until the process ends
 * ```ts
 * import { loadModel } from "../mod.ts";
 * import { startServer } from "./mod.ts";
 *
 * export async function serve(dir: string): Promise<void> {
 *   const model = await loadModel(dir);
 *   const server = await startServer({ models: [{ id: "local", model }], port: 8080 });
 *   console.log(`Listening on ${server.url}`);
 *   await server.finished;
 *   await model.dispose();
 * }
 * ```
 *
 * @module
 */

import { setImmediate } from "node:timers";
import { ChatTemplate, ChatTemplateError } from "../models/chat/session.ts";
import type { GenerateOptions } from "../models/generate/token_generator.ts";
import type { KvStats, Model } from "../models/model.ts";
import { resolveSampling, SamplingOptionError } from "../models/generate/sampler.ts";
import type { Sequence } from "../models/exec/sequence.ts";
import { KvPoolFullError } from "../models/exec/kv_pool.ts";
import { Choices } from "./choices.ts";
import { type PoolClaim, PromptCache, type PromptCacheStats } from "./prompt_cache.ts";
import { QueueFullError, Scheduler } from "./scheduler.ts";
import { Door, isLoopbackAddress } from "./door.ts";
import { maxTokenChars, PromptEncoder, type PromptInput } from "./prompt_encoder.ts";
import { type Http1Server, serveHttp1 } from "./http1.ts";
import {
  ApiError,
  type ChatRequest,
  ClientGoneError,
  type CommonParams,
  type CompletionRequest,
  finishReason,
  parseChatRequest,
  parseCompletionRequest,
  readJson,
  usageObject,
} from "./protocol.ts";

export { ApiError } from "./protocol.ts";
// The types that the server's own signatures name (the rest of the library is at the root entry point).
export type { KvStats, Model } from "../models/model.ts";
export type { Sequence } from "../models/exec/sequence.ts";
export { type PoolClaim, PromptCache, type PromptCacheStats } from "./prompt_cache.ts";
export { QueueFullError, Scheduler, type SchedulerOptions } from "./scheduler.ts";

/** A model the server offers under `id`. */
export interface ServedModel {
  /** The name clients pass as `model`. */
  readonly id: string;
  /** The loaded model (the caller keeps it and disposes it after the server closes). */
  readonly model: Model;
  /** Jinja chat template to use instead of the model's own. */
  readonly template?: string;
}

/** Options of {@link createHandler} and {@link startServer}. */
export interface ServerOptions {
  /** The models served (at least one). */
  models: readonly ServedModel[];
  /**
   * Generations that run at once (slots): their steps are batched together by the model's engine.
   * A request with `n` choices takes `n` slots at once; `n` above this is refused with `400`. Default 4.
   */
  parallel?: number;
  /** Requests that may wait for a slot; past that, `429`. Default 16. */
  maxQueue?: number;
  /**
   * Bytes of KV pages that idle sequences of the prompt cache may hold (0 disables it). Default 256 MiB.
   * They are pages of each model's shared KV pool, given back when a request needs the room.
   */
  cacheBytes?: number;
  /** Largest request body accepted; larger ones get `413`. Default 1 MiB. */
  maxBodyBytes?: number;
  /** `max_tokens` when a request gives none (also capped by the room left in the context). Default 512. */
  defaultMaxTokens?: number;
  /** Serve `GET /debug/stats` (counters, memory; `?gc=1` collects garbage first when `--expose-gc` is on). */
  debug?: boolean;
  /**
   * Keys a request must carry as `Authorization: Bearer KEY` (else `401`, code `invalid_api_key`); `/health` and
   * the chat page's files stay open. None (the default) lets every request in.
   */
  apiKeys?: readonly string[];
  /**
   * Host names a request's `Host` header may name besides the loopback names (else `403`, code
   * `host_not_allowed`), against DNS rebinding. {@link createHandler} checks `Host` only when this is given;
   * {@link startServer} also checks it whenever it listens on a loopback address, allowing that address.
   */
  allowedHosts?: readonly string[];
  /**
   * Where the server's log lines go (default `console.error`): one line for each client that went away before
   * its request was read, and internal errors with their stack.
   */
  onLog?: (line: string) => void;
}

/** Options of {@link startServer}: the handler's plus where to listen. */
export interface StartOptions extends ServerOptions {
  /** Default `"127.0.0.1"`. */
  hostname?: string;
  /** Default 8080; 0 picks a free port. */
  port?: number;
  /** Called once listening (default: nothing is printed). */
  onListen?: (addr: Deno.NetAddr) => void;
  /**
   * Milliseconds a request's line and headers may take, from when its connection opens or goes idle; a client
   * past it is answered `408` and closed (an idle keep-alive connection is just closed). Default 30 s.
   */
  headersTimeoutMs?: number;
  /** Milliseconds a request's whole body may take, from the end of its headers; past it, `408`. Default 30 s. */
  bodyTimeoutMs?: number;
  /** Connections open at once; each one more is answered `503` (code `too_many_connections`). Default 64. */
  maxConnections?: number;
}

/** Counters of the server, as `GET /debug/stats` reports them. */
export interface ServerStats {
  /** Generations running now (slots in use: a request with `n` choices runs `n`). */
  running: number;
  /** Requests waiting for a generation slot. */
  queued: number;
  /** Requests answered by a generation that ran to its end. */
  completed: number;
  /** Generations stopped because the client went away (or the server closed). */
  cancelled: number;
  /** Requests refused with 429. */
  rejected: number;
  /** The prompt cache's counters. */
  cache: PromptCacheStats;
  /** Each served model's shared KV pool (`Model.kvStats()`), by model id. */
  kv: Record<string, KvStats>;
}

/** A request handler with its state; see {@link createHandler}. */
export interface ChatHandler {
  /** Answers one request. */
  readonly handler: (req: Request) => Promise<Response>;
  /** Counters. */
  stats(): ServerStats;
  /** Stops running generations and frees the prompt cache (the models stay loaded). */
  close(): Promise<void>;
}

/** A running server; see {@link startServer}. */
export interface RunningServer extends ChatHandler {
  /** Base URL, e.g. `http://127.0.0.1:8080`. */
  readonly url: string;
  /** The address listened on (with the port picked when `port` was 0). */
  readonly addr: Deno.NetAddr;
  /** Resolves when the server has stopped. */
  readonly finished: Promise<void>;
}

const WEB_FILES: Record<string, { file: string; type: string }> = {
  "/": { file: "./web/index.html", type: "text/html; charset=utf-8" },
  "/app.js": { file: "./web/app.js", type: "text/javascript; charset=utf-8" },
};

/** Paths answered without an API key: the health check, and the chat page (which then asks for a key). */
const OPEN_PATHS: ReadonlySet<string> = new Set(["/health", ...Object.keys(WEB_FILES), "/index.html"]);

interface Entry {
  readonly id: string;
  readonly model: Model;
  readonly template: ChatTemplate | ChatTemplateError;
  /** The longest prompt text that could fit the context: the context times the model's longest token. */
  readonly maxPromptChars: number;
}

/** A request's prompt before tokenizing: token ids as given, or what the encoder takes (a text or a chat). */
type PromptSource = { readonly ids: number[] } | PromptInput;

/** Creates the request handler (for `Deno.serve` or tests). Use {@link startServer} to listen. */
export async function createHandler(options: ServerOptions): Promise<ChatHandler> {
  if (!options.models?.length) throw new TypeError("Cannot serve: no models given");
  const entries = new Map<string, Entry>();
  const tokenCharsOf = new Map<Model, number>();
  for (const m of options.models) {
    if (typeof m.id !== "string" || m.id === "" || entries.has(m.id)) {
      throw new TypeError(`Invalid model id ${JSON.stringify(m.id)}: expected a unique non-empty string`);
    }
    let template: ChatTemplate | ChatTemplateError;
    try {
      template = ChatTemplate.forModel(m.model, m.template);
    } catch (e) {
      if (!(e instanceof ChatTemplateError)) throw e;
      template = e;
    }
    let tokenChars = tokenCharsOf.get(m.model);
    if (tokenChars === undefined) tokenCharsOf.set(m.model, tokenChars = maxTokenChars(m.model));
    entries.set(m.id, { id: m.id, model: m.model, template, maxPromptChars: tokenChars * m.model.contextLength });
  }
  const maxBody = options.maxBodyBytes ?? 1 << 20;
  const defaultMax = options.defaultMaxTokens ?? 512;
  for (const [k, v] of [["maxBodyBytes", maxBody], ["defaultMaxTokens", defaultMax]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`Invalid ${k} ${v}: expected a positive integer`);
  }
  const door = await Door.create({ apiKeys: options.apiKeys, allowedHosts: options.allowedHosts });
  const log = options.onLog ?? ((line: string) => console.error(line));
  const encoder = new PromptEncoder();
  const scheduler = new Scheduler({ parallel: options.parallel ?? 4, maxQueue: options.maxQueue ?? 16 });
  const cache = new PromptCache(options.cacheBytes ?? 256 << 20);
  const web = new Map<string, string>();
  for (const [path, f] of Object.entries(WEB_FILES)) {
    web.set(path, await (await fetch(new URL(f.file, import.meta.url))).text());
  }
  const active = new Set<AbortController>();
  const counters = { completed: 0, cancelled: 0, rejected: 0 };
  let closed = false;
  const created = Math.floor(Date.now() / 1000);

  const kvStats = () => Object.fromEntries([...entries.values()].map((e) => [e.id, e.model.kvStats()]));
  const stats = (): ServerStats => ({
    running: scheduler.running,
    queued: scheduler.queued,
    ...counters,
    cache: cache.stats(),
    kv: kvStats(),
  });

  /**
   * Runs a request's generations (its `n` choices) in as many slots; frees everything however it
   * ends. The prompt is tokenized only once the request has its slots (so a burst of long prompts
   * waits in the queue, or gets 429, untokenized). With `n > 1` the prompt is evaluated once, here,
   * and the sequence is forked for the other choices, which share its KV pages; each choice then
   * evaluates the prompt's last token in its own sequence, and they all decode in the same steps.
   */
  async function start(entry: Entry, prompt: PromptSource, params: CommonParams, signal: AbortSignal) {
    const model = entry.model;
    const n = params.n;
    if (n > scheduler.parallel) {
      throw new ApiError(
        400,
        `Invalid 'n' ${n}: this server runs at most ${scheduler.parallel} generations at once (its parallel ` +
          `setting), and each choice is one`,
        "invalid_request_error",
        "n",
        "invalid_value",
      );
    }
    let release: () => void;
    try {
      release = await scheduler.acquire(signal, n);
    } catch (e) {
      if (e instanceof QueueFullError) {
        counters.rejected++;
        throw new ApiError(429, e.message, "rate_limit_error", null, "rate_limit_exceeded");
      }
      throw e;
    }
    let ids: number[];
    let options: GenerateOptions[];
    try {
      ids = await promptIds(entry, prompt, signal);
      const maxTokens = checkRoom(entry, ids.length, params);
      const base: GenerateOptions = {
        ...params.sampling,
        maxTokens,
        stop: params.stop,
        signal,
        addSpecialTokens: false,
      };
      const seed = params.sampling.seed;
      // Choice i samples with seed + i, so that a seeded request gives the same n choices every time.
      options = Array.from({ length: n }, (_, i) => seed === undefined ? base : { ...base, seed: seed + i });
      // Checked before anything is evaluated: a bad option refuses the request having run nothing.
      for (const o of options) resolveSampling(o, model.config.vocabSize, model.contextLength);
    } catch (e) {
      release();
      if (e instanceof SamplingOptionError) throw new ApiError(400, e.message, "invalid_request_error", e.option);
      throw e;
    }
    const { seq, reuse } = cache.take(model, ids);
    const seqs: Sequence[] = [seq];
    let choices: Choices | undefined;
    let claim: PoolClaim | undefined;
    let finished = false;
    const finish = async () => {
      if (finished) return;
      finished = true;
      await choices?.settled(); // a step still running writes to its sequence
      release();
      for (const fork of seqs.slice(1)) await fork.dispose();
      claim?.release();
      await cache.put(model, seq);
    };
    try {
      // The pages this request's sequences may come to take: each its positions' pages, and one more for the
      // copy of the shared page it first writes into (copy on write). Idle sequences of the prompt cache make
      // way for them; when running requests hold the pool the room may still lack, and the engine then refuses
      // a step it cannot hold (a 503).
      const pageSize = model.kvStats().pageSize;
      const pages = n * (Math.ceil((ids.length + options[0].maxTokens!) / pageSize) + 1);
      claim = await cache.claim(model, seqs, pages);
      if (n === 1) {
        choices = new Choices([model.continueSequence(seq, ids.slice(reuse), options[0])]);
      } else {
        if (ids.length - 1 > reuse) await seq.evaluate(ids.slice(reuse, -1), { signal });
        for (let i = 1; i < n; i++) seqs.push(seq.fork());
        const last = ids.slice(-1);
        choices = new Choices(seqs.map((s, i) => model.continueSequence(s, last, options[i])));
      }
      return { choices, reuse, finish, promptTokens: ids.length };
    } catch (e) {
      choices?.cancel();
      await finish();
      if (!signal.aborted) throw apiError(e);
      counters.cancelled++;
      throw e; // the client went away (or the server is closing): answered as such
    }
  }

  /**
   * The `max_tokens` of a request whose prompt has `promptTokens` tokens: the asked-for one if the
   * context holds it, else the default within the room left; a prompt or `max_tokens` past the
   * context is a `400`.
   */
  function checkRoom(entry: Entry, promptTokens: number, params: CommonParams): number {
    const context = entry.model.contextLength;
    const room = context - promptTokens;
    if (room < 1) {
      throw new ApiError(
        400,
        `The prompt has ${promptTokens} tokens: model "${entry.id}" holds ${context}`,
        "invalid_request_error",
        "messages" in params ? "messages" : "prompt",
        "context_length_exceeded",
      );
    }
    if (params.maxTokens !== undefined && promptTokens + params.maxTokens > context) {
      throw new ApiError(
        400,
        `Invalid 'max_tokens' ${params.maxTokens}: the prompt has ${promptTokens} tokens and model "${entry.id}" ` +
          `holds ${context}, so at most ${room} can be generated`,
        "invalid_request_error",
        "max_tokens",
        "context_length_exceeded",
      );
    }
    return params.maxTokens ?? Math.min(defaultMax, room);
  }

  /**
   * What a request's prompt is, checked without tokenizing: a chat is rendered by its template, and a text
   * longer than the model's context could hold at any tokenization is refused here.
   */
  function promptSource(entry: Entry, req: ChatRequest | CompletionRequest): PromptSource {
    let text: string;
    let param: string;
    if ("messages" in req) {
      if (entry.template instanceof ChatTemplateError) {
        throw new ApiError(
          400,
          `Model "${entry.id}" has no chat template: use /v1/completions, or start the server with a template`,
          "invalid_request_error",
          "model",
          "no_chat_template",
        );
      }
      try {
        text = entry.template.render(req.messages);
      } catch (e) {
        throw new ApiError(400, (e as Error).message, "invalid_request_error", "messages");
      }
      param = "messages";
    } else if (typeof req.prompt === "string") {
      text = req.prompt;
      param = "prompt";
    } else {
      const V = entry.model.config.vocabSize;
      const badId = req.prompt.find((id) => id >= V);
      if (badId !== undefined) {
        throw new ApiError(
          400,
          `Invalid 'prompt' token id ${badId}: expected ids below ${V}`,
          "invalid_request_error",
          "prompt",
        );
      }
      return { ids: req.prompt };
    }
    if (text.length > entry.maxPromptChars) {
      throw new ApiError(
        400,
        `The prompt has ${text.length} characters: model "${entry.id}" holds ${entry.model.contextLength} tokens ` +
          `of at most ${entry.maxPromptChars / entry.model.contextLength} characters each, so at most ` +
          `${entry.maxPromptChars} characters fit`,
        "invalid_request_error",
        param,
        "context_length_exceeded",
      );
    }
    return "messages" in req && !(entry.template instanceof ChatTemplateError)
      ? { template: entry.template, messages: req.messages, renderedChars: text.length }
      : { text, addSpecialTokens: true };
  }

  /** The token ids of a prompt: long texts are tokenized in a worker, off the event loop. */
  async function promptIds(entry: Entry, prompt: PromptSource, signal: AbortSignal): Promise<number[]> {
    if ("ids" in prompt) return prompt.ids;
    // A chat prompt's special tokens come only from its template, never from what the messages say (llama.cpp's
    // rule); a completion prompt gets BOS as the tokenizer says.
    const ids = await encoder.encode(entry.model, prompt, signal);
    const bos = entry.model.tokenizer.bosId;
    return ids.length > 0 || !("text" in prompt) || bos === undefined ? ids : [bos];
  }

  async function complete(req: Request, kind: "chat" | "completion"): Promise<Response> {
    const body = await readJson(req, maxBody);
    const parsed = kind === "chat" ? parseChatRequest(body) : parseCompletionRequest(body);
    const entry = entries.get(parsed.model);
    if (!entry) throw modelNotFound(parsed.model, `: this server has ${[...entries.keys()].join(", ")}`);
    const prompt = promptSource(entry, parsed);
    // One controller stops the generation however it is stopped: close(), the request's signal (the client
    // went away, also while queued), or the response body being cancelled (the connection went while streaming).
    // The signal reaches the generations, which stop within one step; cancel() alone waits for the prompt.
    const ac = new AbortController();
    const clientGone = () => ac.abort(new DOMException("The client disconnected", "AbortError"));
    req.signal.addEventListener("abort", clientGone, { once: true });
    if (req.signal.aborted) clientGone(); // gone before the listener was there: an abort event never comes
    active.add(ac);
    let run: Awaited<ReturnType<typeof start>>;
    try {
      run = await start(entry, prompt, parsed, ac.signal);
    } catch (e) {
      active.delete(ac);
      req.signal.removeEventListener("abort", clientGone);
      throw e;
    }
    const { choices } = run;
    const id = `${kind === "chat" ? "chatcmpl" : "cmpl"}-${crypto.randomUUID().replaceAll("-", "")}`;
    const head = {
      id,
      object: kind === "chat" ? "chat.completion" : "text_completion",
      created: Math.floor(Date.now() / 1000),
      model: entry.id,
    };
    const usage = () => usageObject(run.promptTokens, run.reuse, choices.generatedTokens);
    const enc = new TextEncoder();
    const chunkHead = { ...head, object: kind === "chat" ? "chat.completion.chunk" : "text_completion" };
    const sse = (data: unknown) => enc.encode(`data: ${JSON.stringify(data)}\n\n`);
    const delta = (index: number, text: string | null, reason: string | null) =>
      kind === "chat"
        ? { index, delta: text === null ? {} : { content: text }, logprobs: null, finish_reason: reason }
        : { index, text: text ?? "", logprobs: null, finish_reason: reason };
    let ended = false;
    const end = async (how: "completed" | "cancelled") => {
      ended = true;
      counters[how]++;
      active.delete(ac);
      req.signal.removeEventListener("abort", clientGone);
      await run.finish();
    };
    let cancelled = false;
    let pulling: Promise<void> | undefined;
    /** Whether a {@link step} runs now (it then sees an abort itself, through its generators' signal). */
    let stepping = false;
    /** Ends the body of a run that failed: an error event in a stream (as OpenAI does), else a broken body. */
    const fail = (controller: ReadableStreamDefaultController<Uint8Array>, e: unknown) => {
      if (!parsed.stream) {
        controller.error(e); // the status line is sent: all that is left is to break the connection
        return;
      }
      const err = apiError(e);
      try {
        controller.enqueue(sse({ error: { message: err.message, type: err.type, param: err.param, code: err.code } }));
        controller.close();
      } catch { /* the client is gone */ }
    };
    /**
     * Ends the run of an aborted request (the client went away, the server is closing) when no step is running:
     * its generations are pull-driven, so if nobody pulls its body no step would ever see the abort, and its
     * slots would stay taken (a server layer that drops a response without cancelling its body). Whoever reads
     * the body after all gets its end.
     */
    const abandon = (controller: ReadableStreamDefaultController<Uint8Array>) => {
      if (ended || cancelled || stepping) return; // a running step ends the run itself, or calls this when done
      cancelled = true;
      choices.cancel();
      end("cancelled").catch((e) => log(`Internal error ending a cancelled request: ${(e as Error).stack ?? e}`));
      fail(controller, ac.signal.reason);
    };
    /** Sends the next piece of a stream (or, not streaming, runs every choice to its end). */
    const step = async (controller: ReadableStreamDefaultController<Uint8Array>): Promise<void> => {
      if (ended || cancelled) return;
      stepping = true;
      try {
        await stepOnce(controller);
      } finally {
        stepping = false;
        // An abort that came while the step ran and did not end it (the token it waited for came anyway).
        if (ac.signal.aborted) abandon(controller);
      }
    };
    const stepOnce = async (controller: ReadableStreamDefaultController<Uint8Array>): Promise<void> => {
      try {
        for (;;) {
          await yieldToEventLoop(); // let other requests (and a cancel) in between tokens
          if (ended || cancelled) return;
          const event = await choices.next();
          if (ended || cancelled) return;
          if (!event) break;
          if (!parsed.stream) continue;
          if (event.kind === "text") {
            if (!event.text) continue;
            controller.enqueue(sse({ ...chunkHead, choices: [delta(event.index, event.text, null)] }));
          } else {
            controller.enqueue(sse({ ...chunkHead, choices: [delta(event.index, null, finishReason(event.reason))] }));
          }
          return;
        }
      } catch (e) {
        choices.cancel();
        if (cancelled) return; // cancel() ends it
        await end("cancelled");
        fail(controller, e);
        return;
      }
      await end("completed");
      if (!parsed.stream) {
        const all = choices.texts.map((text, index) => {
          const reason = finishReason(choices.stopReason(index));
          return kind === "chat"
            ? { index, message: { role: "assistant", content: text }, logprobs: null, finish_reason: reason }
            : { index, text, logprobs: null, finish_reason: reason };
        });
        controller.enqueue(enc.encode(JSON.stringify({ ...head, choices: all, usage: usage() })));
      } else {
        if (parsed.includeUsage) controller.enqueue(sse({ ...chunkHead, choices: [], usage: usage() }));
        controller.enqueue(enc.encode("data: [DONE]\n\n"));
      }
      controller.close();
    };
    let streamController!: ReadableStreamDefaultController<Uint8Array>;
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        streamController = controller;
        if (kind !== "chat" || !parsed.stream) return;
        for (let index = 0; index < choices.count; index++) {
          controller.enqueue(sse({
            ...chunkHead,
            choices: [{ index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }],
          }));
        }
      },
      pull(controller) {
        pulling = step(controller);
        return pulling;
      },
      async cancel() {
        if (ended) return;
        cancelled = true;
        clientGone();
        choices.cancel();
        await pulling; // the tokens being computed still write to the sequences: wait before giving them back
        if (!ended) await end("cancelled");
      },
    }, { highWaterMark: 0 });
    // Also when it aborted before this listener was there (start() resolved in the same turn as the abort).
    ac.signal.addEventListener("abort", () => abandon(streamController), { once: true });
    if (ac.signal.aborted) abandon(streamController);
    const headers: Record<string, string> = parsed.stream
      ? { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", "x-request-id": id }
      : { "content-type": "application/json", "x-request-id": id };
    return new Response(stream, { headers });
  }

  async function route(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const path = url.pathname.replace(/\/+$/, "") || "/";
    const method = req.method;
    const only = (m: string) => {
      if (method !== m) {
        throw new ApiError(
          405,
          `Method ${method} is not allowed on ${path}: use ${m}`,
          "invalid_request_error",
          null,
          "method_not_allowed",
        );
      }
    };
    if (closed) throw new ApiError(503, "The server is shutting down", "server_error", null, "unavailable");
    door.checkHost(req);
    if (!OPEN_PATHS.has(path)) await door.checkKey(req);
    switch (path) {
      case "/v1/chat/completions":
        only("POST");
        return await complete(req, "chat");
      case "/v1/completions":
        only("POST");
        return await complete(req, "completion");
      case "/v1/models":
        only("GET");
        return Response.json({ object: "list", data: [...entries.values()].map((e) => modelObject(e, created)) });
      case "/health":
        only("GET");
        return Response.json({
          status: "ok",
          models: [...entries.keys()],
          running: scheduler.running,
          queued: scheduler.queued,
          kv: kvStats(),
        });
      case "/debug/stats":
        if (!options.debug) break;
        only("GET");
        if (url.searchParams.get("gc") === "1") collectGarbage();
        return Response.json({ ...stats(), memory: Deno.memoryUsage(), gcExposed: hasGc() });
    }
    if (path.startsWith("/v1/models/")) {
      only("GET");
      const id = decodeURIComponent(path.slice("/v1/models/".length));
      const entry = entries.get(id);
      if (!entry) throw modelNotFound(id);
      return Response.json(modelObject(entry, created));
    }
    const page = web.get(path === "/index.html" ? "/" : path);
    if (page !== undefined) {
      only("GET");
      return new Response(page, {
        headers: { "content-type": WEB_FILES[path === "/index.html" ? "/" : path].type, "cache-control": "no-cache" },
      });
    }
    throw new ApiError(404, `Not found: ${method} ${path}`, "invalid_request_error", null, "not_found");
  }

  const handler = async (req: Request): Promise<Response> => {
    try {
      return await route(req);
    } catch (e) {
      if (e instanceof ApiError) {
        return e.toResponse(e.status === 401 ? { "www-authenticate": 'Bearer realm="llm-engine"' } : {});
      }
      const gone = new ApiError(499, "The client disconnected", "invalid_request_error", null, "cancelled");
      if (e instanceof DOMException && e.name === "AbortError") return gone.toResponse();
      if (e instanceof ClientGoneError) {
        log(`${req.method} ${new URL(req.url).pathname}: ${e.message}`);
        return gone.toResponse();
      }
      log(`Internal error on ${req.method} ${new URL(req.url).pathname}: ${(e as Error).stack ?? e}`);
      return new ApiError(500, `Internal error: ${(e as Error).message}`, "server_error").toResponse();
    }
  };

  return {
    handler,
    stats,
    async close() {
      closed = true;
      for (const ac of active) ac.abort(new DOMException("The server is closing", "AbortError"));
      // Let aborted generations unwind and return their sequences.
      for (let i = 0; i < 100 && (active.size > 0 || scheduler.running > 0); i++) {
        await new Promise((r) => setTimeout(r, 10));
      }
      encoder.close();
      await cache.clear();
    },
  };
}

/**
 * Starts the server (on 127.0.0.1:8080 unless told otherwise). `close()` stops
 * listening, stops running generations and frees the prompt cache; the models
 * stay loaded (the caller disposes them).
 */
export async function startServer(options: StartOptions): Promise<RunningServer> {
  const hostname = options.hostname ?? "127.0.0.1";
  // On a loopback address only this machine's pages can reach the server, so a Host naming anything else is a
  // DNS-rebinding page.
  const allowedHosts = isLoopbackAddress(hostname) ? [...options.allowedHosts ?? [], hostname] : options.allowedHosts;
  const h = await createHandler({ ...options, allowedHosts });
  // Deno.serve has no header or body timeout and no connection cap: a small HTTP/1.1 server of our own does.
  let server: Http1Server;
  try {
    server = serveHttp1({
      hostname,
      port: options.port ?? 8080,
      headersTimeoutMs: options.headersTimeoutMs ?? 30_000,
      bodyTimeoutMs: options.bodyTimeoutMs ?? 30_000,
      maxConnections: options.maxConnections ?? 64,
      onListen: options.onListen,
      onLog: options.onLog ?? ((line) => console.error(line)),
    }, h.handler);
  } catch (e) {
    await h.close();
    throw e;
  }
  const addr = server.addr;
  const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
  return {
    ...h,
    addr,
    url: `http://${host}:${addr.port}`,
    finished: server.finished,
    async close() {
      await h.close();
      await server.shutdown();
    },
  };
}

/** Resolves after pending I/O callbacks have run (a macrotask turn, with no timer clamping). */
function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * OpenAI's model object, plus which endpoints the model answers: the chat page offers
 * only models that can chat, instead of failing after a message is sent.
 */
function modelObject(entry: Entry, created: number) {
  const capabilities = { chat_completions: !(entry.template instanceof ChatTemplateError), completions: true };
  return { id: entry.id, object: "model", created, owned_by: "llm-engine", capabilities };
}

/**
 * The error a failed generation is answered with: an {@link ApiError} as it is; a KV pool that
 * cannot hold the request's tokens (every page held by running requests) a `503` the client may
 * retry; anything else a `500`.
 */
function apiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof KvPoolFullError) return new ApiError(503, e.message, "server_error", null, "kv_cache_full");
  return new ApiError(500, (e as Error).message, "server_error");
}

/** The `404` for a model id the server does not have; `detail` says more after the sentence. */
function modelNotFound(id: string, detail = ""): ApiError {
  return new ApiError(
    404,
    `The model ${JSON.stringify(id)} does not exist${detail}`,
    "invalid_request_error",
    "model",
    "model_not_found",
  );
}

function hasGc(): boolean {
  return typeof (globalThis as { gc?: unknown }).gc === "function";
}

function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) { for (let i = 0; i < 3; i++) gc(); }
}
