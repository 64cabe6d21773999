/**
 * How long a native step should take, and how many threads it runs on: a fixed
 * count when the caller asked for one, else one thread for steps too small to
 * share, else a measured choice between one thread and all of them, made per class
 * of steps (single-token decode, small batches, batches of decode tokens, prompt
 * chunks: each class is bound by something else, memory or compute).
 *
 * @module
 */

import type { DimBindings } from "../../graph/ir.ts";

/** Multiply-adds a single thread does per millisecond, for the default thread choice. */
const MACS_PER_MS = 20e6;
/** Weight (and KV cache) bytes a single thread streams per millisecond (decode). */
const BYTES_PER_MS = 15e6;
/** A step estimated below this many milliseconds on one thread runs on one thread. */
const PARALLEL_MIN_MS = 1.5;
/** A decode step estimated at this many single-thread milliseconds starts on every thread. */
const DECODE_PARALLEL_MS = 40;
/** Times kept per thread count. */
const SAMPLES = 5;
/** A class switches thread counts when the other's median time per unit is below this share of its own. */
const SWITCH_GAIN = 0.9;
/**
 * Upper ends (exclusive) of the step classes by token count: 1 (decode of one
 * sequence), 2-7, 8-63 (batched decode of many sequences) and from 64 (prompt
 * chunks). A step's time per unit of estimated work is comparable within a class.
 */
const CLASS_ENDS = [2, 8, 64, Infinity];

/** The matmul work of one node: its rows (a number, or a symbolic dimension) times `macsPerRow`. */
export interface MatmulWork {
  /** What the node's rows are: a fixed count, or the dimension they run over (`"T"`, `"R"`). */
  readonly rows: number | string;
  /** Multiply-adds per row (K × N). */
  readonly macsPerRow: number;
}

/** The attention work of one node: per token, the rows it attends over. */
export interface AttentionWork {
  /** The dimension (or fixed count) of the node's tokens. */
  readonly rows: number | string;
  /** The graph input holding each token's position. */
  readonly positions: number;
  /** The node's window (0: every position up to the token's). */
  readonly window: number;
  /** Multiply-adds per attended row (scores and values over every head). */
  readonly macsPerRow: number;
  /** Cache bytes read per attended row (key and value). */
  readonly bytesPerRow: number;
}

/** The work of one plan, for estimating a step's single-thread time. */
export interface PlanWork {
  /** Every matmul. */
  readonly matmuls: readonly MatmulWork[];
  /** Every attention node. */
  readonly attention: readonly AttentionWork[];
  /** Weight bytes a step reads (every matmul's weight). */
  readonly weightBytes: number;
}

/** The positions a step's tokens have, by input id (a view of the arena: read, never kept). */
export type PositionsOf = (inputId: number) => Int32Array;

/**
 * A plan's estimated single-thread milliseconds per step, by compute and by the
 * bytes streamed (weights, and the KV rows attention reads, which grow with the
 * context). Allocates nothing per step.
 */
export class StepCost {
  readonly #work: PlanWork;
  readonly #positionsOf: PositionsOf;

  /**
   * The cost model of one plan.
   * @param work the plan's work
   * @param positionsOf the positions a step's tokens have, for attention
   */
  constructor(work: PlanWork, positionsOf: PositionsOf) {
    this.#work = work;
    this.#positionsOf = positionsOf;
  }

  /** Single-thread milliseconds a step with dimensions `dims` should take (its positions already written). */
  ms(dims: DimBindings): number {
    const { matmuls, attention, weightBytes } = this.#work;
    let macs = 0, bytes = weightBytes;
    for (let i = 0; i < matmuls.length; i++) macs += rowsOf(matmuls[i].rows, dims) * matmuls[i].macsPerRow;
    for (let i = 0; i < attention.length; i++) {
      const a = attention[i];
      const positions = this.#positionsOf(a.positions);
      const tokens = Math.min(rowsOf(a.rows, dims), positions.length);
      let rows = 0;
      for (let t = 0; t < tokens; t++) rows += a.window > 0 ? Math.min(positions[t] + 1, a.window) : positions[t] + 1;
      macs += rows * a.macsPerRow;
      bytes += rows * a.bytesPerRow;
    }
    return Math.max(macs / MACS_PER_MS, bytes / BYTES_PER_MS);
  }
}

function rowsOf(rows: number | string, dims: DimBindings): number {
  return typeof rows === "number" ? rows : dims[rows] ?? 1;
}

