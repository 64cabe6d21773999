/**
 * The native backend (`native`): C kernels (SIMD where the build machine has it,
 * a portable C11 path otherwise) loaded through Deno FFI, with the library's own
 * thread pool. A compiled plan is encoded once (one record per node plus a table
 * of tensor addresses), and each step is one foreign call.
 *
 * Memory: weights are used in place (the bytes given to `upload`, kept alive
 * here); KV caches (f32, or f16 to halve the bytes attention reads per step) and
 * the activation arena are allocated by the library (64-byte aligned) and viewed
 * from TypeScript without copies.
 *
 * Safety: every shape, offset and step size is checked here before a call, and
 * every index (token ids, positions, page tables, rows) when it is written, so the
 * C side never reads or writes outside the buffers it was given. A step may run on
 * another thread (`executable.ts`): until it ends, this backend frees nothing it
 * may use (a release or dispose meanwhile takes effect when it ends) and refuses to
 * write a tensor it binds.
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
import type { Backend, BackendOptions, DeviceTensor, Executable, HostTensor } from "../contract.ts";
import { UnsupportedError, validateBindings } from "../contract.ts";
import { BLOCKED_MS, type NativeContext, NativeExecutable, SYNC_STEP_MS } from "./executable.ts";
import { acquireLibrary, FEATURE_AVX2, type LoadedLibrary, releaseLibrary } from "./library.ts";
import { StepGate } from "./steps.ts";
import { addressOf, type NativeTensor } from "./tensor.ts";

/**
 * Options of {@link createNativeBackend}. `threads` fixes the threads every step runs on, capped at
 * the cores available (`navigator.hardwareConcurrency`: more would only wait on each other; the
 * description says when it was capped); without it each class of steps runs on 1 thread or on every
 * core, whichever it measures faster.
 */
export interface NativeBackendOptions extends BackendOptions {
  /**
   * Library file. Default: `$LLM_NATIVE_LIB` when set, else `build/libllm_native.so`
   * at the project root (what `deno task build:native` writes).
   */
  readonly library?: string;
  /**
   * Steps predicted to take at most this many milliseconds run on the calling thread
   * (a nonblocking call costs tens of microseconds more); longer ones run on another
   * thread, so the caller's event loop keeps running. From 0 (every step off the
   * calling thread) to 10; default 2. Either way the calling thread is never held for
   * more than about 10 ms of steps in a row.
   */
  readonly syncStepMs?: number;
}

/** What the C kernels run: every weight dtype, both cache dtypes, f32 activations. */
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

/** Makes a backend on an open library; set by the class (its constructor is private). */
let construct: (library: LoadedLibrary, options: NativeBackendOptions) => NativeBackend;

/** The native backend. Create it with {@link createNativeBackend}. */
export class NativeBackend implements Backend {
  /** The registry name, `"native"`. */
  readonly name = "native";
  /** A line for logs: the SIMD path and the thread setting. */
  readonly description: string;
  readonly #library: LoadedLibrary;
  readonly #pool: Deno.PointerValue;
  /** What executables need from this backend (kept out of its public members). */
  readonly #context: NativeContext;
  readonly #tensors = new Set<NativeTensor>();
  readonly #executables = new Set<NativeExecutable>();
  /** The step running now, if any: memory it may use is freed only once it ends. */
  readonly #gate = new StepGate();
  #disposed = false;

  static {
    construct = (library, options) => new NativeBackend(library, options);
  }

