/**
 * The WebGPU backend (`webgpu`): runs a planned graph as WGSL compute shaders,
 * using only standard WebGPU APIs (so it runs in Deno and in browsers).
 *
 * - Weights, the KV cache (state) and the activation arena are GPU buffers that stay
 *   resident; activations live at their planned offsets in one arena buffer.
 * - `compile` creates every pipeline (cached by shader source), bind group and the
 *   per-node parameter uniforms once. A step writes `T` and `pos` into a uniform with
 *   `queue.writeBuffer`, records every dispatch into one command encoder and submits
 *   once; `readOutput` copies the requested rows into a staging buffer and maps it.
 * - All arithmetic is f32. f16, bf16, q8_0 and q4_0 weights are unpacked in the
 *   shaders with core WGSL (`unpack2x16float`, bit operations), so no optional
 *   feature (`shader-f16`) is needed, and results match the other backends within
 *   the f32 tolerances of the conformance suite.
 * - The KV cache (state) is f32, or f16 stored as in `graph/dtype.ts` and handled as
 *   u32 words of two elements (`pack2x16float` / `unpack2x16float`, again no
 *   `shader-f16`): attention converts each new key and value to f16 once, when the
 *   step writes it, and reads half the bytes.
 * - Decode (up to 4 rows) uses a matrix-vector kernel: on GPUs 64 invocations share
 *   each weight row and sum in workgroup memory; on software adapters (lavapipe) one
 *   invocation per row, which runs there several times faster. Prefill uses 32×32
 *   output tiles with 4×4 outputs per invocation: on GPUs the tiles of x and of the
 *   unpacked weights are staged in workgroup memory (`"shared"`); on software
 *   adapters a barrier-free register-tiled kernel (`"tiled"`) reads them through the
 *   cache. Option `prefillKernel` forces either.
 * - The device is asked for the adapter's own `maxStorageBufferBindingSize` and
 *   `maxBufferSize`; a 2-D weight larger than one binding is split by rows into
 *   several buffers (one dispatch per part); anything else too large fails with a
 *   `RangeError` that names the limit.
 * - A lost device (or an uncaptured GPU error) makes the next `run`/`readOutput`
 *   reject; pending read-backs race the device's `lost` promise, so nothing hangs.
 * - In Deno, a read-back (`mapAsync`) resolves about 10 ms after the GPU finished
 *   (the runtime polls the device), which bounds decode to about 90 tokens/s
 *   whatever the GPU.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, type KvDType, quantScalesOffset } from "../../graph/dtype.ts";
import type { Node, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { Backend, DeviceTensor, Executable, HostTensor, StepArgs } from "../contract.ts";
import { cacheCapacity, UnsupportedError, validateBindings, validateStep } from "../contract.ts";
import {
  attentionShader,
  cacheElementsPerWord,
  elementwiseShader,
  embeddingShader,
  gridOf,
  kvWriteShader,
  lastRowShader,
  matmulSharedShader,
  matmulTiledShader,
  MATVEC_MAX_T,
  MATVEC_ROWS,
  matvecRowsShader,
  matvecShader,
  rmsNormShader,
  ropeShader,
  SHARED_BYTES,
  SHARED_INVOCATIONS,
  TILE,
  WG,
} from "./shaders.ts";

/** Thrown when WebGPU or a GPU adapter is not available (no `navigator.gpu`, or no adapter). */
export class WebGpuUnavailableError extends Error {
  /** @param message sentence-case reason */
  constructor(message: string) {
    super(message);
    this.name = "WebGpuUnavailableError";
  }
}

/** Thrown by `run`, `readOutput` and reads once the GPU device is lost (or destroyed). */
export class WebGpuDeviceLostError extends Error {
  /**
   * @param reason the `GPUDeviceLostInfo` reason (`"destroyed"` or `"unknown"`)
   * @param detail the driver's message
   */
  constructor(readonly reason: string, detail: string) {
    super(`The WebGPU device was lost (reason "${reason}")${detail ? `: ${detail}` : ""}`);
    this.name = "WebGpuDeviceLostError";
  }
}

/** Options of {@link createWebGpuBackend}. */
export interface WebGpuBackendOptions {
  /** The WebGPU entry point; default `navigator.gpu` (or the one set by {@link setNavigatorGpu}). */
  readonly gpu?: GPU;
  /** Adapter preference passed to `requestAdapter`. */
  readonly powerPreference?: GPUPowerPreference;
  /**
   * The decode (matrix-vector) kernel: `"workgroup"` (64 invocations share a weight row
   * and sum in workgroup memory: for GPUs) or `"rows"` (one invocation per row: for
   * software adapters such as lavapipe). Default: `"rows"` on a fallback adapter, else
   * `"workgroup"`.
   */
  readonly decodeKernel?: DecodeKernel;
  /**
   * The prefill (matrix-matrix) kernel, for steps of more than 4 rows: `"shared"` (tiles
   * of x and of the unpacked weights staged in workgroup memory: for GPUs) or `"tiled"`
   * (register tiling only, no workgroup memory and no barrier: for software adapters such
   * as lavapipe, which compile barriers in loops slowly). Default: `"tiled"` on a fallback
   * adapter or one whose workgroup limits are too small for `"shared"`, else `"shared"`.
   */
  readonly prefillKernel?: PrefillKernel;
  /**
   * Largest weight or state buffer bound to one shader binding, in bytes: 2-D weights above
   * it are split by rows into several buffers. Default and maximum: the device's
   * `maxStorageBufferBindingSize` (tests lower it to exercise the splitting).
   */
  readonly maxBindingBytes?: number;
}

