/**
 * The OpenAI wire format: reading and validating request bodies (every bad
 * field becomes an {@link ApiError} naming the parameter) and the response
 * objects of `/v1/chat/completions` and `/v1/completions`.
 *
 * @module
 */

import { concatBytes } from "../graph/bytes.ts";
import type { ChatMessage } from "../models/chat/session.ts";
import type { GenerateOptions, StopReason } from "../models/generate/token_generator.ts";

/** An error answered as JSON in the OpenAI shape `{ error: { message, type, param, code } }`. */
export class ApiError extends Error {
  /**
   * An error to answer with.
   *
   * @param status HTTP status
   * @param message what is wrong, sentence case
   * @param type OpenAI error type (`invalid_request_error`, …)
   * @param param the request field at fault, if any
   * @param code a machine-readable code, if any
   */
  constructor(
    readonly status: number,
    message: string,
    readonly type = "invalid_request_error",
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
    this.name = "ApiError";
  }

  /** The JSON response. */
  toResponse(headers: HeadersInit = {}): Response {
    return Response.json(
      { error: { message: this.message, type: this.type, param: this.param, code: this.code } },
      { status: this.status, headers },
    );
  }
}

/** Sampling and stopping options common to both endpoints, validated. */
export interface CommonParams {
  /** The `model` field: which served model answers. */
  model: string;
  /** `stream`: answer as server-sent events. */
  stream: boolean;
  /** `stream_options.include_usage`: end a stream with a usage chunk. */
  includeUsage: boolean;
  /** `n`: how many choices to generate for the prompt (1 to {@link MAX_CHOICES}; default 1). */
  n: number;
  /** `max_tokens` / `max_completion_tokens`, if given. */
  maxTokens: number | undefined;
  /** `stop`: one string or a list, as a list. */
  stop: string[];
  /** The sampling fields (`temperature`, `top_p`, `seed`, …) as generation options. */
  sampling: GenerateOptions;
}

/** A validated `/v1/chat/completions` request. */
export interface ChatRequest extends CommonParams {
  /** The conversation, each message's content as text. */
  messages: ChatMessage[];
}

/** A validated `/v1/completions` request. */
export interface CompletionRequest extends CommonParams {
  /** The prompt: text, or token ids. */
  prompt: string | number[];
}

/** The most choices (`n`) one request may ask for. */
export const MAX_CHOICES = 16;

/** A JSON object, as the API sends and receives them. */
export type Json = Record<string, unknown>;

function bad(param: string, message: string, code: string | null = "invalid_value"): never {
  throw new ApiError(400, message, "invalid_request_error", param, code);
}

function describe(v: unknown): string {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

function optNumber(body: Json, key: string, min: number, max: number, integer = false): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || v < min || v > max) {
    bad(key, `Invalid '${key}' ${describe(v)}: expected ${integer ? "an integer" : "a number"} from ${min} to ${max}`);
  }
  return v;
}

/** `body[key]` if it is an object, `undefined` if absent or null; anything else is a `400` naming `key`. */
function optObject(body: Json, key: string): Json | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "object" || Array.isArray(v)) bad(key, `Invalid '${key}' ${describe(v)}: expected an object`);
  return v as Json;
}

