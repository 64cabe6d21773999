/**
 * A sequence: the tokens a model has seen and the pages of the model's shared KV
 * pool that hold their keys and values. Its evaluations go through the model's
 * engine, which batches them with those of every other sequence of the model
 * (see `engine.ts`); a fork shares its parent's pages until either writes.
 *
 * @module
 */

import type { DType } from "../../graph/dtype.ts";
import { f16ToF32, f32ToF16 } from "../../graph/half.ts";
import type { Engine, LogitsMode, SequenceState } from "./engine.ts";

export type { LogitsMode };

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
  /** Stops before the next step; the tokens of finished steps stay in the cache. */
  readonly signal?: AbortSignal;
}

/** Tokens and their KV cache pages for one stream of text. */
export class Sequence {
  readonly #engine: Engine;
  readonly #state: SequenceState;
  readonly #capacity: number;

  /**
   * A new, empty sequence of the model whose engine is `engine`; use `Model.createSequence`.
   * @param engine the model's engine
   * @param capacity positions the sequence may hold (the context length)
   */
  constructor(engine: Engine, capacity: number) {
    this.#engine = engine;
    this.#state = engine.newSequence();
    this.#capacity = capacity;
  }

  /** Tokens in the cache, oldest first. */
  get tokens(): readonly number[] {
    return this.#state.tokens;
  }

  /** Positions filled. */
  get length(): number {
    return this.#state.length;
  }

  /** Positions the context holds. */
  get capacity(): number {
    return this.#capacity;
  }

  /** Tokens run through the model since this sequence was made (prefill plus decode). */
  get evaluatedTokens(): number {
    return this.#state.evaluated;
  }

  /** Bytes of the KV pages this sequence holds (a page it shares with others counts in full). */
  get kvBytes(): number {
    return this.#state.table.pages.length * this.#engine.pool.pageBytes;
  }

  /**
   * Appends `tokens` and runs them through the model, in steps shared with the other
   * sequences of the model. Returns the logits of the last token (a buffer reused by
   * the next call), or with `logits: "all"` a new array of `tokens.length × vocab`
   * logits. `tokens` must not change until the promise settles. One evaluation at a
   * time per sequence.
   */
  evaluate(tokens: ArrayLike<number>, options: EvaluateOptions = {}): Promise<Float32Array> {
    try {
      this.#checkTokens(tokens);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#engine.evaluate(this.#state, tokens, options.logits ?? "last", options.signal);
  }

  /** Forgets every token from position `length` on (rollback); the pages past it go back to the pool. */
  truncate(length: number): void {
    this.#idle("truncate");
    if (!Number.isInteger(length) || length < 0 || length > this.length) {
      throw new RangeError(`Cannot truncate the sequence to ${length} tokens: it has ${this.length}`);
    }
    this.#state.table.truncate(length);
    this.#state.tokens.length = length;
  }

  /** A copy with the same tokens, sharing this sequence's KV pages until either writes (copy on write). */
  fork(): Sequence {
    const s = new Sequence(this.#engine, this.#capacity);
    this.copyTo(s);
    return s;
  }

  /** Makes `other` (a sequence of the same model) hold this sequence's tokens, sharing its KV pages. */
  copyTo(other: Sequence): void {
    this.#idle("copy");
    other.#idle("copy into");
    if (other.#engine !== this.#engine) throw new TypeError("Cannot copy a sequence into one of another model");
    other.#state.table.shareFrom(this.#state.table, this.length);
    other.#state.tokens.length = 0;
    other.#state.tokens.push(...this.#state.tokens);
  }

  /**
   * The keys and values of every position: per layer, the keys then the values, each
   * `length` rows in position order (what {@link Sequence.restore} takes back).
   */
  save(): Promise<Uint8Array> {
    const { table } = this.#state;
    return this.#engine.exclusive(() => this.#engine.pool.read(table.pages, this.length));
  }

  /**
   * Sets tokens and their keys and values saved earlier ({@link Sequence.save}), from a
   * cache of dtype `kvDtype` (default: the pool's; f32 and f16 convert).
   */
  restore(tokens: readonly number[], kvBytes: Uint8Array, kvDtype?: DType): Promise<void> {
    try {
      this.#idle("restore");
      this.#checkTokens(tokens, 0, true);
    } catch (e) {
      return Promise.reject(e);
    }
    const pool = this.#engine.pool;
    const from = kvDtype ?? pool.dtype;
    const rows = from === pool.dtype ? kvBytes : convertValues(kvBytes, from, pool.dtype);
    return this.#engine.exclusive(() => {
      const { table } = this.#state;
      table.clear();
      this.#state.tokens.length = 0;
      pool.reserve(Math.ceil(tokens.length / pool.pageSize));
      table.allocate(tokens.length);
      pool.write(table.pages, tokens.length, rows);
      this.#state.tokens.push(...tokens);
    });
  }

  /** Gives the pages back (once; later calls do nothing); a queued evaluation is refused. */
  dispose(): Promise<void> {
    this.#engine.disposeSequence(this.#state);
    return Promise.resolve();
  }

  /** Checks ids against the vocabulary and the context, placed after `base` positions. */
  #checkTokens(tokens: ArrayLike<number>, base = this.length, allowEmpty = false): void {
    const n = tokens.length;
    const V = this.#engine.plans.config.vocabSize;
    if (n === 0 && !allowEmpty) throw new RangeError("Cannot evaluate an empty list of tokens");
    if (base + n > this.#capacity) throw new ContextOverflowError(base + n, this.#capacity);
    for (let i = 0; i < n; i++) {
      const id = tokens[i];
      if (!Number.isInteger(id) || id < 0 || id >= V) {
        throw new RangeError(`Cannot evaluate token id ${id}: expected an integer from 0 to ${V - 1}`);
      }
    }
  }

  #idle(what: string): void {
    if (this.#state.disposed) throw new TypeError(`Cannot ${what} a disposed sequence`);
    if (this.#state.busy) throw new TypeError(`Cannot ${what} a sequence while it evaluates`);
  }
}

/** `data` (f32 or f16 values) as `to` values, rounding to the nearest f16 when narrowing. */
function convertValues(data: Uint8Array, from: DType, to: DType): Uint8Array {
  const aligned = data.byteOffset % 4 === 0 ? data : data.slice();
  if (from === "f32" && to === "f16") {
    const src = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
    return new Uint8Array(Uint16Array.from(src, f32ToF16).buffer);
  }
  if (from === "f16" && to === "f32") {
    const src = new Uint16Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 2);
    return new Uint8Array(Float32Array.from(src, f16ToF32).buffer);
  }
  throw new TypeError(`Cannot convert KV cache rows from "${from}" to "${to}"`);
}