/** The matrix-vector kernels of {@link WebGpuBackendOptions.decodeKernel}. */
export type DecodeKernel = "workgroup" | "rows";

/** The matrix-matrix kernels of {@link WebGpuBackendOptions.prefillKernel}. */
export type PrefillKernel = "shared" | "tiled";

let gpuOverride: GPU | undefined;

/**
 * Replaces the WebGPU entry point used by {@link createWebGpuBackend} when its options
 * name none (and so by `createBackend("webgpu")` and `loadModel`); `undefined` restores
 * `navigator.gpu`. Lets tests simulate a machine without an adapter.
 *
 * @example
 * ```ts ignore
 * setNavigatorGpu({ requestAdapter: () => Promise.resolve(null) } as unknown as GPU);
 * await createWebGpuBackend(); // throws WebGpuUnavailableError
 * setNavigatorGpu(undefined);
 * ```
 */
export function setNavigatorGpu(gpu: GPU | undefined): void {
  gpuOverride = gpu;
}

/** Rows `firstRow .. firstRow + rows - 1` of a weight, in their own buffer and `graph/dtype.ts` layout. */
interface WeightPart {
  readonly buffer: GPUBuffer;
  readonly firstRow: number;
  readonly rows: number;
}

/**
 * A tensor held by the WebGPU backend: one GPU buffer (size padded to 4 bytes), or
 * for a 2-D weight larger than one storage binding, several parts split by rows.
 */
interface GpuTensor extends DeviceTensor {
  /** The buffer of the first (often only) part. */
  readonly buffer: GPUBuffer;
  readonly parts: readonly WeightPart[];
}

// The WebGPU flag values (fixed by the specification), spelled out so that importing this
// module works where the GPU* globals do not exist: creating the backend then throws a
// WebGpuUnavailableError instead of the import failing with a ReferenceError.
const MAP_READ = 0x0001; // GPUBufferUsage.MAP_READ, also GPUMapMode.READ
const COPY_SRC = 0x0004; // GPUBufferUsage.COPY_SRC
const COPY_DST = 0x0008; // GPUBufferUsage.COPY_DST
const UNIFORM = 0x0040; // GPUBufferUsage.UNIFORM
const STORAGE = 0x0080 | COPY_DST | COPY_SRC; // GPUBufferUsage.STORAGE and copies
const COMPUTE_STAGE = 0x4; // GPUShaderStage.COMPUTE
const WEIGHT_DTYPES: readonly DType[] = ["f32", "f16", "bf16", "q8_0", "q4_0"];
const F32_OPS: readonly OpKind[] = ["rmsNorm", "rope", "siluMul", "add", "lastRow"];

function align4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

/** The WebGPU backend. Create it with {@link createWebGpuBackend}. */
export class WebGpuBackend implements Backend {
  readonly name = "webgpu";
  readonly description: string;
  /** The GPU device (exposed so that tests can destroy it to simulate a loss). */
  readonly device: GPUDevice;
  /** The matrix-vector kernel in use. */
  readonly decodeKernel: DecodeKernel;
  /** The matrix-matrix (prefill) kernel in use. */
  readonly prefillKernel: PrefillKernel;
  /** Largest weight or state buffer bound to one binding; larger 2-D weights are split by rows. */
  readonly maxBindingBytes: number;
  readonly #layouts: Layouts;
  readonly #pipelines = new Map<string, GPUComputePipeline>();
  #failure: Error | undefined;
  readonly #lost: Promise<never>;
  #disposed = false;

