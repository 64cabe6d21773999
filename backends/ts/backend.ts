/**
 * The pure-TypeScript backend (`ts`): runs anywhere Deno, Node or a browser runs,
 * with no permission beyond reading its own modules.
 *
 * Steps run off the caller's thread when they can: in a worker the backend owns,
 * over tensors and activation arenas in `SharedArrayBuffer`s, so a long step never
 * freezes the caller's event loop. `writeInput`, `readOutput`, `readTensor`,
 * `writeTensor` and `copyTensor` work on the shared memory directly from the
 * caller's side; `run()` hands the step to the worker through a shared control word
 * and resolves when it is done (see `protocol.ts`). Where `Worker`,
 * `SharedArrayBuffer` or `Atomics.waitAsync` is missing (a browser page without
 * cross-origin isolation), or `worker: false` asks for it, steps run on the
 * caller's thread instead; `description` says which mode runs.
 *
 * Either way the arena's views are made at compile time, so a step allocates
 * nothing in the kernels.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, isWeightDType } from "../../graph/dtype.ts";
import { elementCount, type OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { Backend, BackendOptions, DeviceTensor, Executable, HostTensor, StepArgs } from "../contract.ts";
import { UnsupportedError, validateBindings, validateStep } from "../contract.ts";
import {
  checkCopy,
  checkInputWrite,
  checkOutputRead,
  checkRange,
  checkStateDType,
  checkUploadSize,
  f32Only,
  IndexChecks,
  type OpSupport,
  supportsOp,
} from "../checks.ts";
import { Program, stepLayout, type TensorMemory, type TsTensor, viewTensor } from "./program.ts";
import { WorkerThread, workerUnavailable } from "./thread.ts";

/** What the ts backend runs: a kernel for every weight dtype, both cache dtypes, f32 activations. */
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

/** Options of the ts backend's factory. */
export interface TsBackendOptions extends BackendOptions {
  /**
   * Whether steps run in a worker the backend owns (`true`: they must, else the
   * factory fails with an `UnsupportedError` saying what is missing), on the caller's
   * thread (`false`), or in a worker where the platform allows it (default).
   */
  readonly worker?: boolean;
}

/** A tensor of the backend: its memory, and its views for the kernels. */
interface HeldTensor {
  readonly memory: TensorMemory;
  readonly view: TsTensor;
}

/** Where steps run, and why. */
type Mode =
  /** In a worker, started on the first compile. */
  | { readonly kind: "worker"; thread?: Promise<WorkerThread> }
  /** On the caller's thread. */
  | { readonly kind: "thread"; readonly reason: string };

/**
 * What a backend holds. Kept in one object apart from the class, so a wrapper made
 * with `Object.create(backend)` (as tests make) shares the same state.
 */
interface BackendState {
  mode: Mode;
  /** Whether tensors live in shared memory (fixed when the backend is created). */
  readonly shared: boolean;
  /** Forced to a worker: a failed start fails compile instead of falling back. */
  readonly forced: boolean;
  readonly tensors: WeakMap<DeviceTensor, HeldTensor>;
  readonly executables: Set<TsExecutable>;
  nextId: number;
  disposed: boolean;
}

/**
 * The pure-TypeScript backend. Call {@link dispose} when done: in worker mode the
 * worker keeps the process alive until then.
 */
export class TsBackend implements Backend {
  /** The registry name, `"ts"`. */
  readonly name = "ts";
  private readonly state: BackendState;

  /**
   * Creates the backend; see {@link TsBackendOptions.worker} for where steps run.
   * @throws {UnsupportedError} when `worker: true` and the platform has no way to run one
   */
  constructor(options: TsBackendOptions = {}) {
    const missing = options.worker === false ? "worker: false" : workerUnavailable();
    if (options.worker === true && missing !== undefined) {
      throw new UnsupportedError(`Backend "ts" cannot run its steps in a worker here: ${missing}`);
    }
    this.state = {
      mode: missing === undefined ? { kind: "worker" } : { kind: "thread", reason: missing },
      shared: missing === undefined,
      forced: options.worker === true,
      tensors: new WeakMap(),
      executables: new Set(),
      nextId: 1,
      disposed: false,
    };
  }

  /** A line for logs: whether steps run in the backend's worker or on the caller's thread, and why. */
  get description(): string {
    const mode = this.state.mode;
    return mode.kind === "worker"
      ? "TypeScript (single thread, in a worker)"
      : `TypeScript (single thread, on the caller's thread: ${mode.reason})`;
  }

  /** Whether an op runs with an operand dtype: see {@link Backend.supports}. */
  supports(op: OpKind, dtype: DType): boolean {
    return supportsOp(SUPPORT, op, dtype);
  }

