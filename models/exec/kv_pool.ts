/**
 * The KV cache pool shared by every sequence of a model: per layer, one key and
 * one value state tensor of `pages × pageSize` rows on the backend, handed out a
 * page at a time. A sequence holds a list of pages (its page table); forks and
 * prefix reuse share pages by reference count, and a shared page is copied only
 * when a sequence writes into it (copy on write). The pool grows on demand, by
 * doubling, up to `maxPages`.
 *
 * @module
 */

import type { Backend, DeviceTensor } from "../../backends/contract.ts";
import { byteSize, type KvDType } from "../../graph/dtype.ts";

/** Thrown when a sequence needs a KV page and the pool holds `maxPages`, all in use. */
export class KvPoolFullError extends RangeError {
  /** Pages the request needed. */
  readonly needed: number;
  /** Pages free when it asked. */
  readonly free: number;
  /** The most tokens the pool may hold. */
  readonly maxTokens: number;

  /**
   * Says that `needed` pages were asked for with `free` free in a pool of `maxTokens` tokens.
   * @param needed pages asked for
   * @param free pages free
   * @param maxTokens the pool's limit in tokens
   */
  constructor(needed: number, free: number, maxTokens: number) {
    super(
      `Cannot take ${needed} KV cache pages: ${free} are free and the pool holds at most ${maxTokens} tokens ` +
        "(raise kvCacheTokens, or dispose sequences)",
    );
    this.name = "KvPoolFullError";
    this.needed = needed;
    this.free = free;
    this.maxTokens = maxTokens;
  }
}

/** How full the pool is. */
export interface KvStats {
  /** Rows of one page. */
  readonly pageSize: number;
  /** Pages allocated on the backend. */
  readonly pages: number;
  /** The most pages the pool may grow to. */
  readonly maxPages: number;
  /** Pages held by at least one sequence. */
  readonly usedPages: number;
  /** Tokens the allocated pages hold (`pages × pageSize`). */
  readonly capacityTokens: number;
  /** Tokens of the pages in use (`usedPages × pageSize`). */
  readonly usedTokens: number;
  /** The most tokens the pool may grow to (`maxPages × pageSize`). */
  readonly maxTokens: number;
  /** Bytes the allocated pages take on the backend, keys and values of every layer. */
  readonly bytes: number;
}

/** The shape of a pool. */
export interface KvPoolOptions {
  /** Layers of the model (one key and one value tensor each). */
  readonly numLayers: number;
  /** Values per row (kv heads × head dim). */
  readonly rowLength: number;
  /** Element type of the tensors. */
  readonly dtype: KvDType;
  /** Rows per page. */
  readonly pageSize: number;
  /** Pages allocated at first. */
  readonly initialPages: number;
  /** The most pages the pool may grow to. */
  readonly maxPages: number;
}

/** Pages of keys and values shared by the sequences of a model. */
export class KvPool {
  /** Rows per page. */
  readonly pageSize: number;
  /** The most pages the pool may grow to. */
  readonly maxPages: number;
  /** Element type of the tensors. */
  readonly dtype: KvDType;
  /** Bytes of one row of one tensor. */
  readonly rowBytes: number;
  readonly #backend: Backend;
  readonly #numLayers: number;
  readonly #rowLength: number;
  #layers: { readonly k: DeviceTensor; readonly v: DeviceTensor }[];
  /** Holders of each page (0: free). */
  #refs: Int32Array;
  /** Free pages, the next to hand out last. */
  #free: number[] = [];

  /**
   * Allocates `initialPages` zeroed pages on `backend`.
   * @param backend where the tensors live
   * @param options the pool's shape and limits
   */
  constructor(backend: Backend, options: KvPoolOptions) {
    const { pageSize, initialPages, maxPages } = options;
    if (!(Number.isInteger(pageSize) && pageSize >= 1 && Number.isInteger(maxPages) && maxPages >= 1)) {
      throw new RangeError(`Invalid KV pool of ${maxPages} pages of ${pageSize} rows`);
    }
    this.#backend = backend;
    this.#numLayers = options.numLayers;
    this.#rowLength = options.rowLength;
    this.pageSize = pageSize;
    this.maxPages = maxPages;
    this.dtype = options.dtype;
    this.rowBytes = byteSize(options.dtype, options.rowLength);
    const pages = Math.min(Math.max(1, initialPages), maxPages);
    this.#layers = this.#allocate(pages);
    this.#refs = new Int32Array(pages);
    for (let p = pages - 1; p >= 0; p--) this.#free.push(p);
  }

  /** Pages allocated on the backend. */
  get pages(): number {
    return this.#refs.length;
  }

  /** Pages no sequence holds. */
  get freePages(): number {
    return this.#free.length;
  }

  /** Per layer, the key and value tensors (replaced when the pool grows). */
  get layers(): readonly { readonly k: DeviceTensor; readonly v: DeviceTensor }[] {
    return this.#layers;
  }

  /** Bytes of one page: its rows of keys and values in every layer. */
  get pageBytes(): number {
    return this.rowBytes * this.pageSize * 2 * this.#numLayers;
  }

  /** How full the pool is. */
  stats(): KvStats {
    const used = this.pages - this.#free.length;
    return {
      pageSize: this.pageSize,
      pages: this.pages,
      maxPages: this.maxPages,
      usedPages: used,
      capacityTokens: this.pages * this.pageSize,
      usedTokens: used * this.pageSize,
      maxTokens: this.maxPages * this.pageSize,
      bytes: this.pages * this.pageBytes,
    };
  }

