/**
 * The engine loop: every evaluation of every sequence of a model goes through one
 * queue, and each step of the loop runs the tokens of many sequences at once
 * (continuous batching, as llama.cpp's server does). A step takes one token of each
 * sequence that is decoding first, then fills the rest of its `stepTokens` with
 * chunks of pending prompts in arrival order, so a long prompt shares steps with the
 * others instead of stalling them for its whole prefill.
 *
 * The steps run on the backend's own thread (a worker, the native library's
 * threads, the GPU); between steps the loop yields to the event loop, which is when
 * callers whose tokens were just computed sample and submit their next ones, so they
 * join the next step together. A request's signal is checked before every step, so
 * an aborted or cancelled evaluation stops within one step.
 *
 * @module
 */

import type { Executable } from "../../backends/contract.ts";
import { setImmediate } from "node:timers";
import { debugLevel, debugTimings } from "./debug.ts";
import type { KvPool } from "./kv_pool.ts";
import { PageTable } from "./page_table.ts";
import type { ModelPlans } from "./plans.ts";

/** Which logits an evaluation returns: the last token's, or every token's. */
export type LogitsMode = "last" | "all";

/** What the engine keeps of one sequence; the `Sequence` object reads it. */
export class SequenceState {
  /** The pool pages holding its positions. */
  readonly table: PageTable;
  /** Tokens in the cache, oldest first. */
  readonly tokens: number[] = [];
  /** The last token's logits, reused by every evaluation with `"last"` logits. */
  readonly logits: Float32Array;
  /** Tokens run through the model since the sequence was made. */
  evaluated = 0;
  /** Whether an evaluation is queued or running. */
  busy = false;
  /** Whether the sequence was disposed (its pages are given back). */
  disposed = false;

  /**
   * An empty sequence over `pool`.
   * @param pool the shared KV pool
   * @param vocab logits per token
   */
  constructor(pool: KvPool, vocab: number) {
    this.table = new PageTable(pool);
    this.logits = new Float32Array(vocab);
  }

  /** Positions filled. */
  get length(): number {
    return this.tokens.length;
  }
}

/** One queued evaluation. */
interface Request {
  readonly state: SequenceState;
  readonly tokens: ArrayLike<number>;
  readonly mode: LogitsMode;
  readonly out: Float32Array;
  readonly signal: AbortSignal | undefined;
  readonly resolve: (logits: Float32Array) => void;
  readonly reject: (e: unknown) => void;
  /** Tokens of `tokens` evaluated so far. */
  done: number;
}

/** Thrown for evaluations queued when the model (or the sequence) is disposed. */
export class DisposedError extends Error {
  /**
   * Says what was disposed.
   * @param what "model" or "sequence"
   */
  constructor(what: "model" | "sequence") {
    super(`Cannot evaluate: the ${what} was disposed`);
    this.name = "DisposedError";
  }
}

/**
 * Waits for one turn of the event loop (timers, I/O and the continuations of callers
 * run there); `setImmediate` costs microseconds, where `setTimeout(0)` is clamped.
 */
function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Runs the batched steps of one model. */
export class Engine {
  /** The model's planned step graph. */
  readonly plans: ModelPlans;
  /** The shared KV pool. */
  readonly pool: KvPool;
  readonly #vocab: number;
  readonly #queue: Request[] = [];
  readonly #live = new Set<SequenceState>();
  #exec: Executable | undefined;
  #execPages = 0;
  #looping = false;
  #disposed = false;
  /** The tail of the lock that steps and pool reads/writes take, one at a time. */
  #tail: Promise<unknown> = Promise.resolve();
  #steps = 0;
  readonly #profiled = new Set<string>();
  // Step inputs and outputs, reused by every step.
  readonly #tokens: Int32Array;
  readonly #positions: Int32Array;
  readonly #seqOf: Int32Array;
  readonly #pages: Int32Array;
  readonly #rows: Int32Array;
  readonly #logits: Float32Array;
  /** The step's requests and how many of their tokens it runs. */
  readonly #stepRequests: Request[] = [];
  readonly #stepCounts: Int32Array;

  /**
   * An engine with nothing queued.
   * @param plans the model's plans
   * @param pool the KV pool the plans compile against
   */
  constructor(plans: ModelPlans, pool: KvPool) {
    this.plans = plans;
    this.pool = pool;
    this.#vocab = plans.config.vocabSize;
    const T = plans.stepTokens;
    this.#tokens = new Int32Array(T);
    this.#positions = new Int32Array(T);
    this.#seqOf = new Int32Array(T);
    this.#pages = new Int32Array(T * plans.pagesPerSeq);
    this.#rows = new Int32Array(plans.logitRows);
    this.#logits = new Float32Array(plans.logitRows * this.#vocab);
    this.#stepCounts = new Int32Array(T);
  }

