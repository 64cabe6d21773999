/**
 * The chat session file format: a versioned, checksummed container for a
 * conversation, its tokens and its KV cache rows, tied to one model by a
 * fingerprint of the model's files.
 *
 * Layout: 8 magic bytes, u32 version, u32 header length, the JSON header, the
 * tokens as i32, the KV cache bytes, then a SHA-256 of everything before it.
 *
 * @module
 */

import type { ChatMessage } from "../text/chat_template.ts";
import { type ContextPolicy, isContextPolicy } from "./context_policy.ts";
import type { GenerateOptions } from "../generate/token_generator.ts";
import { concatBytes, hexString, sha256 } from "../../graph/bytes.ts";
import { isKvDType, type KvDType } from "../../graph/dtype.ts";
import type { Model } from "../model.ts";
import { safetensorsFiles } from "../files/weights.ts";

/** A session file that cannot be used; `reason` says why. */
export class SessionFileError extends Error {
  /**
   * `"magic"` (not a session file), `"version"`, `"corrupt"` (truncated or
   * damaged), `"model"` (another model) or `"template"` (it carries a chat
   * template the caller did not trust).
   */
  readonly reason: "magic" | "version" | "corrupt" | "model" | "template";
  /**
   * A session file error of a kind, with its message.
   * @param reason what kind of problem
   * @param message what is wrong, sentence case
   */
  constructor(reason: SessionFileError["reason"], message: string) {
    super(message);
    this.name = "SessionFileError";
    this.reason = reason;
  }
}

/** A session file written for another model (or another build of its files). */
export class SessionModelMismatchError extends SessionFileError {
  /** Fingerprint of the loaded model. */
  readonly expected: string;
  /** Fingerprint stored in the file. */
  readonly found: string;

  /**
   * Says that a file saved for model `found` cannot be restored into model `expected`.
   * @param expected fingerprint of the loaded model
   * @param found fingerprint stored in the file
   */
  constructor(expected: string, found: string) {
    super(
      "model",
      `Cannot restore a session saved for model ${found.slice(0, 16)}… into model ${expected.slice(0, 16)}…`,
    );
    this.name = "SessionModelMismatchError";
    this.expected = expected;
    this.found = found;
  }
}

/** The magic bytes that open a session file. */
export const SESSION_MAGIC = "LLMCHAT\0";
/** The session file format version this code writes and reads. */
export const SESSION_VERSION = 1;

const fingerprints = new WeakMap<Model, Promise<string>>();

/**
 * The identity of a model for session files: SHA-256 (hex) over its config, KV
 * cache shape, tokenizer files, and each weight file's name, size and full
 * content hash ({@link weightFileDigest}), so that a model that differs in any
 * byte of its weights (tensor names, shapes and dtypes are in the files'
 * headers) is another model. Computed once per model.
 */
export function modelFingerprint(model: Model): Promise<string> {
  let p = fingerprints.get(model);
  if (!p) {
    p = computeFingerprint(model);
    fingerprints.set(model, p);
  }
  return p;
}

async function computeFingerprint(model: Model): Promise<string> {
  const enc = new TextEncoder();
  const parts: Uint8Array[] = [];
  const c = model.config;
  parts.push(enc.encode(JSON.stringify({ config: c, kvRow: c.numKvHeads * c.headDim })));
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
    try {
      parts.push(enc.encode(f), await Deno.readFile(`${model.dir}/${f}`));
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  }
  for (const path of await safetensorsFiles(model.dir)) {
    const name = path.slice(path.lastIndexOf("/") + 1);
    const { size, digest } = await weightFileDigest(path);
    parts.push(enc.encode(`${name}:${size}:${digest}`));
  }
  return hexString(await sha256(concatBytes(parts)));
}

/** Digests already computed in this process, by path, size and modification time. */
const fileDigests = new Map<string, Promise<string>>();

/** Bytes hashed at a time: the digest of a file is the SHA-256 of its chunks' SHA-256s. */
const DIGEST_CHUNK = 16 << 20;

/**
 * A SHA-256 hash over every byte of the file at `path` (hex; the hash of the
 * SHA-256 of each 16 MiB chunk, since WebCrypto cannot hash a stream), with its
 * size. A file already hashed in this process with the same size and
 * modification time is not read again.
 */
