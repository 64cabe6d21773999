/**
 * The KV cache of one sequence: per layer, a key and a value state tensor of
 * `capacity` rows on the backend, and how many rows are filled. Rolling back is
 * setting the length; the rows past it are overwritten by the next step.
 *
 * @module
 */

import type { Backend, DeviceTensor } from "../../backends/contract.ts";
import type { DType } from "../../graph/dtype.ts";
import { byteSize, KV_DTYPES, type KvDType } from "../../graph/dtype.ts";

export { KV_DTYPES, type KvDType };
import { f16ToF32, f32ToF16 } from "../../graph/half.ts";

/** Keys and values of the tokens seen so far. */
export class KvCache {
  /** Rows each layer's tensors hold. */
  readonly capacity: number;
  /** Per layer, the key and value state tensors. */
  readonly layers: readonly { readonly k: DeviceTensor; readonly v: DeviceTensor }[];
  /** Element type of the tensors (`"f32"` or `"f16"`). */
  readonly dtype: DType;
  readonly #backend: Backend;
  readonly #rowBytes: number;
  #length = 0;

  /**
   * Allocates zeroed caches on `backend`.
   * @param backend where the tensors live
   * @param numLayers layers of the model
   * @param capacity rows (the context length)
   * @param rowLength values per row (kv heads × head dim)
   * @param dtype element type
   */
  constructor(backend: Backend, numLayers: number, capacity: number, rowLength: number, dtype: DType = "f32") {
    this.#backend = backend;
    this.capacity = capacity;
    this.dtype = dtype;
    this.#rowBytes = byteSize(dtype, rowLength);
    this.layers = Array.from({ length: numLayers }, (_, i) => ({
      k: backend.createState(`l${i}.k_cache`, dtype, [capacity, rowLength]),
      v: backend.createState(`l${i}.v_cache`, dtype, [capacity, rowLength]),
    }));
  }

  /** Filled rows. */
  get length(): number {
    return this.#length;
  }

  /** Bytes of one row of one tensor. */
  get rowBytes(): number {
    return this.#rowBytes;
  }

  /** Marks `n` more rows as filled (after a step wrote them). */
  advance(n: number): void {
    if (this.#length + n > this.capacity) {
      throw new RangeError(`Cannot advance the KV cache to ${this.#length + n} rows: it holds ${this.capacity}`);
    }
    this.#length += n;
  }

  /** Forgets every row from `length` on. */
  truncate(length: number): void {
    if (!Number.isInteger(length) || length < 0 || length > this.#length) {
      throw new RangeError(`Cannot truncate the KV cache to ${length} rows: it has ${this.#length}`);
    }
    this.#length = length;
  }

  /** Copies the filled rows into `other` (same shape) and sets its length. */
  copyTo(other: KvCache): void {
    if (
      other.layers.length !== this.layers.length || other.#rowBytes !== this.#rowBytes || other.capacity < this.#length
    ) {
      throw new TypeError("Cannot copy a KV cache into one of another shape");
    }
    const bytes = this.#length * this.#rowBytes;
    this.layers.forEach((l, i) => {
      this.#backend.copyTensor(l.k, other.layers[i].k, bytes);
      this.#backend.copyTensor(l.v, other.layers[i].v, bytes);
    });
    other.#length = this.#length;
  }

  /** The filled rows of every layer, keys then values per layer, as bytes. */
  async save(): Promise<Uint8Array> {
    const bytes = this.#length * this.#rowBytes;
    const out = new Uint8Array(bytes * 2 * this.layers.length);
    let at = 0;
    for (const l of this.layers) {
      for (const t of [l.k, l.v]) {
        out.set(await this.#backend.readTensor(t, 0, bytes), at);
        at += bytes;
      }
    }
    return out;
  }

  /**
   * Restores rows written by {@link KvCache.save}; `length` is the row count saved
   * and `dtype` the element type they were saved in (f32 and f16 convert into this
   * cache's type).
   */
  restore(data: Uint8Array, length: number, dtype: DType = this.dtype): void {
    const bytes = byteSize(dtype, length * (this.#rowBytes / byteSize(this.dtype, 1)));
    if (
      !Number.isInteger(length) || length < 0 || length > this.capacity ||
      data.byteLength !== bytes * 2 * this.layers.length
    ) {
      throw new RangeError(`Cannot restore ${length} KV rows from ${data.byteLength} bytes of ${dtype}`);
    }
    const rows = dtype === this.dtype ? data : convertValues(data, dtype, this.dtype);
    const ownBytes = length * this.#rowBytes;
    let at = 0;
    for (const l of this.layers) {
      for (const t of [l.k, l.v]) {
        this.#backend.writeTensor(t, 0, rows.subarray(at, at + ownBytes));
        at += ownBytes;
      }
    }
    this.#length = length;
  }

  /** Frees the tensors. */
  dispose(): void {
    for (const l of this.layers) {
      this.#backend.release(l.k);
      this.#backend.release(l.v);
    }
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
