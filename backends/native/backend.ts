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
 * Safety: every shape, offset, token id and step size is checked here before a
 * call, so the C side never reads or writes outside the buffers it was given.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, isQuantized, KV_DTYPES, QUANT_BLOCK } from "../../graph/dtype.ts";
import type { Dim, Node, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { Backend, BackendOptions, DeviceTensor, Executable, HostTensor, StepArgs } from "../contract.ts";
import { UnsupportedError, validateBindings, validateStep } from "../contract.ts";
import { defaultLibraryPath, sourceHash } from "./abi.ts";

const SYMBOLS = {
  llm_abi: { parameters: [], result: "pointer" },
  llm_features: { parameters: [], result: "u32" },
  llm_alloc: { parameters: ["usize"], result: "pointer" },
  llm_free: { parameters: ["pointer"], result: "void" },
  llm_pool_new: { parameters: ["i32"], result: "pointer" },
  llm_pool_free: { parameters: ["pointer"], result: "void" },
  llm_pool_size: { parameters: ["pointer"], result: "i32" },
  llm_exec_new: { parameters: ["buffer", "i32", "buffer", "i32", "i32", "i32"], result: "pointer" },
  llm_exec_free: { parameters: ["pointer"], result: "void" },
  llm_run: { parameters: ["pointer", "pointer", "i32", "i32", "i32", "i32", "i32"], result: "i32" },
  llm_read_bandwidth: { parameters: ["pointer", "usize", "i32", "i32"], result: "f64" },
} as const;

type Lib = Deno.DynamicLibrary<typeof SYMBOLS>;

/** The build command named by every loading error. */
export const BUILD_COMMAND = "deno task build:native";

/** Thrown when the native library is missing, unloadable, or built from other sources. */
export class NativeLibraryError extends Error {
  /** The library path that was tried. */
  readonly path: string;
  /**
   * @param message sentence-case description, naming the path and the build command
   * @param path the library path
   */
  constructor(message: string, path: string) {
    super(message);
    this.name = "NativeLibraryError";
    this.path = path;
  }
}

/** Options of {@link createNativeBackend}. */
export interface NativeBackendOptions extends BackendOptions {
  /**
   * Library file. Default: `$LLM_NATIVE_LIB` when set, else `build/libllm_native.so`
   * at the project root (what `deno task build:native` writes).
   */
  readonly library?: string;
}

// ---- Library loading (one handle per path, shared, closed with its last user) ----

interface LoadedLib {
  readonly lib: Lib;
  readonly path: string;
  readonly features: number;
  users: number;
}

const loaded = new Map<string, LoadedLib>();

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

/** Opens (or shares) the library at `path`, checking its ABI stamp against the sources. */
export async function acquireLibrary(path?: string): Promise<LoadedLib> {
  const p = libraryPath(path);
  const have = loaded.get(p);
  if (have) {
    have.users++;
    return have;
  }
  let lib: Lib;
  try {
    lib = Deno.dlopen(p, SYMBOLS);
  } catch (e) {
    throw new NativeLibraryError(
      `Cannot load the native library "${p}": ${(e as Error).message}. Build it with \`${BUILD_COMMAND}\``,
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
  const entry: LoadedLib = { lib, path: p, features: lib.symbols.llm_features(), users: 1 };
  loaded.set(p, entry);
  return entry;
}

/** Drops one user of a library; closes it with the last. */
export function releaseLibrary(entry: LoadedLib): void {
  if (--entry.users > 0) return;
  loaded.delete(entry.path);
  entry.lib.close();
}

// ---- Encoding ----

const OP_CODES: Record<OpKind, number> = {
  embedding: 0,
  rmsNorm: 1,
  matmul: 2,
  rope: 3,
  siluMul: 4,
  add: 5,
  attention: 6,
  lastRow: 7,
};

const DTYPE_CODES: Record<DType, number> = { f32: 0, f16: 1, bf16: 2, q8_0: 3, q4_0: 4, i32: 5 };

/** int32 slots per node record (llm_node in c/llm.h). */
const NODE_INTS = 24;

const WEIGHT_DTYPES: readonly DType[] = ["f32", "f16", "bf16", "q8_0", "q4_0"];
const ROW_OPS: readonly OpKind[] = ["rmsNorm", "rope", "siluMul", "add", "lastRow"];

/** Multiply-adds a single thread does per millisecond, for the default thread choice. */
const MACS_PER_MS = 20e6;
/** Weight bytes a single thread streams per millisecond (decode). */
const BYTES_PER_MS = 15e6;
/** A step estimated below this many milliseconds on one thread runs on one thread. */
const PARALLEL_MIN_MS = 1.5;
/** A decode step estimated at this many single-thread milliseconds starts on every thread. */
const DECODE_PARALLEL_MS = 40;

/**
 * Picks 1 or `max` threads for one class of steps (decode or prefill) by timing
 * both: whether a second thread pays depends on the machine and on how busy it
 * is (a worker that loses its core stalls every barrier), which no fixed rule
 * knows. The class starts with a prior guess (two steps), times the other count
 * once, then runs the faster (the median of its last few times per unit of
 * work) and re-times the other every 64 steps so the choice follows the machine.
 */
class ThreadTuner {
  readonly #max: number;
  readonly #samples: [number[], number[]] = [[], []];
  #steps = 0;

  constructor(max: number) {
    this.#max = max;
  }

  /** @param prior the count to start with (1 or the maximum) */
  choose(prior: number): number {
    const other = prior === 1 ? this.#max : 1;
    const [one, many] = this.#samples;
    const [priorSamples, otherSamples] = prior === 1 ? [one, many] : [many, one];
    this.#steps++;
    if (priorSamples.length < 2) return prior;
    if (otherSamples.length < 1) return other;
    const best = median(one) <= median(many) ? 1 : this.#max;
    if (this.#steps % 64 === 0) return best === 1 ? this.#max : 1;
    return best;
  }

  record(threads: number, msPerUnit: number): void {
    const list = this.#samples[threads === 1 ? 0 : 1];
    list.push(msPerUnit);
    if (list.length > 5) list.shift();
  }
}

function median(a: readonly number[]): number {
  const s = [...a].sort((x, y) => x - y);
  return s[s.length >> 1];
}

// ---- Tensors ----

/** A tensor held by the native backend. */
interface NativeTensor extends DeviceTensor {
  /** The bytes (host memory for weights, library memory for state). */
  bytes: Uint8Array;
  /** Address of the first byte. */
  readonly address: bigint;
  /** Library allocation to free on release (state), or null for weights. */
  owned: Deno.PointerValue;
  released: boolean;
}

function checkRange(t: DeviceTensor, offset: number, length: number): void {
  if (
    !Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > t.byteLength
  ) {
    throw new RangeError(`Cannot access bytes ${offset}..${offset + length} of "${t.name}": it holds ${t.byteLength}`);
  }
}

function addressOf(bytes: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes as Uint8Array<ArrayBuffer>)));
}

function elementCountOf(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** The native backend. Create it with {@link createNativeBackend}. */
export class NativeBackend implements Backend {
  readonly name = "native";
  readonly description: string;
  readonly #lib: LoadedLib;
  readonly #pool: Deno.PointerValue;
  readonly #maxThreads: number;
  readonly #fixedThreads: number | undefined;
  readonly #tensors = new Set<NativeTensor>();
  readonly #executables = new Set<NativeExecutable>();
  #disposed = false;

  /** @internal use {@link createNativeBackend} */
  constructor(lib: LoadedLib, options: NativeBackendOptions) {
    this.#lib = lib;
    const requested = options.threads;
    if (requested !== undefined && (!Number.isInteger(requested) || requested < 1 || requested > 256)) {
      throw new RangeError(`Invalid threads ${requested}: expected an integer from 1 to 256`);
    }
    this.#fixedThreads = requested;
    const wanted = requested ?? Math.max(1, Math.min(navigator.hardwareConcurrency ?? 1, 64));
    this.#pool = wanted > 1 ? lib.lib.symbols.llm_pool_new(wanted) : null;
    this.#maxThreads = this.#pool ? lib.lib.symbols.llm_pool_size(this.#pool) : 1;
    const simd = lib.features & 1 ? "AVX2+FMA+F16C" : "portable C";
    const threads = requested === undefined ? `up to ${this.#maxThreads} threads (auto)` : `${requested} threads`;
    this.description = `native C (${simd}), ${threads}`;
    live.add(this);
  }

  /** The library's symbols, for executables. @internal */
  get symbols(): Lib["symbols"] {
    this.#check();
    return this.#lib.lib.symbols;
  }

  /** The thread count every step uses, or undefined to choose per step. @internal */
  get fixedThreads(): number | undefined {
    return this.#fixedThreads === undefined ? undefined : Math.min(this.#fixedThreads, this.#maxThreads);
  }

  /** The most threads a step may use. @internal */
  get maxThreads(): number {
    return this.#maxThreads;
  }

  /** The pool pointer. @internal */
  get pool(): Deno.PointerValue {
    return this.#pool;
  }

  /** @internal */
  forget(e: NativeExecutable): void {
    this.#executables.delete(e);
  }

  #check(): void {
    if (this.#disposed) throw new TypeError(`Cannot use backend "native": it was disposed`);
  }

  supports(op: OpKind, dtype: DType): boolean {
    if (op === "matmul" || op === "embedding") return WEIGHT_DTYPES.includes(dtype);
    if (op === "attention") return isKvDType(dtype);
    return (ROW_OPS.includes(op)) && dtype === "f32";
  }

  upload(t: HostTensor): DeviceTensor {
    this.#check();
    if (!WEIGHT_DTYPES.includes(t.dtype)) {
      throw new UnsupportedError(`Backend "native" cannot hold weight "${t.name}" as "${t.dtype}"`);
    }
    const count = elementCountOf(t.shape);
    const rowLength = t.shape.length > 0 ? t.shape[t.shape.length - 1] : 1;
    const expected = byteSize(t.dtype, count, rowLength);
    if (t.data.byteLength !== expected) {
      throw new RangeError(
        `Cannot upload "${t.name}" (${t.dtype} [${t.shape}]): it has ${t.data.byteLength} bytes, expected ${expected}`,
      );
    }
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

  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    this.#check();
    if (!isKvDType(dtype)) {
      throw new UnsupportedError(
        `Backend "native" cannot hold state "${name}" as "${dtype}": only ${KV_DTYPES.map((d) => `"${d}"`).join(", ")}`,
      );
    }
    const byteLength = byteSize(dtype, elementCountOf(shape));
    if (!shape.every((d) => Number.isSafeInteger(d) && d > 0) || !Number.isSafeInteger(byteLength)) {
      throw new RangeError(`Cannot allocate state "${name}" of shape [${shape}]`);
    }
    const ptr = this.#lib.lib.symbols.llm_alloc(BigInt(byteLength));
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

  readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    const n = this.#own(t);
    checkRange(t, byteOffset, byteLength);
    return Promise.resolve(n.bytes.slice(byteOffset, byteOffset + byteLength));
  }

  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    const n = this.#own(t);
    checkRange(t, byteOffset, data.byteLength);
    n.bytes.set(data, byteOffset);
  }

  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number): void {
    const s = this.#own(src), d = this.#own(dst);
    checkRange(src, 0, byteLength);
    checkRange(dst, 0, byteLength);
    d.bytes.set(s.bytes.subarray(0, byteLength));
  }

  release(t: DeviceTensor): void {
    const n = t as NativeTensor;
    if (!this.#tensors.delete(n) || n.released) return;
    n.released = true;
    n.bytes = new Uint8Array(0);
    if (n.owned) this.#lib.lib.symbols.llm_free(n.owned);
  }

  // deno-lint-ignore require-await -- errors must reject, as the contract says
  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    this.#check();
    validateBindings(this, plan, bindings);
    for (const b of bindings.values()) this.#own(b);
    const exec = new NativeExecutable(this, plan, bindings as ReadonlyMap<number, NativeTensor>);
    this.#executables.add(exec);
    return exec;
  }

  dispose(): void {
    if (this.#disposed) return;
    for (const e of [...this.#executables]) e.dispose();
    for (const t of [...this.#tensors]) this.release(t);
    this.#disposed = true;
    live.delete(this);
    if (this.#pool) this.#lib.lib.symbols.llm_pool_free(this.#pool);
    releaseLibrary(this.#lib);
  }
}

/** Backends not yet disposed: disposed at exit so worker threads stop before the process does. */
const live = new Set<NativeBackend>();
globalThis.addEventListener("unload", () => {
  for (const b of [...live]) b.dispose();
});

// ---- Executables ----

/** Rows of a tensor: a fixed count, or -1 for the step's T. */
function rowsCode(d: Dim, what: string): number {
  if (typeof d === "number") return d;
  if (d === "T") return -1;
  throw new UnsupportedError(`Backend "native" cannot run ${what}: symbolic dimension "${d}" (only "T")`);
}

class NativeExecutable implements Executable {
  readonly #backend: NativeBackend;
  readonly #plan: ExecutionPlan;
  readonly #capacity: number;
  readonly #maxT: number;
  #exec: Deno.PointerValue;
  #arena: Deno.PointerValue;
  readonly #arenaBuf: ArrayBuffer;
  /** Bindings kept alive while the plan may run. */
  readonly #bindings: ReadonlyMap<number, NativeTensor>;
  readonly #idLimit = new Map<number, number>();
  /** Multiply-adds per token row and weight bytes per step, for the thread choice. */
  #macsPerRow = 0;
  #weightBytes = 0;
  /** Thread choice for decode steps (T = 1) and prefill steps (T > 1). */
  readonly #tuners: [ThreadTuner, ThreadTuner];

  constructor(backend: NativeBackend, plan: ExecutionPlan, bindings: ReadonlyMap<number, NativeTensor>) {
    this.#backend = backend;
    this.#plan = plan;
    this.#bindings = bindings;
    const { graph } = plan;
    for (const name of Object.keys(plan.maxDims)) {
      if (name !== "T") throw new UnsupportedError(`Backend "native" cannot run a plan with dimension "${name}"`);
    }
    this.#maxT = plan.maxDims.T ?? 1;
    const sym = backend.symbols;
    const nodes = new Int32Array(plan.order.length * NODE_INTS);
    const floats = new Float32Array(nodes.buffer);
    const doubles = new DataView(nodes.buffer);
    let capacity = Infinity;
    plan.order.forEach((nodeId, i) => {
      const cap = this.#encode(graph.nodes[nodeId], nodes, floats, doubles, i * NODE_INTS);
      capacity = Math.min(capacity, cap);
    });
    this.#capacity = capacity;
    const arenaBytes = Math.max(plan.arenaBytes, 64);
    const arena = sym.llm_alloc(BigInt(arenaBytes));
    if (!arena) throw new RangeError(`Cannot allocate an arena of ${arenaBytes} bytes: out of memory`);
    this.#arena = arena;
    this.#arenaBuf = Deno.UnsafePointerView.getArrayBuffer(arena, arenaBytes);
    const base = BigInt(Deno.UnsafePointer.value(arena));
    const addrs = new BigUint64Array(Math.max(1, graph.tensors.length));
    graph.tensors.forEach((_t, id) => {
      const slot = plan.slots[id];
      if (slot) addrs[id] = base + BigInt(slot.offset);
      else if (bindings.has(id)) addrs[id] = bindings.get(id)!.address;
    });
    const threads = backend.maxThreads;
    this.#tuners = [new ThreadTuner(threads), new ThreadTuner(threads)];
    const exec = sym.llm_exec_new(nodes, plan.order.length, addrs, graph.tensors.length, this.#maxT, threads);
    if (!exec) {
      sym.llm_free(arena);
      throw new RangeError('Cannot prepare the plan on backend "native": out of memory');
    }
    this.#exec = exec;
  }

  /** Checks one node's shapes and writes its record; returns its cache capacity (Infinity if none). */
  #encode(node: Node, nodes: Int32Array, floats: Float32Array, view: DataView, at: number): number {
    const { graph, slots } = this.#plan;
    const op = node.op;
    const label = `node ${node.id} (${op.kind})`;
    const tensor = (id: number) => graph.tensors[id];
    const fail = (msg: string): never => {
      throw new TypeError(`Cannot compile ${label} on backend "native": ${msg}`);
    };
    const maxRows = (d: Dim) => (typeof d === "number" ? d : this.#maxT);
    // An activation/input must be [rows, width] f32 (or i32 ids [rows]) with a slot large enough.
    const act = (id: number, width: number | undefined, what: string): Dim => {
      const t = tensor(id);
      const slot = slots[id];
      if (!slot) fail(`${what} "${t.name}" is not an activation or input`);
      const rank = width === undefined ? 1 : 2;
      if (t.shape.length !== rank || (width !== undefined && t.shape[1] !== width)) {
        fail(`${what} "${t.name}" has shape [${t.shape}], expected [rows${width === undefined ? "" : `, ${width}`}]`);
      }
      const dtype = width === undefined ? "i32" : "f32";
      if (t.dtype !== dtype) fail(`${what} "${t.name}" is "${t.dtype}", expected "${dtype}"`);
      const rows = t.shape[0];
      rowsCode(rows, `${what} "${t.name}"`);
      if (slot!.bytes < maxRows(rows) * (width ?? 1) * 4) {
        fail(`${what} "${t.name}" has a slot of ${slot!.bytes} bytes`);
      }
      return rows;
    };
    const sameRows = (a: Dim, b: Dim, what: string) => {
      if (a !== b) fail(`${what} has ${b} rows, expected ${a}`);
    };
    const bound = (id: number, what: string): NativeTensor => {
      const b = this.#bindings.get(id);
      if (!b) fail(`${what} "${tensor(id).name}" is not bound`);
      return b!;
    };
    const width = (id: number): number => {
      const w = tensor(id).shape[1];
      if (typeof w !== "number") fail(`"${tensor(id).name}" has a symbolic width`);
      return w as number;
    };
    const set = (
      dtype: DType,
      rows: Dim,
      ins: readonly number[],
      params: readonly number[],
      fl: readonly number[] = [],
    ) => {
      nodes[at] = OP_CODES[op.kind];
      nodes[at + 1] = DTYPE_CODES[dtype];
      nodes[at + 2] = node.output;
      nodes[at + 3] = rowsCode(rows, label);
      ins.forEach((v, i) => (nodes[at + 4 + i] = v));
      params.forEach((v, i) => (nodes[at + 9 + i] = v));
      fl.forEach((v, i) => (floats[at + 16 + i] = v));
      for (const v of nodes.subarray(at, at + 16)) {
        if (!Number.isInteger(v)) fail(`parameter ${v} is not an integer`);
      }
    };
    const [a, b] = node.inputs;
    switch (op.kind) {
      case "embedding": {
        const table = bound(b, "table");
        if (table.shape.length !== 2) fail(`table "${table.name}" has shape [${table.shape}]`);
        const [V, D] = table.shape;
        const rows = act(a, undefined, "ids");
        if (!graph.inputs.includes(a)) fail(`ids "${tensor(a).name}" must be a graph input`);
        sameRows(rows, act(node.output, D, "output"), "the output");
        this.#idLimit.set(a, Math.min(this.#idLimit.get(a) ?? Infinity, V));
        if (isQuantized(table.dtype) && D % QUANT_BLOCK !== 0) fail(`rows of ${D} are not whole blocks`);
        set(table.dtype, rows, [a, b], [D, V]);
        return Infinity;
      }
      case "rmsNorm": {
        const w = bound(b, "weight");
        const D = w.shape[0];
        if (w.shape.length !== 1 || w.dtype !== "f32") fail(`weight "${w.name}" must be f32 [D]`);
        const rows = act(a, D, "input");
        sameRows(rows, act(node.output, D, "output"), "the output");
        set("f32", rows, [a, b], [D], [op.eps]);
        return Infinity;
      }
      case "matmul": {
        const w = bound(b, "weight");
        if (w.shape.length !== 2) fail(`weight "${w.name}" has shape [${w.shape}]`);
        const [N, K] = w.shape;
        if (isQuantized(w.dtype) && K % QUANT_BLOCK !== 0) fail(`rows of ${K} are not whole ${w.dtype} blocks`);
        const rows = act(a, K, "input");
        sameRows(rows, act(node.output, N, "output"), "the output");
        this.#macsPerRow += K * N;
        this.#weightBytes += w.byteLength;
        set(w.dtype, rows, [a, b], [K, N]);
        return Infinity;
      }
      case "rope": {
        const { heads, headDim, theta } = op;
        if (headDim % 2 !== 0 || headDim / 2 > 512 || heads < 1) fail(`head dimension ${headDim} is not supported`);
        const rows = act(a, heads * headDim, "input");
        sameRows(rows, act(node.output, heads * headDim, "output"), "the output");
        set("f32", rows, [a], [heads, headDim]);
        view.setFloat64((at + 14) * 4, theta, true);
        return Infinity;
      }
      case "siluMul":
      case "add": {
        const F = width(node.output);
        const rows = act(node.output, F, "output");
        sameRows(rows, act(a, F, "first input"), "the first input");
        sameRows(rows, act(b, F, "second input"), "the second input");
        set("f32", rows, [a, b], [F]);
        return Infinity;
      }
      case "lastRow": {
        const D = width(a);
        const rows = act(a, D, "input");
        const outRows = act(node.output, D, "output");
        if (outRows !== 1) fail(`output has ${outRows} rows, expected 1`);
        set("f32", 1, [a], [D, rowsCode(rows, label)]);
        return Infinity;
      }
      case "attention": {
        const { heads, kvHeads, headDim, scale, window } = op;
        if (!(heads >= 1 && kvHeads >= 1 && heads % kvHeads === 0 && headDim >= 1)) {
          fail(`${heads} heads over ${kvHeads} kv heads of ${headDim} is not supported`);
        }
        if (!Number.isInteger(window) || window < 0) fail(`window ${window} is not supported`);
        const [, , v, kc, vc] = node.inputs;
        const kvDim = kvHeads * headDim;
        const rows = act(a, heads * headDim, "query");
        sameRows(rows, act(b, kvDim, "key"), "the key");
        sameRows(rows, act(v, kvDim, "value"), "the value");
        sameRows(rows, act(node.output, heads * headDim, "output"), "the output");
        const kCache = bound(kc, "key cache"), vCache = bound(vc, "value cache");
        const kv = kCache.dtype;
        if (!isKvDType(kv)) fail(`key cache "${kCache.name}" is "${kv}"`);
        const cap = kCache.shape[0];
        for (const c of [kCache, vCache]) {
          // Both caches share one dtype and shape: the kernel reads them with the same element size and row count.
          if (
            c.dtype !== kv || c.shape.length !== 2 || c.shape[1] !== kvDim || c.shape[0] !== cap ||
            c.byteLength !== byteSize(kv, cap * kvDim)
          ) {
            fail(`cache "${c.name}" is ${c.dtype} [${c.shape}], expected ${kv} [capacity, ${kvDim}]`);
          }
        }
        set(kv, rows, [a, b, v, kc, vc], [heads, kvHeads, headDim, window, cap], [scale]);
        return cap;
      }
    }
  }

  #live(): Deno.PointerValue {
    if (!this.#exec) throw new TypeError('Cannot use an executable of backend "native" after dispose');
    return this.#exec;
  }

  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    this.#live();
    const { graph, slots } = this.#plan;
    const slot = slots[tensorId];
    if (!slot || !graph.inputs.includes(tensorId)) {
      throw new TypeError(`Cannot write input ${tensorId}: it is not a graph input`);
    }
    const t = graph.tensors[tensorId];
    const capacity = slot.bytes / 4;
    if (!Number.isInteger(count) || count < 0 || count > capacity || count > data.length) {
      throw new RangeError(`Cannot write ${count} values to input "${t.name}": it holds ${capacity}`);
    }
    if (t.dtype === "i32") {
      const dst = new Int32Array(this.#arenaBuf, slot.offset, count);
      const limit = this.#idLimit.get(tensorId) ?? Infinity;
      for (let i = 0; i < count; i++) {
        const id = data[i];
        if (!Number.isInteger(id) || !(id >= 0 && id < limit)) {
          throw new RangeError(`Cannot embed token id ${id}: expected an integer from 0 to ${limit - 1}`);
        }
      }
      for (let i = 0; i < count; i++) dst[i] = data[i];
    } else {
      new Float32Array(this.#arenaBuf, slot.offset, count).set(data.subarray(0, count));
    }
  }

  run(step: StepArgs, profile?: Float64Array): Promise<void> {
    try {
      this.#run(step, profile);
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  #run(step: StepArgs, profile?: Float64Array): void {
    const exec = this.#live();
    validateStep(this.#plan, step, this.#capacity);
    const T = step.dims.T ?? 1;
    if (!(T >= 1 && T <= this.#maxT)) {
      throw new RangeError(`Cannot run a step with T = ${T}: expected 1 to ${this.#maxT}`);
    }
    const sym = this.#backend.symbols;
    const pool = this.#backend.pool;
    // Single-thread milliseconds this step should take, by compute and by weight streaming.
    const ms = Math.max(T * this.#macsPerRow / MACS_PER_MS, this.#weightBytes / BYTES_PER_MS);
    const fixed = this.#backend.fixedThreads;
    const tuner = this.#tuners[T === 1 ? 0 : 1];
    // Prior: prefill is compute-bound and gains from every core; decode of a small model loses more to
    // waking a worker than it gains, a large one is bound by memory bandwidth, which two cores raise.
    const prior = T > 1 || ms >= DECODE_PARALLEL_MS ? this.#backend.maxThreads : 1;
    const threads = fixed ?? (ms < PARALLEL_MIN_MS || this.#backend.maxThreads === 1 ? 1 : tuner.choose(prior));
    const n = this.#plan.order.length;
    if (profile) {
      for (let i = 0; i < n; i++) {
        const t0 = performance.now();
        sym.llm_run(exec, pool, step.pos, T, threads, i, i + 1);
        profile[i] += performance.now() - t0;
      }
      return;
    }
    const t0 = performance.now();
    if (sym.llm_run(exec, pool, step.pos, T, threads, 0, n) !== 0) {
      throw new RangeError(`Cannot run a step at position ${step.pos} with T = ${T}`);
    }
    if (fixed === undefined && ms >= PARALLEL_MIN_MS) tuner.record(threads, (performance.now() - t0) / ms);
  }

  readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    try {
      this.#readOutput(tensorId, dst, count);
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  #readOutput(tensorId: number, dst: Float32Array, count: number): void {
    this.#live();
    const { graph, slots } = this.#plan;
    const slot = slots[tensorId];
    if (!slot || !graph.outputs.includes(tensorId) || !Number.isInteger(count) || count < 0 || count > slot.bytes / 4) {
      throw new RangeError(`Cannot read ${count} values of output ${tensorId}`);
    }
    if (count > dst.length) throw new RangeError(`Cannot read ${count} values into an array of ${dst.length}`);
    dst.set(new Float32Array(this.#arenaBuf, slot.offset, count));
  }

  dispose(): void {
    if (!this.#exec) return;
    const sym = this.#backend.symbols;
    sym.llm_exec_free(this.#exec);
    sym.llm_free(this.#arena);
    this.#exec = null;
    this.#arena = null;
    this.#backend.forget(this);
  }
}

/** Creates the native backend; throws {@link NativeLibraryError} when the library is missing or stale. */
export async function createNativeBackend(options: NativeBackendOptions = {}): Promise<Backend> {
  const lib = await acquireLibrary(options.library);
  try {
    return new NativeBackend(lib, options);
  } catch (e) {
    releaseLibrary(lib);
    throw e;
  }
}

/** Options of {@link measureReadBandwidth}. */
export interface BandwidthOptions {
  /** Bytes of the float array summed (default 1 GiB). */
  readonly bytes?: number;
  /** Threads reading (default 1). */
  readonly threads?: number;
  /** Timed passes; the best is reported (default 3). */
  readonly reps?: number;
  /** Library path, as in {@link NativeBackendOptions.library}. */
  readonly library?: string;
}

/**
 * Measures the machine's memory read bandwidth in GB/s (1e9 bytes per second):
 * the best of `reps` passes summing a float array of `bytes` bytes in C.
 *
 * @example
 * ```ts
 * const gbps = await measureReadBandwidth({ bytes: 1 << 30, threads: 1 });
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
  const sym = lib.lib.symbols;
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
