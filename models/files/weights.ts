/**
 * Finding a model's weights in its safetensors files: every tensor the graph
 * needs, by Hugging Face name, checked against the config's shapes. Handles tied
 * embeddings, including files that store the shared table only once and say so
 * in `__metadata__` (the story model keeps it as `lm_head.weight`).
 *
 * @module
 */

import type { HostTensor } from "../../backends/contract.ts";
import type { WeightDType } from "../../graph/dtype.ts";
import { decodeWeights } from "../../graph/weight_codec.ts";
import { elementCount } from "../../graph/ir.ts";
import type { LlamaConfig } from "../arch/config.ts";
import { WEIGHT_NAMES, weightShapes } from "../arch/llama.ts";
import { readAccessError } from "./read_access.ts";
import { readSafetensors, type SafetensorsFile } from "./safetensors.ts";

/** A model folder whose weights do not fit its config; names the tensor and folder. */
export class WeightsError extends TypeError {
  /**
   * An error whose message names the folder, then says what is wrong.
   *
   * @param dir the model folder
   * @param message what is wrong
   */
  constructor(dir: string, message: string) {
    super(`Cannot load weights from "${dir}": ${message}`);
    this.name = "WeightsError";
  }
}

/**
 * Progress of loading a model, reported to `onProgress` callbacks, one event per step:
 *
 * - `download`: bytes of `file` received so far, of `totalBytes` (only when the model is downloaded);
 * - `tensors`: tensor `name` read from the weight files, the `loaded`-th of `total`;
 * - `convert`: tensor `name` converted to the requested `dtype` and handed to the backend, the
 *   `converted`-th of `total` (only when a weight dtype is asked for: quantizing takes a while).
 */
export type LoadProgress =
  | { readonly phase: "download"; readonly file: string; readonly loadedBytes: number; readonly totalBytes: number }
  | { readonly phase: "tensors"; readonly name: string; readonly loaded: number; readonly total: number }
  | {
    readonly phase: "convert";
    readonly name: string;
    readonly converted: number;
    readonly total: number;
    readonly dtype: WeightDType;
  };

/** Lists the `*.safetensors` files of a folder, sorted. */
export async function safetensorsFiles(dir: string): Promise<string[]> {
  const files: string[] = [];
  try {
    for await (const e of Deno.readDir(dir)) {
      if ((e.isFile || e.isSymlink) && e.name.endsWith(".safetensors")) files.push(e.name); // the HF cache links to blobs
    }
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new Deno.errors.NotFound(`Cannot read model folder "${dir}": it does not exist`);
    }
    throw readAccessError(dir, e) ?? e;
  }
  if (files.length === 0) throw new Deno.errors.NotFound(`Cannot load weights from "${dir}": no *.safetensors file`);
  return files.sort().map((f) => `${dir}/${f}`);
}

/** The weights of a model folder, and its config with embedding tying settled by the files. */
export interface ModelWeights {
  /** The config, with `tieWordEmbeddings` settled by the files when the config did not say. */
  readonly config: LlamaConfig;
  /** Every weight the config needs, by Hugging Face name. */
  readonly tensors: Map<string, HostTensor>;
}

/**
 * Reads every weight the config needs from the folder's safetensors files.
 * 1-D tensors (norms) are returned as f32; the others keep their stored dtype.
 */
export async function readWeights(
  dir: string,
  parsed: LlamaConfig,
  onProgress?: (p: LoadProgress) => void,
): Promise<ModelWeights> {
  const files: SafetensorsFile[] = [];
  for (const path of await safetensorsFiles(dir)) files.push(await readSafetensors(path));
  const all = new Map<string, HostTensor>();
  const aliases = new Map<string, string>();
  for (const f of files) {
    for (const [name, t] of f.tensors) {
      if (all.has(name)) throw new WeightsError(dir, `tensor "${name}" appears in more than one file`);
      all.set(name, t);
    }
    for (const [k, v] of Object.entries(f.metadata)) if (k !== v) aliases.set(k, v);
  }

  // A config that does not say whether the head is tied: untied only when the files hold two distinct tables.
  const stored = (name: string) => all.get(name) ?? all.get(aliases.get(name) ?? "");
  const [table, head] = [stored(WEIGHT_NAMES.embedding), stored(WEIGHT_NAMES.lmHead)];
  const config = parsed.tieWordEmbeddingsInferred
    ? { ...parsed, tieWordEmbeddings: !(table && head && table !== head) }
    : parsed;

  const find = (name: string): HostTensor | undefined => {
    const direct = stored(name);
    if (direct) return direct;
    // A tied table stored only as the output head.
    if (name === WEIGHT_NAMES.embedding && config.tieWordEmbeddings) return all.get(WEIGHT_NAMES.lmHead);
    return undefined;
  };

  const shapes = weightShapes(config);
  const out = new Map<string, HostTensor>();
  let loaded = 0;
  for (const [name, shape] of shapes) {
    const t = find(name);
    if (!t) throw new WeightsError(dir, `tensor "${name}" is missing`);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new WeightsError(dir, `tensor "${name}" has shape [${t.shape}], but the config implies [${shape}]`);
    }
    const count = elementCount(shape);
    const host = shape.length === 1 && t.dtype !== "f32"
      ? { name, dtype: "f32" as const, shape, data: new Uint8Array(decodeWeights(t.dtype, t.data, count).buffer) }
      : { ...t, name };
    out.set(name, host);
    onProgress?.({ phase: "tensors", name, loaded: ++loaded, total: shapes.size });
  }
  return { config, tensors: out };
}
