/**
 * The weight encodings against hand-computed values: f16/bf16 rounding, the q8_0
 * and q4_0 block quantizers (in the planar layout of `graph/dtype.ts`), the load
 * path's dtype rules, and the TypeScript backend's weight-typed kernels against a
 * plain f64 product of the decoded weights.
 *
 * Every expected byte below was worked out by hand from the format definitions
 * (the derivation is in the comment beside it), not produced by the code under test.
 *
 * @module
 */

import assert from "node:assert/strict";
import { bf16ToF32, f16Table, f16ToF32, f32ToBf16, f32ToF16 } from "../graph/half.ts";
import { type DType, WEIGHT_DTYPES } from "../graph/dtype.ts";
import { elementCount } from "../graph/ir.ts";
import { decodeWeights, encodeWeights, NonFiniteWeightError } from "../graph/weight_codec.ts";
import { EMBEDDING_KERNELS, MATMUL_KERNELS, type TsWeight } from "../backends/ts/matmul.ts";
import { chooseDType, convertWeight } from "../models/files/weight_dtype.ts";
import { randomF32 } from "./helpers.ts";

/** The 16-bit little-endian word at byte `o`. */
function u16(bytes: Uint8Array, o: number): number {
  return bytes[o] | (bytes[o + 1] << 8);
}

/** A 32-value block: `set` gives the non-zero elements. */
function block(set: Record<number, number>): Float32Array {
  const x = new Float32Array(32);
  for (const [j, v] of Object.entries(set)) x[Number(j)] = v;
  return x;
}

/** Asserts two float arrays are equal element by element (naming the first difference). */
function assertValues(actual: Float32Array, expected: readonly number[], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(actual[i] === expected[i], `${what}: element ${i} is ${actual[i]}, expected ${expected[i]}`);
  }
}

Deno.test("f16: round to nearest even, subnormals, overflow to infinity", () => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.1, 0x2e66], // f32 0x3dcccccd: exponent -4 → 11 << 10; mantissa 0x4ccccd >> 13 = 0x266, rest 0xccd < half
    [65504, 0x7bff], // the largest half
    [65519, 0x7bff], // below the midpoint 65520
    [65520, 0x7c00], // the midpoint to 65536: 0x3ff is odd, so up, and up is past the range
    [1e6, 0x7c00],
    [-1e6, 0xfc00],
    [1 + 2 ** -11, 0x3c00], // tie between 1 and 1 + 2^-10: the even mantissa 0
    [1 + 3 * 2 ** -11, 0x3c02], // tie between mantissas 1 and 2: the even 2
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // just past the tie: up
    [2 ** -14, 0x0400], // the least normal
    [2 ** -24, 0x0001], // the least subnormal
    [-(2 ** -24), 0x8001],
    [2 ** -25, 0x0000], // tie between 0 and 2^-24: the even 0
    [3 * 2 ** -25, 0x0002], // tie between 1 and 2 (× 2^-24): the even 2
    [2 ** -25 + 2 ** -35, 0x0001], // past the tie: up
    [2 ** -26, 0x0000],
    [1023.5 * 2 ** -24, 0x0400], // tie between subnormal 0x3ff and 0x400: carries into the least normal
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
  ];
  for (const [x, bits] of cases) {
    assert.equal(f32ToF16(x), bits, `f32ToF16(${x}) = 0x${f32ToF16(x).toString(16)}, expected 0x${bits.toString(16)}`);
  }
  const nan = f32ToF16(NaN);
  assert.ok((nan & 0x7c00) === 0x7c00 && (nan & 0x3ff) !== 0, `f32ToF16(NaN) = 0x${nan.toString(16)}`);

  const back: [number, number][] = [
    [0x3c00, 1],
    [0xc000, -2],
    [0x7bff, 65504],
    [0x0001, 2 ** -24],
    [0x03ff, 1023 * 2 ** -24],
    [0x0400, 2 ** -14],
    [0x3555, 1365 / 4096], // 2^-2 × (1 + 0x155/1024)
    [0x7c00, Infinity],
    [0xfc00, -Infinity],
  ];
  const table = f16Table();
  for (const [bits, x] of back) {
    assert.equal(f16ToF32(bits), x, `f16ToF32(0x${bits.toString(16)})`);
    assert.equal(table[bits], x, `f16Table()[0x${bits.toString(16)}]`);
  }
  assert.ok(Object.is(f16ToF32(0x8000), -0));
  assert.ok(Number.isNaN(f16ToF32(0x7e00)));
});