  /**
   * Use {@link createWebGpuBackend}.
   * @param device the device, with the limits this backend requested
   * @param adapterName the adapter's description, for logs
   * @param decodeKernel the matrix-vector kernel to use
   * @param maxBindingBytes see {@link WebGpuBackendOptions.maxBindingBytes}
   * @param prefillKernel the matrix-matrix kernel to use
   */
  constructor(
    device: GPUDevice,
    adapterName: string,
    decodeKernel: DecodeKernel,
    maxBindingBytes?: number,
    prefillKernel: PrefillKernel = "tiled",
  ) {
    this.device = device;
    this.decodeKernel = decodeKernel;
    this.prefillKernel = prefillKernel;
    const limit = device.limits.maxStorageBufferBindingSize;
    this.maxBindingBytes = Math.min(limit, maxBindingBytes ?? limit);
    this.description = `WebGPU (${adapterName}), f32 compute, ${decodeKernel} decode kernel, ` +
      `${prefillKernel} prefill kernel, ` +
      `max binding ${this.maxBindingBytes} bytes`;
    this.#layouts = createLayouts(device);
    this.#lost = device.lost.then((info) => {
      // A loss explains any error seen before it, so it takes precedence.
      const e = new WebGpuDeviceLostError(info.reason, info.message);
      this.#failure = e;
      throw e;
    });
    this.#lost.catch(() => {});
    device.addEventListener("uncapturederror", (ev) => {
      const err = (ev as GPUUncapturedErrorEvent).error;
      this.#failure ??= new Error(`A WebGPU operation failed: ${err.message}`);
    });
  }

  /** Throws the device loss or GPU error seen so far, if any. */
  checkHealthy(): void {
    if (this.#failure) throw this.#failure;
    if (this.#disposed) throw new TypeError(`Cannot use backend "webgpu": it was disposed`);
  }

  /**
   * Resolves `p`, or rejects as soon as the device is lost, so a lost device never
   * hangs a caller. When `p` fails because the device is going away (a mapping
   * rejected on a destroyed device), the loss is what is thrown.
   */
  async whileAlive<T>(p: Promise<T>): Promise<T> {
    p.catch(() => {});
    try {
      return await Promise.race([p, this.#lost]);
    } catch (e) {
      if (!this.#failure) {
        // The device's lost promise settles after the operations it fails: give it a turn.
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
      if (this.#failure) throw this.#failure;
      throw e;
    }
  }

  supports(op: OpKind, dtype: DType): boolean {
    if (op === "matmul" || op === "embedding") return WEIGHT_DTYPES.includes(dtype);
    if (op === "attention") return isKvDType(dtype);
    return F32_OPS.includes(op) && dtype === "f32";
  }

  upload(t: HostTensor): DeviceTensor {
    this.checkHealthy();
    const count = t.shape.reduce((a, b) => a * b, 1);
    const expected = byteSize(t.dtype, count, t.shape[t.shape.length - 1] ?? 1);
    if (t.data.byteLength !== expected) {
      throw new RangeError(`Cannot upload "${t.name}": it has ${t.data.byteLength} bytes, expected ${expected}`);
    }
    const base = { name: t.name, dtype: t.dtype, shape: [...t.shape], byteLength: t.data.byteLength };
    if (t.data.byteLength <= this.maxBindingBytes) {
      const buffer = this.#createBuffer(t.name, t.data.byteLength, true);
      new Uint8Array(buffer.getMappedRange()).set(t.data);
      buffer.unmap();
      return { ...base, buffer, parts: [{ buffer, firstRow: 0, rows: t.shape[0] ?? 1 }] } as GpuTensor;
    }
    const parts = this.#split(t);
    return { ...base, buffer: parts[0].buffer, parts } as GpuTensor;
  }

  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    this.checkHealthy();
    if (!isKvDType(dtype)) {
      throw new UnsupportedError(`Backend "webgpu" cannot hold state "${name}" as "${dtype}": only "f32" or "f16"`);
    }
    const rowLength = shape[shape.length - 1] ?? 1;
    if (rowLength % cacheElementsPerWord(dtype) !== 0) {
      // The shaders write an f16 cache a u32 word (two elements) at a time, so rows must be whole words.
      throw new RangeError(
        `Cannot create "${name}" as "${dtype}" state with rows of ${rowLength} elements on WebGPU: ` +
          `an f16 row must hold an even number of elements`,
      );
    }
    const count = shape.reduce((a, b) => a * b, 1);
    const bytes = byteSize(dtype, count, rowLength);
    const buffer = this.#createBuffer(name, bytes, false);
    return {
      name,
      dtype,
      shape: [...shape],
      byteLength: bytes,
      buffer,
      parts: [{ buffer, firstRow: 0, rows: shape[0] ?? 1 }],
    } as GpuTensor;
  }

  async readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    this.checkHealthy();
    checkRange(t, byteOffset, byteLength);
    checkWhole(t);
    if (byteLength === 0) return new Uint8Array(0);
    const start = byteOffset & ~3;
    const size = align4(byteOffset + byteLength) - start;
    const staging = this.device.createBuffer({ size, usage: MAP_READ | COPY_DST });
    try {
      const enc = this.device.createCommandEncoder();
      enc.copyBufferToBuffer((t as GpuTensor).buffer, start, staging, 0, size);
      this.device.queue.submit([enc.finish()]);
      await this.whileAlive(staging.mapAsync(MAP_READ));
      this.checkHealthy();
      return new Uint8Array(staging.getMappedRange()).slice(byteOffset - start, byteOffset - start + byteLength);
    } finally {
      staging.destroy();
    }
  }

  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    this.checkHealthy();
    checkRange(t, byteOffset, data.byteLength);
    checkWhole(t);
    if (byteOffset % 4 !== 0 || data.byteLength % 4 !== 0) {
      throw new RangeError(
        `Cannot write ${data.byteLength} bytes at offset ${byteOffset} of "${t.name}": WebGPU writes whole 4-byte words`,
      );
    }
    this.device.queue.writeBuffer((t as GpuTensor).buffer, byteOffset, data as Uint8Array<ArrayBuffer>);
  }

  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number): void {
    this.checkHealthy();
    checkRange(src, 0, byteLength);
    checkRange(dst, 0, byteLength);
    checkWhole(src);
    checkWhole(dst);
    if (byteLength === 0) return;
    const enc = this.device.createCommandEncoder();
    // Buffers are padded to whole words, so rounding up stays inside both.
    enc.copyBufferToBuffer((src as GpuTensor).buffer, 0, (dst as GpuTensor).buffer, 0, align4(byteLength));
    this.device.queue.submit([enc.finish()]);
  }

  release(t: DeviceTensor): void {
    for (const part of (t as GpuTensor).parts) part.buffer.destroy();
  }

  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    this.checkHealthy();
    validateBindings(this, plan, bindings);
    this.device.pushErrorScope("out-of-memory");
    this.device.pushErrorScope("validation");
    let exec: WebGpuExecutable | undefined;
    let thrown: unknown;
    try {
      exec = new WebGpuExecutable(this, plan, bindings as ReadonlyMap<number, GpuTensor>);
    } catch (e) {
      thrown = e;
    }
    const validation = await this.whileAlive(this.device.popErrorScope());
    const oom = await this.whileAlive(this.device.popErrorScope());
    const gpuError = validation ?? oom;
    if (thrown || gpuError) {
      exec?.dispose();
      if (thrown) throw thrown;
      throw new Error(`Cannot compile the graph for WebGPU: ${gpuError!.message}`);
    }
    return exec!;
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#pipelines.clear();
    this.device.destroy();
  }

  /** The pipeline of a shader source (created once per source and layout). */
  pipeline(code: string, layout: keyof Layouts): GPUComputePipeline {
    const key = `${layout}\n${code}`;
    let p = this.#pipelines.get(key);
    if (!p) {
      const module = this.device.createShaderModule({ code });
      p = this.device.createComputePipeline({
        layout: this.device.createPipelineLayout({ bindGroupLayouts: [this.#layouts[layout]] }),
        compute: { module, entryPoint: "main" },
      });
      this.#pipelines.set(key, p);
    }
    return p;
  }

  /** The bind group layout of a binding scheme. */
  layout(name: keyof Layouts): GPUBindGroupLayout {
    return this.#layouts[name];
  }

  /** Uploads a 2-D weight as parts of whole rows, each in its own buffer and planar layout. */
  #split(t: HostTensor): WeightPart[] {
    const limit = this.maxBindingBytes;
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
    const scaleRow = (C / 32) * 2;
    const scales = quantized ? quantScalesOffset(t.dtype as "q8_0" | "q4_0", R * C) : 0;
    const parts: WeightPart[] = [];
    for (let first = 0; first < R; first += perPart) {
      const rows = Math.min(perPart, R - first);
      const bytes = byteSize(t.dtype, rows * C, C);
      const buffer = this.#createBuffer(`${t.name} rows ${first}..${first + rows - 1}`, bytes, true);
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
    return parts;
  }

  #createBuffer(name: string, bytes: number, mapped: boolean): GPUBuffer {
    const limit = this.maxBindingBytes;
    if (bytes > limit) {
      throw new RangeError(
        `Cannot hold "${name}" (${bytes} bytes) on WebGPU: it is larger than the device's ` +
          `maxStorageBufferBindingSize (${limit} bytes)`,
      );
    }
    return this.device.createBuffer({
      label: name,
      size: Math.max(4, align4(bytes)),
      usage: STORAGE,
      mappedAtCreation: mapped,
    });
  }
}

/** Reads, writes and copies address one buffer: a weight split across bindings refuses them. */
function checkWhole(t: DeviceTensor): void {
  const parts = (t as GpuTensor).parts.length;
  if (parts > 1) {
    throw new TypeError(
      `Cannot read or write the bytes of "${t.name}" directly: WebGPU holds it in ${parts} parts (split by rows)`,
    );
  }
}

function checkRange(t: DeviceTensor, offset: number, length: number): void {
  if (
    !Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > t.byteLength
  ) {
    throw new RangeError(`Cannot access bytes ${offset}..${offset + length} of "${t.name}": it holds ${t.byteLength}`);
  }
}

/** The bind group layouts: binding schemes shared by the shaders (see `shaders.ts`). */
interface Layouts {
  /** params, step, arena. */
  readonly base: GPUBindGroupLayout;
  /** + a read-only weight. */
  readonly weight: GPUBindGroupLayout;
  /** + a read-only weight and read-only token ids. */
  readonly embedding: GPUBindGroupLayout;
  /** + the key and value caches, read-write. */
  readonly cache: GPUBindGroupLayout;
}

function createLayouts(device: GPUDevice): Layouts {
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
    cache: make(["storage", "storage"]),
  };
}

/** One dispatch of a step: its pipeline, bind group and workgroup count for a number of rows. */
interface Dispatch {
  readonly pipeline: GPUComputePipeline;
  readonly bindGroup: GPUBindGroup;
  readonly groups: (T: number) => number;
}

/** Per-node dispatches; matmul keeps a matrix-vector and a tiled variant and picks by rows. */
interface NodeDispatches {
  /** The operand's rows when the graph fixes them (after lastRow), else 0 for the step's T. */
  readonly fixedRows: number;
  readonly dispatches: readonly Dispatch[];
  /** Used instead of `dispatches` for more than MATVEC_MAX_T rows (matmul only). */
  readonly tiled?: readonly Dispatch[];
}

/** Bytes per parameter slot in the params uniform buffer (a valid uniform offset alignment). */
const PARAM_STRIDE = 256;

class WebGpuExecutable implements Executable {
  readonly #backend: WebGpuBackend;
  readonly #device: GPUDevice;
  readonly #plan: ExecutionPlan;
  readonly #capacity: number;
  readonly #arena: GPUBuffer;
  readonly #params: GPUBuffer;
  readonly #step: GPUBuffer;
  readonly #stepData = new Uint32Array(4);
  readonly #staging: GPUBuffer;
  /** Separate buffers of the i32 graph inputs (token ids), by tensor id. */
  readonly #idBuffers = new Map<number, GPUBuffer>();
  /** Per i32 input id: the smallest vocabulary of the embedding tables that read it. */
  readonly #idLimit = new Map<number, number>();
  readonly #nodes: NodeDispatches[] = [];
  #disposed = false;

  constructor(backend: WebGpuBackend, plan: ExecutionPlan, bindings: ReadonlyMap<number, GpuTensor>) {
    this.#backend = backend;
    const device = this.#device = backend.device;
    this.#plan = plan;
    this.#capacity = cacheCapacity(plan);
    const { graph } = plan;
    const limit = device.limits.maxStorageBufferBindingSize;
    if (plan.arenaBytes > limit) {
      throw new RangeError(
        `Cannot compile the graph for WebGPU: its activation arena (${plan.arenaBytes} bytes) is larger than the ` +
          `device's maxStorageBufferBindingSize (${limit} bytes); use a smaller prefill chunk`,
      );
    }
    this.#arena = device.createBuffer({ label: "arena", size: Math.max(4, plan.arenaBytes), usage: STORAGE });
    this.#step = device.createBuffer({
      label: "step",
      size: 16,
      usage: UNIFORM | COPY_DST,
    });
    let outBytes = 4;
    for (const id of graph.outputs) outBytes = Math.max(outBytes, plan.slots[id]!.bytes);
    this.#staging = device.createBuffer({
      label: "readback",
      size: outBytes,
      usage: MAP_READ | COPY_DST,
    });
    for (const id of graph.inputs) {
      const t = graph.tensors[id];
      if (t.dtype === "i32") {
        this.#idBuffers.set(id, device.createBuffer({ label: t.name, size: plan.slots[id]!.bytes, usage: STORAGE }));
      }
    }

    // Parameters: every dispatch gets a 256-byte slot of one uniform buffer (matmul has two
    // kernels per weight part, attention a cache write and the attention).
    const slotsOf = (node: Node): number => {
      const parts = () => bindings.get(node.inputs[1])?.parts.length ?? 1;
      if (node.op.kind === "matmul") return 2 * parts();
      if (node.op.kind === "embedding") return parts();
      return node.op.kind === "attention" ? 2 : 1;
    };
    const dispatchCount = plan.order.reduce((n, id) => n + slotsOf(graph.nodes[id]), 0);
    const paramBytes = new ArrayBuffer(Math.max(1, dispatchCount) * PARAM_STRIDE);
    this.#params = device.createBuffer({
      label: "params",
      size: paramBytes.byteLength,
      usage: UNIFORM | COPY_DST,
    });
    const builder = new DispatchBuilder(backend, this, paramBytes, bindings);
    for (const id of plan.order) this.#nodes.push(builder.node(graph.nodes[id]));
    device.queue.writeBuffer(this.#params, 0, paramBytes);
  }

  /** The arena buffer. */
  get arena(): GPUBuffer {
    return this.#arena;
  }
  /** The params uniform buffer. */
  get params(): GPUBuffer {
    return this.#params;
  }
  /** The step uniform buffer. */
  get step(): GPUBuffer {
    return this.#step;
  }
  /** The plan. */
  get plan(): ExecutionPlan {
    return this.#plan;
  }
  /** The buffer of an i32 input. */
  idBuffer(id: number): GPUBuffer | undefined {
    return this.#idBuffers.get(id);
  }
  /** Records the vocabulary size of a table that reads the ids input `id`. */
  limitIds(id: number, vocab: number): void {
    this.#idLimit.set(id, Math.min(this.#idLimit.get(id) ?? Infinity, vocab));
  }

  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    this.#checkUsable();
    const { graph } = this.#plan;
    const slot = this.#plan.slots[tensorId];
    if (!slot || !graph.inputs.includes(tensorId)) {
      throw new TypeError(`Cannot write input ${tensorId}: it is not a graph input`);
    }
    const t = graph.tensors[tensorId];
    if (!Number.isInteger(count) || count < 0 || count * 4 > slot.bytes || count > data.length) {
      throw new RangeError(`Cannot write ${count} values to input "${t.name}": it holds ${slot.bytes / 4}`);
    }
    if (count === 0) return;
    if (t.dtype === "i32") {
      const limit = this.#idLimit.get(tensorId) ?? Infinity;
      for (let i = 0; i < count; i++) {
        const id = data[i];
        if (!(id >= 0 && id < limit) || !Number.isInteger(id)) {
          throw new RangeError(`Cannot embed token id ${id}: expected an integer from 0 to ${limit - 1}`);
        }
      }
      const src = data instanceof Int32Array ? data : Int32Array.from(data.subarray(0, count));
      this.#device.queue.writeBuffer(this.#idBuffers.get(tensorId)!, 0, src as Int32Array<ArrayBuffer>, 0, count);
    } else {
      const src = data instanceof Float32Array ? data : Float32Array.from(data.subarray(0, count));
      this.#device.queue.writeBuffer(this.#arena, slot.offset, src as Float32Array<ArrayBuffer>, 0, count);
    }
  }

  async run(step: StepArgs, profile?: Float64Array): Promise<void> {
    this.#checkUsable();
    validateStep(this.#plan, step, this.#capacity);
    const T = step.dims.T ?? 1;
    const device = this.#device;
    this.#stepData[0] = T;
    this.#stepData[1] = step.pos;
    device.queue.writeBuffer(this.#step, 0, this.#stepData);
    if (!profile) {
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      for (const node of this.#nodes) encodeNode(pass, node, T);
      pass.end();
      device.queue.submit([enc.finish()]);
      return;
    }
    // Profiling: one submission per node, timed to its completion.
    for (let i = 0; i < this.#nodes.length; i++) {
      const t0 = performance.now();
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      encodeNode(pass, this.#nodes[i], T);
      pass.end();
      device.queue.submit([enc.finish()]);
      await this.#backend.whileAlive(device.queue.onSubmittedWorkDone());
      profile[i] += performance.now() - t0;
    }
    this.#backend.checkHealthy();
  }

  async readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    this.#checkUsable();
    const slot = this.#plan.slots[tensorId];
    if (!slot || !this.#plan.graph.outputs.includes(tensorId) || !Number.isInteger(count) || count < 0) {
      throw new RangeError(`Cannot read ${count} values of output ${tensorId}`);
    }
    if (count * 4 > slot.bytes || count > dst.length) {
      throw new RangeError(`Cannot read ${count} values of output ${tensorId}: it holds ${slot.bytes / 4}`);
    }
    if (count === 0) return;
    if (this.#staging.mapState !== "unmapped") {
      throw new TypeError(`Cannot read output ${tensorId}: another read of this executable is in progress`);
    }
    const bytes = count * 4;
    const enc = this.#device.createCommandEncoder();
    enc.copyBufferToBuffer(this.#arena, slot.offset, this.#staging, 0, bytes);
    this.#device.queue.submit([enc.finish()]);
    await this.#backend.whileAlive(this.#staging.mapAsync(MAP_READ, 0, bytes));
    try {
      this.#backend.checkHealthy();
      dst.set(new Float32Array(this.#staging.getMappedRange(0, bytes)), 0);
    } finally {
      this.#staging.unmap();
    }
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const b of [this.#arena, this.#params, this.#step, this.#staging, ...this.#idBuffers.values()]) b.destroy();
  }

  #checkUsable(): void {
    if (this.#disposed) throw new TypeError("Cannot use a disposed WebGPU executable");
    this.#backend.checkHealthy();
  }
}

function encodeNode(pass: GPUComputePassEncoder, node: NodeDispatches, T: number): void {
  const rows = node.fixedRows || T;
  const list = node.tiled && rows > MATVEC_MAX_T ? node.tiled : node.dispatches;
  for (const d of list) {
    const groups = d.groups(rows);
    if (groups === 0) continue;
    const [x, y] = gridOf(groups);
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, d.bindGroup);
    pass.dispatchWorkgroups(x, y);
  }
}

/** Turns plan nodes into dispatches: parameters, pipelines and bind groups. */
class DispatchBuilder {
  #slot = 0;
  readonly #u32: Uint32Array;
  readonly #f32: Float32Array;

  constructor(
    readonly backend: WebGpuBackend,
    readonly exec: WebGpuExecutable,
    params: ArrayBuffer,
    readonly bindings: ReadonlyMap<number, GpuTensor>,
  ) {
    this.#u32 = new Uint32Array(params);
    this.#f32 = new Float32Array(params);
  }

  /** Element offset of an arena tensor; throws for tensors that are not in the arena. */
  #at(node: Node, input: number): number {
    const { graph, slots } = this.exec.plan;
    const id = input < 0 ? node.output : node.inputs[input];
    const slot = slots[id];
    if (!slot || graph.tensors[id].dtype !== "f32") {
      const t = graph.tensors[id];
      throw new UnsupportedError(
        `Backend "webgpu" cannot run op "${node.op.kind}" with ${t.kind} "${t.name}" (${t.dtype}) as operand ${input}: ` +
          `expected an f32 activation or input`,
      );
    }
    return slot.offset / 4;
  }

  #bound(node: Node, input: number): GpuTensor {
    const { graph } = this.exec.plan;
    const id = node.inputs[input];
    const b = this.bindings.get(id);
    if (!b) {
      const t = graph.tensors[id];
      throw new UnsupportedError(
        `Backend "webgpu" cannot run op "${node.op.kind}" with ${t.kind} "${t.name}" as operand ${input}: ` +
          `expected a weight or state tensor`,
      );
    }
    return b;
  }

  /** Writes one parameter slot (u32 values; numbers given as `{ f: x }` are stored as f32). */
  #params(rows: number, values: readonly (number | { f: number })[]): GPUBufferBinding {
    const base = (this.#slot * PARAM_STRIDE) / 4;
    this.#u32[base] = rows;
    values.forEach((v, i) => {
      if (typeof v === "number") this.#u32[base + 1 + i] = v;
      else this.#f32[base + 1 + i] = v.f;
    });
    return { buffer: this.exec.params, offset: this.#slot++ * PARAM_STRIDE, size: PARAM_STRIDE };
  }

  #dispatch(
    code: string,
    layout: "base" | "weight" | "embedding" | "cache",
    params: GPUBufferBinding,
    extra: GPUBuffer[],
    groups: (T: number) => number,
  ): Dispatch {
    const entries: GPUBindGroupEntry[] = [
      { binding: 0, resource: params },
      { binding: 1, resource: { buffer: this.exec.step } },
      { binding: 2, resource: { buffer: this.exec.arena } },
      ...extra.map((buffer, i) => ({ binding: 3 + i, resource: { buffer } })),
    ];
    const bindGroup = this.backend.device.createBindGroup({ layout: this.backend.layout(layout), entries });
    return { pipeline: this.backend.pipeline(code, layout), bindGroup, groups };
  }

  node(node: Node): NodeDispatches {
    const op = node.op;
    const { graph } = this.exec.plan;
    // The operand's rows: fixed by the graph (after lastRow, say), or the step's T (0 here).
    const rowsId = op.kind === "lastRow" ? node.inputs[0] : node.output;
    const dim = graph.tensors[rowsId].shape[0];
    if (typeof dim === "string" && dim !== "T") {
      throw new UnsupportedError(`Backend "webgpu" cannot run op "${op.kind}" over rows "${dim}": expected "T"`);
    }
    const fixed = typeof dim === "number" ? dim : 0;
    return { ...this.#build(node, fixed), fixedRows: fixed };
  }

  #build(node: Node, fixed: number): Omit<NodeDispatches, "fixedRows"> {
    const op = node.op;
    const { graph } = this.exec.plan;
    const width = (id: number) => graph.tensors[id].shape[1] as number;
    const ceil = (a: number, b: number) => Math.ceil(a / b);
    switch (op.kind) {
      case "embedding": {
        const table = this.#bound(node, 1);
        const ids = this.exec.idBuffer(node.inputs[0]);
        if (!ids) {
          throw new UnsupportedError(`Backend "webgpu" needs the ids of "embedding" to be an "i32" graph input`);
        }
        const [V, D] = table.shape;
        this.exec.limitIds(node.inputs[0], V);
        const out = this.#at(node, -1);
        const dispatches = table.parts.map((part) =>
          this.#dispatch(
            embeddingShader(table.dtype),
            "embedding",
            this.#params(fixed, [0, out, D, scaleWord(table.dtype, part, D), part.firstRow, part.rows]),
            [part.buffer, ids],
            (T) => T * ceil(D, WG),
          )
        );
        return { dispatches };
      }
      case "rmsNorm": {
        const w = this.#bound(node, 1);
        if (w.dtype !== "f32") throw new UnsupportedError(`Backend "webgpu" needs an "f32" rmsNorm weight`);
        const D = width(node.inputs[0]);
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), D, { f: op.eps }]);
        return { dispatches: [this.#dispatch(rmsNormShader(), "weight", params, [w.buffer], (T) => T)] };
      }
      case "matmul": {
        const w = this.#bound(node, 1);
        const [N, K] = w.shape;
        const [x, out] = [this.#at(node, 0), this.#at(node, -1)];
        const rowsKernel = this.backend.decodeKernel === "rows";
        const quad = K % 4 === 0;
        const dispatches: Dispatch[] = [];
        const tiled: Dispatch[] = [];
        for (const part of w.parts) {
          // Each part writes its own columns of the output rows.
          const values = [x, out + part.firstRow, K, part.rows, scaleWord(w.dtype, part, K), N];
          dispatches.push(this.#dispatch(
            (rowsKernel ? matvecRowsShader : matvecShader)(w.dtype, quad),
            "weight",
            this.#params(fixed, values),
            [part.buffer],
            () => ceil(part.rows, rowsKernel ? WG : MATVEC_ROWS),
          ));
          tiled.push(this.#dispatch(
            (this.backend.prefillKernel === "shared" ? matmulSharedShader : matmulTiledShader)(w.dtype, quad),
            "weight",
            this.#params(fixed, values),
            [part.buffer],
            (T) => ceil(T, TILE) * ceil(part.rows, TILE),
          ));
        }
        return { dispatches, tiled };
      }
      case "rope": {
        const { heads, headDim, theta } = op;
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), heads, headDim, {
          f: Math.log2(theta),
        }]);
        return {
          dispatches: [this.#dispatch(ropeShader(), "base", params, [], (T) => ceil((T * heads * headDim) / 2, WG))],
        };
      }
      case "siluMul":
      case "add": {
        const F = width(node.output);
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, 1), this.#at(node, -1), F]);
        return {
          dispatches: [this.#dispatch(elementwiseShader(op.kind), "base", params, [], (T) => ceil(T * F, WG))],
        };
      }
      case "lastRow": {
        const D = width(node.output);
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), D, 0]);
        return { dispatches: [this.#dispatch(lastRowShader(), "base", params, [], () => ceil(D, WG))] };
      }
      case "attention": {
        const { heads, kvHeads, headDim, scale, window } = op;
        if (heads % kvHeads !== 0) {
          throw new UnsupportedError(
            `Backend "webgpu" cannot run attention with ${heads} heads over ${kvHeads} kv heads: expected a multiple`,
          );
        }
        const kc = this.#bound(node, 3);
        const vc = this.#bound(node, 4);
        if (kc.dtype !== vc.dtype) {
          throw new UnsupportedError(
            `Backend "webgpu" cannot run attention with a "${kc.dtype}" key cache and a "${vc.dtype}" value cache`,
          );
        }
        // supports() admitted the key cache's dtype.
        const dtype = kc.dtype as KvDType;
        if (headDim % cacheElementsPerWord(dtype) !== 0) {
          // Attention reads a head's keys a whole word at a time, so a head must start on a word.
          throw new UnsupportedError(
            `Backend "webgpu" cannot run attention with head dim ${headDim} over a "${dtype}" cache: expected an even one`,
          );
        }
        const kvDim = kvHeads * headDim;
        const write = this.#dispatch(
          kvWriteShader(dtype),
          "cache",
          this.#params(fixed, [this.#at(node, 1), this.#at(node, 2), kvDim, 0]),
          [kc.buffer, vc.buffer],
          (T) => ceil((T * kvDim) / cacheElementsPerWord(dtype), WG),
        );
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), heads, kvHeads, window, {
          f: scale,
        }]);
        const att = this.#dispatch(
          attentionShader(headDim, dtype),
          "cache",
          params,
          [kc.buffer, vc.buffer],
          (T) => T * heads,
        );
        return { dispatches: [write, att] };
      }
    }
  }
}

