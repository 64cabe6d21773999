/**
 * A plan compiled for the native backend: its encoded node records and address
 * table live in the library (`llm_exec_new`), its arena is library memory viewed
 * from TypeScript, and a step is one foreign call (`llm_run`).
 *
 * @module
 */

import type { ExecutionPlan } from "../../graph/plan.ts";
import { checkInputWrite, checkOutputRead, TokenIdLimits } from "../checks.ts";
import type { Executable, StepArgs } from "../contract.ts";
import { UnsupportedError, validateStep } from "../contract.ts";
import { encodePlan } from "./encoder.ts";
import type { NativeSymbols } from "./library.ts";
import type { NativeTensor } from "./tensor.ts";
import { ThreadPolicy } from "./threads.ts";

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
  /** Called once when an executable is disposed. */
  forget(exec: NativeExecutable): void;
}

/** A compiled plan of the native backend. */
export class NativeExecutable implements Executable {
  readonly #context: NativeContext;
  readonly #symbols: NativeSymbols;
  readonly #plan: ExecutionPlan;
  readonly #capacity: number;
  readonly #maxT: number;
  #exec: Deno.PointerValue;
  #arena: Deno.PointerValue;
  /** Views of the input slots (i32 ids or f32 values) and output slots in the arena, by tensor id. */
  readonly #inputs = new Map<number, Int32Array | Float32Array>();
  readonly #outputs = new Map<number, Float32Array>();
  /** Bindings kept alive while the plan may run. */
  readonly #bindings: ReadonlyMap<number, NativeTensor>;
  readonly #idLimits = new TokenIdLimits();
  readonly #threads: ThreadPolicy;

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
    const { graph } = plan;
    for (const name of Object.keys(plan.maxDims)) {
      if (name !== "T") throw new UnsupportedError(`Backend "native" cannot run a plan with dimension "${name}"`);
    }
    this.#maxT = plan.maxDims.T ?? 1;
    const encoded = encodePlan(plan, this.#bindings, this.#maxT, this.#idLimits);
    this.#capacity = encoded.capacity;
    this.#threads = new ThreadPolicy(context.maxThreads, context.fixedThreads, encoded.work);
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
      this.#maxT,
      context.maxThreads,
    );
    if (!exec) {
      sym.llm_free(arena);
      throw new RangeError('Cannot prepare the plan on backend "native": out of memory');
    }
    this.#exec = exec;
  }

  #live(): Deno.PointerValue {
    if (!this.#exec) throw new TypeError('Cannot use an executable of backend "native" after dispose');
    return this.#exec;
  }

  /** Copies token ids (checked against the tables) or activations into a graph input. */
  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    this.#live();
    checkInputWrite(this.#plan, tensorId, data, count);
    const dst = this.#inputs.get(tensorId)!;
    if (dst instanceof Int32Array) {
      this.#idLimits.check(tensorId, data, count);
      for (let i = 0; i < count; i++) dst[i] = data[i];
    } else {
      dst.set(data.subarray(0, count));
    }
  }

  /** Runs the plan in one foreign call (one per node when profiling). */
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
    const sym = this.#symbols;
    const pool = this.#context.pool;
    const threads = this.#threads.choose(T);
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
    this.#threads.record(T, threads, performance.now() - t0);
  }

  /** Copies the first values of a graph output into `dst`. */
  readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    try {
      this.#live();
      checkOutputRead(this.#plan, tensorId, dst, count);
      dst.set(this.#outputs.get(tensorId)!.subarray(0, count));
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Frees the library's plan and the arena. */
  dispose(): void {
    if (!this.#exec) return;
    this.#symbols.llm_exec_free(this.#exec);
    this.#symbols.llm_free(this.#arena);
    this.#exec = null;
    this.#arena = null;
    this.#context.forget(this);
  }
}