Deno.test("bf16: round to nearest even, overflow, NaN stays NaN", () => {
  const cases: [number, number][] = [
    [1, 0x3f80],
    [-1.5, 0xbfc0],
    [0.1, 0x3dcd], // f32 0x3dcccccd: the low half 0xcccd is past 0x8000, so up
    [1 + 2 ** -8, 0x3f80], // tie between 1 and 1 + 2^-7: the even 0x3f80
    [1 + 3 * 2 ** -8, 0x3f82], // tie between 0x3f81 and 0x3f82: the even one
    [1 + 2 ** -8 + 2 ** -20, 0x3f81], // past the tie: up
    [3.4028234663852886e38, 0x7f80], // the largest f32 rounds past the largest bf16
    [2 ** -130, 0x0008], // an f32 subnormal: bits 0x00080000
    [Infinity, 0x7f80],
    [-Infinity, 0xff80],
  ];
  for (const [x, bits] of cases) {
    assert.equal(
      f32ToBf16(x),
      bits,
      `f32ToBf16(${x}) = 0x${f32ToBf16(x).toString(16)}, expected 0x${bits.toString(16)}`,
    );
  }
  assert.equal(f32ToBf16(NaN), 0x7fc0);
  assert.equal(bf16ToF32(0x3f80), 1);
  assert.equal(bf16ToF32(0xbfc0), -1.5);
  assert.equal(bf16ToF32(0xff80), -Infinity);
  assert.equal(bf16ToF32(0x3dcd), 0.10009765625); // 2^-4 × (1 + 0x4d/128)
  assert.ok(Number.isNaN(bf16ToF32(0x7fc1)));
});

Deno.test("f16 and bf16 weights: encoded as little-endian words", () => {
  const f16 = encodeWeights("f16", Float32Array.from([1, -2, 65520, 2 ** -25]), 2);
  assert.deepEqual([...f16], [0x00, 0x3c, 0x00, 0xc0, 0x00, 0x7c, 0x00, 0x00]);
  assertValues(decodeWeights("f16", f16, 4), [1, -2, Infinity, 0], "f16 decoded");
  const bf16 = encodeWeights("bf16", Float32Array.from([1, 0.1]), 2);
  assert.deepEqual([...bf16], [0x80, 0x3f, 0xcd, 0x3d]);
  assertValues(decodeWeights("bf16", bf16, 2), [1, 0.10009765625], "bf16 decoded");
});

Deno.test("q8_0: all-zero block", () => {
  const bytes = encodeWeights("q8_0", new Float32Array(32), 32);
  assert.equal(bytes.length, 34);
  assert.ok(bytes.every((b) => b === 0), "every quant and the scale are 0");
  assertValues(decodeWeights("q8_0", bytes, 32), new Array(32).fill(0), "decoded");
});

Deno.test("q8_0: one huge value sets the scale", () => {
  // d = 1000 / 127 = 7.874…, stored as the nearest half: 2016 × 2^-8 = 7.875 (0x47e0).
  // q = round(x × 127 / 1000): 1000 → 127, 4 → round(0.508) = 1, -4 → -1, 3.9 → round(0.495) = 0, 1 → 0.
  const x = block({ 0: 1, 1: 4, 2: -4, 3: 3.9, 5: 1000 });
  const bytes = encodeWeights("q8_0", x, 32);
  assert.deepEqual([...bytes.subarray(0, 6)], [0, 1, 0xff, 0, 0, 127]);
  assert.ok(bytes.subarray(6, 32).every((b) => b === 0));
  assert.equal(u16(bytes, 32), 0x47e0);
  const expected = new Array(32).fill(0);
  expected[1] = 7.875;
  expected[2] = -7.875;
  expected[5] = 127 * 7.875;
  assertValues(decodeWeights("q8_0", bytes, 32), expected, "decoded");
});

Deno.test("q8_0: mixed signs, ties round half away from zero", () => {
  // amax = 127 → d = 1 (0x3c00): q = roundf(x), so halves go away from zero (2.5 → 3, not 2).
  const x = block({ 0: -127, 1: 2.5, 2: -2.5, 3: 0.5, 4: -0.5, 5: 1.5, 6: -1.5, 7: 126.5, 8: 3.49, 9: -3.51 });
  const bytes = encodeWeights("q8_0", x, 32);
  const q = [...new Int8Array(bytes.buffer, 0, 10)];
  assert.deepEqual(q, [-127, 3, -3, 1, -1, 2, -2, 127, 3, -4]);
  assert.equal(u16(bytes, 32), 0x3c00);
  assertValues(decodeWeights("q8_0", bytes, 32).subarray(0, 10), q, "decoded");
});