function parseCommon(body: unknown): CommonParams & { body: Json } {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new ApiError(400, `Invalid request body ${describe(body)}: expected a JSON object`, "invalid_request_error");
  }
  const b = body as Json;
  if (typeof b.model !== "string" || b.model === "") {
    bad("model", `Invalid 'model' ${describe(b.model)}: expected a model id`);
  }
  if (b.stream !== undefined && b.stream !== null && typeof b.stream !== "boolean") {
    bad("stream", `Invalid 'stream' ${describe(b.stream)}: expected true or false`);
  }
  let includeUsage = false;
  const so = optObject(b, "stream_options");
  if (so) {
    if (so.include_usage !== undefined && typeof so.include_usage !== "boolean") {
      bad("stream_options.include_usage", `Invalid 'stream_options.include_usage' ${describe(so.include_usage)}`);
    }
    includeUsage = so.include_usage === true;
  }
  const n = optNumber(b, "n", 1, MAX_CHOICES, true) ?? 1;
  const maxTokens = optNumber(b, "max_completion_tokens", 1, 1 << 24, true) ??
    optNumber(b, "max_tokens", 1, 1 << 24, true);
  let stop: string[] = [];
  if (typeof b.stop === "string") stop = [b.stop];
  else if (Array.isArray(b.stop)) stop = b.stop as string[];
  else if (b.stop !== undefined && b.stop !== null) {
    bad("stop", `Invalid 'stop' ${describe(b.stop)}: expected a string or an array of strings`);
  }
  if (stop.length > 4 || stop.some((s) => typeof s !== "string" || s === "")) {
    bad("stop", `Invalid 'stop' ${describe(b.stop)}: expected up to 4 non-empty strings`);
  }
  const sampling: GenerateOptions = {
    temperature: optNumber(b, "temperature", 0, 2),
    topP: optNumber(b, "top_p", 0, 1),
    topK: optNumber(b, "top_k", 0, 1 << 20, true),
    minP: optNumber(b, "min_p", 0, 1),
    presencePenalty: optNumber(b, "presence_penalty", -2, 2),
    frequencyPenalty: optNumber(b, "frequency_penalty", -2, 2),
    repetitionPenalty: optNumber(b, "repeat_penalty", 0, 10),
    seed: optNumber(b, "seed", -(2 ** 53), 2 ** 53, true),
  };
  if (sampling.topP === 0) sampling.topP = Number.MIN_VALUE; // OpenAI allows 0 (≈ greedy)
  const lb = optObject(b, "logit_bias");
  if (lb) {
    const bias: Record<number, number> = {};
    for (const [k, v] of Object.entries(lb)) {
      if (!/^\d+$/.test(k) || typeof v !== "number" || !(v >= -100 && v <= 100)) {
        bad(
          "logit_bias",
          `Invalid 'logit_bias' entry ${describe(k)}: ${describe(v)}: expected token id → number from -100 to 100`,
        );
      }
      bias[Number(k)] = v as number;
    }
    sampling.logitBias = bias;
  }
  for (const k of Object.keys(sampling) as (keyof GenerateOptions)[]) if (sampling[k] === undefined) delete sampling[k];
  return { body: b, model: b.model as string, stream: b.stream === true, includeUsage, n, maxTokens, stop, sampling };
}

/** Validates a `/v1/chat/completions` body. */
export function parseChatRequest(body: unknown): ChatRequest {
  const c = parseCommon(body);
  const raw = c.body.messages;
  if (!Array.isArray(raw)) bad("messages", `Invalid 'messages' ${describe(raw)}: expected an array of messages`);
  if (raw.length === 0) bad("messages", "Invalid 'messages' []: expected at least one message", "empty_array");
  const messages = raw.map((m: unknown, i: number): ChatMessage => {
    const param = `messages[${i}]`;
    if (typeof m !== "object" || m === null || Array.isArray(m)) {
      bad(param, `Invalid '${param}' ${describe(m)}: expected an object`);
    }
    const r = m as Json;
    if (!["system", "developer", "user", "assistant"].includes(r.role as string)) {
      bad(
        `${param}.role`,
        `Invalid '${param}.role' ${describe(r.role)}: expected "system", "developer", "user" or "assistant"`,
      );
    }
    let content: string;
    if (typeof r.content === "string") content = r.content;
    else if (Array.isArray(r.content)) {
      content = r.content.map((p: unknown, j: number) => {
        const part = p as Json;
        if (typeof part !== "object" || part === null || part.type !== "text" || typeof part.text !== "string") {
          bad(
            `${param}.content[${j}]`,
            `Invalid '${param}.content[${j}]' ${describe(p)}: only text parts are supported`,
          );
        }
        return part.text as string;
      }).join("");
    } else bad(`${param}.content`, `Invalid '${param}.content' ${describe(r.content)}: expected a string`);
    return { role: r.role === "developer" ? "system" : r.role as string, content };
  });
  return { ...strip(c), messages };
}