  /** Sequences made and not yet disposed. */
  get liveSequences(): number {
    return this.#live.size;
  }

  /** Steps run so far. */
  get steps(): number {
    return this.#steps;
  }

  /** A new, empty sequence's state. */
  newSequence(): SequenceState {
    if (this.#disposed) throw new DisposedError("model");
    const s = new SequenceState(this.pool, this.#vocab);
    this.#live.add(s);
    return s;
  }

  /** Gives a sequence's pages back and refuses its queued evaluation. */
  disposeSequence(s: SequenceState): void {
    if (s.disposed) return;
    s.disposed = true;
    this.#live.delete(s);
    const i = this.#queue.findIndex((r) => r.state === s);
    if (i >= 0) this.#queue.splice(i, 1)[0].reject(new DisposedError("sequence"));
    s.table.clear();
  }

  /**
   * Queues `tokens` of `s` (which must not change until the promise settles) and
   * resolves with the logits once they are all evaluated: the last token's (the
   * state's reused buffer), or with `"all"` a new `tokens.length × vocab` array.
   * Tokens of finished steps stay in the cache when the signal aborts.
   */
  evaluate(s: SequenceState, tokens: ArrayLike<number>, mode: LogitsMode, signal?: AbortSignal): Promise<Float32Array> {
    if (this.#disposed) return Promise.reject(new DisposedError("model"));
    if (s.disposed) return Promise.reject(new DisposedError("sequence"));
    if (s.busy) return Promise.reject(new TypeError("Cannot evaluate on a sequence that is evaluating already"));
    if (signal?.aborted) return Promise.reject(signal.reason);
    s.busy = true;
    const out = mode === "all" ? new Float32Array(tokens.length * this.#vocab) : s.logits;
    return new Promise<Float32Array>((resolve, reject) => {
      const settle = <A>(f: (a: A) => void) => (a: A) => {
        s.busy = false;
        f(a);
      };
      this.#queue.push({
        state: s,
        tokens,
        mode,
        out,
        signal,
        resolve: settle(resolve),
        reject: settle(reject),
        done: 0,
      });
      this.#kick();
    });
  }

  /**
   * Runs `fn` when no step runs (reads and writes of the pool's tensors outside the
   * steps: saving, restoring), and holds the steps back until it settles.
   */
  exclusive<T>(fn: () => T | Promise<T>): Promise<T> {
    const run = this.#tail.then(fn);
    this.#tail = run.catch(() => {});
    return run;
  }

  /** Refuses what is queued, waits for the running step, and frees the executable and the pool. */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const r of this.#queue.splice(0)) r.reject(new DisposedError("model"));
    await this.exclusive(() => {
      this.#exec?.dispose();
      this.#exec = undefined;
      for (const s of this.#live) s.disposed = true;
      this.#live.clear();
      this.pool.dispose();
    });
  }

  #kick(): void {
    if (this.#looping) return;
    this.#looping = true;
    void this.#loop();
  }

  async #loop(): Promise<void> {
    try {
      while (this.#queue.length > 0 && !this.#disposed) {
        // Callers whose tokens the last step computed submit their next ones here, to share the next step.
        await yieldToEventLoop();
        await this.exclusive(() => this.#step());
      }
    } finally {
      this.#looping = false;
    }
  }

  /** Forms one step from the queue and runs it; never throws (a failure rejects the step's requests). */
  async #step(): Promise<void> {
    this.#dropAborted();
    const requests = this.#stepRequests;
    requests.length = 0;
    if (!this.#form()) return;
    try {
      if (!this.#exec || this.#execPages !== this.pool.pages) await this.#compile();
      await this.#run();
    } catch (e) {
      for (const r of requests) this.#remove(r).reject(e);
    }
  }

  /** Rejects the requests whose signal aborted; their finished steps stay in the cache. */
  #dropAborted(): void {
    for (let i = this.#queue.length - 1; i >= 0; i--) {
      const r = this.#queue[i];
      if (r.signal?.aborted) this.#queue.splice(i, 1)[0].reject(r.signal.reason);
    }
  }

  /**
   * Picks the step's requests: one token of each decoding sequence first, then prompt
   * chunks in arrival order, within `stepTokens`; takes their pages (a request the pool
   * cannot hold is refused with a `KvPoolFullError`). Returns whether any was picked.
   */
  #form(): boolean {
    const requests = this.#stepRequests;
    const counts = this.#stepCounts;
    const queue = this.#queue;
    let budget = this.plans.stepTokens;
    let rows = this.plans.logitRows;
    for (let pass = 1; pass <= 2; pass++) {
      for (let i = 0; i < queue.length && budget > 0; i++) {
        const r = queue[i];
        const left = r.tokens.length - r.done;
        if ((pass === 1) !== (left === 1)) continue;
        // Rows of logits: one per token with "all", one for the last token with "last" (within the step's R).
        let n = Math.min(left, budget);
        if (r.mode === "all") n = Math.min(n, rows);
        else if (n === left && rows === 0) n--;
        if (n === 0) continue;
        const from = r.state.length;
        try {
          this.pool.reserve(r.state.table.pagesToWrite(from, from + n));
        } catch (e) {
          queue.splice(i--, 1);
          r.reject(e);
          continue;
        }
        r.state.table.prepareWrite(from, from + n);
        counts[requests.length] = n;
        requests.push(r);
        budget -= n;
        rows -= r.mode === "all" ? n : n === left ? 1 : 0;
      }
    }
    return requests.length > 0;
  }

  async #compile(): Promise<void> {
    this.#exec?.dispose();
    this.#exec = undefined;
    this.#exec = await this.plans.compile(this.pool);
    this.#execPages = this.pool.pages;
  }

