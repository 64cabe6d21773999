/**
 * A plan compiled for the native backend: its encoded node records and address
 * table live in the library (`llm_exec_new`), its arena is library memory viewed
 * from TypeScript, and a step is one foreign call (`llm_run`).
 *
 * A step must not hold the caller's thread: an engine awaits `run()` while its
 * event loop serves timers and sockets. So a step runs on one of Deno's blocking
 * threads (a `nonblocking` FFI call, which resolves a promise when it returns),
 * except a step predicted to be short (`syncStepMs`, default {@link SYNC_STEP_MS}: a
 * decode step of a small model, where handing it to another thread costs a large
 * share of the step) that runs on one thread, which runs on the calling thread. Only
 * single-thread steps: a step on several threads can stall far past its prediction
 * when the machine deschedules one of them. And only while the event loop had a turn
 * (the last nonblocking step ended) less than {@link BLOCKED_MS} ago: past that, the
 * next step runs nonblocking, which gives the event loop its turn.
 *
 * While a step runs off the thread, the C side reads and writes the arena and the
 * bound tensors. The caller must not write inputs, read outputs or touch the
 * bound tensors until `run()` settles (the contract says so; these methods throw a
 * `TypeError` when asked), and what would free memory (dispose, release) waits for
 * the step to end.
 *
 * @module
 */

import type { DimBindings } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import { checkInputWrite, checkOutputRead, IndexChecks } from "../checks.ts";
import type { Executable, StepArgs } from "../contract.ts";
import { validateStep } from "../contract.ts";
import { encodePlan } from "./encoder.ts";
import type { NativeSymbols } from "./library.ts";
import type { StepGate } from "./steps.ts";
import type { NativeTensor } from "./tensor.ts";
import { StepCost, ThreadPolicy } from "./threads.ts";

/**
 * By default, a step predicted to take at most this many milliseconds runs on the
 * calling thread (`syncStepMs`). A nonblocking call costs 25-40 µs more per step
 * than a direct one (measured on 2 shared vCPUs), 5-8% of a 0.5 ms decode step of
 * the story model and next to nothing beside a step of several milliseconds.
 */
export const SYNC_STEP_MS = 2;
/**
 * Steps run on the calling thread at most this many milliseconds (of wall time)
 * after the event loop last had a turn; then one step runs nonblocking, so a caller
 * that never yields between steps still lets its event loop run (timers lag by
 * about this much, plus one step).
 */
export const BLOCKED_MS = 10;

/**
 * When the event loop last had a turn that this module knows of: a nonblocking step's
 * promise resolves from it. (A caller that yields by itself makes this older than its
 * turns are: then a step runs nonblocking every BLOCKED_MS anyway, at tens of µs each.)
 */
let lastTurn = performance.now();

/**
 * What an executable needs from the backend that compiles it. The backend keeps it
 * private and hands it to each executable, so that none of it is part of the
 * public backend.
 */
export interface NativeContext {
  /** The library's functions; reading them throws once the backend is disposed. */
  readonly symbols: NativeSymbols;
  /** The library's thread pool, or null for a single thread. */
  readonly pool: Deno.PointerValue;
  /** The most threads a step may use (the pool's size). */
  readonly maxThreads: number;
  /** The thread count every step uses, or undefined to choose per step. */
  readonly fixedThreads: number | undefined;
  /** The backend's running step: one at a time. */
  readonly gate: StepGate;
  /** Steps predicted to take at most this many ms run on the calling thread. */
  readonly syncStepMs: number;
  /** Called once when an executable is disposed. */
  forget(exec: NativeExecutable): void;
}

/** The step classes whose last times predict the next (by tokens: 1, 2-7, 8-63, 64 and more). */
const PREDICT_CLASS_ENDS = [2, 8, 64, Infinity];

function predictClass(T: number): number {
  let c = 0;
  while (T >= PREDICT_CLASS_ENDS[c]) c++;
  return c;
}

