/**
 * The server's scheduling: at most `parallel` generations run at once, at most
 * `maxQueue` more wait their turn, and any further request is refused at once
 * ({@link QueueFullError}, answered with `429`).
 *
 * @module
 */

/** Every generation slot is busy and the queue is full. */
export class QueueFullError extends Error {
  /**
   * The error for a full queue, with what it holds.
   *
   * @param parallel generations running
   * @param queued requests waiting
   */
  constructor(readonly parallel: number, readonly queued: number) {
    super(`Server busy: ${parallel} requests are running and ${queued} are queued; try again later`);
    this.name = "QueueFullError";
  }
}

/** Limits of a {@link Scheduler}. */
export interface SchedulerOptions {
  /** Generations that run at once. */
  parallel: number;
  /** Requests that may wait for a slot. */
  maxQueue: number;
}

interface Waiter {
  resolve: (release: () => void) => void;
  reject: (e: unknown) => void;
}

/** Hands out generation slots in arrival order. */
export class Scheduler {
  /** Generations that run at once. */
  readonly parallel: number;
  /** Requests that may wait for a slot. */
  readonly maxQueue: number;
  #running = 0;
  readonly #queue: Waiter[] = [];

  /**
   * A scheduler with every slot free.
   *
   * @param options slot and queue limits
   */
  constructor(options: SchedulerOptions) {
    for (const [k, min] of [["parallel", 1], ["maxQueue", 0]] as const) {
      const v = options[k];
      if (!Number.isInteger(v) || v < min) throw new RangeError(`Invalid ${k} ${v}: expected an integer ≥ ${min}`);
    }
    this.parallel = options.parallel;
    this.maxQueue = options.maxQueue;
  }

  /** Generations running. */
  get running(): number {
    return this.#running;
  }

  /** Requests waiting. */
  get queued(): number {
    return this.#queue.length;
  }

  /**
   * A slot: resolves with its release function (call it exactly once). Throws
   * {@link QueueFullError} synchronously when the queue is full; rejects with
   * the signal's reason if `signal` aborts while waiting.
   */
  acquire(signal?: AbortSignal): Promise<() => void> {
    signal?.throwIfAborted();
    if (this.#running < this.parallel) {
      this.#running++;
      return Promise.resolve(this.#releaser());
    }
    if (this.#queue.length >= this.maxQueue) throw new QueueFullError(this.#running, this.#queue.length);
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve: (r) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(r);
        },
        reject,
      };
      const onAbort = () => {
        const i = this.#queue.indexOf(waiter);
        if (i >= 0) this.#queue.splice(i, 1);
        reject(signal!.reason);
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#queue.push(waiter);
    });
  }

  #releaser(): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.#queue.shift();
      if (next) next.resolve(this.#releaser());
      else this.#running--;
    };
  }
}
