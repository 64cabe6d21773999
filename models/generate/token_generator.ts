/**
 * Generation as pull-driven streams. Nothing is computed until the consumer
 * reads: the first read evaluates the prompt (in chunks, cancellable between
 * them), each later read one token. `cancel()` on the stream or an
 * `AbortSignal` stops the work.
 *
 * @module
 */

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
  /** Aborting errors the stream with the signal's reason, also during the prompt. */
  signal?: AbortSignal;
  /** Add BOS as the tokenizer config says (default true). */
  addSpecialTokens?: boolean;
}

/** Why generation ended. */
export type StopReason = "eos" | "maxTokens" | "stop" | "context" | "cancelled";

/** One generated token. */
export interface GeneratedToken {
  readonly id: number;
  /** Natural log of the token's probability under the model (before sampling settings). */
  readonly logprob: number;
  /** Text this token completes; "" while a character or a possible stop string is pending. */
  readonly text: string;
}

/** Counts and speeds of one generation, final once the stream has ended. */
export interface GenerationStats {
  promptTokens: number;
  generatedTokens: number;
  /** Milliseconds to evaluate the prompt and pick the first token. */
  prefillMs: number;
  /** Milliseconds of the following single-token steps. */
  decodeMs: number;
  prefillTokensPerSecond: number;
  decodeTokensPerSecond: number;
  stopReason: StopReason | undefined;
}

/** A stream of text pieces with its statistics. */
export type TextStream = ReadableStream<string> & { readonly stats: GenerationStats };
/** A stream of tokens with its statistics. */
export type TokenStream = ReadableStream<GeneratedToken> & { readonly stats: GenerationStats };

/** Produces tokens one at a time from a sequence that already holds nothing of this turn's prompt. */
export class TokenGenerator {
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
  #logits: Float32Array | undefined;
  #done = false;
  #inflight: Promise<unknown> | undefined;
  /** Reused for every decode step, so a step allocates no arrays of its own. */
  readonly #next1 = new Int32Array(1);
  readonly #evalOptions: { signal?: AbortSignal };

  /**
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
    this.#time(first, performance.now() - t0);
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

  #time(first: boolean, ms: number): void {
    const s = this.stats;
    if (first) {
      s.prefillMs += ms;
      s.prefillTokensPerSecond = s.promptTokens / (s.prefillMs / 1000);
    } else {
      s.decodeMs += ms;
      s.decodeTokensPerSecond = (s.generatedTokens - 1) / (s.decodeMs / 1000);
    }
  }
}

/** A pull-driven stream of tokens; `onEnd` runs once when it ends for any reason. */
export function tokenStream(gen: TokenGenerator, onEnd: () => void): TokenStream {
  let ended = false;
  const end = () => {
    if (!ended) {
      ended = true;
      onEnd();
    }
  };
  const stream = new ReadableStream<GeneratedToken>({
    async pull(controller) {
      try {
        const t = await gen.next();
        if (t) controller.enqueue(t);
        else {
          end();
          controller.close();
        }
      } catch (e) {
        gen.cancel();
        end();
        controller.error(e);
      }
    },
    async cancel() {
      gen.cancel();
      await gen.settled();
      end();
    },
  }, { highWaterMark: 0 });
  return Object.assign(stream, { stats: gen.stats });
}

/** A pull-driven stream of text pieces (no empty pieces); ends like {@link tokenStream}. */
export function textStream(gen: TokenGenerator, onEnd: () => void): TextStream {
  let ended = false;
  const end = () => {
    if (!ended) {
      ended = true;
      onEnd();
    }
  };
  const stream = new ReadableStream<string>({
    async pull(controller) {
      try {
        for (;;) {
          const t = await gen.next();
          if (!t) {
            end();
            controller.close();
            return;
          }
          if (t.text) {
            controller.enqueue(t.text);
            return;
          }
        }
      } catch (e) {
        gen.cancel();
        end();
        controller.error(e);
      }
    },
    async cancel() {
      gen.cancel();
      await gen.settled();
      end();
    },
  }, { highWaterMark: 0 });
  return Object.assign(stream, { stats: gen.stats });
}