  /**
   * Makes a weight resident. In worker mode the backend copies the bytes into shared
   * memory and then holds its own copy; on the caller's thread it views the host
   * bytes (copying only misaligned ones), so they must not change while it is used.
   */
  upload(t: HostTensor): DeviceTensor {
    this.#checkAlive("upload");
    checkUploadSize(t);
    const data = t.data;
    if (this.state.shared) {
      const bytes = new Uint8Array(new SharedArrayBuffer(data.byteLength));
      bytes.set(data);
      return this.#hold(t.name, t.dtype, t.shape, bytes);
    }
    return this.#hold(t.name, t.dtype, t.shape, data.byteOffset % 4 === 0 ? data : data.slice());
  }

  /** Allocates a zero-filled f32 or f16 KV cache (in shared memory in worker mode). */
  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    this.#checkAlive("createState");
    checkStateDType(this.name, name, dtype);
    const length = byteSize(dtype, elementCount(shape));
    const bytes = this.state.shared ? new Uint8Array(new SharedArrayBuffer(length)) : new Uint8Array(length);
    return this.#hold(name, dtype, shape, bytes);
  }

  /** Copies bytes out of a tensor. Not while a step that uses the tensor runs. */
  readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    try {
      const bytes = this.#held(t).view.bytes;
      checkRange(t, byteOffset, byteLength);
      // slice() of a shared view makes an ordinary (unshared) array.
      return Promise.resolve(bytes.slice(byteOffset, byteOffset + byteLength));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Copies bytes into a tensor. Not while a step that uses the tensor runs. */
  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    const bytes = this.#held(t).view.bytes;
    checkRange(t, byteOffset, data.byteLength);
    bytes.set(data, byteOffset);
  }

  /**
   * Copies `byteLength` bytes of `src` from `srcOffset` into `dst` at `dstOffset`;
   * within one tensor when the ranges do not overlap. Not while a step that uses
   * either runs.
   */
  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number, srcOffset = 0, dstOffset = 0): void {
    const [from, to] = [this.#held(src).view.bytes, this.#held(dst).view.bytes];
    checkCopy(src, dst, byteLength, srcOffset, dstOffset);
    if (from === to) to.copyWithin(dstOffset, srcOffset, srcOffset + byteLength);
    else to.set(from.subarray(srcOffset, srcOffset + byteLength), dstOffset);
  }

  /** Forgets a tensor: its memory goes once no executable uses it (the garbage collector owns it). */
  release(t: DeviceTensor): void {
    this.state.tensors.delete(t);
  }

  /**
   * Prepares a plan: the arena (shared in worker mode) and one kernel closure per
   * node, built in the worker from the plan and the shared buffers, or here.
   */
  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    this.#checkAlive("compile");
    validateBindings(this, plan, bindings);
    const memories: [number, TensorMemory][] = [];
    const views = new Map<number, TsTensor>();
    for (const [id, t] of bindings) {
      const held = this.#held(t);
      memories.push([id, held.memory]);
      views.set(id, held.view);
    }
    const state = this.state;
    const layout = stepLayout(plan);
    const thread = await this.#thread();
    this.#checkAlive("compile");
    const id = state.nextId++;
    let exec: TsExecutable;
    if (thread) {
      const memory = new SharedArrayBuffer(layout.byteLength);
      await thread.compile(id, plan, memory, memories);
      exec = new TsExecutable(plan, memory, { kind: "worker", thread, id }, state);
    } else {
      const memory = state.shared ? new SharedArrayBuffer(layout.byteLength) : new ArrayBuffer(layout.byteLength);
      exec = new TsExecutable(plan, memory, { kind: "thread", program: new Program(plan, memory, views) }, state);
    }
    state.executables.add(exec);
    return exec;
  }

  /** Stops the worker (a step that runs ends after its current node) and frees every executable. */
  dispose(): void {
    const state = this.state;
    if (state.disposed) return;
    state.disposed = true;
    for (const exec of state.executables) exec.dispose();
    const mode = state.mode;
    if (mode.kind === "worker") mode.thread?.then((thread) => thread.stop(), () => {});
  }

  /**
   * Starts the worker now, where steps run in one (it otherwise starts at the first compile); resolves once it
   * runs, or once the backend has fallen back to the caller's thread. `createBackend("ts")` calls it.
   */
  async start(): Promise<void> {
    this.#checkAlive("start");
    await this.#thread();
  }

  /** The worker, started on first use; `undefined` when steps run here (falling back when it cannot start). */
  async #thread(): Promise<WorkerThread | undefined> {
    const state = this.state;
    const mode = state.mode;
    if (mode.kind === "thread") return undefined;
    mode.thread ??= WorkerThread.start();
    try {
      return await mode.thread;
    } catch (e) {
      if (state.forced) throw e;
      // Tensors are in shared memory, which the caller's thread reads as well.
      if (state.mode === mode) state.mode = { kind: "thread", reason: (e as Error).message };
      return undefined;
    }
  }

  #hold(name: string, dtype: DType, shape: readonly number[], bytes: Uint8Array): DeviceTensor {
    const memory: TensorMemory = {
      name,
      dtype,
      shape: [...shape],
      buffer: bytes.buffer,
      byteOffset: bytes.byteOffset,
      byteLength: bytes.byteLength,
    };
    const tensor: DeviceTensor = { name, dtype, shape: memory.shape, byteLength: bytes.byteLength };
    this.state.tensors.set(tensor, { memory, view: viewTensor(memory) });
    return tensor;
  }

  #held(t: DeviceTensor): HeldTensor {
    const held = this.state.tensors.get(t);
    if (!held) {
      throw new TypeError(`Cannot use tensor "${t?.name}": it is not held by this ts backend (or was released)`);
    }
    return held;
  }

  #checkAlive(what: string): void {
    if (this.state.disposed) throw new TypeError(`Cannot ${what}: the ts backend was disposed`);
  }
}

