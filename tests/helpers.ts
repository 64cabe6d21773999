/**
 * Shared test helpers: shared-folder paths, seeded data, closeness checks, and
 * the list of backends available on this machine.
 *
 * @module
 */

import "../backends/builtin.ts";
import type { Backend, Executable } from "../backends/contract.ts";
import { backendNames, createBackend, registerBackend } from "../backends/registry.ts";
import { TsBackend } from "../backends/ts/backend.ts";
import { Rng } from "../models/generate/sampler.ts";

/** The shared folder beside the project (models and references). */
export const SHARED: string = new URL("../../shared", import.meta.url).pathname;
/** The real TinyStories-656K model. */
export const STORY_DIR: string = `${SHARED}/models/story`;
/** The config and tokenizer of the minueza 32M chat model (no weights). */
export const MINUEZA_DIR: string = `${SHARED}/models/minueza-32m-shape`;

/** `n` values uniform in [-scale, scale), deterministic for a seed. */
export function randomF32(n: number, seed: number, scale = 1): Float32Array {
  const rng = new Rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (rng.next() * 2 - 1) * scale;
  return out;
}

/**
 * Asserts `|actual - expected| <= tol * max(1, max|expected|)` element-wise, naming
 * the first element that differs.
 */
export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  if (actual.length !== expected.length) {
    throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  }
  let scale = 1;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]));
  let worst = 0;
  let at = -1;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  if (!(worst <= tol * scale)) {
    throw new Error(
      `${what}: element ${at} is ${actual[at]}, expected ${expected[at]} (difference ${worst}, tolerance ${
        tol * scale
      })`,
    );
  }
}

/** A backend that could be created here, or why not. */
export type BackendProbe = { name: string; backend: Backend } | { name: string; skip: string };

/** Tries to create every registered backend. */
export async function probeBackends(): Promise<BackendProbe[]> {
  const out: BackendProbe[] = [];
  for (const name of backendNames()) {
    try {
      out.push({ name, backend: await createBackend(name) });
    } catch (e) {
      out.push({ name, skip: (e as Error).message });
    }
  }
  return out;
}

/**
 * Registers `name` as the ts backend with `beforeStep` called (and awaited) before
 * every step it runs: tests count steps with it, or pace them so that a generation
 * surely outlasts what the test does meanwhile.
 */
export function registerInstrumentedTs(name: string, beforeStep: () => void | Promise<void>): void {
  registerBackend(name, () => {
    const ts = new TsBackend();
    const compile = async (...args: Parameters<Backend["compile"]>): Promise<Executable> => {
      const exec = await ts.compile(...args);
      const run = exec.run.bind(exec);
      exec.run = async (step, profile) => {
        await beforeStep();
        return run(step, profile);
      };
      return exec;
    };
    // A proxy, not a prototype copy: the backend's private fields need the real instance as receiver.
    const backend = new Proxy(ts, {
      get(target, key) {
        if (key === "name") return name;
        if (key === "compile") return compile;
        const v = Reflect.get(target, key, target);
        return typeof v === "function" ? v.bind(target) : v;
      },
    }) as unknown as Backend;
    return Promise.resolve(backend);
  });
}

/**
 * Watches the event loop with a 10 ms interval timer: `worst()` is the largest lag past 10 ms seen so
 * far, `stop()` clears the timer. The responsiveness tests run steps meanwhile.
 */
export function watchEventLoop(): { worst(): number; stop(): void } {
  let last = performance.now();
  let worst = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    worst = Math.max(worst, now - last - 10);
    last = now;
  }, 10);
  return { worst: () => worst, stop: () => clearInterval(timer) };
}
