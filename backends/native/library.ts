/**
 * Loading the native library: its symbols, where it is looked for, the ABI check
 * against the C sources, and one shared handle per path that closes with its last
 * user.
 *
 * @module
 */

import { defaultLibraryPath, sourceHash } from "./abi.ts";

/** The parameters of `llm_run` (`c/exec.c`). */
const RUN_PARAMETERS = ["pointer", "pointer", "i32", "i32", "i32", "i32", "i32", "i32", "i32", "i32"] as const;

/** The library's exported functions, as `c/exec.c` defines them. */
export const SYMBOLS = {
  llm_abi: { parameters: [], result: "pointer" },
  llm_features: { parameters: [], result: "u32" },
  llm_alloc: { parameters: ["usize"], result: "pointer" },
  llm_free: { parameters: ["pointer"], result: "void" },
  llm_pool_new: { parameters: ["i32"], result: "pointer" },
  llm_pool_free: { parameters: ["pointer"], result: "void" },
  llm_pool_size: { parameters: ["pointer"], result: "i32" },
  llm_exec_new: { parameters: ["buffer", "i32", "buffer", "i32", "buffer", "i32", "i32"], result: "pointer" },
  llm_exec_free: { parameters: ["pointer"], result: "void" },
  llm_exec_times: { parameters: ["pointer"], result: "pointer" },
  /** (exec, pool, threads, from, to, d0, d1, d2, d3, profile): a step on the calling thread. */
  llm_run: { parameters: RUN_PARAMETERS, result: "i32" },
  /** The same function on one of Deno's blocking threads: resolves when the step is done. */
  llm_run_nonblocking: { name: "llm_run", parameters: RUN_PARAMETERS, result: "i32", nonblocking: true },
  llm_read_bandwidth: { parameters: ["pointer", "usize", "i32", "i32"], result: "f64" },
} as const;

/** The library's functions, callable from TypeScript. */
export type NativeSymbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/** Bit of `llm_features()` set when the library was built with AVX2, FMA and F16C. */
export const FEATURE_AVX2 = 1;

/** The build command named by every loading error. */
export const BUILD_COMMAND = "deno task build:native";

/** Thrown when the native library is missing, unloadable, or built from other sources. */
export class NativeLibraryError extends Error {
  /** The library path that was tried. */
  readonly path: string;
  /**
   * Creates the error.
   * @param message sentence-case description, naming the path and the build command
   * @param path the library path
   */
  constructor(message: string, path: string) {
    super(message);
    this.name = "NativeLibraryError";
    this.path = path;
  }
}

/** An open library, shared by every user of its path. */
export interface LoadedLibrary {
  /** Its functions. */
  readonly symbols: NativeSymbols;
  /** The path it was opened from. */
  readonly path: string;
  /** `llm_features()`: see {@link FEATURE_AVX2}. */
  readonly features: number;
}

interface Entry extends LoadedLibrary {
  readonly lib: Deno.DynamicLibrary<typeof SYMBOLS>;
  users: number;
}

const loaded = new Map<string, Entry>();

function libraryPath(explicit?: string): string {
  if (explicit) return explicit;
  let env: string | undefined;
  try {
    env = Deno.env.get("LLM_NATIVE_LIB");
  } catch {
    env = undefined; // no --allow-env: use the default path
  }
  return env || defaultLibraryPath();
}

/**
 * Why `dlopen` failed, without the "Could not open library: " prefix Deno repeats
 * (twice in Deno 2) or the path the message names already.
 */
function dlopenReason(e: unknown, path: string): string {
  let reason = e instanceof Error ? e.message : String(e);
  const prefix = /^\s*Could not open library:\s*/i;
  while (prefix.test(reason)) reason = reason.replace(prefix, "");
  if (reason.startsWith(`${path}: `)) reason = reason.slice(path.length + 2);
  return reason || "unknown error";
}

/**
 * Opens (or shares) the library at `path` (default `$LLM_NATIVE_LIB`, else the build
 * output), checking its ABI stamp against the sources. Every call needs one
 * {@link releaseLibrary}.
 */
export async function acquireLibrary(path?: string): Promise<LoadedLibrary> {
  const p = libraryPath(path);
  const have = loaded.get(p);
  if (have) {
    have.users++;
    return have;
  }
  let lib: Deno.DynamicLibrary<typeof SYMBOLS>;
  try {
    lib = Deno.dlopen(p, SYMBOLS);
  } catch (e) {
    throw new NativeLibraryError(
      `Cannot load the native library "${p}": ${dlopenReason(e, p)}. Build it with \`${BUILD_COMMAND}\``,
      p,
    );
  }
  const abiPtr = lib.symbols.llm_abi();
  const abi = abiPtr ? Deno.UnsafePointerView.getCString(abiPtr) : "";
  let want: string;
  try {
    // Hashed at every open (a few small files): the sources may have changed since the last one.
    want = await sourceHash();
  } catch (e) {
    lib.close();
    throw new NativeLibraryError(`Cannot check the native library "${p}": ${(e as Error).message}`, p);
  }
  if (abi !== want) {
    lib.close();
    throw new NativeLibraryError(
      `The native library "${p}" was built from other sources (version "${abi}", expected "${want}"): ` +
        `rebuild it with \`${BUILD_COMMAND}\``,
      p,
    );
  }
  const entry: Entry = { lib, symbols: lib.symbols, path: p, features: lib.symbols.llm_features(), users: 1 };
  loaded.set(p, entry);
  return entry;
}

/** Drops one user of a library; closes it with the last. */
export function releaseLibrary(library: LoadedLibrary): void {
  const entry = loaded.get(library.path);
  if (entry !== library || --entry.users > 0) return;
  loaded.delete(entry.path);
  entry.lib.close();
}
