/**
 * The version stamp shared by the build script and the loader: a hash of the C
 * sources. The build compiles it into the library (`llm_abi()`), and the loader
 * refuses a library whose stamp differs from the sources next to it, so a stale
 * build fails with a clear error instead of running old kernels.
 *
 * @module
 */

import { concatBytes, hexString, sha256 } from "../../graph/bytes.ts";

/** The C sources of the library, relative to `c/`, in hash order. */
export const C_SOURCES: readonly string[] = ["llm.h", "pool.c", "kernels.c", "matmul.c", "exec.c"];

/** The folder holding the C sources. */
export const C_DIR: URL = new URL("./c/", import.meta.url);

async function readSource(url: URL): Promise<Uint8Array> {
  if (url.protocol === "file:") return await Deno.readFile(url);
  const res = await fetch(url);
  if (!res.ok) throw new TypeError(`Cannot read the native source "${url.href}": HTTP ${res.status}`);
  return new Uint8Array(await res.arrayBuffer());
}

/** The ABI stamp of the current sources: the first 16 hex digits of SHA-256 over names and contents. */
export async function sourceHash(): Promise<string> {
  const enc = new TextEncoder();
  const parts: Uint8Array[] = [];
  for (const name of C_SOURCES) {
    parts.push(enc.encode(`${name}\0`), await readSource(new URL(name, C_DIR)), enc.encode("\0"));
  }
  const digest = await sha256(concatBytes(parts));
  return hexString(digest.subarray(0, 8));
}

/** The library file name on this platform. */
export function libraryFileName(portable = false): string {
  const base = portable ? "llm_native_portable" : "llm_native";
  switch (Deno.build.os) {
    case "windows":
      return `${base}.dll`;
    case "darwin":
      return `lib${base}.dylib`;
    default:
      return `lib${base}.so`;
  }
}

/** Where `deno task build:native` puts the library: `build/` at the project root. */
export function defaultLibraryPath(portable = false): string {
  return new URL(`../../build/${libraryFileName(portable)}`, import.meta.url).pathname;
}
