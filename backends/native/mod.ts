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

export { createNativeBackend, NativeBackend, type NativeBackendOptions } from "./backend.ts";
export { BUILD_COMMAND, NativeLibraryError } from "./library.ts";
export { type BandwidthOptions, measureReadBandwidth } from "./bandwidth.ts";
export { buildNative, type BuildOptions } from "./build.ts";

registerBackend("native", createNativeBackend);
