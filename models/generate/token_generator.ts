/**
 * Token-by-token generation from a {@link Sequence}: sampling, stop conditions and statistics. Nothing
 * is computed until {@link TokenGenerator.next} is called: the first call evaluates the prompt (in
 * chunks, cancellable between them), each later call one token. The streams over it are in
 * `streams.ts`.
 *
 * @module
 */

import { setImmediate } from "node:timers";
import { logProb, type Sampler, type SamplingOptions } from "./sampler.ts";
import type { Sequence } from "../exec/sequence.ts";
import { StopMatcher, StreamingDecoder } from "../text/detokenizer.ts";
import type { TextTokenizer } from "../text/tokenizer.ts";

/** Options of `Model.generate`: sampling plus when to stop. */
export interface GenerateOptions extends SamplingOptions {
  /** Most tokens to generate: an integer ≥ 0. Default 256. */
  maxTokens?: number;
  /**
   * Generation ends before the first occurrence of any of these strings (each non-empty). An array
   * even for one string: a bare string is refused with a `TypeError` (it would otherwise be taken as
   * its characters, stopping at any of them).
   */
  stop?: readonly string[];
  /** Keep generating past end-of-sequence tokens (as llama.cpp's `ignore_eos`). */
  ignoreEos?: boolean;
  /**
   * Aborting errors the stream with the signal's reason, also during the prompt. The signal is
   * checked before every token and between prompt chunks. So that a timer-based signal
   * (`AbortSignal.timeout`) or a signal listener can fire even when the consumer never waits on
   * anything else (a backend whose steps resolve at once, a `for await` that does nothing), a
   * generation given a signal yields to the event loop between tokens, at most once every
   * {@link YIELD_INTERVAL_MS} milliseconds; without a signal it never does.
   */
  signal?: AbortSignal;
  /** Add BOS as the tokenizer config says (default true). */
  addSpecialTokens?: boolean;
}

/**
 * Checks the options of a generation that are not sampling options (those are checked by
 * `resolveSampling`): `maxTokens` (a `RangeError`), and the types of `stop`, `ignoreEos`, `signal` and
 * `addSpecialTokens` (a `TypeError`), each naming the option and the value. Callers run it before
 * they take anything that must be given back, such as a sequence.
 */
export function checkGenerateOptions(options: GenerateOptions): void {
  const { maxTokens, stop, ignoreEos, signal, addSpecialTokens } = options;
  if (maxTokens !== undefined && !(Number.isInteger(maxTokens) && maxTokens >= 0)) {
    throw new RangeError(`Invalid maxTokens ${describe(maxTokens)}: expected an integer ≥ 0`);
  }
  if (stop !== undefined) {
    if (!Array.isArray(stop)) {
      throw new TypeError(
        `Invalid stop ${describe(stop)}: expected an array of non-empty strings (one stop string is [${
          describe(stop)
        }])`,
      );
    }
    for (const s of stop) {
      if (typeof s !== "string" || s.length === 0) {
        throw new TypeError(`Invalid stop string ${describe(s)} in stop: expected a non-empty string`);
      }
    }
  }
  for (const [name, v] of [["ignoreEos", ignoreEos], ["addSpecialTokens", addSpecialTokens]] as const) {
    if (v !== undefined && typeof v !== "boolean") {
      throw new TypeError(`Invalid ${name} ${describe(v)}: expected a boolean`);
    }
  }
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw new TypeError(`Invalid signal ${describe(signal)}: expected an AbortSignal`);
  }
}

/** A value as an error message shows it. */
function describe(v: unknown): string {
  return typeof v === "number" ? String(v) : JSON.stringify(v) ?? typeof v;
}

/** What {@link TokenGenerator.cancel} aborts with: a step that fails with it ended by cancellation. */
function cancelledReason(): DOMException {
  return new DOMException("The generation was cancelled", "AbortError");
}

/**
 * How often, at most, a generation with a signal yields to the event loop (see
 * {@link GenerateOptions.signal}): often enough for a timer to fire within a few milliseconds, seldom
 * enough that the yields cost under 1% of decode speed.
 */
export const YIELD_INTERVAL_MS = 5;

/** Why generation ended. */
export type StopReason = "eos" | "maxTokens" | "stop" | "context" | "cancelled";

/** One generated token. */
export interface GeneratedToken {
  /** The token id. */
  readonly id: number;
  /** Natural log of the token's probability under the model (before sampling settings). */
  readonly logprob: number;
  /** Text this token completes; "" while a character or a possible stop string is pending. */
  readonly text: string;
}

