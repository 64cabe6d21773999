/**
 * A memory bandwidth probe for benchmarks: how fast the C side of the native
 * library streams a large float array, on one thread or several.
 *
 * @module
 */

import { acquireLibrary, releaseLibrary } from "./library.ts";

/** Options of {@link measureReadBandwidth}. */
export interface BandwidthOptions {
  /** Bytes of the float array summed (default 1 GiB). */
  readonly bytes?: number;
  /** Threads reading (default 1). */
  readonly threads?: number;
  /** Timed passes; the best is reported (default 3). */
  readonly reps?: number;
  /** Library path, as the `library` option of `createNativeBackend` takes it. */
  readonly library?: string;
}

/**
 * Measures the machine's memory read bandwidth in GB/s (1e9 bytes per second):
 * the best of `reps` passes summing a float array of `bytes` bytes in C.
 *
 * @example
 * ```ts
 * import { measureReadBandwidth } from "@llm/engine/native";
 * const gbps = await measureReadBandwidth({ bytes: 64 << 20, threads: 1 });
 * console.log(`${gbps.toFixed(1)} GB/s`);
 * ```
 */
export async function measureReadBandwidth(options: BandwidthOptions = {}): Promise<number> {
  const bytes = options.bytes ?? 2 ** 30;
  const threads = options.threads ?? 1;
  const reps = options.reps ?? 3;
  if (!Number.isSafeInteger(bytes) || bytes < 4096) {
    throw new RangeError(`Invalid bytes ${bytes}: expected at least 4096`);
  }
  if (!Number.isInteger(threads) || threads < 1 || threads > 64) {
    throw new RangeError(`Invalid threads ${threads}: expected an integer from 1 to 64`);
  }
  if (!Number.isInteger(reps) || reps < 1) throw new RangeError(`Invalid reps ${reps}: expected a positive integer`);
  const lib = await acquireLibrary(options.library);
  const sym = lib.symbols;
  const pool = threads > 1 ? sym.llm_pool_new(threads) : null;
  try {
    const gbps = sym.llm_read_bandwidth(pool, BigInt(bytes), threads, reps);
    if (gbps < 0) throw new RangeError(`Cannot measure bandwidth over ${bytes} bytes: out of memory`);
    return gbps;
  } finally {
    if (pool) sym.llm_pool_free(pool);
    releaseLibrary(lib);
  }
}