/** Word index of the f16 scales in a part of a quantized weight with rows of `cols` (0 for float weights). */
function scaleWord(dtype: DType, part: WeightPart, cols: number): number {
  if (dtype !== "q8_0" && dtype !== "q4_0") return 0;
  return quantScalesOffset(dtype, part.rows * cols) / 4;
}

/**
 * Creates the WebGPU backend on the first adapter `requestAdapter` offers (Mesa's
 * lavapipe counts), requesting the adapter's own buffer and binding limits.
 * Throws a {@link WebGpuUnavailableError} when there is no WebGPU or no adapter.
 *
 * @example
 * ```ts ignore
 * const backend = await createWebGpuBackend();
 * console.log(backend.description);
 * backend.dispose();
 * ```
 */
export async function createWebGpuBackend(options: WebGpuBackendOptions = {}): Promise<WebGpuBackend> {
  const { decodeKernel, prefillKernel, maxBindingBytes } = options;
  if (decodeKernel !== undefined && decodeKernel !== "rows" && decodeKernel !== "workgroup") {
    throw new TypeError(`Invalid decodeKernel "${decodeKernel}": expected "workgroup" or "rows"`);
  }
  if (prefillKernel !== undefined && prefillKernel !== "shared" && prefillKernel !== "tiled") {
    throw new TypeError(`Invalid prefillKernel "${prefillKernel}": expected "shared" or "tiled"`);
  }
  if (maxBindingBytes !== undefined && !(Number.isInteger(maxBindingBytes) && maxBindingBytes >= 4)) {
    throw new RangeError(`Invalid maxBindingBytes ${maxBindingBytes}: expected an integer of at least 4`);
  }
  const gpu = options.gpu ?? gpuOverride ?? (globalThis.navigator as Navigator | undefined)?.gpu;
  if (!gpu) throw new WebGpuUnavailableError("Cannot create the WebGPU backend: navigator.gpu is not available here");
  const adapter = await gpu.requestAdapter(
    options.powerPreference ? { powerPreference: options.powerPreference } : undefined,
  );
  if (!adapter) {
    throw new WebGpuUnavailableError(
      "Cannot create the WebGPU backend: no GPU adapter is available (requestAdapter returned null)",
    );
  }
  const a = adapter.limits;
  const need = {
    maxComputeWorkgroupSizeX: WG,
    maxComputeInvocationsPerWorkgroup: 256,
    maxStorageBuffersPerShaderStage: 3,
  };
  for (const [name, value] of Object.entries(need)) {
    const have = a[name as keyof GPUSupportedLimits] as number;
    if (have < value) {
      throw new WebGpuUnavailableError(
        `Cannot create the WebGPU backend: the adapter's ${name} is ${have}, expected at least ${value}`,
      );
    }
  }
  let device: GPUDevice;
  try {
    device = await adapter.requestDevice({
      requiredLimits: {
        maxStorageBufferBindingSize: a.maxStorageBufferBindingSize,
        maxBufferSize: a.maxBufferSize,
      },
    });
  } catch (e) {
    throw new WebGpuUnavailableError(`Cannot create the WebGPU backend: requestDevice failed: ${(e as Error).message}`);
  }
  // `adapter.info` is recent; older browsers lack it.
  const info: Partial<GPUAdapterInfo> = adapter.info ?? {};
  const name = [info.description, info.vendor, info.architecture].filter((s) => s).join(" ") || "unknown adapter";
  const fallback = (info as { isFallbackAdapter?: boolean }).isFallbackAdapter ??
    (adapter as { isFallbackAdapter?: boolean }).isFallbackAdapter ?? false;
  const kernel = decodeKernel ?? (fallback ? "rows" : "workgroup");
  // The shared-memory kernel's needs, within WebGPU's default limits (the ones granted here).
  const l = device.limits;
  const sharedFits = l.maxComputeWorkgroupStorageSize >= SHARED_BYTES &&
    l.maxComputeInvocationsPerWorkgroup >= SHARED_INVOCATIONS;
  if (prefillKernel === "shared" && !sharedFits) {
    device.destroy();
    throw new WebGpuUnavailableError(
      `Cannot use the "shared" prefill kernel: it needs ${SHARED_BYTES} bytes of workgroup storage and ` +
        `${SHARED_INVOCATIONS} invocations per workgroup, the device allows ${l.maxComputeWorkgroupStorageSize} ` +
        `and ${l.maxComputeInvocationsPerWorkgroup}`,
    );
  }
  const prefill = prefillKernel ?? (fallback || !sharedFits ? "tiled" : "shared");
  return new WebGpuBackend(device, name, kernel, maxBindingBytes, prefill);
}
