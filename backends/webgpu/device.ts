/**
 * Getting a WebGPU device, and knowing when it is gone: the typed errors of a
 * machine without WebGPU and of a lost device, the backend's options and the
 * kernel defaults they leave to the adapter, and the watch that turns a device
 * loss (or an uncaptured GPU error) into an error of the next call instead of a
 * hang.
 *
 * @module
 */

import { SHARED_BYTES, SHARED_INVOCATIONS, WG } from "./shaders.ts";

/** Thrown when WebGPU or a GPU adapter is not available (no `navigator.gpu`, or no adapter). */
export class WebGpuUnavailableError extends Error {
  /**
   * Creates the error.
   * @param message sentence-case reason
   */
  constructor(message: string) {
    super(message);
    this.name = "WebGpuUnavailableError";
  }
}

/** Thrown by `run`, `readOutput` and reads once the GPU device is lost (or destroyed). */
export class WebGpuDeviceLostError extends Error {
  /** The `GPUDeviceLostInfo` reason (`"destroyed"` or `"unknown"`). */
  readonly reason: string;

  /**
   * Creates the error.
   * @param reason the `GPUDeviceLostInfo` reason (`"destroyed"` or `"unknown"`)
   * @param detail the driver's message
   */
  constructor(reason: string, detail: string) {
    super(`The WebGPU device was lost (reason "${reason}")${detail ? `: ${detail}` : ""}`);
    this.name = "WebGpuDeviceLostError";
    this.reason = reason;
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
 * ```ts
 * import { createWebGpuBackend, setNavigatorGpu, WebGpuUnavailableError } from "@llm/engine/webgpu";
 * setNavigatorGpu({ requestAdapter: () => Promise.resolve(null) } as unknown as GPU);
 * try {
 *   await createWebGpuBackend();
 * } catch (e) {
 *   console.log(e instanceof WebGpuUnavailableError); // true: no adapter
 * } finally {
 *   setNavigatorGpu(undefined);
 * }
 * ```
 */
export function setNavigatorGpu(gpu: GPU | undefined): void {
  gpuOverride = gpu;
}

/** A device fit for the backend, with the kernels chosen for its adapter. */
export interface AcquiredDevice {
  /** The device, with the adapter's own buffer and binding limits. */
  readonly device: GPUDevice;
  /** The adapter's description, for logs. */
  readonly adapterName: string;
  /** The matrix-vector kernel: the option, or the adapter's default. */
  readonly decodeKernel: DecodeKernel;
  /** The matrix-matrix kernel: the option, or the adapter's default. */
  readonly prefillKernel: PrefillKernel;
}

/**
 * Checks the options, then requests the first adapter `requestAdapter` offers (Mesa's
 * lavapipe counts) and a device with the adapter's own buffer and binding limits.
 * Throws a {@link WebGpuUnavailableError} when there is no WebGPU, no adapter, or
 * one too small.
 */
export async function acquireDevice(options: WebGpuBackendOptions): Promise<AcquiredDevice> {
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
    // Attention binds the arena, both caches and the index buffer.
    maxStorageBuffersPerShaderStage: 4,
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
  return { device, adapterName: name, decodeKernel: kernel, prefillKernel: prefill };
}

/**
 * Watches a device for its loss and for uncaptured GPU errors, so that every later
 * call fails with the first of them (a loss explains any error seen before it, so
 * it takes precedence) and no read-back waits forever on a dead device.
 */
export class DeviceHealth {
  #failure: Error | undefined;
  readonly #lost: Promise<never>;
  #closed = false;

  /**
   * Starts watching `device` for loss and uncaptured errors.
   * @param device the device to watch
   */
  constructor(device: GPUDevice) {
    this.#lost = device.lost.then((info) => {
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

  /** Marks the backend disposed: later checks throw a `TypeError`. */
  close(): void {
    this.#closed = true;
  }

  /** Throws the device loss or GPU error seen so far, if any, or a `TypeError` once disposed. */
  check(): void {
    if (this.#failure) throw this.#failure;
    if (this.#closed) throw new TypeError(`Cannot use backend "webgpu": it was disposed`);
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
}
