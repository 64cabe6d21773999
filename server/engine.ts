/**
 * The server's scheduling and its prompt cache.
 *
 * {@link Scheduler}: at most `parallel` generations run at once, at most
 * `maxQueue` more wait their turn, and any further request is refused at once
 * ({@link QueueFullError}, answered with `429`).
 *
 * {@link PromptCache}: sequences (token ids + KV cache) left by finished
 * requests, kept within a byte budget and evicted least recently used first. A
 * new request finds the cached sequence sharing the longest prefix with its
 * prompt and evaluates only the rest (as llama.cpp's prompt cache does): when
 * the request extends that conversation (what the cache holds past the shared
 * prefix is at most half as long as the prefix) it takes the sequence itself;
 * when it branches off earlier it copies the shared prefix into a new sequence
 * and leaves the cached one intact.
 *
 * @module
 */

import { byteSize } from "../graph/dtype.ts";
import type { Model } from "../models/model.ts";
import type { Sequence } from "../models/sequence.ts";

/** Every generation slot is busy and the queue is full. */
export class QueueFullError extends Error {
  /**
   * @param parallel generations running
   * @param queued requests waiting
   */
  constructor(readonly parallel: number, readonly queued: number) {
    super(`Server busy: ${parallel} requests are running and ${queued} are queued; try again later`);
    this.name = "QueueFullError";
  }
}

/** Limits of a {@link Scheduler}. */
export interface SchedulerOptions {
  /** Generations that run at once. */
  parallel: number;
  /** Requests that may wait for a slot. */
  maxQueue: number;
}

interface Waiter {
  resolve: (release: () => void) => void;
  reject: (e: unknown) => void;
}

/** Hands out generation slots in arrival order. */
export class Scheduler {
  readonly parallel: number;
  readonly maxQueue: number;
  #running = 0;
  readonly #queue: Waiter[] = [];

  /** @param options slot and queue limits */
  constructor(options: SchedulerOptions) {
    for (const [k, min] of [["parallel", 1], ["maxQueue", 0]] as const) {
      const v = options[k];
      if (!Number.isInteger(v) || v < min) throw new RangeError(`Invalid ${k} ${v}: expected an integer ≥ ${min}`);
    }
    this.parallel = options.parallel;
    this.maxQueue = options.maxQueue;
  }

  /** Generations running. */
  get running(): number {
    return this.#running;
  }

  /** Requests waiting. */
  get queued(): number {
    return this.#queue.length;
  }

  /**
   * A slot: resolves with its release function (call it exactly once). Throws
   * {@link QueueFullError} synchronously when the queue is full; rejects with
   * the signal's reason if `signal` aborts while waiting.
   */
  acquire(signal?: AbortSignal): Promise<() => void> {
    signal?.throwIfAborted();
    if (this.#running < this.parallel) {
      this.#running++;
      return Promise.resolve(this.#releaser());
    }
    if (this.#queue.length >= this.maxQueue) throw new QueueFullError(this.#running, this.#queue.length);
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve: (r) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(r);
        },
        reject,
      };
      const onAbort = () => {
        const i = this.#queue.indexOf(waiter);
        if (i >= 0) this.#queue.splice(i, 1);
        reject(signal!.reason);
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#queue.push(waiter);
    });
  }

  #releaser(): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.#queue.shift();
      if (next) next.resolve(this.#releaser());
      else this.#running--;
    };
  }
}

interface CacheEntry {
  readonly model: Model;
  readonly seq: Sequence;
  readonly bytes: number;
  lastUsed: number;
}

/** Counters of a {@link PromptCache}. */
export interface PromptCacheStats {
  /** Idle sequences held. */
  sequences: number;
  /** Bytes of their KV caches (allocated, whole context). */
  bytes: number;
  /** The budget. */
  budgetBytes: number;
  /** Sequences alive: held plus lent to running requests. */
  live: number;
  /** Requests that reused a cached prefix. */
  hits: number;
  /** Requests that started from an empty sequence. */
  misses: number;
  /** Sequences evicted (disposed). */
  evictions: number;
}

