/**
 * Encoding f32 weights into every weight dtype, and decoding them back. The
 * block formats quantize exactly as ggml's reference quantizers
 * (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) do, in the planar layout
 * described in `dtype.ts`.
 *
 * @module
 */

import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "./convert.ts";
import { byteSize, type DType, QUANT_BLOCK, quantScalesOffset } from "./dtype.ts";

/** A weight value that no dtype can hold (NaN or ±Infinity). */
export class NonFiniteWeightError extends RangeError {
  /**
   * @param what the tensor
   * @param index the element
   * @param value the value
   */
  constructor(what: string, index: number, value: number) {
    super(`Cannot encode ${what}: element ${index} is ${value}, expected a finite number`);
    this.name = "NonFiniteWeightError";
  }
}

/**
 * Encodes f32 values as `dtype`, rows of `rowLength`. Throws a
 * {@link NonFiniteWeightError} for NaN or ±Infinity (for every target but f32, whose
 * values pass through), and a `RangeError` when a quantized row is not whole blocks.
 */
export function encodeWeights(dtype: DType, values: Float32Array, rowLength: number, what = "weights"): Uint8Array {
  const n = values.length;
  const out = new Uint8Array(byteSize(dtype, n, rowLength));
  const dv = new DataView(out.buffer);
  if (dtype === "f32") {
    out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
    return out;
  }
  for (let i = 0; i < n; i++) {
    if (!Number.isFinite(values[i])) throw new NonFiniteWeightError(what, i, values[i]);
  }
  switch (dtype) {
    case "f16":
      for (let i = 0; i < n; i++) dv.setUint16(i * 2, f32ToF16(values[i]), true);
      return out;
    case "bf16":
      for (let i = 0; i < n; i++) dv.setUint16(i * 2, f32ToBf16(values[i]), true);
      return out;
    case "q8_0":
      quantizeQ8_0(values, out);
      return out;
    case "q4_0":
      quantizeQ4_0(values, out);
      return out;
    case "i32":
      throw new TypeError(`Cannot encode ${what} as "i32": it is not a weight dtype`);
  }
}

/** Decodes `count` values of `dtype` to f32 (a fresh array). */
export function decodeWeights(dtype: DType, data: Uint8Array, count: number): Float32Array {
  const out = new Float32Array(count);
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  switch (dtype) {
    case "f32":
      for (let i = 0; i < count; i++) out[i] = dv.getFloat32(i * 4, true);
      return out;
    case "f16":
      for (let i = 0; i < count; i++) out[i] = f16ToF32(dv.getUint16(i * 2, true));
      return out;
    case "bf16":
      for (let i = 0; i < count; i++) out[i] = bf16ToF32(dv.getUint16(i * 2, true));
      return out;
    case "q8_0": {
      const scales = quantScalesOffset(dtype, count);
      for (let b = 0; b < count / QUANT_BLOCK; b++) {
        const d = f16ToF32(dv.getUint16(scales + b * 2, true));
        for (let j = 0; j < QUANT_BLOCK; j++) out[b * QUANT_BLOCK + j] = dv.getInt8(b * QUANT_BLOCK + j) * d;
      }
      return out;
    }
    case "q4_0": {
      const scales = quantScalesOffset(dtype, count);
      for (let b = 0; b < count / QUANT_BLOCK; b++) {
        const d = f16ToF32(dv.getUint16(scales + b * 2, true));
        for (let j = 0; j < 16; j++) {
          const q = data[b * 16 + j];
          out[b * QUANT_BLOCK + j] = ((q & 0x0f) - 8) * d;
          out[b * QUANT_BLOCK + j + 16] = ((q >> 4) - 8) * d;
        }
      }
      return out;
    }
    case "i32":
      throw new TypeError(`Cannot decode "i32" as weights`);
  }
}

/** q8_0: d = max|x| / 127, q = round(x / d), d stored as f16. */
function quantizeQ8_0(x: Float32Array, out: Uint8Array): void {
  const dv = new DataView(out.buffer);
  const scales = quantScalesOffset("q8_0", x.length);
  for (let b = 0; b < x.length / QUANT_BLOCK; b++) {
    const o = b * QUANT_BLOCK;
    let amax = 0;
    for (let j = 0; j < QUANT_BLOCK; j++) amax = Math.max(amax, Math.abs(x[o + j]));
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    for (let j = 0; j < QUANT_BLOCK; j++) dv.setInt8(o + j, roundHalfAway(Math.fround(x[o + j] * id)));
    dv.setUint16(scales + b * 2, f32ToF16(d), true);
  }
}

/** q4_0: d = (the value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)), d as f16. */
function quantizeQ4_0(x: Float32Array, out: Uint8Array): void {
  const dv = new DataView(out.buffer);
  const scales = quantScalesOffset("q4_0", x.length);
  for (let b = 0; b < x.length / QUANT_BLOCK; b++) {
    const o = b * QUANT_BLOCK;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < QUANT_BLOCK; j++) {
      const v = x[o + j];
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = Math.fround(max / -8);
    const id = d ? Math.fround(1 / d) : 0;
    for (let j = 0; j < 16; j++) {
      const q0 = Math.min(15, Math.trunc(Math.fround(Math.fround(x[o + j] * id) + 8.5)));
      const q1 = Math.min(15, Math.trunc(Math.fround(Math.fround(x[o + j + 16] * id) + 8.5)));
      out[b * 16 + j] = q0 | (q1 << 4);
    }
    dv.setUint16(scales + b * 2, f32ToF16(d), true);
  }
}

/** C's `roundf`: halves away from zero. */
function roundHalfAway(v: number): number {
  return v < 0 ? -Math.round(-v) : Math.round(v);
}
