/**
 * The WebGPU backend's memory: the buffer usage flags, the tensor it holds (one
 * buffer, or a large 2-D weight split by rows into parts that each fit one shader
 * binding), and the bind group layouts every shader binds its buffers through.
 *
 * @module
 */

import { byteSize, isQuantized, QUANT_BLOCK, quantScalesOffset } from "../../graph/dtype.ts";
import type { DType } from "../../graph/dtype.ts";
import type { DeviceTensor, HostTensor } from "../contract.ts";

// The WebGPU flag values (fixed by the specification), spelled out so that importing this
// module works where the GPU* globals do not exist: creating the backend then throws a
// WebGpuUnavailableError instead of the import failing with a ReferenceError.
/** `GPUBufferUsage.MAP_READ`, also `GPUMapMode.READ`. */
export const MAP_READ = 0x0001;
/** `GPUBufferUsage.COPY_SRC`. */
export const COPY_SRC = 0x0004;
/** `GPUBufferUsage.COPY_DST`. */
export const COPY_DST = 0x0008;
/** `GPUBufferUsage.UNIFORM`. */
export const UNIFORM = 0x0040;
/** `GPUBufferUsage.STORAGE`, with copies both ways. */
export const STORAGE = 0x0080 | COPY_DST | COPY_SRC;
/** `GPUShaderStage.COMPUTE`. */
const COMPUTE_STAGE = 0x4;

/** `n` rounded up to whole 4-byte words. */
export function align4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

/** Rows `firstRow .. firstRow + rows - 1` of a weight, in their own buffer and `graph/dtype.ts` layout. */
export interface WeightPart {
  /** The part's buffer. */
  readonly buffer: GPUBuffer;
  /** The weight row the part starts at. */
  readonly firstRow: number;
  /** Rows in the part. */
  readonly rows: number;
}

/**
 * A tensor held by the WebGPU backend: one GPU buffer (size padded to 4 bytes), or
 * for a 2-D weight larger than one storage binding, several parts split by rows.
 */
export interface GpuTensor extends DeviceTensor {
  /** The buffer of the first (often only) part. */
  readonly buffer: GPUBuffer;
  /** Every part, in row order. */
  readonly parts: readonly WeightPart[];
}

/**
 * A storage buffer of `bytes` bytes (padded to whole words); a `RangeError` names
 * the limit when it is larger than one binding may be.
 */
export function createStorageBuffer(
  device: GPUDevice,
  name: string,
  bytes: number,
  mapped: boolean,
  maxBindingBytes: number,
): GPUBuffer {
  if (bytes > maxBindingBytes) {
    throw new RangeError(
      `Cannot hold "${name}" (${bytes} bytes) on WebGPU: it is larger than the device's ` +
        `maxStorageBufferBindingSize (${maxBindingBytes} bytes)`,
    );
  }
  return device.createBuffer({
    label: name,
    size: Math.max(4, align4(bytes)),
    usage: STORAGE,
    mappedAtCreation: mapped,
  });
}

/** A tensor in one buffer, holding `data` when given (zeros otherwise). */
export function wholeTensor(
  device: GPUDevice,
  spec: Omit<DeviceTensor, "byteLength">,
  byteLength: number,
  data: Uint8Array | undefined,
  maxBindingBytes: number,
): GpuTensor {
  const buffer = createStorageBuffer(device, spec.name, byteLength, data !== undefined, maxBindingBytes);
  if (data) {
    new Uint8Array(buffer.getMappedRange()).set(data);
    buffer.unmap();
  }
  return {
    name: spec.name,
    dtype: spec.dtype,
    shape: [...spec.shape],
    byteLength,
    buffer,
    parts: [{ buffer, firstRow: 0, rows: spec.shape[0] ?? 1 }],
  };
}

/**
 * Uploads a 2-D weight larger than one binding as parts of whole rows, each in its own
 * buffer and planar layout; a `RangeError` when even one row does not fit a binding.
 */
