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
  /** Most tokens to generate. Default 256. */
  maxTokens?: number;
  /** Generation ends before the first occurrence of any of these strings. */
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
   * @param options stop conditions
   */
  constructor(
    seq: Sequence,
    prompt: readonly number[],
    tokenizer: TextTokenizer,
    sampler: Sampler,
    options: GenerateOptions,
  ) {
    const max = options.maxTokens ?? 256;
    if (!Number.isInteger(max) || max < 0) throw new RangeError(`Invalid maxTokens ${max}: expected an integer ≥ 0`);
    this.#seq = seq;
    this.#prompt = prompt;
    this.#sampler = sampler;
    this.#max = max;
    this.#stops = new StopMatcher(options.stop ?? []);
    this.#eos = new Set(tokenizer.eosIds);
    this.#ignoreEos = options.ignoreEos ?? false;
    this.#signal = options.signal;
    this.#evalOptions = { signal: options.signal };
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
      this.#logits = this.#prompt.length > 0
        ? await this.#seq.evaluate(this.#prompt, this.#evalOptions)
        : await this.#lastLogits();
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
    if (eos) this.#done = true;
    else if (this.#stops.stopped) this.#done = true;
    else if (this.stats.generatedTokens >= this.#max) this.#done = true;
    else if (this.#seq.length >= this.#seq.capacity) this.#done = true;
    else {
      this.#next1[0] = id;
      this.#logits = await this.#seq.evaluate(this.#next1, this.#evalOptions);
    }
    if (this.#done) {
      const reason: StopReason = eos
        ? "eos"
        : this.#stops.stopped
        ? "stop"
        : this.stats.generatedTokens >= this.#max
        ? "maxTokens"
        : "context";
      if (!this.#stops.stopped) text += this.#stops.push(this.#decoder.flush()) + this.#stops.flush();
      this.stats.stopReason = reason;
    }
    this.#time(first, t0);
    return { id, logprob, text };
  }

  /** Marks the generation as cancelled. */
  cancel(): void {
    if (!this.#done) this.stats.stopReason = "cancelled";
    this.#done = true;
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
