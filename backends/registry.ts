/**
 * The backend registry: backends register a factory under a name, and callers
 * create one by name. Backends that need a permission or platform feature (FFI,
 * WebGPU) live behind their own entry points and are imported only when asked
 * for, so importing the core needs neither `--allow-ffi` nor a GPU.
 *
 * @module
 */

import type { Backend, BackendOptions } from "./contract.ts";

/** Creates a backend; may fail (no library, no adapter) with a typed error. */
export type BackendFactory = (options: BackendOptions) => Promise<Backend>;

const factories = new Map<string, BackendFactory>();

/** Backends whose module is loaded on first use; loading registers them. */
const lazyModules: Record<string, () => Promise<unknown>> = {};

/** Registers (or replaces) a backend factory under `name`. */
export function registerBackend(name: string, factory: BackendFactory): void {
  factories.set(name, factory);
}

/** Declares a backend whose module is imported the first time it is asked for. */
export function registerLazyBackend(name: string, load: () => Promise<unknown>): void {
  lazyModules[name] = load;
}

/** Names of every backend that can be asked for. */
export function backendNames(): string[] {
  return [...new Set([...factories.keys(), ...Object.keys(lazyModules)])];
}

/** Thrown when no backend of that name exists. */
export class UnknownBackendError extends TypeError {
  /**
   * Creates the error, listing the names that exist.
   * @param name the name that was asked for
   */
  constructor(name: string) {
    super(`Cannot find backend "${name}": expected one of ${backendNames().map((n) => `"${n}"`).join(", ")}`);
    this.name = "UnknownBackendError";
  }
}

/** Creates the backend registered as `name`. */
export async function createBackend(name: string, options: BackendOptions = {}): Promise<Backend> {
  if (!factories.has(name) && lazyModules[name]) await lazyModules[name]();
  const factory = factories.get(name);
  if (!factory) throw new UnknownBackendError(name);
  return await factory(options);
}