/** Idle sequences kept for their prefixes, within a byte budget, LRU-evicted. */
export class PromptCache {
  readonly budgetBytes: number;
  readonly #entries: CacheEntry[] = [];
  #clock = 0;
  #live = 0;
  #hits = 0;
  #misses = 0;
  #evictions = 0;

  /** @param budgetBytes most bytes of KV cache kept by idle sequences (0 disables caching) */
  constructor(budgetBytes: number) {
    if (!Number.isInteger(budgetBytes) || budgetBytes < 0) {
      throw new RangeError(`Invalid prompt cache budget ${budgetBytes}: expected an integer number of bytes ≥ 0`);
    }
    this.budgetBytes = budgetBytes;
  }

  /** Bytes of the KV cache of one sequence of `model`: the whole context is allocated up front. */
  static sequenceBytes(model: Model): number {
    const c = model.config;
    return byteSize(model.kvDtype, model.contextLength * c.numKvHeads * c.headDim) * 2 * c.numLayers;
  }

  /**
   * A sequence for `ids`, rolled back to the longest prefix it shares with
   * them (always leaving at least one token to evaluate), and that prefix's
   * length. The sequence is the caller's until {@link PromptCache.put}.
   */
  take(model: Model, ids: readonly number[]): { seq: Sequence; reuse: number } {
    let best: CacheEntry | undefined;
    let bestLength = 0;
    for (const e of this.#entries) {
      if (e.model !== model) continue;
      const t = e.seq.tokens;
      let n = 0;
      while (n < t.length && n < ids.length && t[n] === ids[n]) n++;
      if (n > bestLength) {
        best = e;
        bestLength = n;
      }
    }
    const reuse = Math.min(bestLength, ids.length - 1);
    if (best && reuse > 0) {
      this.#hits++;
      if (2 * (best.seq.length - bestLength) <= bestLength) {
        // The request extends the cached conversation (give or take its tail, at most half as long as the
        // shared prefix: a re-tokenized answer, a regenerated one): take the sequence itself.
        this.#entries.splice(this.#entries.indexOf(best), 1);
        best.seq.truncate(reuse);
        return { seq: best.seq, reuse };
      }
      // The request branches off: copy the shared prefix, keeping the cached conversation.
      const seq = best.seq.fork();
      seq.truncate(reuse);
      this.#live++;
      return { seq, reuse };
    }
    this.#misses++;
    this.#live++;
    return { seq: model.createSequence(), reuse: 0 };
  }

  /** Gives a sequence back; it is kept (most recently used) if the budget allows, else freed. */
  async put(model: Model, seq: Sequence): Promise<void> {
    const bytes = seq.kv.rowBytes * seq.capacity * 2 * seq.kv.layers.length;
    const entry: CacheEntry = { model, seq, bytes, lastUsed: ++this.#clock };
    this.#entries.push(entry);
    await this.#evict();
  }

  /** Frees every idle sequence. */
  async clear(): Promise<void> {
    const all = this.#entries.splice(0);
    for (const e of all) await this.#dispose(e.seq);
  }

  /** Counters and sizes. */
  stats(): PromptCacheStats {
    return {
      sequences: this.#entries.length,
      bytes: this.#bytes(),
      budgetBytes: this.budgetBytes,
      live: this.#live,
      hits: this.#hits,
      misses: this.#misses,
      evictions: this.#evictions,
    };
  }

  #bytes(): number {
    return this.#entries.reduce((a, e) => a + e.bytes, 0);
  }

  async #evict(): Promise<void> {
    while (this.#entries.length > 0 && this.#bytes() > this.budgetBytes) {
      let lru = this.#entries[0];
      for (const e of this.#entries) if (e.lastUsed < lru.lastUsed) lru = e;
      this.#entries.splice(this.#entries.indexOf(lru), 1);
      this.#evictions++;
      await this.#dispose(lru.seq);
    }
  }

  async #dispose(seq: Sequence): Promise<void> {
    this.#live--;
    await seq.dispose();
  }
}