  /**
   * Makes sure `n` pages are free, growing the pool (by doubling, up to `maxPages`)
   * when they are not. Returns whether it grew: the tensors are new then, and plans
   * bound to the old ones must be compiled again. Throws a {@link KvPoolFullError}
   * when even `maxPages` cannot hold them.
   */
  reserve(n: number): boolean {
    if (n <= this.#free.length) return false;
    const used = this.pages - this.#free.length;
    if (used + n > this.maxPages) throw new KvPoolFullError(n, this.#free.length, this.maxPages * this.pageSize);
    let pages = this.pages;
    while (pages - used < n) pages = Math.min(this.maxPages, pages * 2);
    this.#grow(pages);
    return true;
  }

  /** Takes a free page for one holder; {@link KvPool.reserve} must have made room. */
  take(): number {
    const p = this.#free.pop();
    if (p === undefined) throw new KvPoolFullError(1, 0, this.maxPages * this.pageSize);
    this.#refs[p] = 1;
    return p;
  }

  /** Adds a holder to page `p` (a fork shares it). */
  retain(p: number): void {
    if (this.#refs[p] <= 0) throw new RangeError(`Cannot share KV page ${p}: it is free`);
    this.#refs[p]++;
  }

  /** Drops a holder of page `p`; the last one frees it. */
  release(p: number): void {
    if (this.#refs[p] <= 0) throw new RangeError(`Cannot release KV page ${p}: it is free`);
    if (--this.#refs[p] === 0) this.#free.push(p);
  }

  /** Whether page `p` has more than one holder (so writing into it must copy it first). */
  shared(p: number): boolean {
    return this.#refs[p] > 1;
  }

  /** Copies the first `rows` rows of page `from` into page `to`, in every layer. */
  copyPage(from: number, to: number, rows: number): void {
    const pageBytes = this.rowBytes * this.pageSize;
    for (const l of this.#layers) {
      for (const t of [l.k, l.v]) {
        this.#backend.copyTensor(t, t, rows * this.rowBytes, from * pageBytes, to * pageBytes);
      }
    }
  }

  /**
   * Reads the first `length` positions held by `pages` (a sequence's page table):
   * per layer, the keys then the values, each `length` rows in position order.
   */
  async read(pages: readonly number[], length: number): Promise<Uint8Array> {
    const bytes = length * this.rowBytes;
    const out = new Uint8Array(bytes * 2 * this.#numLayers);
    let at = 0;
    for (const l of this.#layers) {
      for (const t of [l.k, l.v]) {
        for (const [page, rows] of this.#runs(pages, length)) {
          const n = rows * this.rowBytes;
          out.set(await this.#backend.readTensor(t, page * this.pageSize * this.rowBytes, n), at);
          at += n;
        }
      }
    }
    return out;
  }

  /** Writes rows laid out as {@link KvPool.read} gives them into `pages`. */
  write(pages: readonly number[], length: number, data: Uint8Array): void {
    if (data.byteLength !== length * this.rowBytes * 2 * this.#numLayers) {
      throw new RangeError(`Cannot write ${length} KV rows from ${data.byteLength} bytes`);
    }
    let at = 0;
    for (const l of this.#layers) {
      for (const t of [l.k, l.v]) {
        for (const [page, rows] of this.#runs(pages, length)) {
          const n = rows * this.rowBytes;
          this.#backend.writeTensor(t, page * this.pageSize * this.rowBytes, data.subarray(at, at + n));
          at += n;
        }
      }
    }
  }

  /** Frees the tensors. */
  dispose(): void {
    for (const l of this.#layers) {
      this.#backend.release(l.k);
      this.#backend.release(l.v);
    }
    this.#layers = [];
  }

  /** Each page of `pages` with the rows of the first `length` positions it holds. */
  *#runs(pages: readonly number[], length: number): Generator<[number, number]> {
    for (let i = 0; i * this.pageSize < length; i++) {
      yield [pages[i], Math.min(this.pageSize, length - i * this.pageSize)];
    }
  }

  #allocate(pages: number): { k: DeviceTensor; v: DeviceTensor }[] {
    const rows = pages * this.pageSize;
    const made: DeviceTensor[] = [];
    try {
      return Array.from({ length: this.#numLayers }, (_, i) => {
        const k = this.#backend.createState(`l${i}.k_cache`, this.dtype, [rows, this.#rowLength]);
        made.push(k);
        const v = this.#backend.createState(`l${i}.v_cache`, this.dtype, [rows, this.#rowLength]);
        made.push(v);
        return { k, v };
      });
    } catch (e) {
      for (const t of made) this.#backend.release(t);
      throw e;
    }
  }

  #grow(pages: number): void {
    const old = this.#layers;
    const next = this.#allocate(pages);
    const bytes = this.pages * this.pageSize * this.rowBytes;
    old.forEach((l, i) => {
      this.#backend.copyTensor(l.k, next[i].k, bytes);
      this.#backend.copyTensor(l.v, next[i].v, bytes);
      this.#backend.release(l.k);
      this.#backend.release(l.v);
    });
    const refs = new Int32Array(pages);
    refs.set(this.#refs);
    for (let p = pages - 1; p >= this.#refs.length; p--) this.#free.unshift(p);
    this.#refs = refs;
    this.#layers = next;
  }
}