/** Validates a `/v1/completions` body. */
export function parseCompletionRequest(body: unknown): CompletionRequest {
  const c = parseCommon(body);
  let p = c.body.prompt;
  if (Array.isArray(p) && p.length === 1 && typeof p[0] === "string") p = p[0];
  if (typeof p === "string") {
    if (p === "") bad("prompt", "Invalid 'prompt' \"\": expected a non-empty string", "empty_prompt");
    return { ...strip(c), prompt: p };
  }
  if (Array.isArray(p) && p.length > 0 && p.every((x) => Number.isInteger(x) && x >= 0)) {
    return { ...strip(c), prompt: p as number[] };
  }
  return bad("prompt", `Invalid 'prompt' ${describe(p)}: expected a string or an array of token ids`);
}

function strip(c: CommonParams & { body: Json }): CommonParams {
  const { body: _, ...rest } = c;
  return rest;
}

/** OpenAI's `finish_reason` for an engine stop reason. */
export function finishReason(r: StopReason | undefined): "stop" | "length" {
  return r === "maxTokens" || r === "context" ? "length" : "stop";
}

/** The `usage` object. */
export function usageObject(promptTokens: number, cachedTokens: number, completionTokens: number): Json {
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
    prompt_tokens_details: { cached_tokens: cachedTokens },
  };
}

/** A request body stopped coming in time (thrown by the body stream of the server's HTTP layer). */
export class BodyTimeoutError extends Error {
  /**
   * The error for a body that took too long.
   *
   * @param timeoutMs the limit it went past
   */
  constructor(readonly timeoutMs: number) {
    super(`Request body timeout: the whole body must arrive within ${timeoutMs / 1000} s`);
    this.name = "BodyTimeoutError";
  }
}

/** The client went away before its request was read: nobody is left to answer, so it is logged as one line. */
export class ClientGoneError extends Error {
  /**
   * The error for a vanished client.
   *
   * @param message what was cut short
   */
  constructor(message: string) {
    super(message);
    this.name = "ClientGoneError";
  }
}

/**
 * Throws a `415` unless the request's body is declared `application/json`: a browser sends a cross-origin
 * `text/plain` or form POST without asking the server first, but never a JSON one.
 */
export function requireJsonBody(req: Request): void {
  const type = req.headers.get("content-type");
  if (type?.split(";")[0].trim().toLowerCase() === "application/json") return;
  throw new ApiError(
    415,
    `Unsupported Content-Type ${JSON.stringify(type)}: send the body as 'Content-Type: application/json'`,
    "invalid_request_error",
    null,
    "unsupported_media_type",
  );
}

/**
 * The JSON body of `req`, at most `limit` bytes: `413` past it, then `415` unless it is declared
 * `application/json`, `400` if it does not parse, `408` if it came too slowly ({@link BodyTimeoutError}), and a
 * {@link ClientGoneError} if the client went away before its end.
 */
export async function readJson(req: Request, limit: number): Promise<unknown> {
  const declared = Number(req.headers.get("content-length") ?? NaN);
  const tooLarge = () =>
    new ApiError(
      413,
      `Request body too large: the limit is ${limit} bytes`,
      "invalid_request_error",
      null,
      "request_too_large",
    );
  if (declared > limit) throw tooLarge();
  if (!req.body) throw new ApiError(400, "Missing request body: expected JSON", "invalid_request_error");
  const parts: Uint8Array[] = [];
  let size = 0;
  const reader = req.body.getReader();
  for (;;) {
    let chunk: ReadableStreamReadResult<Uint8Array>;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e instanceof BodyTimeoutError) {
        throw new ApiError(408, e.message, "invalid_request_error", null, "request_timeout");
      }
      throw new ClientGoneError(`The client went away after ${size} bytes of the body (${(e as Error).message})`);
    }
    const { done, value } = chunk;
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      throw tooLarge();
    }
    parts.push(value);
  }
  requireJsonBody(req);
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(concatBytes(parts)));
  } catch (e) {
    throw new ApiError(400, `Invalid JSON in the request body: ${(e as Error).message}`, "invalid_request_error");
  }
}
