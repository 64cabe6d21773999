/**
 * The WebGPU backend (`webgpu`): runs a planned graph as WGSL compute shaders,
 * using only standard WebGPU APIs (so it runs in Deno and in browsers).
 *
 * - Weights, the KV cache pool (state) and the activation arena are GPU buffers that
 *   stay resident; activations live at their planned offsets in one arena buffer, and
 *   the `i32` inputs (token ids, positions, sequence rows, page tables, gathered rows)
 *   in one index buffer, each written only for the values a step uses.
 * - `compile` creates every pipeline (cached by shader source), bind group and the
 *   per-node parameter uniforms once. A step writes its dimensions (`T`, `R`) into a
 *   uniform with `queue.writeBuffer`, records every dispatch into one command encoder,
 *   each node for its own rows (`T`, or `R` after `gatherRows`), and submits once;
 *   `readOutput` copies the requested rows into a staging buffer and maps it.
 * - Attention writes each token's key and value to its own pool row through its
 *   sequence's page table, then attends over its own sequence's positions; every
 *   kernel computes a token's row the same way whatever else shares the step, except
 *   that matmul switches from the matrix-vector kernel to the matrix-matrix one above 4
 *   rows (on lavapipe both sum in the same order; see `tests/webgpu_test.ts`).
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

import { byteSize, type DType, isKvDType, isWeightDType } from "../../graph/dtype.ts";
import { elementCount, type OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import {
  checkCopy,
  checkRange,
  checkStateDType,
  checkUploadSize,
  f32Only,
  type OpSupport,
  supportsOp,
} from "../checks.ts";
import type { Backend, DeviceTensor, Executable, HostTensor } from "../contract.ts";
import { validateBindings } from "../contract.ts";
import {
  acquireDevice,
  type DecodeKernel,
  DeviceHealth,
  type PrefillKernel,
  type WebGpuBackendOptions,
} from "./device.ts";
import { WebGpuExecutable } from "./executable.ts";
import { type GpuContext, Pipelines } from "./lowering.ts";
import {
  align4,
  checkWhole,
  COPY_DST,
  COPY_SRC,
  type GpuTensor,
  MAP_READ,
  splitWeight,
  wholeTensor,
} from "./memory.ts";
import { cacheElementsPerWord } from "./shaders.ts";

/** What the shaders run: every weight dtype, both cache dtypes, f32 activations. */
const SUPPORT: OpSupport = {
  embedding: isWeightDType,
  rmsNorm: f32Only,
  matmul: isWeightDType,
  rope: f32Only,
  siluMul: f32Only,
  add: f32Only,
  attention: isKvDType,
  gatherRows: f32Only,
};

