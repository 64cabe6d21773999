/**
 * Builds the native kernel library with the system C compiler:
 * `deno task build:native` (add `--portable` for the scalar C11 path only, or
 * `--out PATH` to choose the output file). The default output is
 * `build/libllm_native.so` at the project root, compiled for this machine
 * (`-march=native`: CI builds on the machine that runs the tests). `CC` picks
 * the compiler (default `cc`).
 *
 * @module
 */

import { C_DIR, C_SOURCES, defaultLibraryPath, sourceHash } from "./abi.ts";

/** Options of {@link buildNative}. */
export interface BuildOptions {
  /** Compile only the portable scalar path (no SIMD intrinsics, no -march). */
  readonly portable?: boolean;
  /** Output file; default `build/` at the project root. */
  readonly out?: string;
  /** The C compiler; default `$CC` or `cc`. */
  readonly cc?: string;
  /** Print the command. */
  readonly verbose?: boolean;
}

/** Compiles the library; resolves to the output path, or throws with the compiler's messages. */
export async function buildNative(options: BuildOptions = {}): Promise<string> {
  const portable = options.portable ?? false;
  const out = options.out ?? defaultLibraryPath(portable);
  const cc = options.cc ?? Deno.env.get("CC") ?? "cc";
  const abi = await sourceHash();
  const sources = C_SOURCES.filter((s) => s.endsWith(".c")).map((s) => new URL(s, C_DIR).pathname);
  const dir = out.slice(0, Math.max(0, out.lastIndexOf("/")));
  if (dir) await Deno.mkdir(dir, { recursive: true });
  const args = [
    "-std=c11",
    "-O3",
    "-Wall",
    "-Wextra",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fvisibility=hidden",
    ...(portable ? ["-DLLM_PORTABLE"] : ["-march=native"]),
    `-DLLM_ABI="${abi}"`,
    "-o",
    `${out}.tmp`,
    ...sources,
    "-lm",
  ];
  if (options.verbose) console.log([cc, ...args].join(" "));
  const res = await new Deno.Command(cc, { args, stdout: "piped", stderr: "piped" }).output();
  const messages = new TextDecoder().decode(res.stderr) + new TextDecoder().decode(res.stdout);
  if (!res.success) throw new Error(`Cannot build the native library with "${cc}":\n${messages}`);
  if (messages.trim()) console.warn(messages);
  // Rename into place so a process loading the old library never sees half a file.
  await Deno.rename(`${out}.tmp`, out);
  return out;
}

if (import.meta.main) {
  const portable = Deno.args.includes("--portable");
  const i = Deno.args.indexOf("--out");
  const out = i >= 0 ? Deno.args[i + 1] : undefined;
  const path = await buildNative({ portable, out, verbose: true });
  console.log(`built ${path}`);
}