/** Counts, times and speeds of one generation, final once the stream has ended. */
export interface GenerationStats {
  /** Prompt tokens evaluated for this generation (for a chat turn, those not already cached). */
  promptTokens: number;
  /** Tokens generated so far. */
  generatedTokens: number;
  /**
   * Milliseconds from the start of the generation (the `generate` call) to the first token: the
   * prompt's evaluation, and any wait before the consumer's first read. 0 until there is a token.
   */
  timeToFirstTokenMs: number;
  /** Milliseconds to evaluate the prompt and pick the first token. */
  prefillMs: number;
  /** Milliseconds of the following single-token steps. */
  decodeMs: number;
  /** Prompt tokens per second of the prefill (a prompt of a few tokens gives a rate that says little). */
  prefillTokensPerSecond: number;
  /** Tokens per second of the single-token steps after the first token. */
  decodeTokensPerSecond: number;
  /** Why the generation ended; undefined while it runs (or when it was interrupted by an error). */
  stopReason: StopReason | undefined;
}

/**
 * Waits for one turn of the event loop, where timers, I/O and signal events run: awaiting a resolved
 * promise is not enough (microtasks run before any of them). `setImmediate` takes a few microseconds
 * and keeps nothing alive; `setTimeout(0)` is clamped to milliseconds, and a `MessageChannel` (what a
 * browser would use) measured some 2% of decode speed against setImmediate's 0.5%.
 */
function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Produces tokens one at a time from a sequence that already holds nothing of this turn's prompt. */
export class TokenGenerator {
  /** This generation's statistics, updated as it runs. */
  readonly stats: GenerationStats;
  readonly #seq: Sequence;
  readonly #prompt: readonly number[];
  readonly #sampler: Sampler;
  readonly #decoder: StreamingDecoder;
  readonly #stops: StopMatcher;
  readonly #eos: ReadonlySet<number>;
  readonly #max: number;
  readonly #ignoreEos: boolean;
  readonly #signal?: AbortSignal;
  /** Aborted by {@link TokenGenerator.cancel}, so that a prompt's evaluation stops at the next chunk. */
  readonly #cancel = new AbortController();
  readonly #vocab: number;
  readonly #started = performance.now();
  #lastYield = performance.now();
  #logits: Float32Array | undefined;
  #done = false;
  #inflight: Promise<unknown> | undefined;
  /** Reused for every decode step, so a step allocates no arrays of its own. */
  readonly #next1 = new Int32Array(1);
  readonly #evalOptions: { signal?: AbortSignal };

  /**
   * Prepares a generation; nothing runs until the first {@link TokenGenerator.next}.
   *
   * @param seq the sequence to extend
   * @param prompt ids to evaluate before the first token (may be empty when the
   *   sequence already ends with them, but then the sequence must be non-empty)
   * @param tokenizer for text pieces
   * @param sampler configured sampler
   * @param options stop conditions (checked by {@link checkGenerateOptions})
   */
  constructor(
    seq: Sequence,
    prompt: readonly number[],
    tokenizer: TextTokenizer,
    sampler: Sampler,
    options: GenerateOptions,
  ) {
    checkGenerateOptions(options);
    const max = options.maxTokens ?? 256;
    this.#seq = seq;
    this.#prompt = prompt;
    this.#sampler = sampler;
    this.#max = max;
    this.#stops = new StopMatcher(options.stop ?? []);
    this.#eos = new Set(tokenizer.eosIds);
    this.#ignoreEos = options.ignoreEos ?? false;
    this.#signal = options.signal;
    // Evaluation stops on the caller's signal and on cancel(), whichever comes first.
    const cancel = this.#cancel.signal;
    this.#evalOptions = { signal: options.signal ? AbortSignal.any([cancel, options.signal]) : cancel };
    this.#vocab = sampler.vocabSize;
    this.#decoder = new StreamingDecoder(tokenizer, [...seq.tokens, ...prompt]);
    for (const id of [...seq.tokens, ...prompt]) sampler.accept(id);
    this.stats = {
      promptTokens: prompt.length,
      generatedTokens: 0,
      timeToFirstTokenMs: 0,
      prefillMs: 0,
      decodeMs: 0,
      prefillTokensPerSecond: 0,
      decodeTokensPerSecond: 0,
      stopReason: undefined,
    };
  }

