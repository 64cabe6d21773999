/**
 * Element types of graph tensors and the byte layout of each.
 *
 * Activations are always `f32`; token ids are `i32`. Weights may be stored in any
 * of the float or block-quantized types. The layouts below are the contract
 * every backend reads: a weight of shape `[rows, cols]` is stored row by row.
 *
 * - `f32`, `f16`, `bf16`, `i32`: plain little-endian arrays, `rows * cols` elements.
 * - `q8_0`: blocks of 32 weights along a row. The buffer holds first all the int8
 *   quants (`rows * cols` bytes, in element order), then all the block scales as
 *   f16 (`rows * cols / 32` of them, in block order). Value = `q * d`.
 * - `q4_0`: blocks of 32 weights. First all the packed quants (`rows * cols / 2`
 *   bytes; within a block, byte `j` holds element `j` in its low nibble and element
 *   `j + 16` in its high nibble, as GGUF does), then the f16 scales. Value =
 *   `(q - 8) * d`.
 *
 * Quants and scales are split ("planar") rather than interleaved as in GGUF so
 * that every region stays aligned for typed-array views and SIMD loads; the
 * numbers are the same as GGUF's.
 *
 * @module
 */

/** The element types a graph tensor can have. */
export type DType = "f32" | "f16" | "bf16" | "q8_0" | "q4_0" | "i32";

/** Every dtype, in a stable order. */
export const DTYPES: readonly DType[] = ["f32", "f16", "bf16", "q8_0", "q4_0", "i32"];

/** The element types a weight can be stored in: every {@link DType} but the `i32` of token ids. */
export type WeightDType = "f32" | "f16" | "bf16" | "q8_0" | "q4_0";

/**
 * Every {@link WeightDType}, in a stable order: what `matmul` and `embedding` may read,
 * and what a model may be loaded as.
 */
export const WEIGHT_DTYPES: readonly WeightDType[] = ["f32", "f16", "bf16", "q8_0", "q4_0"];

/** True when `dtype` is a {@link WeightDType}. */
export function isWeightDType(dtype: string): dtype is WeightDType {
  return (WEIGHT_DTYPES as readonly string[]).includes(dtype);
}

/** The element types a KV cache (the state attention reads and appends to) can have. */
export type KvDType = "f32" | "f16";

/** Every {@link KvDType}: what backends may support for attention, and what a model may ask for. */
export const KV_DTYPES: readonly KvDType[] = ["f32", "f16"];

/** True when `dtype` is a {@link KvDType}. */
export function isKvDType(dtype: string): dtype is KvDType {
  return (KV_DTYPES as readonly string[]).includes(dtype);
}

/** Weights per block of the block-quantized types. */
export const QUANT_BLOCK = 32;

/** True for the block-quantized dtypes (`q8_0`, `q4_0`). */
export function isQuantized(dtype: DType): boolean {
  return dtype === "q8_0" || dtype === "q4_0";
}

/** Parses a dtype name, throwing a `TypeError` that names the value when unknown. */
export function parseDType(name: string, what = "dtype"): DType {
  if ((DTYPES as readonly string[]).includes(name)) return name as DType;
  throw new TypeError(
    `Cannot use ${what} "${name}": expected one of ${DTYPES.map((d) => `"${d}"`).join(", ")}`,
  );
}

/**
 * Bytes taken by `count` elements of `dtype` laid out as rows of `rowLength`.
 * Quantized types need `rowLength` to be a multiple of {@link QUANT_BLOCK}.
 */
export function byteSize(dtype: DType, count: number, rowLength = count): number {
  switch (dtype) {
    case "f32":
    case "i32":
      return count * 4;
    case "f16":
    case "bf16":
      return count * 2;
    case "q8_0":
    case "q4_0": {
      if (rowLength % QUANT_BLOCK !== 0) {
        throw new RangeError(
          `Cannot store rows of length ${rowLength} as "${dtype}": the length must be a multiple of ${QUANT_BLOCK}`,
        );
      }
      const blocks = count / QUANT_BLOCK;
      return (dtype === "q8_0" ? count : count / 2) + blocks * 2;
    }
  }
}

/** Byte offset of the f16 scales region inside a quantized weight buffer. */
export function quantScalesOffset(dtype: "q8_0" | "q4_0", count: number): number {
  return dtype === "q8_0" ? count : count / 2;
}
