/**
 * One step at a time per native backend: its executables share the library's
 * thread pool (and may share tensors: weights, the KV pool), and `pool_run` runs
 * one task at a time, so a step that starts while another runs on one of Deno's
 * blocking threads waits for it. Whatever would free or change memory a running
 * step uses (releasing a tensor, disposing an executable or the backend) waits for
 * it too.
 *
 * @module
 */

/** What a running step uses: the tensors bound to its executable. */
export interface RunningStep {
  /** Whether the step's executable binds `tensor`. */
  binds(tensor: object): boolean;
}

/** The step a backend runs now, and what waits for it to end. */
export class StepGate {
  #step: RunningStep | null = null;
  #done: Promise<void> | null = null;
  #afterIdle: (() => void)[] = [];

  /** The promise of the running step (settled only after it ended), or null when none runs. */
  get running(): Promise<void> | null {
    return this.#done;
  }

  /** Whether the running step, if any, uses `tensor`. */
  uses(tensor: object): boolean {
    return this.#step !== null && this.#step.binds(tensor);
  }

  /**
   * Marks `step` as running until `done` settles. Only one at a time: the caller
   * checks {@link StepGate.running} first.
   */
  begin(step: RunningStep, done: Promise<void>): void {
    this.#step = step;
    const end = () => this.#end();
    this.#done = done.then(end, end);
  }

  /** Runs `fn` now when no step runs, else once the running one has ended. */
  whenIdle(fn: () => void): void {
    if (this.#done) this.#afterIdle.push(fn);
    else fn();
  }

  #end(): void {
    this.#step = null;
    this.#done = null;
    const pending = this.#afterIdle.splice(0);
    for (const fn of pending) fn();
  }
}
