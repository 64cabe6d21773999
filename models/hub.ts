/**
 * Resolving a model source to a local folder: a path, a name in the
 * `LLM_MODELS_DIR` mirror, or a Hugging Face id in the Hugging Face cache
 * (downloaded when missing and the network allows).
 *
 * @module
 */

import type { LoadProgress } from "./weights.ts";

/** Options of {@link resolveModelSource}. */
export interface ResolveOptions {
  /** Reports download progress. */
  onProgress?: (p: LoadProgress) => void;
}

async function isDir(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

/** The local folder holding the model named by `source`. */
export async function resolveModelSource(source: string, _options: ResolveOptions = {}): Promise<string> {
  if (await isDir(source)) return source.replace(/\/+$/, "");
  throw new Deno.errors.NotFound(
    `Cannot find model "${source}": not a folder; pass a local model folder with --model DIR`,
  );
}
