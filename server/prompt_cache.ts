/**
 * The server's prompt cache: sequences (token ids + KV cache) left by finished
 * requests, kept within a byte budget and evicted least recently used first. A
 * new request finds the cached sequence sharing the longest prefix with its
 * prompt and evaluates only the rest (as llama.cpp's prompt cache does): when
 * the request extends that conversation (what the cache holds past the shared
 * prefix is at most half as long as the prefix) it takes the sequence itself;
 * when it branches off earlier it forks the cached sequence (sharing its KV
 * pages, copy on write) and leaves the cached one intact.
 *
 * Every sequence of a model holds pages of the model's one shared KV pool, so
 * the budget counts the bytes of the pages each idle sequence holds
 * (`Sequence.kvBytes`: a page shared by several counts for each), and the
 * cache gives pages back to the pool while running requests may need them
 * ({@link PromptCache.claim}).
 *
 * @module
 */

import type { Model } from "../models/model.ts";
import type { Sequence } from "../models/exec/sequence.ts";

interface CacheEntry {
  readonly model: Model;
  readonly seq: Sequence;
  lastUsed: number;
}

/** A running request's claim on its model's KV pool (see {@link PromptCache.claim}). */
export interface PoolClaim {
  /** Whether the pool had the room claimed once idle sequences were evicted for it. */
  readonly fits: boolean;
  /** Gives the claim up (later calls do nothing). */
  release(): void;
}

/** A claim as the cache keeps it. */
interface Claim {
  readonly model: Model;
  readonly seqs: readonly Sequence[];
  readonly pages: number;
}

/** Counters of a {@link PromptCache}. */
export interface PromptCacheStats {
  /** Idle sequences held. */
  sequences: number;
  /** Bytes of the KV pages they hold (a page shared by several counts for each). */
  bytes: number;
  /** The budget. */
  budgetBytes: number;
  /** Sequences alive: held plus lent to running requests. */
  live: number;
  /** Requests that reused a cached prefix. */
  hits: number;
  /** Requests that started from an empty sequence. */
  misses: number;
  /** Sequences evicted (disposed), for the budget or to make room in a model's KV pool. */
  evictions: number;
}

/** Idle sequences kept for their prefixes, within a byte budget, LRU-evicted. */
export class PromptCache {
  /** Most bytes of KV cache that idle sequences may hold. */
  readonly budgetBytes: number;
  readonly #entries: CacheEntry[] = [];
  readonly #claims = new Set<Claim>();
  #clock = 0;
  #live = 0;
  #hits = 0;
  #misses = 0;
  #evictions = 0;

  /**
   * An empty cache.
   *
   * @param budgetBytes most bytes of KV pages kept by idle sequences (0 disables caching)
   */
  constructor(budgetBytes: number) {
    if (!Number.isInteger(budgetBytes) || budgetBytes < 0) {
      throw new RangeError(`Invalid prompt cache budget ${budgetBytes}: expected an integer number of bytes ≥ 0`);
    }
    this.budgetBytes = budgetBytes;
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
      // The request branches off: share the prefix's pages, keeping the cached conversation.
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
    this.#entries.push({ model, seq, lastUsed: ++this.#clock });
    await this.#evict();
    await this.#makeRoom(model);
  }

  /**
   * Claims room in `model`'s KV pool for a running request whose sequences (`seqs`: the caller may add
   * to the array, and disposes what it adds) may come to hold `pages` pages together, a page shared by
   * several counted for each. From now until the claim is released, idle sequences of the model are
   * disposed, least recently used first, whenever the pool's room (the pages it has free or may still
   * grow by) falls short of what the running claims may still take: now, and whenever a sequence is
   * put back. A page an idle sequence shares with a running one stays taken, so evicting it may free
   * less than its bytes. {@link PoolClaim.fits} says whether the room was there once claimed.
   */
  async claim(model: Model, seqs: readonly Sequence[], pages: number): Promise<PoolClaim> {
    const claim: Claim = { model, seqs, pages };
    this.#claims.add(claim);
    const fits = await this.#makeRoom(model);
    return { fits, release: () => void this.#claims.delete(claim) };
  }

  /** Disposes idle sequences of `model` until its pool has room for its claims; whether it has. */
  async #makeRoom(model: Model): Promise<boolean> {
    for (;;) {
      const kv = model.kvStats();
      const pageBytes = kv.bytes / kv.pages;
      let wanted = 0;
      for (const c of this.#claims) {
        if (c.model !== model) continue;
        const held = c.seqs.reduce((n, seq) => n + seq.kvBytes / pageBytes, 0);
        wanted += Math.max(0, c.pages - held);
      }
      if (kv.maxPages - kv.usedPages >= wanted) return true;
      const lru = this.#leastRecent((e) => e.model === model);
      if (!lru) return false;
      await this.#drop(lru);
    }
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
    return this.#entries.reduce((a, e) => a + e.seq.kvBytes, 0);
  }

  async #evict(): Promise<void> {
    while (this.#bytes() > this.budgetBytes) await this.#drop(this.#leastRecent(() => true)!);
  }

  /** The least recently used entry that `which` accepts. */
  #leastRecent(which: (e: CacheEntry) => boolean): CacheEntry | undefined {
    let lru: CacheEntry | undefined;
    for (const e of this.#entries) if (which(e) && (!lru || e.lastUsed < lru.lastUsed)) lru = e;
    return lru;
  }

  /** Evicts `entry`. */
  async #drop(entry: CacheEntry): Promise<void> {
    const i = this.#entries.indexOf(entry);
    if (i < 0) return; // another eviction took it
    this.#entries.splice(i, 1);
    this.#evictions++;
    await this.#dispose(entry.seq);
  }

  async #dispose(seq: Sequence): Promise<void> {
    this.#live--;
    await seq.dispose();
  }
}
