/**
 * Multi-turn chat: prompts rendered from the model's own Jinja chat template,
 * and {@link ChatSession}, which keeps its KV cache between turns so that a new
 * turn prefills only the tokens the cache does not already hold. Sessions roll
 * back (`undo`, `regenerate`), fork, and save to / restore from a file.
 *
 * @example
 * ```ts ignore
 * import { ChatSession, loadModel } from "../mod.ts";
 * const model = await loadModel("Felladrin/Minueza-32M-UltraChat");
 * const chat = new ChatSession(model, { system: "You are a helpful assistant.", maxTokens: 128 });
 * const reply = chat.send("Hello!");
 * for await (const piece of reply) console.log(piece);
 * console.log(await reply.usage);
 * ```
 *
 * @module
 */

import type { GenerateOptions, GenerationStats, StopReason } from "../generate/token_generator.ts";
import { byteSize } from "../../graph/dtype.ts";
import type { Model } from "../model.ts";
import { ContextOverflowError, type Sequence } from "../exec/sequence.ts";
import { CONTEXT_POLICIES, type ContextPolicy, isContextPolicy } from "./context_policy.ts";
import { type ChatMessage, ChatTemplate, ChatTemplateError } from "../text/chat_template.ts";
import { encodeChatPrompt } from "../text/chat_prompt.ts";
import { writeFileAtomic } from "../files/atomic_write.ts";
import {
  decodeSessionFile,
  encodeSessionFile,
  modelFingerprint,
  serializableDefaults,
  type SessionExchange,
  SessionFileError,
} from "./session_file.ts";

export { type ChatMessage, ChatTemplate, ChatTemplateError } from "../text/chat_template.ts";
export { modelFingerprint, SessionFileError, SessionModelMismatchError } from "./session_file.ts";

export type { ContextPolicy } from "./context_policy.ts";
export { type ChatPromptOptions, encodeChatPrompt } from "../text/chat_prompt.ts";

/** Options of {@link ChatSession}: generation defaults for every turn plus session settings. */
export interface ChatSessionOptions extends GenerateOptions {
  /** The system prompt (first message), if any. */
  system?: string;
  /** Jinja chat template to use instead of the model's. */
  template?: string;
  /**
   * When the rendered conversation plus `reserveTokens` does not fit in the
   * context: `"error"` (default) refuses the turn with a {@link ContextOverflowError}
   * and leaves the session as it was; `"drop-oldest"` drops the oldest exchanges
   * (keeping the system prompt and the new user message) until it fits, then
   * prefills the shortened conversation again from the system prompt on.
   */
  contextPolicy?: ContextPolicy;
  /** Positions kept free for the answer. Default: `maxTokens` (256 if unset), at most a quarter of the context. */
  reserveTokens?: number;
}

/** Options of {@link ChatSession.deserialize} and {@link ChatSession.load}. */
export interface SessionLoadOptions extends ChatSessionOptions {
  /**
   * Use a chat template stored in the file even when it is neither the model's
   * own nor `template` (default false). A template is a program: one from an
   * untrusted file could loop, inflate the prompt or forge turns, so such a file
   * is refused with a {@link SessionFileError} (reason `"template"`) unless the
   * caller opts in.
   */
  trustTemplate?: boolean;
}

/** Token counts of one answer. */
export interface ChatUsage {
  /** Tokens of the rendered conversation (the prompt). */
  readonly promptTokens: number;
  /** Of those, tokens that were already in the KV cache and were not evaluated again. */
  readonly cachedTokens: number;
  /** Tokens generated. */
  readonly completionTokens: number;
  /** Why the answer ended. */
  readonly stopReason: StopReason | undefined;
  /** Messages dropped by the `"drop-oldest"` policy before this turn. */
  readonly droppedMessages: number;
}

