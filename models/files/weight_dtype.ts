/**
 * Converting loaded weights to the dtype a caller asks for (`loadModel(m, { dtype })`).
 *
 * Rules: 1-D tensors (norms) stay f32; the precision-sensitive parts of the model
 * never depend on the weight dtype. Block-quantized types need rows that are whole
 * 32-weight blocks; a matrix whose rows are not (the minueza shape: 312, 1092) is
 * kept in f16 instead, as llama.cpp does.
 *
 * @module
 */

import type { HostTensor } from "../../backends/contract.ts";
import { isQuantized, QUANT_BLOCK, type WeightDType } from "../../graph/dtype.ts";
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
