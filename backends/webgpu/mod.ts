/**
 * The WebGPU backend's entry point: importing it registers the backend as
 * `"webgpu"`. The core registers it lazily (`backends/builtin.ts`), so importing
 * the engine needs no GPU; `createBackend("webgpu")` or
 * `loadModel(dir, { backend: "webgpu" })` loads this module on first use.
 *
 * @example
 * ```ts
 * import { loadModel } from "@llm/engine";
 * import { WebGpuUnavailableError } from "@llm/engine/webgpu";
 * try {
 *   const model = await loadModel("../shared/models/story", { backend: "webgpu" });
 *   console.log(model.backend.description);
 *   await model.dispose();
 * } catch (e) {
 *   if (!(e instanceof WebGpuUnavailableError)) throw e; // no GPU adapter here
 * }
 * ```
 *
 * @module
 */

import { registerBackend } from "../registry.ts";
import { createWebGpuBackend } from "./backend.ts";

export { createWebGpuBackend, WebGpuBackend } from "./backend.ts";
export {
  type DecodeKernel,
  type PrefillKernel,
  setNavigatorGpu,
  type WebGpuBackendOptions,
  WebGpuDeviceLostError,
  WebGpuUnavailableError,
} from "./device.ts";

registerBackend("webgpu", () => createWebGpuBackend());