  async #run(): Promise<void> {
    const exec = this.#exec!;
    const requests = this.#stepRequests;
    const counts = this.#stepCounts;
    const perSeq = this.plans.pagesPerSeq;
    const V = this.#vocab;
    let T = 0;
    let R = 0;
    for (let s = 0; s < requests.length; s++) {
      const r = requests[s];
      const start = r.state.length;
      const n = counts[s];
      const last = r.done + n === r.tokens.length;
      for (let i = 0; i < n; i++) {
        this.#tokens[T] = r.tokens[r.done + i];
        this.#positions[T] = start + i;
        this.#seqOf[T] = s;
        if (r.mode === "all" || (last && i === n - 1)) this.#rows[R++] = T;
        T++;
      }
      const pages = r.state.table.pages;
      for (let i = 0; i < pages.length; i++) this.#pages[s * perSeq + i] = pages[i];
    }
    // A step whose tokens are all mid-prompt still computes one row of logits (the graph's R is at least 1).
    if (R === 0) this.#rows[R++] = 0;
    const { llama, plan } = this.plans.planned(this.#execPages);
    const S = requests.length;
    exec.writeInput(llama.tokens.id, this.#tokens, T);
    exec.writeInput(llama.positions.id, this.#positions, T);
    exec.writeInput(llama.seqOf.id, this.#seqOf, T);
    exec.writeInput(llama.pages.id, this.#pages, S * perSeq);
    exec.writeInput(llama.logitRows.id, this.#rows, R);
    const key = T === S ? "decode" : "prefill";
    const profile = debugLevel() >= 2 && !this.#profiled.has(key) ? new Float64Array(plan.order.length) : undefined;
    await exec.run({ dims: { T, S, R } }, profile);
    if (profile) {
      this.#profiled.add(key);
      debugTimings(`${key} step of ${T} tokens of ${S} sequences`, plan, profile);
    }
    await exec.readOutput(llama.logits.id, this.#logits, R * V);
    this.#steps++;
    let row = 0;
    for (let s = 0; s < requests.length; s++) {
      const r = requests[s];
      const n = counts[s];
      const state = r.state;
      const last = r.done + n === r.tokens.length;
      if (r.mode === "all") {
        r.out.set(this.#logits.subarray(row * V, (row + n) * V), r.done * V);
        row += n;
      } else if (last) {
        r.out.set(this.#logits.subarray(row * V, (row + 1) * V));
        row++;
      }
      if (state.disposed) continue; // disposed during the step: already refused
      for (let i = 0; i < n; i++) state.tokens.push(r.tokens[r.done + i]);
      state.evaluated += n;
      r.done += n;
      if (last) this.#remove(r).resolve(r.out);
    }
  }

  /** Takes `r` off the queue and returns it. */
  #remove(r: Request): Request {
    const i = this.#queue.indexOf(r);
    if (i >= 0) this.#queue.splice(i, 1);
    return r;
  }
}
