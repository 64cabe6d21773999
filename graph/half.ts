/**
 * Conversions between f32 and the 16-bit float types, element by element, on
 * numbers or on f32 bit patterns (for loops over a `Uint32Array` view of f32 data,
 * which skip the round trip through a scratch array).
 *
 * @module
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The f32 value of an IEEE half (given as its 16 bits). */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

let f16Values: Float32Array | undefined;

/** The f32 value of every f16 bit pattern (a 65536-entry table, built on first use and shared). */
export function f16Table(): Float32Array {
  if (f16Values === undefined) {
    f16Values = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Values[h] = f16ToF32(h);
  }
  return f16Values;
}

/** The bits of the IEEE half nearest to `x` (round to nearest even), as llama.cpp rounds. */
export function f32ToF16(x: number): number {
  f32[0] = x;
  return f32BitsToF16(u32[0]);
}

/**
 * The bits of the IEEE half nearest to the f32 whose bits are `b` (round to nearest
 * even; past the range, ±Infinity; NaN stays a quiet NaN).
 */
export function f32BitsToF16(b: number): number {
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let m = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    if (rest > half || (rest === half && (m & 1))) m++;
    return sign | m;
  }
  let m = mant >>> 13;
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (m & 1))) {
    m++;
    if (m === 0x400) {
      m = 0;
      e++;
      if (e >= 31) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | m;
}

/** The f32 value of a bfloat16 (given as its 16 bits). */
export function bf16ToF32(h: number): number {
  u32[0] = h << 16;
  return f32[0];
}

/** The bits of the bfloat16 nearest to `x` (round to nearest even; NaN stays NaN). */
export function f32ToBf16(x: number): number {
  f32[0] = x;
  return f32BitsToBf16(u32[0]);
}

/** The bits of the bfloat16 nearest to the f32 whose bits are `b` (round to nearest even; NaN stays NaN). */
export function f32BitsToBf16(b: number): number {
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}
