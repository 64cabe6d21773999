/**
 * The caller's side of the TypeScript backend's worker (see `protocol.ts`): starts
 * it, hands it plans and steps one at a time, and stops it.
 *
 * @module
 */

import type { ExecutionPlan } from "../../graph/plan.ts";
import { UnsupportedError } from "../contract.ts";
import {
  CMD,
  Command,
  CONTROL_BYTES,
  EXEC,
  type FromWorker,
  PROFILE,
  readError,
  rebuildError,
  STATUS,
  Status,
  STOP,
  type ToWorker,
} from "./protocol.ts";
import type { TensorMemory } from "./program.ts";

/** The worker module. */
const WORKER_URL = new URL("./worker.ts", import.meta.url);

/**
 * Why the backend cannot run in a worker here, or `undefined` when it can: it needs
 * `Worker`, `SharedArrayBuffer` (browsers give it only to cross-origin isolated
 * pages) and `Atomics.waitAsync`, and under Deno read access to the worker module.
 */
export function workerUnavailable(): string | undefined {
  if (typeof Worker !== "function") return "no Worker";
  if (typeof SharedArrayBuffer !== "function") return "no SharedArrayBuffer";
  if (typeof Atomics.waitAsync !== "function") return "no Atomics.waitAsync";
  const deno = (globalThis as { Deno?: typeof Deno }).Deno;
  if (deno?.permissions?.querySync && WORKER_URL.protocol === "file:") {
    const { state } = deno.permissions.querySync({ name: "read", path: WORKER_URL });
    if (state !== "granted") return "no read access to its worker module";
  }
  return undefined;
}

function noop(): void {}

/** The worker and its control block. One command at a time runs; the others queue. */
export class WorkerThread {
  readonly #worker: Worker;
  readonly #control = new Int32Array(new SharedArrayBuffer(CONTROL_BYTES));
  /** Settles when the last queued command has. */
  #tail: Promise<void> = Promise.resolve();
  /** Resolves the pending message's reply. */
  #reply: ((message: FromWorker) => void) | undefined;
  /** Rejects the pending message's reply. */
  #fail: ((error: Error) => void) | undefined;
  /** Why the worker is gone, once it is. */
  #gone: Error | undefined;

  private constructor() {
    this.#worker = new Worker(WORKER_URL, { type: "module", name: "ts backend" });
    this.#worker.onmessage = (event: MessageEvent<FromWorker>) => {
      const reply = this.#reply;
      this.#reply = this.#fail = undefined;
      reply?.(event.data);
    };
    this.#worker.onerror = (event: ErrorEvent) => {
      // Handled here: an error in the worker must not end the caller's process.
      event.preventDefault();
      this.#end(new UnsupportedError(`The ts backend's worker failed: ${event.message}`));
    };
    this.#worker.onmessageerror = () =>
      this.#end(new TypeError("The ts backend's worker sent a message that cannot be read"));
  }

  /** Starts a worker and waits until it is ready; rejects when it cannot start. */
  static async start(): Promise<WorkerThread> {
    const thread = new WorkerThread();
    try {
      await thread.#post({ kind: "init", control: thread.#control.buffer as SharedArrayBuffer }, false);
    } catch (e) {
      thread.stop();
      throw e;
    }
    return thread;
  }

  /** Builds executable `id` in the worker; rejects with the worker's error. */
  compile(
    id: number,
    plan: ExecutionPlan,
    memory: SharedArrayBuffer,
    bindings: readonly (readonly [number, TensorMemory])[],
  ): Promise<void> {
    return this.#serial(async () => {
      const reply = await this.#post({ kind: "compile", id, plan, memory, bindings }, true);
      if (reply.kind === "compiled" && reply.error) throw rebuildError(reply.error);
    });
  }

  /** Forgets executable `id` in the worker (after the commands queued before). */
  free(id: number): void {
    if (this.#gone) return;
    this.#serial(() => this.#post({ kind: "free", id }, true)).catch(noop);
  }

  /**
   * Runs executable `id`'s step (its dimensions already in its memory); resolves when
   * the worker is done, rejects with the error a kernel threw.
   */
  run(id: number, profile: boolean): Promise<void> {
    return this.#serial(async () => {
      const ctl = this.#control;
      this.#check();
      ctl[EXEC] = id;
      ctl[PROFILE] = profile ? 1 : 0;
      Atomics.store(ctl, CMD, Command.run);
      Atomics.notify(ctl, CMD);
      while (Atomics.load(ctl, CMD) === Command.run) {
        const wait = Atomics.waitAsync(ctl, CMD, Command.run);
        if (wait.async) await wait.value;
      }
      this.#check();
      if (ctl[STATUS] === Status.error) throw readError(ctl);
    });
  }

  /**
   * Stops the worker: a step that is running ends after its current node, queued
   * commands reject, and nothing of the worker keeps the process alive.
   */
  stop(): void {
    this.#end(new Error("Cannot use the ts backend: it was disposed"));
  }

  #end(reason: Error): void {
    if (this.#gone) return;
    this.#gone = reason;
    const ctl = this.#control;
    // The flag first, then the word: a worker that read the flag as 0 parks on a word that has changed.
    Atomics.store(ctl, STOP, 1);
    Atomics.store(ctl, CMD, Command.stop);
    // Wakes the worker if it is parked, and the caller's own waitAsync of a running step.
    Atomics.notify(ctl, CMD);
    this.#worker.terminate();
    this.#fail?.(reason);
    this.#reply = this.#fail = undefined;
  }

  #check(): void {
    if (this.#gone) throw this.#gone;
  }

  /** Runs `task` after every command queued before it. */
  #serial<T>(task: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(task);
    this.#tail = result.then(noop, noop);
    return result;
  }

  /** Posts a message and waits for the reply; `ring` wakes a parked worker to receive it. */
  #post(message: ToWorker, ring: boolean): Promise<FromWorker> {
    this.#check();
    return new Promise<FromWorker>((resolve, reject) => {
      this.#reply = resolve;
      this.#fail = reject;
      this.#worker.postMessage(message);
      if (ring) {
        Atomics.store(this.#control, CMD, Command.message);
        Atomics.notify(this.#control, CMD);
      }
    });
  }
}