/** The WebGPU backend. Create it with {@link createWebGpuBackend}. */
export class WebGpuBackend implements Backend {
  /** The registry name, `"webgpu"`. */
  readonly name = "webgpu";
  /** A line for logs: the adapter, the kernels and the binding limit. */
  readonly description: string;
  /** The GPU device (exposed so that tests can destroy it to simulate a loss). */
  readonly device: GPUDevice;
  /** The matrix-vector kernel in use. */
  readonly decodeKernel: DecodeKernel;
  /** The matrix-matrix (prefill) kernel in use. */
  readonly prefillKernel: PrefillKernel;
  /** Largest weight or state buffer bound to one binding; larger 2-D weights are split by rows. */
  readonly maxBindingBytes: number;
  /** What executables share with this backend (kept out of its public members). */
  readonly #context: GpuContext;
  /** Scratch space of `copyTensor` within one tensor (made on first use). */
  #scratch: GPUBuffer | undefined;
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
    this.#context = {
      device,
      decodeKernel,
      prefillKernel,
      pipelines: new Pipelines(device),
      health: new DeviceHealth(device),
    };
  }

  /** Whether an op runs with an operand dtype: see {@link Backend.supports}. */
  supports(op: OpKind, dtype: DType): boolean {
    return supportsOp(SUPPORT, op, dtype);
  }

  /** Copies a weight into a GPU buffer, or into several split by rows when it exceeds one binding. */
  upload(t: HostTensor): DeviceTensor {
    this.#context.health.check();
    checkUploadSize(t);
    if (t.data.byteLength <= this.maxBindingBytes) {
      return wholeTensor(this.device, t, t.data.byteLength, t.data, this.maxBindingBytes);
    }
    return splitWeight(this.device, t, this.maxBindingBytes);
  }

  /** Allocates a zero-filled f32 or f16 KV cache (f16 rows must be whole words). */
  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    this.#context.health.check();
    checkStateDType(this.name, name, dtype);
    const rowLength = shape[shape.length - 1] ?? 1;
    if (rowLength % cacheElementsPerWord(dtype) !== 0) {
      // The shaders write an f16 cache a u32 word (two elements) at a time, so rows must be whole words.
      throw new RangeError(
        `Cannot create "${name}" as "${dtype}" state with rows of ${rowLength} elements on WebGPU: ` +
          `an f16 row must hold an even number of elements`,
      );
    }
    const bytes = byteSize(dtype, elementCount(shape), rowLength);
    return wholeTensor(this.device, { name, dtype, shape }, bytes, undefined, this.maxBindingBytes);
  }

  /** Copies bytes out of a tensor through a read-back buffer. */
  async readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    this.#context.health.check();
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
      await this.#context.health.whileAlive(staging.mapAsync(MAP_READ));
      this.#context.health.check();
      return new Uint8Array(staging.getMappedRange()).slice(byteOffset - start, byteOffset - start + byteLength);
    } finally {
      staging.destroy();
    }
  }

  /** Writes whole 4-byte words into a tensor. */
  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    this.#context.health.check();
    checkRange(t, byteOffset, data.byteLength);
    checkWhole(t);
    if (byteOffset % 4 !== 0 || data.byteLength % 4 !== 0) {
      throw new RangeError(
        `Cannot write ${data.byteLength} bytes at offset ${byteOffset} of "${t.name}": WebGPU writes whole 4-byte words`,
      );
    }
    this.device.queue.writeBuffer((t as GpuTensor).buffer, byteOffset, data as Uint8Array<ArrayBuffer>);
  }

  /**
   * Copies `byteLength` bytes of `src` from `srcOffset` into `dst` at `dstOffset` on the
   * GPU, in whole 4-byte words: offsets must be multiples of 4, and so must the length
   * unless the copy ends at the end of `dst` (its buffer is padded to a whole word). KV
   * rows are whole words. WebGPU cannot copy a buffer into itself, so a copy within one
   * tensor goes through a scratch buffer (two copies in one submission).
   */
  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number, srcOffset = 0, dstOffset = 0): void {
    this.#context.health.check();
    checkCopy(src, dst, byteLength, srcOffset, dstOffset);
    checkWhole(src);
    checkWhole(dst);
    if (byteLength === 0) return;
    const size = align4(byteLength);
    const wholeWords = byteLength === size || (dstOffset + byteLength === dst.byteLength &&
      srcOffset + size <= align4(src.byteLength));
    if (srcOffset % 4 !== 0 || dstOffset % 4 !== 0 || !wholeWords) {
      throw new RangeError(
        `Cannot copy ${byteLength} bytes from offset ${srcOffset} of "${src.name}" to offset ${dstOffset} of ` +
          `"${dst.name}" on WebGPU: it copies whole 4-byte words (offsets and length multiples of 4)`,
      );
    }
    const from = (src as GpuTensor).buffer;
    const to = (dst as GpuTensor).buffer;
    const enc = this.device.createCommandEncoder();
    if (from === to) {
      const scratch = this.#scratchOf(size);
      enc.copyBufferToBuffer(from, srcOffset, scratch, 0, size);
      enc.copyBufferToBuffer(scratch, 0, to, dstOffset, size);
    } else {
      enc.copyBufferToBuffer(from, srcOffset, to, dstOffset, size);
    }
    this.device.queue.submit([enc.finish()]);
  }

  /**
   * The scratch buffer of copies within one tensor, grown to at least `size` bytes.
   * One buffer serves every copy: the queue runs them in order.
   */
  #scratchOf(size: number): GPUBuffer {
    if (!this.#scratch || this.#scratch.size < size) {
      // Destroying a buffer that submitted work still uses is deferred until that work is done.
      this.#scratch?.destroy();
      this.#scratch = this.device.createBuffer({ label: "copy scratch", size, usage: COPY_SRC | COPY_DST });
    }
    return this.#scratch;
  }

  /** Destroys a tensor's buffers. */
  release(t: DeviceTensor): void {
    for (const part of (t as GpuTensor).parts) part.buffer.destroy();
  }

  /** Creates the plan's buffers and dispatches; GPU validation and memory errors reject. */
  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    this.#context.health.check();
    validateBindings(this, plan, bindings);
    this.device.pushErrorScope("out-of-memory");
    this.device.pushErrorScope("validation");
    let exec: WebGpuExecutable | undefined;
    let thrown: unknown;
    try {
      exec = new WebGpuExecutable(this.#context, plan, bindings as ReadonlyMap<number, GpuTensor>);
    } catch (e) {
      thrown = e;
    }
    const validation = await this.#context.health.whileAlive(this.device.popErrorScope());
    const oom = await this.#context.health.whileAlive(this.device.popErrorScope());
    const gpuError = validation ?? oom;
    if (thrown || gpuError) {
      exec?.dispose();
      if (thrown) throw thrown;
      throw new Error(`Cannot compile the graph for WebGPU: ${gpuError!.message}`);
    }
    return exec!;
  }

  /** Destroys the device, and with it every buffer. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#context.health.close();
    this.#context.pipelines.clear();
    this.device.destroy();
  }
}

/**
 * Creates the WebGPU backend on the first adapter `requestAdapter` offers (Mesa's
 * lavapipe counts), requesting the adapter's own buffer and binding limits.
 * Throws a {@link WebGpuUnavailableError} when there is no WebGPU or no adapter.
 *
 * @example
 * ```ts
 * import { createWebGpuBackend, WebGpuUnavailableError } from "@llm/engine/webgpu";
 * try {
 *   const backend = await createWebGpuBackend();
 *   console.log(backend.description);
 *   backend.dispose();
 * } catch (e) {
 *   if (!(e instanceof WebGpuUnavailableError)) throw e;
 *   console.log(`no WebGPU here: ${e.message}`);
 * }
 * ```
 */
export async function createWebGpuBackend(options: WebGpuBackendOptions = {}): Promise<WebGpuBackend> {
  const { device, adapterName, decodeKernel, prefillKernel } = await acquireDevice(options);
  return new WebGpuBackend(device, adapterName, decodeKernel, options.maxBindingBytes, prefillKernel);
}