  /** The next token, or undefined when generation has ended. One call at a time. */
  next(): Promise<GeneratedToken | undefined> {
    const step = this.#next();
    this.#inflight = step.catch(() => {});
    return step;
  }

  /** Resolves once no step is running (after {@link TokenGenerator.cancel}, before reusing the sequence). */
  async settled(): Promise<void> {
    await this.#inflight;
  }

  async #next(): Promise<GeneratedToken | undefined> {
    if (this.#done) return undefined;
    const t0 = performance.now();
    if (this.#signal) {
      // Inline, so that a step that does not yield costs no extra promise.
      if (t0 - this.#lastYield >= YIELD_INTERVAL_MS) {
        await yieldToEventLoop();
        this.#lastYield = performance.now();
      }
      this.#signal.throwIfAborted();
    }
    const first = this.#logits === undefined;
    if (first) {
      try {
        this.#logits = this.#prompt.length > 0
          ? await this.#seq.evaluate(this.#prompt, this.#evalOptions)
          : await this.#lastLogits();
      } catch (e) {
        if (this.#isCancellation(e)) return undefined;
        throw e;
      }
      if (this.#done) return undefined; // cancelled during the last chunk
    }
    if (this.stats.generatedTokens >= this.#max) return this.#finish("maxTokens");
    this.#signal?.throwIfAborted();
    const logits = this.#logits!;
    const id = this.#sampler.sample(logits);
    const logprob = logProb(logits, id, this.#vocab);
    this.#sampler.accept(id);
    this.stats.generatedTokens++;
    const eos = this.#eos.has(id) && !this.#ignoreEos;
    let text = eos ? "" : this.#stops.push(this.#decoder.push(id));
    const reason: StopReason | undefined = eos
      ? "eos"
      : this.#stops.stopped
      ? "stop"
      : this.stats.generatedTokens >= this.#max
      ? "maxTokens"
      : this.#seq.length >= this.#seq.capacity
      ? "context"
      : undefined;
    if (reason === undefined) {
      this.#next1[0] = id;
      try {
        this.#logits = await this.#seq.evaluate(this.#next1, this.#evalOptions);
      } catch (e) {
        if (!this.#isCancellation(e)) throw e; // cancelled: the token is still this call's
      }
    } else if (!this.#done) {
      // Not when cancel() came first: the reason stays "cancelled".
      this.#done = true;
      if (!this.#stops.stopped) text += this.#stops.push(this.#decoder.flush()) + this.#stops.flush();
      this.stats.stopReason = reason;
    }
    this.#time(first, t0);
    return { id, logprob, text };
  }

  /**
   * Marks the generation as cancelled and stops the step in flight at its next chance (between
   * prompt chunks): the pending {@link TokenGenerator.next} then resolves to undefined, or to the
   * token it had already picked, and later calls to undefined. The stop reason is `"cancelled"`
   * unless the generation had already ended.
   */
  cancel(): void {
    if (!this.#done) this.stats.stopReason = "cancelled";
    this.#done = true;
    if (!this.#cancel.signal.aborted) this.#cancel.abort(cancelledReason());
  }

  /** Whether `e` is the abort of {@link TokenGenerator.cancel} (not the caller's signal's). */
  #isCancellation(e: unknown): boolean {
    return this.#cancel.signal.aborted && e === this.#cancel.signal.reason;
  }

  #finish(reason: StopReason): undefined {
    this.#done = true;
    this.stats.stopReason = reason;
    return undefined;
  }

  async #lastLogits(): Promise<Float32Array> {
    // Re-evaluate the last token to get its logits (after a rollback, say).
    const last = this.#seq.tokens[this.#seq.length - 1];
    if (last === undefined) throw new RangeError("Cannot generate from an empty sequence without a prompt");
    this.#evalOptions.signal?.throwIfAborted(); // before the token is taken off, not after
    this.#seq.truncate(this.#seq.length - 1);
    return await this.#seq.evaluate([last], this.#evalOptions);
  }

  #time(first: boolean, t0: number): void {
    const now = performance.now();
    const s = this.stats;
    if (first) {
      s.timeToFirstTokenMs = now - this.#started;
      s.prefillMs += now - t0;
      s.prefillTokensPerSecond = s.promptTokens / (s.prefillMs / 1000);
    } else {
      s.decodeMs += now - t0;
      s.decodeTokensPerSecond = (s.generatedTokens - 1) / (s.decodeMs / 1000);
    }
  }
}