/** Where an executable's steps run. */
type Runner =
  | { readonly kind: "worker"; readonly thread: WorkerThread; readonly id: number }
  | { readonly kind: "thread"; readonly program: Program };

/**
 * A compiled plan. The caller never touches its inputs, outputs or bound tensors
 * while its `run()` is pending (the contract's rule): that is what lets
 * `writeInput` and `readOutput` work on the shared arena without locks.
 */
class TsExecutable implements Executable {
  readonly #plan: ExecutionPlan;
  readonly #runner: Runner;
  readonly #backend: BackendState;
  readonly #indexChecks: IndexChecks;
  readonly #f32: (Float32Array | undefined)[] = [];
  readonly #i32: (Int32Array | undefined)[] = [];
  readonly #dimNames: readonly string[];
  readonly #dims: Int32Array;
  readonly #times: Float64Array;
  #disposed = false;

  constructor(plan: ExecutionPlan, memory: ArrayBufferLike, runner: Runner, backend: BackendState) {
    this.#plan = plan;
    this.#runner = runner;
    this.#backend = backend;
    this.#indexChecks = new IndexChecks(plan);
    const { graph } = plan;
    for (const id of [...graph.inputs, ...graph.outputs]) {
      const slot = plan.slots[id]!;
      if (graph.tensors[id].dtype === "i32") this.#i32[id] = new Int32Array(memory, slot.offset, slot.bytes / 4);
      else this.#f32[id] = new Float32Array(memory, slot.offset, slot.bytes / 4);
    }
    const layout = stepLayout(plan);
    this.#dimNames = layout.dimNames;
    this.#dims = new Int32Array(memory, layout.dimsOffset, layout.dimNames.length);
    this.#times = new Float64Array(memory, layout.timesOffset, plan.order.length);
  }

  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    checkInputWrite(this.#plan, tensorId, data, count);
    const ids = this.#i32[tensorId];
    if (ids) {
      this.#indexChecks.check(tensorId, data, count);
      for (let i = 0; i < count; i++) ids[i] = data[i];
    } else {
      const dst = this.#f32[tensorId]!;
      for (let i = 0; i < count; i++) dst[i] = data[i];
    }
  }

  run(step: StepArgs, profile?: Float64Array): Promise<void> {
    // A bad step rejects the promise, as on the other backends, rather than throwing.
    try {
      this.#checkRunnable();
      validateStep(this.#plan, step);
      const nodes = this.#plan.order.length;
      if (profile && profile.length < nodes) {
        throw new RangeError(`Cannot profile ${nodes} nodes into an array of ${profile.length}`);
      }
      const names = this.#dimNames;
      for (let i = 0; i < names.length; i++) this.#dims[i] = step.dims[names[i]];
      const runner = this.#runner;
      if (runner.kind === "thread") {
        runner.program.run(profile !== undefined);
        if (profile) this.#addTimes(profile);
        return Promise.resolve();
      }
      const done = runner.thread.run(runner.id, profile !== undefined);
      return profile ? done.then(() => this.#addTimes(profile)) : done;
    } catch (e) {
      return Promise.reject(e);
    }
  }

  readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    try {
      checkOutputRead(this.#plan, tensorId, dst, count);
    } catch (e) {
      return Promise.reject(e);
    }
    const src = this.#f32[tensorId]!;
    for (let i = 0; i < count; i++) dst[i] = src[i];
    return Promise.resolve();
  }

  /** Frees the arena (and the worker's side of the plan). Bound weights and state stay alive. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#backend.executables.delete(this);
    const runner = this.#runner;
    if (runner.kind === "worker") runner.thread.free(runner.id);
  }

  #addTimes(profile: Float64Array): void {
    const times = this.#times;
    for (let i = 0; i < times.length; i++) profile[i] += times[i];
  }

  #checkRunnable(): void {
    if (this.#backend.disposed) throw new TypeError("Cannot run the step: the ts backend was disposed");
    if (this.#disposed) throw new TypeError("Cannot run the step: the executable was disposed");
  }
}

/**
 * Creates the TypeScript backend. `options.worker` (see {@link TsBackendOptions})
 * chooses where steps run; the other options are ignored.
 */
export async function createTsBackend(options: BackendOptions = {}): Promise<Backend> {
  const backend = new TsBackend({ worker: options.worker });
  // Starting the worker loads its modules, which holds the caller's thread some 40-70 ms: here, as part of
  // loading a model, rather than in the first step of its first generation.
  await backend.start();
  return backend;
}
