/**
 * Finding a model's weights in its safetensors files: every tensor the graph
 * needs, by Hugging Face name, checked against the config's shapes. Handles tied
 * embeddings, including files that store the shared table only once and say so
 * in `__metadata__` (the story model keeps it as `lm_head.weight`): that is the one
 * alias a file may declare, so no metadata can substitute one tensor for another.
 * Every weight is checked once for NaN and ±Infinity unless the caller opts out.
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
import { findNonFinite } from "./weight_dtype.ts";

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

/** A weight that holds NaN or ±Infinity; names the tensor, its file, the element and its value. */
export class NonFiniteTensorError extends WeightsError {
  /** The tensor at fault, by its name in the file. */
  readonly tensor: string;
  /** The first non-finite element's index in the tensor. */
  readonly index: number;
  /** Its value: NaN, Infinity or -Infinity. */
  readonly value: number;
  /**
   * An error naming the folder, the tensor, its file, the element and its value.
   *
   * @param dir the model folder
   * @param file the safetensors file that holds the tensor
   * @param tensor the tensor's name in the file
   * @param index the element's index
   * @param value the element's value
   */
  constructor(dir: string, file: string, tensor: string, index: number, value: number) {
    super(dir, `tensor "${tensor}" in "${file}" has element ${index} = ${value}: expected a finite number`);
    this.name = "NonFiniteTensorError";
    this.tensor = tensor;
    this.index = index;
    this.value = value;
  }
}

/** Options of {@link readWeights}. */
export interface ReadWeightsOptions {
  /**
   * Check every weight for NaN and ±Infinity once, refusing the folder with a
   * {@link NonFiniteTensorError} (as llama.cpp's `--check-tensors`, but on by default: it costs one
   * pass over the bytes, small next to reading them). Default `true`.
   */
  readonly checkWeights?: boolean;
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
 * The aliases the files' `__metadata__` declare, by the name asked for. The only one accepted is
 * the tied table stored once (`model.embed_tokens.weight` as `lm_head.weight`, or the other way),
 * and only when the files do not also store it under the aliased name; any other entry that names
 * a weight of the layout or a stored tensor is refused, since honouring it would let a file put
 * one tensor in another's place. Other entries (`"format": "pt"`) are free text and ignored.
 */
function tensorAliases(
  dir: string,
  files: readonly SafetensorsFile[],
  stored: ReadonlyMap<string, HostTensor>,
  layout: ReadonlySet<string>,
): Map<string, string> {
  const { embedding, lmHead } = WEIGHT_NAMES;
  const aliases = new Map<string, string>();
  for (const f of files) {
    for (const [k, v] of Object.entries(f.metadata)) {
      if (k === v) continue; // a name for itself changes nothing
      const entry = `"__metadata__" entry ${JSON.stringify(k)}: ${JSON.stringify(v)} in "${f.file}"`;
      const tied = (k === embedding && v === lmHead) || (k === lmHead && v === embedding);
      if (tied && stored.has(k)) {
        throw new WeightsError(dir, `${entry} aliases "${k}", which the files also store: expected one or the other`);
      }
      if (tied) aliases.set(k, v);
      else if (layout.has(k) || stored.has(k)) {
        throw new WeightsError(
          dir,
          `${entry} would load tensor ${JSON.stringify(v)} in place of ${
            JSON.stringify(k)
          }: the only alias accepted is the tied "${embedding}" / "${lmHead}"`,
        );
      }
    }
  }
  return aliases;
}

/**
 * Reads every weight the config needs from the folder's safetensors files.
 * 1-D tensors (norms) are returned as f32; the others keep their stored dtype.
 * Each weight is checked once for NaN and ±Infinity unless `options.checkWeights` is false.
 */
export async function readWeights(
  dir: string,
  parsed: LlamaConfig,
  onProgress?: (p: LoadProgress) => void,
  options: ReadWeightsOptions = {},
): Promise<ModelWeights> {
  const files: SafetensorsFile[] = [];
  for (const path of await safetensorsFiles(dir)) files.push(await readSafetensors(path));
  const all = new Map<string, HostTensor>();
  const fileOf = new Map<HostTensor, string>();
  for (const f of files) {
    for (const [name, t] of f.tensors) {
      if (all.has(name)) throw new WeightsError(dir, `tensor "${name}" appears in more than one file`);
      all.set(name, t);
      fileOf.set(t, f.file);
    }
  }
  // Every weight name of the layout, the output head included whether or not it is tied.
  const layout = new Set(weightShapes({ ...parsed, tieWordEmbeddings: false }).keys());
  const aliases = tensorAliases(dir, files, all, layout);

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
  const checked = new Set<HostTensor>(); // a tied table is one tensor under two names: checked once
  let loaded = 0;
  for (const [name, shape] of shapes) {
    const t = find(name);
    if (!t) throw new WeightsError(dir, `tensor "${name}" is missing`);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new WeightsError(dir, `tensor "${name}" has shape [${t.shape}], but the config implies [${shape}]`);
    }
    if (options.checkWeights !== false && !checked.has(t)) {
      const bad = findNonFinite(t);
      if (bad) throw new NonFiniteTensorError(dir, fileOf.get(t) ?? dir, t.name, bad.index, bad.value);
      checked.add(t);
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
