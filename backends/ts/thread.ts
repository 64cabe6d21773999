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

/**
 * The caller's handle on the worker. Under Deno it is a `node:worker_threads` worker,
 * which can be unreferenced: an idle backend then does not keep the process alive, so
 * a program that ends without disposing its model exits as it would with the other
 * backends (a web `Worker` would keep it running forever). Elsewhere, a web `Worker`.
 */
interface WorkerHandle {
  post(message: ToWorker): void;
  terminate(): void;
  /** Whether the worker keeps the process alive (only while a command is pending). */
  keepAlive(on: boolean): void;
}

interface WorkerEvents {
  message(data: FromWorker): void;
  error(message: string): void;
  messageError(): void;
}

/** Starts the worker module: a `node:worker_threads` worker under Deno, else a web worker. */
async function spawn(events: WorkerEvents): Promise<WorkerHandle> {
  if ((globalThis as { Deno?: unknown }).Deno !== undefined) {
    const { Worker: NodeWorker } = await import("node:worker_threads");
    const w = new NodeWorker(WORKER_URL, { name: "ts backend" });
    w.on("message", (data: FromWorker) => events.message(data));
    w.on("error", (e: Error) => events.error(e.message));
    w.on("messageerror", () => events.messageError());
    w.unref();
    return {
      post: (message) => w.postMessage(message),
      terminate: () => void w.terminate(),
      keepAlive: (on) => on ? w.ref() : w.unref(),
    };
  }
  const w = new Worker(WORKER_URL, { type: "module", name: "ts backend" });
  w.onmessage = (event: MessageEvent<FromWorker>) => events.message(event.data);
  w.onerror = (event: ErrorEvent) => {
    // Handled here: an error in the worker must not end the caller's process.
    event.preventDefault();
    events.error(event.message);
  };
  w.onmessageerror = () => events.messageError();
  return { post: (message) => w.postMessage(message), terminate: () => w.terminate(), keepAlive: noop };
}

/** The worker and its control block. One command at a time runs; the others queue. */
export class WorkerThread {
  #worker!: WorkerHandle;
  readonly #control = new Int32Array(new SharedArrayBuffer(CONTROL_BYTES));
  /** Settles when the last queued command has. */
  #tail: Promise<void> = Promise.resolve();
  /** Resolves the pending message's reply. */
  #reply: ((message: FromWorker) => void) | undefined;
  /** Rejects the pending message's reply. */
  #fail: ((error: Error) => void) | undefined;
  /** Why the worker is gone, once it is. */
  #gone: Error | undefined;
  /** Commands queued or running. */
  #pending = 0;

  private constructor() {}

  /** Starts a worker and waits until it is ready; rejects when it cannot start. */
  static async start(): Promise<WorkerThread> {
    const thread = new WorkerThread();
    thread.#worker = await spawn({
      message: (data) => {
        const reply = thread.#reply;
        thread.#reply = thread.#fail = undefined;
        reply?.(data);
      },
      error: (message) => thread.#end(new UnsupportedError(`The ts backend's worker failed: ${message}`)),
      messageError: () => thread.#end(new TypeError("The ts backend's worker sent a message that cannot be read")),
    });
    try {
      thread.#worker.keepAlive(true);
      await thread.#post({ kind: "init", control: thread.#control.buffer as SharedArrayBuffer }, false);
      thread.#worker.keepAlive(false);
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

  /** Runs `task` after every command queued before it; the worker keeps the process alive meanwhile. */
  #serial<T>(task: () => Promise<T>): Promise<T> {
    this.#pending++;
    this.#worker.keepAlive(true);
    const result = this.#tail.then(task).finally(() => {
      if (--this.#pending === 0 && !this.#gone) this.#worker.keepAlive(false);
    });
    this.#tail = result.then(noop, noop);
    return result;
  }

  /** Posts a message and waits for the reply; `ring` wakes a parked worker to receive it. */
  #post(message: ToWorker, ring: boolean): Promise<FromWorker> {
    this.#check();
    return new Promise<FromWorker>((resolve, reject) => {
      this.#reply = resolve;
      this.#fail = reject;
      this.#worker.post(message);
      if (ring) {
        Atomics.store(this.#control, CMD, Command.message);
        Atomics.notify(this.#control, CMD);
      }
    });
  }
}