/** An answer as it streams: text pieces, with statistics and usage once it ends. */
export type ChatReply = ReadableStream<string> & {
  /** Generation statistics (final once the stream has ended). */
  readonly stats: GenerationStats;
  /** Resolves when the answer ends (or rejects with the stream's error). */
  readonly usage: Promise<ChatUsage>;
};

/** A second turn started while an answer is still streaming. */
export class SessionBusyError extends Error {
  constructor() {
    super("Cannot start a turn while the previous answer is still streaming: read or cancel it first");
    this.name = "SessionBusyError";
  }
}

/**
 * A conversation with a model that keeps its KV cache between turns.
 *
 * Each turn renders the whole conversation with the chat template, keeps the
 * longest prefix that the cache already holds, and evaluates only the rest.
 * One answer streams at a time.
 */
export class ChatSession {
  /** The model the session runs on. */
  readonly model: Model;
  readonly #template: ChatTemplate;
  readonly #templateOverride: string | undefined;
  readonly #defaults: GenerateOptions;
  readonly #policy: ContextPolicy;
  readonly #reserve: number | undefined;
  #seq: Sequence;
  #messages: ChatMessage[] = [];
  #exchanges: SessionExchange[] = [];
  #busy = false;
  #turns = 0;
  #disposed = false;

  /**
   * A new conversation on `model`, with an empty KV cache of its own.
   * @param model a loaded model
   * @param options generation defaults, the system prompt, the template and the context policy
   */
  constructor(model: Model, options: ChatSessionOptions = {}) {
    const { system, template, contextPolicy, reserveTokens, ...defaults } = options;
    if (contextPolicy !== undefined && !isContextPolicy(contextPolicy)) {
      throw new TypeError(
        `Invalid contextPolicy ${JSON.stringify(contextPolicy)}: expected ${
          CONTEXT_POLICIES.map((p) => `"${p}"`).join(" or ")
        }`,
      );
    }
    if (reserveTokens !== undefined && (!Number.isInteger(reserveTokens) || reserveTokens < 0)) {
      throw new RangeError(`Invalid reserveTokens ${reserveTokens}: expected an integer ≥ 0`);
    }
    this.model = model;
    this.#templateOverride = template;
    this.#template = ChatTemplate.forModel(model, template);
    this.#defaults = defaults;
    this.#policy = contextPolicy ?? "error";
    this.#reserve = reserveTokens;
    this.#seq = model.createSequence();
    if (system !== undefined) this.#messages.push({ role: "system", content: system });
  }

  /** The conversation so far (copies). */
  get messages(): ChatMessage[] {
    return this.#messages.map((m) => ({ ...m }));
  }

  /** The system prompt, if any. */
  get system(): string | undefined {
    return this.#messages[0]?.role === "system" ? this.#messages[0].content : undefined;
  }

  /** Tokens held in the KV cache. */
  get cachedTokens(): readonly number[] {
    return this.#seq.tokens;
  }

  /** Tokens run through the model by this session's current cache (prefill plus decode). */
  get evaluatedTokens(): number {
    return this.#seq.evaluatedTokens;
  }

  /** The context policy in force. */
  get contextPolicy(): ContextPolicy {
    return this.#policy;
  }

  /** Whether an answer is streaming. */
  get busy(): boolean {
    return this.#busy;
  }

  /** The prompt text of the conversation as it stands (ending with the assistant's header). */
  render(): string {
    return this.#template.render(this.#messages);
  }

