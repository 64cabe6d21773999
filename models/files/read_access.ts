/**
 * Deno's missing-permission errors as errors that name the path and the flag to grant, so that a
 * caller sees why a file could not be read instead of "not found" or "not a folder".
 *
 * @module
 */

/**
 * A `Deno.errors.NotCapable` naming `path` and `--allow-read` when `e` is Deno's refusal to read
 * it (the read permission is not granted for that path); undefined for any other error.
 */
export function readAccessError(path: string, e: unknown): Deno.errors.NotCapable | undefined {
  if (!(e instanceof Deno.errors.NotCapable)) return undefined;
  return new Deno.errors.NotCapable(`Cannot read "${path}": read access is not granted (run with --allow-read)`);
}
