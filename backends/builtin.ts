/**
 * Registers the built-in backends: `ts` now, and the native and WebGPU backends
 * lazily, so their modules load only when asked for by name.
 *
 * @module
 */

import { createTsBackend } from "./ts/backend.ts";
import { registerBackend, registerLazyBackend } from "./registry.ts";

registerBackend("ts", createTsBackend);
registerLazyBackend("native", () => import("./native/mod.ts"));
registerLazyBackend("webgpu", () => import("./webgpu/mod.ts"));