  /**
   * Adds a user message and streams the answer. The answer is added to the
   * conversation when the stream ends (also when it is cancelled: the partial
   * answer stays, `undo()` removes it). If the turn fails before any token, the
   * user message is taken back.
   */
  send(content: string, options: GenerateOptions = {}): ChatReply {
    this.#check();
    if (typeof content !== "string") {
      throw new TypeError(`Invalid message ${JSON.stringify(content)}: expected a string`);
    }
    const exchange: SessionExchange = { messageIndex: this.#messages.length, cachePosition: this.#seq.length };
    this.#messages.push({ role: "user", content });
    this.#exchanges.push(exchange);
    try {
      return this.#answer(options, () => {
        this.#messages.splice(exchange.messageIndex);
        this.#exchanges.pop();
      });
    } catch (e) {
      this.#messages.splice(exchange.messageIndex);
      this.#exchanges.pop();
      throw e;
    }
  }

  /**
   * Generates the last answer again (with the next seed when a seed is set).
   * Throws a `RangeError` when the conversation does not end with an answer.
   */
  regenerate(options: GenerateOptions = {}): ChatReply {
    this.#check();
    const last = this.#messages[this.#messages.length - 1];
    if (last?.role !== "assistant") throw new RangeError("Cannot regenerate: the conversation has no answer to redo");
    this.#messages.pop();
    try {
      return this.#answer(options, () => this.#messages.push(last));
    } catch (e) {
      this.#messages.push(last);
      throw e;
    }
  }

  /**
   * Takes back the last exchange (the last user message and its answer),
   * truncating the cache to where that exchange began. Returns the removed
   * messages (empty when there is nothing to undo).
   */
  undo(): ChatMessage[] {
    this.#check();
    const ex = this.#exchanges.pop();
    if (!ex) return [];
    const removed = this.#messages.splice(ex.messageIndex);
    this.#seq.truncate(Math.min(ex.cachePosition, this.#seq.length));
    return removed;
  }

  /** Forgets the conversation (keeping the system prompt) and the cache past it. */
  reset(): void {
    this.#check();
    this.#messages = this.#messages[0]?.role === "system" ? [this.#messages[0]] : [];
    this.#exchanges = [];
    this.#seq.truncate(0);
  }

  /**
   * Sets (or with `undefined` removes) the system prompt. The conversation is
   * kept; the next turn prefills from where the prompt changed.
   */
  setSystem(text: string | undefined): void {
    this.#check();
    const had = this.#messages[0]?.role === "system";
    if (text === undefined) {
      if (had) this.#shift(-1, () => this.#messages.shift());
    } else if (had) this.#messages[0] = { role: "system", content: text };
    else this.#shift(1, () => this.#messages.unshift({ role: "system", content: text }));
  }

  /**
   * An independent session with the same conversation. Its cache shares the KV pages of this one
   * until either writes past their common prefix (copy on write), so a fork costs no copy of the
   * conversation; nothing mutable is shared.
   */
  fork(): ChatSession {
    this.#check();
    const copy = new ChatSession(this.model, {
      ...this.#defaults,
      template: this.#templateOverride,
      contextPolicy: this.#policy,
      reserveTokens: this.#reserve,
    });
    copy.#messages = this.#messages.map((m) => ({ ...m }));
    copy.#exchanges = this.#exchanges.map((e) => ({ ...e }));
    copy.#turns = this.#turns;
    this.#seq.copyTo(copy.#seq);
    return copy;
  }

  /** The session as bytes (see {@link ChatSession.deserialize}); the format is versioned and checksummed. */
  async serialize(): Promise<Uint8Array> {
    this.#check();
    const tokens = Int32Array.from(this.#seq.tokens);
    const kv = await this.#seq.save();
    return await encodeSessionFile(
      {
        model: await modelFingerprint(this.model),
        messages: this.#messages,
        exchanges: this.#exchanges,
        turns: this.#turns,
        template: this.#templateOverride ?? null,
        policy: this.#policy,
        reserveTokens: this.#reserve ?? null,
        defaults: serializableDefaults(this.#defaults),
        tokens: tokens.length,
        kvDtype: this.model.kvDtype,
        kvBytes: kv.byteLength,
      },
      tokens,
      kv,
    );
  }

  /**
   * Writes the session to `path` (see {@link ChatSession.serialize}), all or
   * nothing: through a temporary file renamed over `path`, so a save that fails
   * or is killed midway leaves the previous file as it was.
   */
  async save(path: string): Promise<void> {
    await writeFileAtomic(path, await this.serialize());
  }

  /**
   * A session restored from {@link ChatSession.serialize} bytes. Throws a
   * {@link SessionFileError} for a file that is not a session, of another
   * version, truncated or damaged, and a {@link SessionModelMismatchError} for a
   * file saved with another model. The generation defaults, context policy and
   * reserve saved in the file apply unless `options` override them. A template
   * saved in the file is used only when it is the model's own or `options.template`,
   * or with `options.trustTemplate`; otherwise the file is refused with a
   * {@link SessionFileError} whose reason is `"template"`.
   */
  static async deserialize(model: Model, bytes: Uint8Array, options: SessionLoadOptions = {}): Promise<ChatSession> {
    const { trustTemplate, ...sessionOptions } = options;
    const { header: h, tokens, kv } = await decodeSessionFile(bytes, await modelFingerprint(model));
    if (h.tokens > model.contextLength) throw new ContextOverflowError(h.tokens, model.contextLength);
    if (
      h.template !== null && trustTemplate !== true && h.template !== model.tokenizer.chatTemplate &&
      h.template !== options.template
    ) {
      throw new SessionFileError(
        "template",
        "Cannot restore the session: the file carries its own chat template, which would run as code; " +
          "pass { trustTemplate: true } to use it or { template } to use another",
      );
    }
    const session = new ChatSession(model, {
      template: h.template ?? undefined,
      contextPolicy: h.policy,
      reserveTokens: h.reserveTokens ?? undefined,
      ...h.defaults,
      ...sessionOptions,
    });
    // A session saved with the other KV cache dtype converts on restore.
    const c = model.config;
    const kvExpected = byteSize(h.kvDtype, h.tokens * c.numKvHeads * c.headDim) * 2 * c.numLayers;
    try {
      if (h.kvBytes !== kvExpected) throw new RangeError(`${h.kvBytes} KV bytes, expected ${kvExpected}`);
      const bad = tokens.find((id) => id < 0 || id >= model.config.vocabSize);
      if (bad !== undefined) throw new RangeError(`token id ${bad} is past the vocabulary`);
      await session.#seq.restore(tokens, kv, h.kvDtype);
    } catch (e) {
      session.dispose();
      throw new SessionFileError("corrupt", `Cannot restore the session: ${(e as Error).message}`);
    }
    session.#messages = h.messages;
    session.#exchanges = h.exchanges;
    session.#turns = h.turns;
    return session;
  }

  /** Reads a session written by {@link ChatSession.save} (see {@link ChatSession.deserialize}). */
  static async load(model: Model, path: string, options: SessionLoadOptions = {}): Promise<ChatSession> {
    return await ChatSession.deserialize(model, await Deno.readFile(path), options);
  }

  /** Frees the session's KV cache. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    void this.#seq.dispose();
  }

  #check(): void {
    if (this.#disposed) throw new TypeError("Cannot use a disposed chat session");
    if (this.#busy) throw new SessionBusyError();
  }

  #shift(delta: number, change: () => void): void {
    change();
    this.#exchanges = this.#exchanges.map((e) => ({ ...e, messageIndex: e.messageIndex + delta }));
  }

  /** Prompt tokens of the conversation, applying the context policy. Returns the ids and messages dropped. */
  #fit(maxTokens: number): { ids: number[]; dropped: number } {
    const capacity = this.#seq.capacity;
    const reserve = Math.min(this.#reserve ?? Math.min(maxTokens, Math.floor(capacity / 4)), capacity - 1);
    // Special tokens come only from the template's text, never from what a user typed.
    const encode = () => encodeChatPrompt(this.#template, this.model.tokenizer, this.#messages);
    let ids = encode();
    if (ids.length === 0) throw new ChatTemplateError("Cannot chat: the chat template rendered an empty prompt");
    let dropped = 0;
    while (ids.length + reserve > capacity) {
      if (this.#policy === "error") throw new ContextOverflowError(ids.length + reserve, capacity);
      // Drop the oldest exchange after the system prompt, never the newest user message.
      const start = this.#messages[0]?.role === "system" ? 1 : 0;
      const last = this.#messages.length - 1;
      let end = start + 1;
      while (end < last && this.#messages[end].role !== "user") end++;
      if (start >= last) throw new ContextOverflowError(ids.length + reserve, capacity);
      end = Math.min(end, last);
      this.#messages.splice(start, end - start);
      dropped += end - start;
      ids = encode();
    }
    if (dropped > 0) {
      // Positions of earlier exchanges no longer describe the cache: rebuild the undo list from the messages.
      this.#exchanges = this.#messages.flatMap((m, i) =>
        m.role === "user" ? [{ messageIndex: i, cachePosition: 0 }] : []
      );
    }
    return { ids, dropped };
  }

  #answer(options: GenerateOptions, rollback: () => void): ChatReply {
    const opts: GenerateOptions = { ...this.#defaults, ...options };
    if (opts.seed !== undefined && options.seed === undefined) opts.seed = opts.seed + this.#turns;
    const snapshot = this.#messages.slice();
    const exchanges = this.#exchanges.slice();
    let fit: { ids: number[]; dropped: number };
    try {
      fit = this.#fit(opts.maxTokens ?? 256);
    } catch (e) {
      this.#messages = snapshot;
      this.#exchanges = exchanges;
      throw e;
    }
    const { ids, dropped } = fit;
    const seq = this.#seq;
    const toks = seq.tokens;
    let common = 0;
    while (common < toks.length && common < ids.length && toks[common] === ids[common]) common++;
    const reuse = Math.min(common, ids.length - 1);
    seq.truncate(reuse);
    const fresh = ids.slice(reuse);
    const gen = this.model.continueSequence(seq, fresh, { ...opts, addSpecialTokens: false });
    this.#turns++;
    this.#busy = true;
    let text = "";
    let produced = false;
    let settled = false;
    let resolveUsage!: (u: ChatUsage) => void;
    let rejectUsage!: (e: unknown) => void;
    const usage = new Promise<ChatUsage>((res, rej) => {
      resolveUsage = res;
      rejectUsage = rej;
    });
    usage.catch(() => {}); // Callers that only read the stream need not handle it.
    const finish = (error?: unknown) => {
      if (settled) return;
      settled = true;
      this.#busy = false;
      if (error !== undefined && !produced) {
        this.#messages = snapshot;
        this.#exchanges = exchanges;
        rollback();
        rejectUsage(error);
        return;
      }
      this.#messages.push({ role: "assistant", content: text });
      resolveUsage({
        promptTokens: ids.length,
        cachedTokens: reuse,
        completionTokens: gen.stats.generatedTokens,
        stopReason: gen.stats.stopReason,
        droppedMessages: dropped,
      });
    };
    let cancelled = false;
    let pulling: Promise<void> | undefined;
    const step = async (controller: ReadableStreamDefaultController<string>) => {
      try {
        for (;;) {
          const t = await gen.next();
          if (cancelled) return;
          if (!t) {
            finish();
            controller.close();
            return;
          }
          produced = true;
          if (t.text) {
            text += t.text;
            controller.enqueue(t.text);
            return;
          }
        }
      } catch (e) {
        gen.cancel();
        if (cancelled) return;
        finish(e);
        controller.error(e);
      }
    };
    const stream = new ReadableStream<string>({
      pull(controller) {
        pulling = step(controller);
        return pulling;
      },
      async cancel() {
        cancelled = true;
        gen.cancel();
        // The token being computed still writes to the cache: the session stays busy until it is done.
        await pulling;
        finish();
      },
    }, { highWaterMark: 0 });
    return Object.assign(stream, { stats: gen.stats, usage });
  }
}