export async function weightFileDigest(path: string): Promise<{ size: number; digest: string }> {
  const info = await Deno.stat(path);
  const key = `${path}\0${info.size}\0${info.mtime?.getTime() ?? ""}`;
  let digest = fileDigests.get(key);
  if (!digest) {
    digest = hashFile(path);
    fileDigests.set(key, digest);
    digest.catch(() => fileDigests.delete(key));
  }
  return { size: info.size, digest: await digest };
}

async function hashFile(path: string): Promise<string> {
  using file = await Deno.open(path);
  const chunk = new Uint8Array(DIGEST_CHUNK);
  const digests: Uint8Array[] = [];
  for (;;) {
    let filled = 0;
    while (filled < chunk.length) {
      const n = await file.read(chunk.subarray(filled));
      if (n === null) break;
      filled += n;
    }
    if (filled > 0) digests.push(await sha256(chunk.subarray(0, filled)));
    if (filled < chunk.length) break;
  }
  return hexString(await sha256(concatBytes(digests)));
}

/** An exchange of a conversation, as a session remembers it. */
export interface SessionExchange {
  /** Index of the exchange's user message. */
  readonly messageIndex: number;
  /** Cache length when the exchange began (the saved position `undo` returns to). */
  readonly cachePosition: number;
}

/** What a session file's JSON header holds. */
export interface SessionHeader {
  /** The fingerprint of the model the session was saved with ({@link modelFingerprint}). */
  model: string;
  /** The conversation. */
  messages: ChatMessage[];
  /** Where each exchange starts, for `undo`. */
  exchanges: SessionExchange[];
  /** Turns answered so far (a set seed advances by one per turn). */
  turns: number;
  /** The template that overrode the model's, or null. */
  template: string | null;
  /** The context policy. */
  policy: ContextPolicy;
  /** Positions kept free for an answer, or null for the default. */
  reserveTokens: number | null;
  /** The session's generation defaults. */
  defaults: GenerateOptions;
  /** Tokens in the saved cache. */
  tokens: number;
  /** The KV cache dtype the rows were saved in (files without it hold f32). */
  kvDtype: KvDType;
  /** Bytes of the saved KV cache rows. */
  kvBytes: number;
}

/** Validates a parsed header, throwing a `TypeError` naming the bad field. */
function parseHeader(v: unknown): SessionHeader {
  const h = v as Record<string, unknown>;
  const fail = (field: string): never => {
    throw new TypeError(`field "${field}" is ${JSON.stringify(h?.[field])}`);
  };
  if (typeof h !== "object" || h === null) throw new TypeError("expected a JSON object");
  const nat = (f: string) => (Number.isInteger(h[f]) && (h[f] as number) >= 0 ? h[f] as number : fail(f));
  if (typeof h.model !== "string") fail("model");
  if (!Array.isArray(h.messages)) fail("messages");
  for (const m of h.messages as unknown[]) {
    const r = m as Record<string, unknown>;
    if (typeof r !== "object" || r === null || typeof r.role !== "string" || typeof r.content !== "string") {
      fail("messages");
    }
  }
  const messages = (h.messages as ChatMessage[]).map((m) => ({ role: m.role, content: m.content }));
  if (!Array.isArray(h.exchanges)) fail("exchanges");
  const exchanges = (h.exchanges as Record<string, unknown>[]).map((e) => {
    const i = e?.messageIndex, p = e?.cachePosition;
    if (!Number.isInteger(i) || !Number.isInteger(p) || (i as number) < 0 || (p as number) < 0) fail("exchanges");
    if ((i as number) >= messages.length || messages[i as number].role !== "user") fail("exchanges");
    return { messageIndex: i as number, cachePosition: p as number };
  });
  if (h.template !== null && typeof h.template !== "string") fail("template");
  if (!isContextPolicy(h.policy)) fail("policy");
  if (h.reserveTokens !== null) nat("reserveTokens");
  const d = h.defaults ?? {};
  if (typeof d !== "object" || d === null || Array.isArray(d)) fail("defaults");
  for (const [k, v] of Object.entries(d as Record<string, unknown>)) {
    const ok = SAVED_OPTIONS.includes(k) &&
      (typeof v === "number" || typeof v === "boolean" || (k === "stop" && Array.isArray(v)) ||
        (k === "logitBias" && typeof v === "object" && v !== null));
    if (!ok) throw new TypeError(`field "defaults.${k}" is ${JSON.stringify(v)}`);
  }
  return {
    model: h.model as string,
    messages,
    exchanges,
    turns: nat("turns"),
    template: h.template as string | null,
    policy: h.policy as ContextPolicy,
    reserveTokens: h.reserveTokens as number | null,
    defaults: d as GenerateOptions,
    tokens: nat("tokens"),
    kvDtype: h.kvDtype === undefined
      ? "f32"
      : typeof h.kvDtype === "string" && isKvDType(h.kvDtype)
      ? h.kvDtype
      : fail("kvDtype"),
    kvBytes: nat("kvBytes"),
  };
}

