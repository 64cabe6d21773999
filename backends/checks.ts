/**
 * The checks every backend makes the same way, written once: the bytes of an
 * upload, the dtype of a KV cache, byte ranges of a tensor, the arguments of
 * `writeInput` and `readOutput`, index inputs (token ids, positions, page tables,
 * rows) against what they index, and which ops a backend supports.
 *
 * Each backend keeps only what is its own (where the bytes live); the checks, and
 * the messages a caller sees, are the same on every backend.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, KV_DTYPES, type KvDType } from "../graph/dtype.ts";
import { elementCount, type OpKind } from "../graph/ir.ts";
import type { BufferSlot, ExecutionPlan } from "../graph/plan.ts";
import { type DeviceTensor, type HostTensor, type IndexLimit, indexLimits, UnsupportedError } from "./contract.ts";

/**
 * Checks that a weight given to `upload` has exactly the bytes its dtype and shape
 * take (`graph/dtype.ts`); a `RangeError` names both sizes.
 */
export function checkUploadSize(t: HostTensor): void {
  const rowLength = t.shape.length > 0 ? t.shape[t.shape.length - 1] : 1;
  const expected = byteSize(t.dtype, elementCount(t.shape), rowLength);
  if (t.data.byteLength !== expected) {
    throw new RangeError(
      `Cannot upload "${t.name}" (${t.dtype} [${t.shape}]): it has ${t.data.byteLength} bytes, expected ${expected}`,
    );
  }
}

/**
 * Checks the dtype of a KV cache a backend is asked to create (`createState`): an
 * {@link UnsupportedError} names the backend, the tensor and the dtypes it holds.
 */
export function checkStateDType(backend: string, name: string, dtype: DType): asserts dtype is KvDType {
  if (!isKvDType(dtype)) {
    throw new UnsupportedError(
      `Backend "${backend}" cannot hold state "${name}" as "${dtype}": only ${
        KV_DTYPES.map((d) => `"${d}"`).join(", ")
      }`,
    );
  }
}

/**
 * Checks that bytes `offset .. offset + length` lie inside `t` (for `readTensor`,
 * `writeTensor` and `copyTensor`); a `RangeError` names the range and the size.
 */
export function checkRange(t: DeviceTensor, offset: number, length: number): void {
  if (
    !Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > t.byteLength
  ) {
    throw new RangeError(`Cannot access bytes ${offset}..${offset + length} of "${t.name}": it holds ${t.byteLength}`);
  }
}

/**
 * Checks the arguments of `copyTensor`: both ranges inside their tensors
 * ({@link checkRange}), and not overlapping when `src` is `dst`; a `RangeError` names
 * the ranges.
 */
export function checkCopy(
  src: DeviceTensor,
  dst: DeviceTensor,
  byteLength: number,
  srcOffset: number,
  dstOffset: number,
): void {
  checkRange(src, srcOffset, byteLength);
  checkRange(dst, dstOffset, byteLength);
  if (src === dst && srcOffset < dstOffset + byteLength && dstOffset < srcOffset + byteLength && byteLength > 0) {
    throw new RangeError(
      `Cannot copy bytes ${srcOffset}..${srcOffset + byteLength} of "${src.name}" over ${dstOffset}..${
        dstOffset + byteLength
      } of itself: the ranges overlap`,
    );
  }
}

/**
 * Checks the arguments of {@link Executable.writeInput}: `tensorId` is a graph input
 * (else a `TypeError`), and `count` is an integer that fits both the input's slot and
 * `data` (else a `RangeError`). Returns the input's arena slot.
 */
export function checkInputWrite(
  plan: ExecutionPlan,
  tensorId: number,
  data: Int32Array | Float32Array,
  count: number,
): BufferSlot {
  const slot = plan.slots[tensorId];
  if (!slot || !plan.graph.inputs.includes(tensorId)) {
    throw new TypeError(`Cannot write input ${tensorId}: it is not a graph input`);
  }
  const capacity = slot.bytes / 4;
  if (!Number.isInteger(count) || count < 0 || count > capacity || count > data.length) {
    const name = plan.graph.tensors[tensorId].name;
    throw new RangeError(`Cannot write ${count} values to input "${name}": it holds ${capacity}`);
  }
  return slot;
}

/**
 * Checks the arguments of {@link Executable.readOutput}: `tensorId` is a graph output,
 * and `count` is an integer that fits both the output's slot and `dst`; a `RangeError`
 * otherwise. Returns the output's arena slot.
 */
export function checkOutputRead(plan: ExecutionPlan, tensorId: number, dst: Float32Array, count: number): BufferSlot {
  const slot = plan.slots[tensorId];
  if (!slot || !plan.graph.outputs.includes(tensorId)) {
    throw new RangeError(`Cannot read ${count} values of output ${tensorId}: it is not a graph output`);
  }
  const capacity = slot.bytes / 4;
  if (!Number.isInteger(count) || count < 0 || count > capacity) {
    throw new RangeError(`Cannot read ${count} values of output ${tensorId}: it holds ${capacity}`);
  }
  if (count > dst.length) throw new RangeError(`Cannot read ${count} values into an array of ${dst.length}`);
  return slot;
}

/**
 * The bounds of a plan's index inputs ({@link indexLimits}): an executable makes one
 * when it compiles and checks every value `writeInput` receives for an index input,
 * so no kernel reads or writes past a table, a page table or the KV pool.
 */
export class IndexChecks {
  readonly #plan: ExecutionPlan;
  readonly #limits: Map<number, IndexLimit>;

  /**
   * The bounds of `plan`'s index inputs.
   * @param plan the plan an executable runs
   */
  constructor(plan: ExecutionPlan) {
    this.#plan = plan;
    this.#limits = indexLimits(plan);
  }

  /** One past the largest value input `inputId` accepts (Infinity when nothing bounds it). */
  limit(inputId: number): number {
    return this.#limits.get(inputId)?.limit ?? Infinity;
  }

  /**
   * Checks the first `count` values of `data` for input `inputId` (nothing for an input
   * no op indexes with): a `RangeError` names the first that is not an integer from 0
   * to the limit minus 1.
   */
  check(inputId: number, data: Int32Array | Float32Array, count: number): void {
    const bound = this.#limits.get(inputId);
    if (!bound) return;
    const { limit, what } = bound;
    for (let i = 0; i < count; i++) {
      const v = data[i];
      if (Number.isInteger(v) && v >= 0 && v < limit) continue;
      const expected = limit === Infinity ? "a non-negative integer" : `an integer from 0 to ${limit - 1}`;
      if (what === "token id") throw new RangeError(`Cannot embed token id ${v}: expected ${expected}`);
      const name = this.#plan.graph.tensors[inputId].name;
      throw new RangeError(`Cannot use ${what} ${v} at index ${i} of input "${name}": expected ${expected}`);
    }
  }
}

/**
 * What a backend runs: for every op kind, whether it runs it with a given operand
 * dtype (see {@link Backend.supports} for which dtype that is). Each backend keeps
 * one, so adding an op kind is a compile error in every backend until it says.
 */
export type OpSupport = Readonly<Record<OpKind, (dtype: DType) => boolean>>;

/** The operand test of ops that run on f32 activations only. */
export function f32Only(dtype: DType): boolean {
  return dtype === "f32";
}

/**
 * Looks `op` up in a backend's {@link OpSupport} table: what its `supports` returns.
 * An op kind the table does not know (a caller's typo) is not supported.
 */
export function supportsOp(table: OpSupport, op: OpKind, dtype: DType): boolean {
  return Object.hasOwn(table, op) && table[op](dtype);
}
