/**
 * The server's prompt cache: sequences (token ids + KV cache) left by finished
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
import type { Sequence } from "../models/exec/sequence.ts";

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
  /** Most bytes of KV cache that idle sequences may hold. */
  readonly budgetBytes: number;
  readonly #entries: CacheEntry[] = [];
  #clock = 0;
  #live = 0;
  #hits = 0;
  #misses = 0;
  #evictions = 0;

  /**
   * An empty cache.
   *
   * @param budgetBytes most bytes of KV cache kept by idle sequences (0 disables caching)
   */
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