  private constructor(library: LoadedLibrary, options: NativeBackendOptions) {
    this.#library = library;
    const requested = options.threads;
    const cores = availableCores();
    if (requested !== undefined && !(Number.isSafeInteger(requested) && requested >= 1)) {
      throw new RangeError(`Invalid threads ${requested}: expected an integer ≥ 1 (this machine has ${cores} cores)`);
    }
    // More threads than cores only makes every barrier wait for a descheduled worker (256 on 2 cores: 2 s a token).
    const fixed = requested === undefined ? undefined : Math.min(requested, cores);
    const syncStepMs = options.syncStepMs ?? SYNC_STEP_MS;
    if (!(typeof syncStepMs === "number" && syncStepMs >= 0 && syncStepMs <= BLOCKED_MS)) {
      throw new RangeError(
        `Invalid syncStepMs ${syncStepMs}: expected a number of milliseconds from 0 to ${BLOCKED_MS}`,
      );
    }
    const wanted = fixed ?? Math.min(cores, 64);
    const symbols = library.symbols;
    const pool = this.#pool = wanted > 1 ? symbols.llm_pool_new(wanted) : null;
    const maxThreads = pool ? symbols.llm_pool_size(pool) : 1;
    const simd = library.features & FEATURE_AVX2 ? "AVX2+FMA+F16C" : "portable C";
    const threads = fixed === undefined
      ? `up to ${maxThreads} threads (auto)`
      : fixed < requested!
      ? `${fixed} threads (${requested} asked, capped at the ${cores} cores)`
      : `${fixed} threads`;
    this.description = `native C (${simd}), ${threads}`;
    const check = () => this.#check();
    this.#context = {
      get symbols() {
        check();
        return symbols;
      },
      pool,
      maxThreads,
      fixedThreads: fixed === undefined ? undefined : Math.min(fixed, maxThreads),
      gate: this.#gate,
      syncStepMs,
      forget: (e) => this.#executables.delete(e),
    };
    live.add(this);
  }

  #check(): void {
    if (this.#disposed) throw new TypeError(`Cannot use backend "native": it was disposed`);
  }

  /** Whether an op runs with an operand dtype: see {@link Backend.supports}. */
  supports(op: OpKind, dtype: DType): boolean {
    return supportsOp(SUPPORT, op, dtype);
  }

  /** Uses the weight's bytes in place (a copy when they are misaligned); checks their size. */
  upload(t: HostTensor): DeviceTensor {
    this.#check();
    if (!isWeightDType(t.dtype)) {
      throw new UnsupportedError(`Backend "native" cannot hold weight "${t.name}" as "${t.dtype}"`);
    }
    checkUploadSize(t);
    // A view into the file bytes is used in place; copy only when misaligned for its elements.
    const bytes = t.data.byteOffset % 4 === 0 ? t.data : t.data.slice();
    const tensor: NativeTensor = {
      name: t.name,
      dtype: t.dtype,
      shape: [...t.shape],
      byteLength: bytes.byteLength,
      bytes,
      address: addressOf(bytes),
      owned: null,
      released: false,
    };
    this.#tensors.add(tensor);
    return tensor;
  }

  /** Allocates a zero-filled f32 or f16 KV cache in library memory. */
  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    this.#check();
    checkStateDType(this.name, name, dtype);
    const byteLength = byteSize(dtype, elementCount(shape));
    if (!shape.every((d) => Number.isSafeInteger(d) && d > 0) || !Number.isSafeInteger(byteLength)) {
      throw new RangeError(`Cannot allocate state "${name}" of shape [${shape}]`);
    }
    const ptr = this.#library.symbols.llm_alloc(BigInt(byteLength));
    if (!ptr) throw new RangeError(`Cannot allocate ${byteLength} bytes for state "${name}": out of memory`);
    const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, byteLength));
    const tensor: NativeTensor = {
      name,
      dtype,
      shape: [...shape],
      byteLength,
      bytes,
      address: BigInt(Deno.UnsafePointer.value(ptr)),
      owned: ptr,
      released: false,
    };
    this.#tensors.add(tensor);
    return tensor;
  }

  #own(t: DeviceTensor): NativeTensor {
    const n = t as NativeTensor;
    if (!this.#tensors.has(n)) throw new TypeError(`Cannot use tensor "${t.name}": it is not held by backend "native"`);
    return n;
  }

  /** Refuses to change a tensor that the running step may read or write. */
  #idleFor(t: NativeTensor, what: string): void {
    if (this.#gate.uses(t)) {
      throw new TypeError(`Cannot ${what} "${t.name}" while a step that uses it runs: await its run() first`);
    }
  }

  /** Copies bytes out of a tensor (after the running step, if it uses the tensor). */
  readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    try {
      const n = this.#own(t);
      checkRange(t, byteOffset, byteLength);
      const read = () => n.bytes.slice(byteOffset, byteOffset + byteLength);
      const running = this.#gate.running;
      if (running && this.#gate.uses(n)) {
        return running.then(() => {
          this.#own(t); // it may have been released meanwhile
          return read();
        });
      }
      return Promise.resolve(read());
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Copies bytes into a tensor. */
  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    const n = this.#own(t);
    checkRange(t, byteOffset, data.byteLength);
    this.#idleFor(n, "write tensor");
    n.bytes.set(data, byteOffset);
  }

  /** Copies bytes of one tensor into another, or within one (ranges that do not overlap). */
  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number, srcOffset = 0, dstOffset = 0): void {
    const s = this.#own(src), d = this.#own(dst);
    checkCopy(src, dst, byteLength, srcOffset, dstOffset);
    this.#idleFor(d, "copy into tensor");
    d.bytes.set(s.bytes.subarray(srcOffset, srcOffset + byteLength), dstOffset);
  }

  /** Frees a state tensor's library memory, or lets go of a weight's bytes (once no step runs). */
  release(t: DeviceTensor): void {
    const n = t as NativeTensor;
    if (!this.#tensors.delete(n) || n.released) return;
    this.#gate.whenIdle(() => this.#free(n));
  }

  #free(n: NativeTensor): void {
    if (n.released) return;
    n.released = true;
    n.bytes = new Uint8Array(0);
    if (n.owned) this.#library.symbols.llm_free(n.owned);
  }

  /** Checks the plan against the kernels and encodes it for the library. */
  // deno-lint-ignore require-await -- errors must reject, as the contract says
  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    this.#check();
    validateBindings(this, plan, bindings);
    for (const b of bindings.values()) this.#own(b);
    const exec = new NativeExecutable(this.#context, plan, bindings as ReadonlyMap<number, NativeTensor>);
    this.#executables.add(exec);
    return exec;
  }

  /**
   * Frees every executable and tensor, stops the thread pool and drops the library;
   * with a step running, once it ends.
   */
  dispose(): void {
    if (this.#disposed) return;
    for (const e of [...this.#executables]) e.dispose();
    for (const t of [...this.#tensors]) this.release(t);
    this.#disposed = true;
    live.delete(this);
    this.#gate.whenIdle(() => {
      if (this.#pool) this.#library.symbols.llm_pool_free(this.#pool);
      releaseLibrary(this.#library);
    });
  }
}

/** The cores this process may run on (`navigator.hardwareConcurrency`, which follows CPU affinity and quotas). */
function availableCores(): number {
  const n = navigator.hardwareConcurrency;
  return Number.isInteger(n) && n >= 1 ? n : 1;
}

/** Backends not yet disposed: disposed at exit so worker threads stop before the process does. */
const live = new Set<NativeBackend>();
globalThis.addEventListener("unload", () => {
  for (const b of [...live]) b.dispose();
});

/**
 * Creates the native backend; rejects with a `NativeLibraryError` when the library
 * is missing or stale.
 *
 * @example
 * ```ts
 * import { createNativeBackend } from "@llm/engine/native";
 * const backend = await createNativeBackend({ threads: 2 });
 * console.log(backend.description); // e.g. "native C (AVX2+FMA+F16C), 2 threads"
 * backend.dispose();
 * ```
 */
export async function createNativeBackend(options: NativeBackendOptions = {}): Promise<Backend> {
  const library = await acquireLibrary(options.library);
  try {
    return construct(library, options);
  } catch (e) {
    releaseLibrary(library);
    throw e;
  }
}