/** A compiled plan of the native backend. */
export class NativeExecutable implements Executable {
  readonly #context: NativeContext;
  readonly #symbols: NativeSymbols;
  readonly #plan: ExecutionPlan;
  #exec: Deno.PointerValue;
  #arena: Deno.PointerValue;
  /** Views of the input slots (i32 indices or f32 values) and output slots in the arena, by tensor id. */
  readonly #inputs = new Map<number, Int32Array | Float32Array>();
  readonly #outputs = new Map<number, Float32Array>();
  /** Bindings kept alive while the plan may run. */
  readonly #bindings: ReadonlyMap<number, NativeTensor>;
  readonly #bound: ReadonlySet<NativeTensor>;
  readonly #indexChecks: IndexChecks;
  readonly #threads: ThreadPolicy;
  readonly #cost: StepCost;
  /** The symbolic dimensions the C side reads per step, in its order. */
  readonly #dims: readonly string[];
  /** The C side's timings: [0] the last step's ms, [1 + i] node i's when profiled. */
  readonly #times: Float64Array;
  /** Per step class, the last step's estimate and its measured milliseconds (-1: none yet). */
  readonly #lastEstimate = new Float64Array(PREDICT_CLASS_ENDS.length);
  readonly #lastElapsed = new Float64Array(PREDICT_CLASS_ENDS.length).fill(-1);
  /** Set while a step runs off the calling thread. */
  #running = false;
  /** Set by dispose(); the memory is freed once no step runs. */
  #disposed = false;

  /**
   * Encodes and prepares `plan`; throws naming the node for anything the kernels do not accept.
   * @param context the compiling backend's context
   * @param plan the plan
   * @param bindings the weight and state tensors, checked by `validateBindings`
   */
  constructor(context: NativeContext, plan: ExecutionPlan, bindings: ReadonlyMap<number, NativeTensor>) {
    this.#context = context;
    const sym = this.#symbols = context.symbols;
    this.#plan = plan;
    this.#bindings = bindings;
    this.#bound = new Set(bindings.values());
    const { graph } = plan;
    const encoded = encodePlan(plan, this.#bindings);
    this.#indexChecks = new IndexChecks(plan);
    this.#dims = encoded.dims;
    this.#threads = new ThreadPolicy(context.maxThreads, context.fixedThreads);
    const arenaBytes = Math.max(plan.arenaBytes, 64);
    const arena = sym.llm_alloc(BigInt(arenaBytes));
    if (!arena) throw new RangeError(`Cannot allocate an arena of ${arenaBytes} bytes: out of memory`);
    this.#arena = arena;
    const arenaBuf = Deno.UnsafePointerView.getArrayBuffer(arena, arenaBytes);
    for (const id of graph.inputs) {
      const slot = plan.slots[id];
      if (!slot) continue;
      const View = graph.tensors[id].dtype === "i32" ? Int32Array : Float32Array;
      this.#inputs.set(id, new View(arenaBuf, slot.offset, slot.bytes / 4));
    }
    for (const id of graph.outputs) {
      const slot = plan.slots[id];
      if (slot) this.#outputs.set(id, new Float32Array(arenaBuf, slot.offset, slot.bytes / 4));
    }
    const positions = this.#inputs;
    this.#cost = new StepCost(encoded.work, (id) => positions.get(id) as Int32Array);
    const base = BigInt(Deno.UnsafePointer.value(arena));
    const addrs = new BigUint64Array(Math.max(1, graph.tensors.length));
    graph.tensors.forEach((_t, id) => {
      const slot = plan.slots[id];
      if (slot) addrs[id] = base + BigInt(slot.offset);
      else if (bindings.has(id)) addrs[id] = bindings.get(id)!.address;
    });
    const exec = sym.llm_exec_new(
      encoded.nodes,
      plan.order.length,
      addrs,
      graph.tensors.length,
      encoded.maxDims.length > 0 ? encoded.maxDims : new Int32Array(1),
      encoded.dims.length,
      context.maxThreads,
    );
    if (!exec) {
      sym.llm_free(arena);
      throw new RangeError('Cannot prepare the plan on backend "native": out of memory');
    }
    this.#exec = exec;
    const times = sym.llm_exec_times(exec)!;
    this.#times = new Float64Array(Deno.UnsafePointerView.getArrayBuffer(times, (plan.order.length + 1) * 8));
  }

  /** Whether this executable binds `tensor` (a running step of it may read or write the tensor). */
  binds(tensor: object): boolean {
    return this.#bound.has(tensor as NativeTensor);
  }

  #live(what: string): Deno.PointerValue {
    if (this.#disposed || !this.#exec) {
      throw new TypeError('Cannot use an executable of backend "native" after dispose');
    }
    if (this.#running) {
      throw new TypeError(`Cannot ${what} while a step of this executable runs: await run() first`);
    }
    return this.#exec;
  }

  /** Copies indices (each checked against what it indexes) or activations into a graph input. */
  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    this.#live("write an input");
    checkInputWrite(this.#plan, tensorId, data, count);
    const dst = this.#inputs.get(tensorId)!;
    if (dst instanceof Int32Array) {
      this.#indexChecks.check(tensorId, data, count);
      for (let i = 0; i < count; i++) dst[i] = data[i];
    } else {
      dst.set(data.subarray(0, count));
    }
  }

