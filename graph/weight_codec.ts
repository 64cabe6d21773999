/**
 * Encoding f32 weights into every weight dtype, and decoding them back. The
 * block formats quantize exactly as ggml's reference quantizers
 * (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) do, in the planar layout
 * described in `dtype.ts`.
 *
 * The loops read and write typed-array views (little-endian, as every platform a
 * JavaScript engine runs on is), so converting a large model at load stays fast.
 *
 * @module
 */

import { f16Table, f32BitsToBf16, f32BitsToF16, f32ToF16 } from "./half.ts";
import { byteSize, type DType, QUANT_BLOCK, quantScalesOffset } from "./dtype.ts";

/** A weight value that no dtype can hold (NaN or ±Infinity). */
export class NonFiniteWeightError extends RangeError {
  /**
   * Creates the error, naming the tensor, the element and its value.
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
 * values pass through), and a `RangeError` when a quantized row is not whole blocks
 * or `rowLength` does not divide the values into whole rows. f16 rounds finite
 * values past its range to ±Infinity, as a hardware conversion does.
 */
export function encodeWeights(dtype: DType, values: Float32Array, rowLength: number, what = "weights"): Uint8Array {
  const n = values.length;
  if (!Number.isInteger(rowLength) || rowLength < 1 || n % rowLength !== 0) {
    throw new RangeError(
      `Cannot encode ${what} in rows of ${rowLength}: expected a positive integer that divides the ${n} values`,
    );
  }
  if (dtype === "i32") throw new TypeError(`Cannot encode ${what} as "i32": it is not a weight dtype`);
  const out = new Uint8Array(byteSize(dtype, n, rowLength));
  if (dtype === "f32") {
    out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
    return out;
  }
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (v - v !== 0) throw new NonFiniteWeightError(what, i, v); // NaN and ±Infinity only
  }
  switch (dtype) {
    case "f16":
    case "bf16": {
      const bits = new Uint32Array(values.buffer, values.byteOffset, n);
      const h = new Uint16Array(out.buffer, 0, n);
      if (dtype === "f16") { for (let i = 0; i < n; i++) h[i] = f32BitsToF16(bits[i]); }
      else for (let i = 0; i < n; i++) h[i] = f32BitsToBf16(bits[i]);
      return out;
    }
    case "q8_0":
      quantizeQ8_0(values, out);
      return out;
    case "q4_0":
      quantizeQ4_0(values, out);
      return out;
  }
}

/** Decodes `count` values of `dtype` to f32 (a fresh array). */
export function decodeWeights(dtype: DType, data: Uint8Array, count: number): Float32Array {
  if (dtype === "i32") throw new TypeError(`Cannot decode "i32" as weights`);
  if (!Number.isInteger(count) || count < 0 || (isBlock(dtype) && count % QUANT_BLOCK !== 0)) {
    throw new RangeError(`Cannot decode ${count} "${dtype}" values: expected a whole number of rows`);
  }
  const need = byteSize(dtype, count, isBlock(dtype) ? QUANT_BLOCK : count);
  if (data.byteLength < need) {
    throw new RangeError(`Cannot decode ${count} "${dtype}" values from ${data.byteLength} bytes: expected ${need}`);
  }
  // Views need aligned offsets; a misaligned slice of a file is copied once.
  const bytes = data.byteOffset % 4 === 0 ? data : data.slice(0, need);
  const out = new Float32Array(count);
  switch (dtype) {
    case "f32":
      out.set(new Float32Array(bytes.buffer, bytes.byteOffset, count));
      return out;
    case "f16": {
      const table = f16Table();
      const h = new Uint16Array(bytes.buffer, bytes.byteOffset, count);
      for (let i = 0; i < count; i++) out[i] = table[h[i]];
      return out;
    }
    case "bf16": {
      const h = new Uint16Array(bytes.buffer, bytes.byteOffset, count);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < count; i++) bits[i] = h[i] << 16;
      return out;
    }
    case "q8_0": {
      const table = f16Table();
      const q = new Int8Array(bytes.buffer, bytes.byteOffset, count);
      const scales = new Uint16Array(bytes.buffer, bytes.byteOffset + quantScalesOffset(dtype, count), count / 32);
      for (let b = 0, o = 0; o < count; b++, o += QUANT_BLOCK) {
        const d = table[scales[b]];
        for (let j = o; j < o + QUANT_BLOCK; j++) out[j] = q[j] * d;
      }
      return out;
    }
    case "q4_0": {
      const table = f16Table();
      const scales = new Uint16Array(bytes.buffer, bytes.byteOffset + quantScalesOffset(dtype, count), count / 32);
      for (let b = 0, o = 0; o < count; b++, o += QUANT_BLOCK) {
        const d = table[scales[b]];
        for (let j = 0; j < 16; j++) {
          const v = bytes[b * 16 + j];
          out[o + j] = ((v & 0x0f) - 8) * d;
          out[o + j + 16] = ((v >> 4) - 8) * d;
        }
      }
      return out;
    }
  }
}

function isBlock(dtype: DType): boolean {
  return dtype === "q8_0" || dtype === "q4_0";
}

/** q8_0: d = max|x| / 127, q = round(x / d) (halves away from zero), d stored as f16. */
function quantizeQ8_0(x: Float32Array, out: Uint8Array): void {
  const n = x.length;
  const q = new Int8Array(out.buffer, 0, n);
  const scales = new Uint16Array(out.buffer, quantScalesOffset("q8_0", n), n / QUANT_BLOCK);
  for (let b = 0, o = 0; o < n; b++, o += QUANT_BLOCK) {
    let amax = 0;
    for (let j = o; j < o + QUANT_BLOCK; j++) {
      const a = Math.abs(x[j]);
      if (a > amax) amax = a;
    }
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    for (let j = o; j < o + QUANT_BLOCK; j++) {
      const v = Math.fround(x[j] * id);
      q[j] = v < 0 ? -Math.round(-v) : Math.round(v); // C's roundf
    }
    scales[b] = f32ToF16(d);
  }
}

/** q4_0: d = (the value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)), d as f16. */
function quantizeQ4_0(x: Float32Array, out: Uint8Array): void {
  const n = x.length;
  const scales = new Uint16Array(out.buffer, quantScalesOffset("q4_0", n), n / QUANT_BLOCK);
  for (let b = 0, o = 0; o < n; b++, o += QUANT_BLOCK) {
    let amax = 0;
    let max = 0;
    for (let j = o; j < o + QUANT_BLOCK; j++) {
      const v = x[j];
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
    scales[b] = f32ToF16(d);
  }
}