/** Generation defaults a session file keeps (not `signal`). */
const SAVED_OPTIONS = [
  "maxTokens",
  "stop",
  "ignoreEos",
  "addSpecialTokens",
  "temperature",
  "topK",
  "topP",
  "minP",
  "repetitionPenalty",
  "presencePenalty",
  "frequencyPenalty",
  "penaltyLastN",
  "logitBias",
  "seed",
];

/** The generation defaults a session file can keep. */
export function serializableDefaults(o: GenerateOptions): GenerateOptions {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (SAVED_OPTIONS.includes(k) && v !== undefined) out[k] = v;
  return out as GenerateOptions;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false;
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Encodes a session file. */
export async function encodeSessionFile(
  header: SessionHeader,
  tokens: Int32Array,
  kv: Uint8Array,
): Promise<Uint8Array> {
  const enc = new TextEncoder();
  const json = enc.encode(JSON.stringify(header));
  const fixed = new Uint8Array(16);
  fixed.set(enc.encode(SESSION_MAGIC), 0);
  const view = new DataView(fixed.buffer);
  view.setUint32(8, SESSION_VERSION, true);
  view.setUint32(12, json.byteLength, true);
  const body = concatBytes([fixed, json, new Uint8Array(tokens.buffer, tokens.byteOffset, tokens.byteLength), kv]);
  return concatBytes([body, await sha256(body)]);
}

/** A decoded session file. */
export interface SessionFile {
  /** The checked JSON header. */
  readonly header: SessionHeader;
  /** The cached token ids. */
  readonly tokens: number[];
  /** The KV cache rows, keys then values per layer, in the header's `kvDtype`. */
  readonly kv: Uint8Array;
}

/**
 * Decodes and checks a session file: magic, version, checksum, header, sizes,
 * and that it was written for the model whose fingerprint is `expectedModel`.
 */
export async function decodeSessionFile(bytes: Uint8Array, expectedModel: string): Promise<SessionFile> {
  const dec = new TextDecoder("utf-8", { fatal: true });
  const magic = bytes.byteLength >= 8 ? dec.decode(bytes.subarray(0, 8).slice(), { stream: false }) : "";
  if (magic !== SESSION_MAGIC) {
    throw new SessionFileError("magic", "Cannot restore the session: not a session file (bad magic bytes)");
  }
  if (bytes.byteLength < 16 + 32) {
    throw new SessionFileError(
      "corrupt",
      `Cannot restore the session: the file is truncated (${bytes.byteLength} bytes)`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = view.getUint32(8, true);
  if (version !== SESSION_VERSION) {
    throw new SessionFileError(
      "version",
      `Cannot restore the session: file format version ${version}, expected ${SESSION_VERSION}`,
    );
  }
  const body = bytes.subarray(0, bytes.byteLength - 32);
  if (!equalBytes(await sha256(body), bytes.subarray(bytes.byteLength - 32))) {
    throw new SessionFileError("corrupt", "Cannot restore the session: the file is truncated or damaged (checksum)");
  }
  const headerLength = view.getUint32(12, true);
  if (16 + headerLength > body.byteLength) {
    throw new SessionFileError("corrupt", `Cannot restore the session: header length ${headerLength} past the end`);
  }
  let header: SessionHeader;
  try {
    header = parseHeader(JSON.parse(dec.decode(body.subarray(16, 16 + headerLength))));
  } catch (e) {
    throw new SessionFileError("corrupt", `Cannot restore the session: bad header: ${(e as Error).message}`);
  }
  if (header.model !== expectedModel) throw new SessionModelMismatchError(expectedModel, header.model);
  const tokStart = 16 + headerLength;
  if (tokStart + header.tokens * 4 + header.kvBytes !== body.byteLength) {
    throw new SessionFileError("corrupt", "Cannot restore the session: sizes in the header do not match the file");
  }
  const tokens = Array.from(new Int32Array(body.slice(tokStart, tokStart + header.tokens * 4).buffer));
  return { header, tokens, kv: body.slice(tokStart + header.tokens * 4) };
}
