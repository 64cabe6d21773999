/**
 * How many threads a native step runs on: a fixed count when the caller asked for
 * one, else one thread for steps too small to share, else a measured choice
 * between one thread and all of them, made per class of steps (decode, prefill).
 *
 * @module
 */

/** Multiply-adds a single thread does per millisecond, for the default thread choice. */
const MACS_PER_MS = 20e6;
/** Weight bytes a single thread streams per millisecond (decode). */
const BYTES_PER_MS = 15e6;
/** A step estimated below this many milliseconds on one thread runs on one thread. */
const PARALLEL_MIN_MS = 1.5;
/** A decode step estimated at this many single-thread milliseconds starts on every thread. */
const DECODE_PARALLEL_MS = 40;
/** Times kept per thread count. */
const SAMPLES = 5;

/** The work of one plan, for estimating a step's single-thread time. */
export interface PlanWork {
  /** Multiply-adds per token row (every matmul's K × N). */
  readonly macsPerRow: number;
  /** Weight bytes a step reads (every matmul's weight). */
  readonly weightBytes: number;
}

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
  /** The last few times per unit of work on one thread, and on `max` threads. */
  readonly #one: number[] = [];
  readonly #many: number[] = [];
  /** Room to sort a copy of either list in, so that a choice allocates nothing. */
  readonly #sorted = new Float64Array(SAMPLES);
  #steps = 0;

  constructor(max: number) {
    this.#max = max;
  }

  /** @param prior the count to start with (1 or the maximum) */
  choose(prior: number): number {
    const other = prior === 1 ? this.#max : 1;
    const priorSamples = prior === 1 ? this.#one : this.#many;
    const otherSamples = prior === 1 ? this.#many : this.#one;
    this.#steps++;
    if (priorSamples.length < 2) return prior;
    if (otherSamples.length < 1) return other;
    const best = this.#median(this.#one) <= this.#median(this.#many) ? 1 : this.#max;
    if (this.#steps % 64 === 0) return best === 1 ? this.#max : 1;
    return best;
  }

  record(threads: number, msPerUnit: number): void {
    const list = threads === 1 ? this.#one : this.#many;
    list.push(msPerUnit);
    if (list.length > SAMPLES) list.shift();
  }

  /** The upper median of `a` (insertion sort of a copy: at most {@link SAMPLES} values). */
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
    return s[a.length >> 1];
  }
}

/** The thread choice of one executable: {@link ThreadPolicy.choose} before a step, `record` after it. */
export class ThreadPolicy {
  readonly #max: number;
  readonly #fixed: number | undefined;
  readonly #work: PlanWork;
  /** Decode steps (T = 1) and prefill steps (T > 1). */
  readonly #tuners: [ThreadTuner, ThreadTuner];

  /**
   * A tuner for one plan's steps.
   * @param max the most threads a step may use (the pool's size)
   * @param fixed the count every step uses, or undefined to choose per step
   * @param work the plan's work, for estimating a step's time
   */
  constructor(max: number, fixed: number | undefined, work: PlanWork) {
    this.#max = max;
    this.#fixed = fixed;
    this.#work = work;
    this.#tuners = [new ThreadTuner(max), new ThreadTuner(max)];
  }

  /** Single-thread milliseconds a step of `T` rows should take, by compute and by weight streaming. */
  #estimate(T: number): number {
    return Math.max(T * this.#work.macsPerRow / MACS_PER_MS, this.#work.weightBytes / BYTES_PER_MS);
  }

  /** The threads a step of `T` rows runs on. */
  choose(T: number): number {
    if (this.#fixed !== undefined) return this.#fixed;
    const ms = this.#estimate(T);
    if (ms < PARALLEL_MIN_MS || this.#max === 1) return 1;
    // Prior: prefill is compute-bound and gains from every core; decode of a small model loses more to
    // waking a worker than it gains, a large one is bound by memory bandwidth, which two cores raise.
    const prior = T > 1 || ms >= DECODE_PARALLEL_MS ? this.#max : 1;
    return this.#tuners[T === 1 ? 0 : 1].choose(prior);
  }

  /** Records how long a step of `T` rows on `threads` threads took, for later choices. */
  record(T: number, threads: number, elapsedMs: number): void {
    const ms = this.#estimate(T);
    if (this.#fixed !== undefined || ms < PARALLEL_MIN_MS) return;
    this.#tuners[T === 1 ? 0 : 1].record(threads, elapsedMs / ms);
  }
}
