/**
 * A sequence: the tokens a model has seen, their KV cache, and the compiled
 * steps that extend it. Prompts are evaluated in chunks of at most
 * `plans.prefillChunk` tokens, checking for cancellation between chunks.
 *
 * @module
 */

import type { Executable } from "../../backends/contract.ts";
import type { DType } from "../../graph/dtype.ts";
import { debugLevel, debugTimings } from "./debug.ts";
import { KvCache } from "./kv_cache.ts";
import type { LogitsMode, ModelPlans } from "./plans.ts";

/** A prompt or conversation longer than the context. */
export class ContextOverflowError extends RangeError {
  /** Positions the request needs. */
  readonly needed: number;
  /** Positions the context holds. */
  readonly capacity: number;

  /**
   * Says that `needed` positions do not fit in a context of `capacity`.
   * @param needed positions the request needs
   * @param capacity positions the context holds
   */
  constructor(needed: number, capacity: number) {
    super(`Cannot evaluate ${needed} tokens: the context holds ${capacity}`);
    this.name = "ContextOverflowError";
    this.needed = needed;
    this.capacity = capacity;
  }
}

/** Options of {@link Sequence.evaluate}. */
export interface EvaluateOptions {
  /** `"last"` (default): logits of the last token; `"all"`: of every token evaluated. */
  readonly logits?: LogitsMode;
  /** Stops between chunks; the tokens of finished chunks stay in the cache. */
  readonly signal?: AbortSignal;
}

/** Tokens, their KV cache, and the compiled steps for one stream of text. */
export class Sequence {
  /** The sequence's KV cache (one key and one value tensor per layer on the model's backend). */
  readonly kv: KvCache;
  readonly #plans: ModelPlans;
  readonly #exec = new Map<LogitsMode, Promise<Executable>>();
  readonly #ids: Int32Array;
  readonly #logits: Float32Array;
  readonly #tokens: number[] = [];
  #evaluated = 0;
  #profiled = new Set<string>();
  readonly #onDispose: ((s: Sequence) => void) | undefined;
  #disposed = false;

  /**
   * A new, empty sequence with its own KV cache; use `Model.createSequence`.
   * @param plans the model's planned graphs
   * @param onDispose called once when the sequence is disposed (the model forgets it)
   */
  constructor(plans: ModelPlans, onDispose?: (s: Sequence) => void) {
    this.#plans = plans;
    this.#onDispose = onDispose;
    const c = plans.config;
    this.kv = new KvCache(plans.backend, c.numLayers, plans.capacity, c.numKvHeads * c.headDim, plans.kvDtype);
    this.#ids = new Int32Array(plans.prefillChunk);
    this.#logits = new Float32Array(c.vocabSize);
  }

  /** Tokens in the cache, oldest first. */
  get tokens(): readonly number[] {
    return this.#tokens;
  }

  /** Positions filled. */
  get length(): number {
    return this.kv.length;
  }

  /** Positions the context holds. */
  get capacity(): number {
    return this.kv.capacity;
  }

  /** Tokens run through the model since this sequence was made (prefill plus decode). */
  get evaluatedTokens(): number {
    return this.#evaluated;
  }

  /**
   * Appends `tokens` and runs them through the model. Returns the logits of the
   * last token (a buffer reused by the next call), or with `logits: "all"` a new
   * array of `tokens.length × vocab` logits.
   */
  async evaluate(tokens: ArrayLike<number>, options: EvaluateOptions = {}): Promise<Float32Array> {
    const n = tokens.length;
    const V = this.#plans.config.vocabSize;
    if (n === 0) throw new RangeError("Cannot evaluate an empty list of tokens");
    if (this.length + n > this.capacity) throw new ContextOverflowError(this.length + n, this.capacity);
    for (let i = 0; i < n; i++) {
      const id = tokens[i];
      if (!Number.isInteger(id) || id < 0 || id >= V) {
        throw new RangeError(`Cannot evaluate token id ${id}: expected an integer from 0 to ${V - 1}`);
      }
    }
    const mode = options.logits ?? "last";
    const exec = await this.#executable(mode);
    const { llama, plan } = this.#plans.planned(mode);
    const all = mode === "all" ? new Float32Array(n * V) : undefined;
    const chunk = this.#plans.prefillChunk;
    for (let start = 0; start < n; start += chunk) {
      if (start > 0) {
        // Let cancellation and other tasks in between chunks.
        await new Promise((r) => setTimeout(r, 0));
      }
      options.signal?.throwIfAborted();
      const T = Math.min(chunk, n - start);
      for (let i = 0; i < T; i++) this.#ids[i] = tokens[start + i];
      exec.writeInput(llama.tokens.id, this.#ids, T);
      const key = `${mode}:${T === 1 ? "decode" : "prefill"}`;
      const profile = debugLevel() >= 2 && !this.#profiled.has(key) ? new Float64Array(plan.order.length) : undefined;
      await exec.run({ dims: { T }, pos: this.length }, profile);
      if (profile) {
        this.#profiled.add(key);
        debugTimings(`${key} step of ${T} tokens at position ${this.length}`, plan, profile);
      }
      this.kv.advance(T);
      this.#evaluated += T;
      for (let i = 0; i < T; i++) this.#tokens.push(tokens[start + i]);
      if (all) await exec.readOutput(llama.logits.id, all.subarray(start * V, (start + T) * V), T * V);
      else if (start + T === n) await exec.readOutput(llama.logits.id, this.#logits, V);
    }
    return all ?? this.#logits;
  }

  /** Forgets every token from position `length` on (rollback). */
  truncate(length: number): void {
    this.kv.truncate(length);
    this.#tokens.length = length;
  }

  /** An independent copy: same tokens and cache, nothing mutable shared. */
  fork(): Sequence {
    const s = new Sequence(this.#plans);
    this.copyTo(s);
    return s;
  }

  /** Makes `other` (a sequence of the same model) hold this sequence's tokens and cache rows. */
  copyTo(other: Sequence): void {
    this.kv.copyTo(other.kv);
    other.#tokens.length = 0;
    other.#tokens.push(...this.#tokens);
  }

  /**
   * Sets tokens and cache rows saved earlier (see {@link KvCache.save}), from a
   * cache of dtype `kvDtype` (default: this sequence's).
   */
  restore(tokens: readonly number[], kvBytes: Uint8Array, kvDtype?: DType): void {
    this.kv.restore(kvBytes, tokens.length, kvDtype);
    this.#tokens.length = 0;
    this.#tokens.push(...tokens);
  }

  /** Frees the cache and the compiled steps (once; later calls do nothing). */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#onDispose?.(this);
    for (const e of this.#exec.values()) (await e).dispose();
    this.#exec.clear();
    this.kv.dispose();
  }

  #executable(mode: LogitsMode): Promise<Executable> {
    let e = this.#exec.get(mode);
    if (!e) {
      e = this.#plans.compile(mode, this.kv);
      this.#exec.set(mode, e);
    }
    return e;
  }
}