Deno.test("q8_0: planar layout, all quants then all scales", () => {
  // Two rows of one block: row 0 has amax 127 (d = 1), row 1 amax 254 (d = 2, 0x4000).
  const x = new Float32Array(64);
  x[0] = 127;
  x[1] = 5;
  x[32] = -254;
  x[33] = 6;
  const bytes = encodeWeights("q8_0", x, 32);
  assert.equal(bytes.length, 64 + 4);
  assert.deepEqual([bytes[0], bytes[1], bytes[32], bytes[33]], [127, 5, 0x81, 3]); // -127 is 0x81
  assert.equal(u16(bytes, 64), 0x3c00);
  assert.equal(u16(bytes, 66), 0x4000);
});

Deno.test("q4_0: all-zero block", () => {
  // max = 0 → d = 0 / -8 = -0 (f16 0x8000, as ggml stores it); id = 0, so every q = trunc(8.5) = 8.
  const bytes = encodeWeights("q4_0", new Float32Array(32), 32);
  assert.equal(bytes.length, 18);
  assert.ok(bytes.subarray(0, 16).every((b) => b === 0x88));
  assert.equal(u16(bytes, 16), 0x8000);
  const out = decodeWeights("q4_0", bytes, 32);
  assert.ok(out.every((v) => v === 0));
});

Deno.test("q4_0: nibble order, element j low and j + 16 high of byte j", () => {
  // max = -8 (element 0) → d = 1, id = 1, q = min(15, trunc(x + 8.5)).
  // x[j] = j - 8 → q = j; x[16 + j] = 7 - j → q = 15 - j. So byte j = j | (15 - j) << 4.
  const x = new Float32Array(32);
  for (let j = 0; j < 16; j++) {
    x[j] = j - 8;
    x[16 + j] = 7 - j;
  }
  const bytes = encodeWeights("q4_0", x, 32);
  const expected = [0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87, 0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f];
  assert.deepEqual([...bytes.subarray(0, 16)], expected);
  assert.equal(u16(bytes, 16), 0x3c00);
  assertValues(decodeWeights("q4_0", bytes, 32), [...x], "decoded");
});

Deno.test("q4_0: the signed maximum sets d = max / -8; ties and the clamp", () => {
  // max = 8 (first of the two of magnitude 8) → d = -1 (0xbc00), id = -1, q = min(15, trunc(8.5 - x)).
  // 8 → 0 (value 8); -8 → trunc(16.5) = 16, clamped to 15 (value -7); 0.5 → 8 (value 0: 8.0 truncates to 8);
  // -0.5 → 9 (value -1); 1.5 → 7 (value 1); 2.4 → trunc(6.1) = 6 (value 2); -3.7 → trunc(12.2) = 12 (value -4).
  const x = block({ 0: 8, 1: -8, 2: 0.5, 3: -0.5, 4: 1.5, 5: 2.4, 6: -3.7 });
  const bytes = encodeWeights("q4_0", x, 32);
  const lows = [...bytes.subarray(0, 7)].map((b) => b & 15);
  assert.deepEqual(lows, [0, 15, 8, 9, 7, 6, 12]);
  assert.ok(bytes.subarray(0, 16).every((b) => b >> 4 === 8), "elements 16..31 are 0 → q = 8");
  assert.equal(u16(bytes, 16), 0xbc00);
  const expected = new Array(32).fill(0);
  [8, -7, 0, -1, 1, 2, -4].forEach((v, j) => expected[j] = v);
  assertValues(decodeWeights("q4_0", bytes, 32), expected, "decoded");
});

Deno.test("q4_0: one huge value", () => {
  // max = 1000 → d = -125 (f16 0xd7d0: -(1 + 976/1024) × 2^6). q = trunc(8.5 - x / 125):
  // 1000 → 0 (value 1000), 10 → 8 (0), -100 → 9 (-125), 63 → 7 (125), -62 → 8 (0).
  const x = block({ 0: 10, 1: -100, 2: 63, 3: 1000, 20: -62 });
  const bytes = encodeWeights("q4_0", x, 32);
  assert.deepEqual([...bytes.subarray(0, 4)].map((b) => b & 15), [8, 9, 7, 0]);
  assert.equal(bytes[4] >> 4, 8); // element 20 is the high nibble of byte 4
  assert.equal(u16(bytes, 16), 0xd7d0);
  const expected = new Array(32).fill(0);
  expected[1] = -125;
  expected[2] = 125;
  expected[3] = 1000;
  assertValues(decodeWeights("q4_0", bytes, 32), expected, "decoded");
});

