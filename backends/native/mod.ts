/**
 * The native backend's entry point: importing it registers the backend as
 * `"native"` (the registry imports it lazily when a model asks for that name).
 * Needs `--allow-ffi` (and read access to the library and the C sources, whose
 * hash the library must match). Build the library with `deno task build:native`.
 *
 * @example
 * ```ts
 * import { loadModel } from "@llm/engine";
 * import "@llm/engine/native";
 * const model = await loadModel("../shared/models/story", { backend: "native" });
 * ```
 *
 * @module
 */

import { registerBackend } from "../registry.ts";
import { createNativeBackend } from "./backend.ts";

export {
  BUILD_COMMAND,
  createNativeBackend,
  measureReadBandwidth,
  NativeBackend,
  NativeLibraryError,
} from "./backend.ts";
export type { BandwidthOptions, NativeBackendOptions } from "./backend.ts";
export { buildNative } from "./build.ts";
export type { BuildOptions } from "./build.ts";

registerBackend("native", createNativeBackend);