/**
 * Picks 1 or `max` threads for one class of steps by timing both: whether a second
 * thread pays depends on the machine and on how busy it is (a worker that loses
 * its core stalls every barrier), which no fixed rule knows. The class starts with
 * a prior guess (two steps) and times the other count once; a count that looks
 * better is timed once more before the class moves to it, and the class moves only
 * when the other's median time per unit of work is clearly lower ({@link SWITCH_GAIN}):
 * one step slowed by a busy moment on a shared machine must not send a class of
 * compute-bound batches to one thread, and a clearly worse count costs one step. The
 * count the class does not run is re-timed every 64 steps, so the choice follows
 * the machine.
 */
class ThreadTuner {
  readonly #max: number;
  /** The last few times per unit of work on one thread, and on `max` threads. */
  readonly #one: number[] = [];
  readonly #many: number[] = [];
  /** Room to sort a copy of either list in, so that a choice allocates nothing. */
  readonly #sorted = new Float64Array(SAMPLES);
  /** The count the class runs on once the other was timed (0: not chosen yet). */
  #current = 0;
  #steps = 0;

  constructor(max: number) {
    this.#max = max;
  }

  /** @param prior the count to start with (1 or the maximum) */
  choose(prior: number): number {
    this.#steps++;
    if (this.#current === 0) {
      const other = prior === 1 ? this.#max : 1;
      const priorSamples = prior === 1 ? this.#one : this.#many;
      const otherSamples = prior === 1 ? this.#many : this.#one;
      if (priorSamples.length < 2) return prior;
      if (otherSamples.length < 1) return other;
      // One good time of the other count is checked once more before anything moves.
      if (otherSamples.length < 2 && this.#better(otherSamples, priorSamples)) return other;
      this.#current = prior;
    }
    const current = this.#current;
    const mine = current === 1 ? this.#one : this.#many, theirs = current === 1 ? this.#many : this.#one;
    if (theirs.length >= 2 && this.#better(theirs, mine)) this.#current = current === 1 ? this.#max : 1;
    if (this.#steps % 64 === 0) return this.#current === 1 ? this.#max : 1;
    return this.#current;
  }

  /** Whether the times `a` are clearly below the times `b` (medians, {@link SWITCH_GAIN}). */
  #better(a: readonly number[], b: readonly number[]): boolean {
    return this.#median(a) < SWITCH_GAIN * this.#median(b);
  }

  record(threads: number, msPerUnit: number): void {
    const list = threads === 1 ? this.#one : this.#many;
    list.push(msPerUnit);
    if (list.length > SAMPLES) list.shift();
  }

  /**
   * The lower median of `a`: the median of an odd count, the better of two (a shared machine's noise is
   * slow steps, so of two times the lower says more). Insertion sort of a copy: at most {@link SAMPLES}.
   */
  #median(a: readonly number[]): number {
    const s = this.#sorted;
    for (let i = 0; i < a.length; i++) {
      let j = i;
      while (j > 0 && s[j - 1] > a[i]) {
        s[j] = s[j - 1];
        j--;
      }
      s[j] = a[i];
    }
    return s[(a.length - 1) >> 1];
  }
}

/** The class of a step of `T` tokens: an index into {@link CLASS_ENDS}. */
function stepClass(T: number): number {
  let c = 0;
  while (T >= CLASS_ENDS[c]) c++;
  return c;
}

/** The thread choice of one executable: {@link ThreadPolicy.choose} before a step, `record` after it. */
export class ThreadPolicy {
  readonly #max: number;
  readonly #fixed: number | undefined;
  readonly #tuners: ThreadTuner[];

  /**
   * A tuner for one plan's steps.
   * @param max the most threads a step may use (the pool's size)
   * @param fixed the count every step uses, or undefined to choose per step
   */
  constructor(max: number, fixed: number | undefined) {
    this.#max = max;
    this.#fixed = fixed;
    this.#tuners = CLASS_ENDS.map(() => new ThreadTuner(max));
  }

  /** The threads a step of `T` tokens estimated at `ms` single-thread milliseconds runs on. */
  choose(T: number, ms: number): number {
    if (this.#fixed !== undefined) return this.#fixed;
    if (ms < PARALLEL_MIN_MS || this.#max === 1) return 1;
    // Prior: batches and prompt chunks are compute-bound and gain from every core; decode of a small model
    // loses more to waking a worker than it gains, a large one is bound by memory bandwidth, which two cores raise.
    const prior = T > 1 || ms >= DECODE_PARALLEL_MS ? this.#max : 1;
    return this.#tuners[stepClass(T)].choose(prior);
  }

  /** Records how long a step of `T` tokens estimated at `ms` took on `threads` threads, for later choices. */
  record(T: number, ms: number, threads: number, elapsedMs: number): void {
    if (this.#fixed !== undefined || ms < PARALLEL_MIN_MS) return;
    this.#tuners[stepClass(T)].record(threads, elapsedMs / ms);
  }
}