Deno.test("q4_0: planar layout, all packed quants then all scales", () => {
  const x = new Float32Array(64);
  x[0] = -8; // row 0: d = 1
  x[32] = -16; // row 1: d = 2 (0x4000)
  const bytes = encodeWeights("q4_0", x, 32);
  assert.equal(bytes.length, 32 + 4);
  assert.equal(bytes[0], 0x80); // q 0 low, element 16 (zero) → 8 high
  assert.equal(bytes[16], 0x80);
  assert.equal(u16(bytes, 32), 0x3c00);
  assert.equal(u16(bytes, 34), 0x4000);
});

Deno.test("encodeWeights: NaN and infinities are rejected by every dtype but f32", () => {
  for (const dtype of ["f16", "bf16", "q8_0", "q4_0"] as const) {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const x = new Float32Array(64);
      x[37] = bad;
      assert.throws(
        () => encodeWeights(dtype, x, 32, 'tensor "w"'),
        (e: unknown) =>
          e instanceof NonFiniteWeightError && e instanceof RangeError &&
          e.message === `Cannot encode tensor "w": element 37 is ${bad}, expected a finite number`,
        `${dtype} ${bad}`,
      );
    }
  }
  const passed = decodeWeights("f32", encodeWeights("f32", Float32Array.from([NaN, Infinity]), 2), 2);
  assert.ok(Number.isNaN(passed[0]) && passed[1] === Infinity);
});

Deno.test("encodeWeights: quantized rows must be whole blocks, rows must divide the values", () => {
  for (const dtype of ["q8_0", "q4_0"] as const) {
    for (const row of [312, 1092, 16]) {
      assert.throws(() => encodeWeights(dtype, new Float32Array(row * 2), row), RangeError, `${dtype} rows of ${row}`);
    }
  }
  assert.throws(() => encodeWeights("q8_0", new Float32Array(48), 32), /rows of 32/);
  assert.throws(() => encodeWeights("f16", new Float32Array(10), 3), /rows of 3/);
  assert.throws(() => encodeWeights("f16", new Float32Array(10), 0), /rows of 0/);
  assert.throws(() => encodeWeights("i32", new Float32Array(4), 4), TypeError);
  assert.throws(() => decodeWeights("q8_0", new Uint8Array(34), 48), /Cannot decode 48 "q8_0" values/);
  assert.throws(() => decodeWeights("q4_0", new Uint8Array(17), 32), /from 17 bytes: expected 18/);
  assert.throws(() => decodeWeights("f16", new Uint8Array(6), 4), /from 6 bytes: expected 8/);
});

Deno.test("decodeWeights: reads a misaligned view of a larger buffer", () => {
  // f16 1, -2 and bf16 1, 0.1 as bytes, one byte into a buffer (as a tensor inside a file can be).
  const buf = Uint8Array.from([0xaa, 0x00, 0x3c, 0x00, 0xc0, 0xaa]);
  assertValues(decodeWeights("f16", buf.subarray(1, 5), 2), [1, -2], "f16");
  const bf = Uint8Array.from([0xaa, 0x80, 0x3f, 0xcd, 0x3d]);
  assertValues(decodeWeights("bf16", bf.subarray(1), 2), [1, 0.10009765625], "bf16");
  const q8 = new Uint8Array(35);
  q8[1] = 3; // element 0: q = 3
  q8[2] = 0xfe; // element 1: q = -2
  q8[34] = 0x40; // scale bits 0x4000 = 2, little-endian at bytes 32..33 of the view
  assertValues(decodeWeights("q8_0", q8.subarray(1), 32).subarray(0, 3), [6, -4, 0], "q8_0");
});

Deno.test("chooseDType: norms stay f32, rows that are not whole blocks fall back to f16", () => {
  // The minueza shapes: dim 312 and ffn 1092 are not multiples of 32.
  for (const target of ["q8_0", "q4_0"] as const) {
    assert.equal(chooseDType([312, 312], target), "f16");
    assert.equal(chooseDType([1092, 312], target), "f16");
    assert.equal(chooseDType([312, 1092], target), "f16");
    assert.equal(chooseDType([32000, 312], target), "f16");
    assert.equal(chooseDType([384, 128], target), target);
    assert.equal(chooseDType([128, 384], target), target);
  }
  for (const target of WEIGHT_DTYPES) {
    assert.equal(chooseDType([312], target), "f32", `a norm under ${target}`);
    assert.equal(chooseDType([128], target), "f32", `a norm under ${target}`);
  }
  assert.equal(chooseDType([312, 1092], "bf16"), "bf16");
  assert.equal(chooseDType([312, 1092], "f32"), "f32");
});

