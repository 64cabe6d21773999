/**
 * A sequence's page table: which pages of the shared {@link KvPool} hold its
 * positions, `pageSize` positions a page, in order. Writing into a page another
 * sequence also holds copies it first (copy on write), so forks and reused
 * prefixes share their common pages until they diverge.
 *
 * @module
 */

import type { KvPool } from "./kv_pool.ts";

/** The pages one sequence holds, in position order. */
export class PageTable {
  /** The pool the pages come from. */
  readonly pool: KvPool;
  readonly #pages: number[] = [];

  /**
   * An empty table.
   * @param pool the pool its pages come from
   */
  constructor(pool: KvPool) {
    this.pool = pool;
  }

  /** The pool pages, in position order. */
  get pages(): readonly number[] {
    return this.#pages;
  }

  /**
   * Pages the pool must hand out before positions `from .. to - 1` can be written:
   * new pages past the table, and the shared pages in that range (copied on write).
   */
  pagesToWrite(from: number, to: number): number {
    const size = this.pool.pageSize;
    let n = 0;
    for (let i = Math.floor(from / size); i * size < to; i++) {
      if (i >= this.#pages.length || this.pool.shared(this.#pages[i])) n++;
    }
    return n;
  }

  /**
   * Makes positions `from .. to - 1` writable by this sequence alone: takes new pages
   * past the table, and replaces each shared page in the range by a copy of its rows
   * below `from`. The pool must have room ({@link KvPool.reserve}).
   */
  prepareWrite(from: number, to: number): void {
    const size = this.pool.pageSize;
    for (let i = Math.floor(from / size); i * size < to; i++) {
      if (i >= this.#pages.length) {
        this.#pages.push(this.pool.take());
        continue;
      }
      const old = this.#pages[i];
      if (!this.pool.shared(old)) continue;
      const copy = this.pool.take();
      this.pool.copyPage(old, copy, Math.max(0, Math.min(size, from - i * size)));
      this.pool.release(old);
      this.#pages[i] = copy;
    }
  }

  /** Keeps the pages of the first `length` positions and gives the rest back. */
  truncate(length: number): void {
    const keep = Math.ceil(length / this.pool.pageSize);
    while (this.#pages.length > keep) this.pool.release(this.#pages.pop()!);
  }

  /** Gives back this table's pages and shares the pages of `other`'s first `length` positions instead. */
  shareFrom(other: PageTable, length: number): void {
    const keep = other.#pages.slice(0, Math.ceil(length / this.pool.pageSize));
    for (const p of keep) this.pool.retain(p);
    this.clear();
    this.#pages.push(...keep);
  }

  /** Takes fresh pages for the first `length` positions (after {@link KvPool.reserve}), giving back the old ones. */
  allocate(length: number): void {
    this.clear();
    for (let i = 0; i * this.pool.pageSize < length; i++) this.#pages.push(this.pool.take());
  }

  /** Gives every page back. */
  clear(): void {
    while (this.#pages.length > 0) this.pool.release(this.#pages.pop()!);
  }
}
