/**
 * Converting loaded weights to the dtype a caller asks for (`loadModel(m, { dtype })`).
 *
 * Rules: 1-D tensors (norms) stay f32; the precision-sensitive parts of the model
 * never depend on the weight dtype. Block-quantized types need rows that are whole
 * 32-weight blocks; a matrix whose rows are not (the minueza shape: 312, 1092) is
 * kept in f16 instead, as llama.cpp does.
 *
 * Also the check that every stored value is finite ({@link findNonFinite}), run once per tensor
 * at load: it reads the exponent bits only, so it costs one pass over the bytes and no decode.
 *
 * @module
 */

import type { HostTensor } from "../../backends/contract.ts";
import { type DType, isQuantized, QUANT_BLOCK, quantScalesOffset, type WeightDType } from "../../graph/dtype.ts";
import { bf16ToF32, f16ToF32 } from "../../graph/half.ts";
import { decodeWeights, encodeWeights } from "../../graph/weight_codec.ts";
import { elementCount } from "../../graph/ir.ts";

/** The dtype a tensor gets when `target` is asked for. */
export function chooseDType(shape: readonly number[], target: WeightDType): WeightDType {
  if (shape.length === 1) return "f32";
  if (isQuantized(target) && shape[shape.length - 1] % QUANT_BLOCK !== 0) return "f16";
  return target;
}

/** Converts one tensor (a no-op when it is stored in the chosen dtype already). */
export function convertWeight(t: HostTensor, target: WeightDType): HostTensor {
  const dtype = chooseDType(t.shape, target);
  if (dtype === t.dtype) return t;
  const count = elementCount(t.shape);
  // Aligned f32 bytes are read in place; anything else is decoded to a fresh f32 array first.
  const values = t.dtype === "f32" && t.data.byteOffset % 4 === 0
    ? new Float32Array(t.data.buffer, t.data.byteOffset, count)
    : decodeWeights(t.dtype, t.data, count);
  return { ...t, dtype, data: encodeWeights(dtype, values, t.shape[t.shape.length - 1], `tensor "${t.name}"`) };
}

/** A value that is NaN or ±Infinity, found by {@link findNonFinite}. */
export interface NonFiniteValue {
  /** The element's index in the tensor (a block's first element when its scale is at fault). */
  readonly index: number;
  /** The value: NaN, Infinity or -Infinity. */
  readonly value: number;
}

/** The first element of 16-bit values whose exponent bits are all ones (`mask`), or -1. */
function scan16(bits: Uint16Array, mask: number): number {
  for (let i = 0; i < bits.length; i++) if ((bits[i] & mask) === mask) return i;
  return -1;
}

/** `count` 16-bit values at `byteOffset` of `data`, copied once when misaligned. */
function view16(data: Uint8Array, byteOffset: number, count: number): Uint16Array {
  const bytes = (data.byteOffset + byteOffset) % 2 === 0
    ? data.subarray(byteOffset, byteOffset + count * 2)
    : data.slice(byteOffset, byteOffset + count * 2);
  return new Uint16Array(bytes.buffer, bytes.byteOffset, count);
}

/** The first non-finite block scale of a q8_0 or q4_0 tensor of `count` values. */
function scanScales(dtype: "q8_0" | "q4_0", data: Uint8Array, count: number): NonFiniteValue | undefined {
  const scales = view16(data, quantScalesOffset(dtype, count), count / QUANT_BLOCK);
  const b = scan16(scales, 0x7c00);
  return b < 0 ? undefined : { index: b * QUANT_BLOCK, value: f16ToF32(scales[b]) };
}

/** Per stored dtype, the first NaN or ±Infinity among `count` values in `data`. */
const FIND_NON_FINITE: Record<DType, (data: Uint8Array, count: number) => NonFiniteValue | undefined> = {
  f32: (data, count) => {
    const bytes = data.byteOffset % 4 === 0 ? data : data.slice(0, count * 4);
    const bits = new Uint32Array(bytes.buffer, bytes.byteOffset, count);
    for (let i = 0; i < count; i++) {
      if ((bits[i] & 0x7f800000) === 0x7f800000) {
        return { index: i, value: new Float32Array(bits.buffer, bits.byteOffset + i * 4, 1)[0] };
      }
    }
    return undefined;
  },
  f16: (data, count) => {
    const h = view16(data, 0, count);
    const i = scan16(h, 0x7c00);
    return i < 0 ? undefined : { index: i, value: f16ToF32(h[i]) };
  },
  bf16: (data, count) => {
    const h = view16(data, 0, count);
    const i = scan16(h, 0x7f80);
    return i < 0 ? undefined : { index: i, value: bf16ToF32(h[i]) };
  },
  q8_0: (data, count) => scanScales("q8_0", data, count),
  q4_0: (data, count) => scanScales("q4_0", data, count),
  i32: () => undefined, // integers are always finite
};

/**
 * The first NaN or ±Infinity in a tensor, or undefined when every value is finite (for the block
 * types, a non-finite scale; their quantized values are integers). Reads the exponent bits in one
 * pass: a misaligned tensor is copied once first.
 */
export function findNonFinite(t: HostTensor): NonFiniteValue | undefined {
  return FIND_NON_FINITE[t.dtype](t.data, elementCount(t.shape));
}
