/**
 * Reading a model folder's JSON files with errors that name the file.
 *
 * @module
 */

import { readAccessError } from "./read_access.ts";

/** Reads and parses a JSON object; `NotFound`, `NotCapable` (no read permission) or `SyntaxError` name the file. */
export async function readJsonFile(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new Deno.errors.NotFound(`Cannot read "${path}": the file does not exist`);
    }
    throw readAccessError(path, e) ?? e;
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new SyntaxError(`Cannot parse "${path}": ${(e as Error).message}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new SyntaxError(`Cannot parse "${path}": expected a JSON object`);
  }
  return value as Record<string, unknown>;
}