Deno.test("convertWeight: converts matrices, keeps norms, sizes follow the layout", () => {
  const f32 = (name: string, shape: number[]) => {
    const v = randomF32(elementCount(shape), 3);
    return { name, dtype: "f32" as DType, shape, data: new Uint8Array(v.buffer) };
  };
  const norm = f32("norm", [64]);
  assert.equal(convertWeight(norm, "q4_0"), norm);
  const w = f32("w", [2, 64]);
  const q8 = convertWeight(w, "q8_0");
  assert.equal(q8.dtype, "q8_0");
  assert.equal(q8.data.length, 128 + 4 * 2); // 34 bytes per 32 weights
  const q4 = convertWeight(w, "q4_0");
  assert.equal(q4.data.length, 64 + 4 * 2); // 18 bytes per 32 weights
  const odd = convertWeight(f32("odd", [3, 312]), "q4_0");
  assert.equal(odd.dtype, "f16");
  assert.equal(odd.data.length, 3 * 312 * 2);
  // Back to f32 from a reduced dtype decodes the stored values.
  const back = convertWeight(q8, "f32");
  assert.deepEqual(new Float32Array(back.data.buffer), decodeWeights("q8_0", q8.data, 128));
  // f32 bytes at an offset that is not a multiple of 4 (inside a file) convert the same.
  const raw = new Uint8Array(2 + 8);
  raw.set(new Uint8Array(Float32Array.from([1, -2]).buffer), 2);
  const moved = convertWeight({ name: "m", dtype: "f32", shape: [1, 2], data: raw.subarray(2) }, "f16");
  assert.deepEqual([...moved.data], [0x00, 0x3c, 0x00, 0xc0]);
  assert.throws(() => {
    const bad = f32("bad", [1, 32]);
    new Float32Array(bad.data.buffer)[5] = NaN;
    convertWeight(bad, "q8_0");
  }, /tensor "bad": element 5 is NaN/);
});

/** The weight as the TypeScript backend would hold it, `pad` bytes into a larger buffer. */
function tsWeight(dtype: DType, shape: number[], values: Float32Array, pad: number): TsWeight {
  const enc = encodeWeights(dtype, values, shape[1]);
  const buf = new Uint8Array(enc.length + pad);
  buf.set(enc, pad);
  const bytes = buf.subarray(pad);
  const f32 = dtype === "f32" ? new Float32Array(bytes.slice().buffer) : undefined;
  return { dtype, shape, bytes, f32 };
}

Deno.test("ts kernels: every weight dtype matches the f64 product of the decoded weights", () => {
  for (const dtype of WEIGHT_DTYPES) {
    for (const [T, K, N, pad] of [[1, 96, 7, 0], [1, 64, 1, 4], [2, 32, 5, 1], [6, 128, 9, 2], [9, 64, 4, 0]]) {
      const W = randomF32(N * K, N + K, 0.5);
      const x = randomF32(T * K, T + K);
      const w = tsWeight(dtype, [N, K], W, dtype === "f32" ? 0 : pad);
      const dec = decodeWeights(dtype, w.bytes, N * K);
      const out = new Float32Array(T * N);
      MATMUL_KERNELS[dtype]!(out, x, w, T, K, N);
      for (let t = 0; t < T; t++) {
        for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += dec[n * K + k] * x[t * K + k];
          const got = out[t * N + n];
          assert.ok(
            Math.abs(got - s) <= 1e-6 * Math.max(1, Math.abs(s)),
            `${dtype} T=${T} K=${K} N=${N}: out[${t}, ${n}] is ${got}, expected ${s}`,
          );
        }
      }
    }
    const V = 5, D = 64;
    const table = tsWeight(dtype, [V, D], randomF32(V * D, 11), dtype === "f32" ? 0 : 2);
    const dec = decodeWeights(dtype, table.bytes, V * D);
    const ids = Int32Array.from([4, 0, 4, 2]);
    const out = new Float32Array(ids.length * D);
    EMBEDDING_KERNELS[dtype]!(out, ids, table, ids.length, D);
    ids.forEach((id, t) => {
      assertValues(out.subarray(t * D, (t + 1) * D), [...dec.subarray(id * D, (id + 1) * D)], `${dtype} row ${id}`);
    });
  }
});
