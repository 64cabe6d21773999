/**
 * The server's scheduling: at most `parallel` generations (sequences that decode) run at once, at
 * most `maxQueue` more requests wait their turn, and any further request is refused at once
 * ({@link QueueFullError}, answered with `429`). A request asks for as many slots as it runs
 * generations at once (an OpenAI `n` request asks for `n`), and gets them all together.
 *
 * Slots are handed out in arrival order: a request that waits for several slots is not overtaken
 * by later requests that need fewer, so it cannot starve. The running generations are not run by
 * the scheduler: they are batched into shared steps by the model's engine.
 *
 * @module
 */

/** Every generation slot is busy and the queue is full. */
export class QueueFullError extends Error {
  /**
   * The error for a full queue, with what it holds.
   *
   * @param parallel generation slots in use
   * @param queued requests waiting
   */
  constructor(readonly parallel: number, readonly queued: number) {
    super(`Server busy: ${parallel} generations are running and ${queued} requests are queued; try again later`);
    this.name = "QueueFullError";
  }
}

/** Limits of a {@link Scheduler}. */
export interface SchedulerOptions {
  /** Generations that run at once. */
  parallel: number;
  /** Requests that may wait for their slots. */
  maxQueue: number;
}

interface Waiter {
  readonly count: number;
  readonly resolve: (release: () => void) => void;
}

/** Hands out generation slots in arrival order. */
export class Scheduler {
  /** Generations that run at once. */
  readonly parallel: number;
  /** Requests that may wait for their slots. */
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

  /** Slots in use: the generations running. */
  get running(): number {
    return this.#running;
  }

  /** Requests waiting. */
  get queued(): number {
    return this.#queue.length;
  }

  /**
   * `count` slots (default 1) at once: resolves with their release function (call it once; later
   * calls do nothing). Throws a `RangeError` synchronously for a count that could never be met
   * (not an integer from 1 to {@link Scheduler.parallel}), a {@link QueueFullError} when the request
   * would have to wait and the queue is full; rejects with the signal's reason if `signal` aborts
   * while waiting.
   */
  acquire(signal?: AbortSignal, count = 1): Promise<() => void> {
    if (!Number.isInteger(count) || count < 1 || count > this.parallel) {
      throw new RangeError(`Invalid slot count ${count}: expected an integer from 1 to ${this.parallel}`);
    }
    signal?.throwIfAborted();
    // Only when nobody waits: a request that waits for several slots keeps its turn.
    if (this.#queue.length === 0 && this.#running + count <= this.parallel) {
      this.#running += count;
      return Promise.resolve(this.#releaser(count));
    }
    if (this.#queue.length >= this.maxQueue) throw new QueueFullError(this.#running, this.#queue.length);
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        const i = this.#queue.indexOf(waiter);
        if (i < 0) return;
        this.#queue.splice(i, 1);
        reject(signal!.reason);
        this.#grant(); // the head may have been waiting behind this one
      };
      const waiter: Waiter = {
        count,
        resolve: (release) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(release);
        },
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#queue.push(waiter);
    });
  }

  /** Gives slots to the waiters at the head of the queue while they fit. */
  #grant(): void {
    while (this.#queue.length > 0 && this.#running + this.#queue[0].count <= this.parallel) {
      const next = this.#queue.shift()!;
      this.#running += next.count;
      next.resolve(this.#releaser(next.count));
    }
  }

  #releaser(count: number): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#running -= count;
      this.#grant();
    };
  }
}