export function splitWeight(device: GPUDevice, t: HostTensor, maxBindingBytes: number): GpuTensor {
  const limit = maxBindingBytes;
  const [R, C] = t.shape;
  const rowBytes = t.shape.length === 2 ? byteSize(t.dtype, C, C) : Infinity;
  const perPart = Math.floor(limit / rowBytes);
  if (perPart < 1) {
    throw new RangeError(
      `Cannot hold "${t.name}" (${t.data.byteLength} bytes) on WebGPU: it is larger than the device's ` +
        `maxStorageBufferBindingSize (${limit} bytes)` +
        (t.shape.length === 2 ? `, and so is one of its rows (${rowBytes} bytes)` : ", and it is not a 2-D weight"),
    );
  }
  const quantized = t.dtype === "q8_0" || t.dtype === "q4_0";
  const quantRow = t.dtype === "q8_0" ? C : C / 2;
  const scaleRow = (C / QUANT_BLOCK) * 2;
  const scales = quantized ? quantScalesOffset(t.dtype as "q8_0" | "q4_0", R * C) : 0;
  const parts: WeightPart[] = [];
  for (let first = 0; first < R; first += perPart) {
    const rows = Math.min(perPart, R - first);
    const bytes = byteSize(t.dtype, rows * C, C);
    const buffer = createStorageBuffer(device, `${t.name} rows ${first}..${first + rows - 1}`, bytes, true, limit);
    const dst = new Uint8Array(buffer.getMappedRange());
    if (quantized) {
      dst.set(t.data.subarray(first * quantRow, (first + rows) * quantRow), 0);
      dst.set(t.data.subarray(scales + first * scaleRow, scales + (first + rows) * scaleRow), rows * quantRow);
    } else {
      dst.set(t.data.subarray(first * rowBytes, (first + rows) * rowBytes), 0);
    }
    buffer.unmap();
    parts.push({ buffer, firstRow: first, rows });
  }
  const { name, dtype, shape } = t;
  return { name, dtype, shape: [...shape], byteLength: t.data.byteLength, buffer: parts[0].buffer, parts };
}

/** Reads, writes and copies address one buffer: a weight split across bindings refuses them. */
export function checkWhole(t: DeviceTensor): void {
  const parts = (t as GpuTensor).parts.length;
  if (parts > 1) {
    throw new TypeError(
      `Cannot read or write the bytes of "${t.name}" directly: WebGPU holds it in ${parts} parts (split by rows)`,
    );
  }
}

/** Word index of the f16 scales in a part of a quantized weight with rows of `cols` (0 for float weights). */
export function scaleWord(dtype: DType, part: WeightPart, cols: number): number {
  if (!isQuantized(dtype)) return 0;
  return quantScalesOffset(dtype as "q8_0" | "q4_0", part.rows * cols) / 4;
}

/** The bind group layouts: binding schemes shared by the shaders (see `shaders.ts`). */
export interface Layouts {
  /** params, step, arena. */
  readonly base: GPUBindGroupLayout;
  /** + a read-only weight. */
  readonly weight: GPUBindGroupLayout;
  /** + a read-only weight and the read-only index buffer (token ids). */
  readonly embedding: GPUBindGroupLayout;
  /** + the read-only index buffer (positions, gathered rows). */
  readonly index: GPUBindGroupLayout;
  /** + the key and value caches, read-write, and the read-only index buffer (positions, page tables). */
  readonly cache: GPUBindGroupLayout;
}

/** Creates the {@link Layouts} of a device. */
export function createLayouts(device: GPUDevice): Layouts {
  const C = COMPUTE_STAGE;
  const head: GPUBindGroupLayoutEntry[] = [
    { binding: 0, visibility: C, buffer: { type: "uniform" } },
    { binding: 1, visibility: C, buffer: { type: "uniform" } },
    { binding: 2, visibility: C, buffer: { type: "storage" } },
  ];
  const make = (extra: GPUBufferBindingType[]) =>
    device.createBindGroupLayout({
      entries: [...head, ...extra.map((type, i) => ({ binding: 3 + i, visibility: C, buffer: { type } }))],
    });
  return {
    base: make([]),
    weight: make(["read-only-storage"]),
    embedding: make(["read-only-storage", "read-only-storage"]),
    index: make(["read-only-storage"]),
    cache: make(["storage", "storage", "read-only-storage"]),
  };
}