  /**
   * Runs the plan in one foreign call: on the calling thread when the step is predicted
   * short, else on another thread (see the module). With `profile`, adds each node's
   * milliseconds as the C side measured them (between the barriers that end them).
   */
  run(step: StepArgs, profile?: Float64Array): Promise<void> {
    try {
      this.#live("run a step");
      validateStep(this.#plan, step);
      const n = this.#plan.order.length;
      if (profile !== undefined && !(profile instanceof Float64Array && profile.length >= n)) {
        throw new RangeError(`Cannot profile a step of ${n} nodes into ${describe(profile)}`);
      }
    } catch (e) {
      return Promise.reject(e);
    }
    // Steps of one backend share its thread pool: wait for the running one (of any executable) to end.
    const running = this.#context.gate.running;
    if (running) return running.then(() => this.run(step, profile));
    return this.#start(step.dims, profile);
  }

  #start(dims: DimBindings, profile: Float64Array | undefined): Promise<void> {
    const T = dims.T ?? 1;
    const estimate = this.#cost.ms(dims);
    const threads = this.#threads.choose(T, estimate);
    const c = predictClass(T);
    const last = this.#lastElapsed[c], lastEstimate = this.#lastEstimate[c];
    // The last step of the class took `last` for its estimate: this one should take as much per unit.
    const predicted = last < 0 ? estimate : lastEstimate > 0 ? last * estimate / lastEstimate : last;
    const d = this.#dims;
    const d0 = d.length > 0 ? dims[d[0]] : 0, d1 = d.length > 1 ? dims[d[1]] : 0;
    const d2 = d.length > 2 ? dims[d[2]] : 0, d3 = d.length > 3 ? dims[d[3]] : 0;
    const sym = this.#symbols, exec = this.#exec, pool = this.#context.pool, n = this.#plan.order.length;
    const flag = profile ? 1 : 0;
    if (
      threads === 1 && predicted <= this.#context.syncStepMs && performance.now() + predicted - lastTurn <= BLOCKED_MS
    ) {
      const rc = sym.llm_run(exec, pool, threads, 0, n, d0, d1, d2, d3, flag);
      const error = this.#finish(rc, T, estimate, threads, profile);
      return error ? Promise.reject(error) : Promise.resolve();
    }
    this.#running = true;
    let error: Error | undefined;
    const ended = sym.llm_run_nonblocking(exec, pool, threads, 0, n, d0, d1, d2, d3, flag).then((rc) => {
      this.#running = false;
      lastTurn = performance.now(); // this promise resolves from the event loop: it had its turn
      error = this.#finish(rc, T, estimate, threads, profile);
      if (this.#disposed) this.#free();
    });
    this.#context.gate.begin(this, ended);
    return ended.then(() => (error ? Promise.reject(error) : undefined));
  }

  /** Books a finished step's time and profile; returns the error of a refused one. */
  #finish(rc: number, T: number, estimate: number, threads: number, profile?: Float64Array): Error | undefined {
    if (rc !== 0) {
      // validateStep and the encoder check all that the C side does: reaching this is a bug, not a caller's error.
      return new RangeError(`Cannot run a step of dimensions ${this.#dims}: the native library refused it`);
    }
    const elapsed = this.#times[0];
    const c = predictClass(T);
    this.#lastEstimate[c] = estimate;
    this.#lastElapsed[c] = elapsed;
    this.#threads.record(T, estimate, threads, elapsed);
    if (profile) { for (let i = 0; i < this.#plan.order.length; i++) profile[i] += this.#times[1 + i]; }
    return undefined;
  }

  /** Copies the first values of a graph output into `dst`. */
  readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    try {
      this.#live("read an output");
      checkOutputRead(this.#plan, tensorId, dst, count);
      dst.set(this.#outputs.get(tensorId)!.subarray(0, count));
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Frees the library's plan and the arena, once no step of it runs. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#context.forget(this);
    if (!this.#running) this.#free();
  }

  #free(): void {
    if (!this.#exec) return;
    this.#symbols.llm_exec_free(this.#exec);
    this.#symbols.llm_free(this.#arena);
    this.#exec = null;
    this.#arena = null;
  }
}

function describe(profile: unknown): string {
  return profile instanceof Float64Array ? `a Float64Array of ${profile.length}` : String(profile);
}
