/**
 * `loadModel` and the {@link Model} it returns: a tokenizer, weights resident on a
 * backend, and the planned graphs, with streaming generation on top.
 *
 * @module
 */

import "../backends/builtin.ts";
import { type Backend, type DeviceTensor, UnsupportedError } from "../backends/contract.ts";
import { createBackend } from "../backends/registry.ts";
import { isKvDType, isWeightDType, KV_DTYPES, type KvDType, WEIGHT_DTYPES, type WeightDType } from "../graph/dtype.ts";
import type { Graph } from "../graph/ir.ts";
import { type LlamaConfig, parseConfig } from "./arch/config.ts";
import { readJsonFile } from "./files/json.ts";
import {
  checkGenerateOptions,
  type GeneratedToken,
  type GenerateOptions,
  TokenGenerator,
} from "./generate/token_generator.ts";
import { type TextStream, textStream, type TokenStream, tokenStream } from "./generate/streams.ts";
import { resolveModelSource } from "./files/hub.ts";
import { type LogitsMode, ModelPlans } from "./exec/plans.ts";
import { resolveSampling, Sampler } from "./generate/sampler.ts";
import { ContextOverflowError, Sequence } from "./exec/sequence.ts";
import { TextTokenizer } from "./text/tokenizer.ts";
import { type LoadProgress, readWeights } from "./files/weights.ts";
import { convertWeight } from "./files/weight_dtype.ts";

export type { GeneratedToken, GenerateOptions, LoadProgress, TextStream, TokenStream, WeightDType };
export { KV_DTYPES, type KvDType };

/** Options of {@link loadModel}. */
export interface LoadOptions {
  /** Backend name (`"ts"`, `"native"`, `"webgpu"`). Default `"ts"`. */
  backend?: string;
  /**
   * Worker threads, for backends that have them. The native backend caps it at the cores available
   * (its description says so); without it, it measures 1 thread against every core per class of
   * steps and runs the faster, which is the fastest choice.
   */
  threads?: number;
  /** Context length (KV cache rows per sequence). Default: the config's maximum, capped at 4096. */
  contextLength?: number;
  /** Most tokens evaluated in one step while reading a prompt. Default 64. */
  prefillChunk?: number;
  /**
   * Weight dtype to hold the model in (converted at load). Default: as stored. Norms
   * stay f32; quantized types fall back to f16 for rows that are not whole blocks.
   */
  dtype?: WeightDType;
  /**
   * Dtype of the KV cache: `"f32"` (default) or `"f16"`, which halves the cache's
   * memory and the bytes attention reads per token, at f16 rounding of keys and values.
   */
  kvDtype?: KvDType;
  /** Called as files download, tensors load and, with {@link LoadOptions.dtype}, tensors convert. */
  onProgress?: (p: LoadProgress) => void;
  /**
   * Check every weight once at load for NaN and ±Infinity, refusing the model with a
   * `NonFiniteTensorError` naming the tensor and the element (as llama.cpp's `--check-tensors`, but
   * on by default: one pass over the bytes, small next to reading them). Default `true`; `false`
   * skips the pass for weights you trust.
   */
  checkWeights?: boolean;
}

/** Options of the {@link Model} constructor: the settings {@link loadModel} checked. */
export interface ModelOptions {
  /** Positions each sequence holds. */
  contextLength: number;
  /** Most tokens evaluated in one step while reading a prompt. */
  prefillChunk: number;
  /** Dtype of the KV cache. Default `"f32"`. */
  kvDtype?: KvDType;
  /** Milliseconds the load took, for {@link Model.loadMs}. Default 0. */
  loadMs?: number;
}

/** A loaded model, ready to generate. */
export class Model {
  /** The model folder. */
  readonly dir: string;
  /** The model's shape and settings, from its `config.json` (embedding tying settled by the weight files). */
  readonly config: LlamaConfig;
  /** The model's tokenizer, from its `tokenizer.json`. */
  readonly tokenizer: TextTokenizer;
  /** The backend that holds the weights and runs the steps. */
  readonly backend: Backend;
  /** Total bytes of the weights as held by the backend. */
  readonly weightBytes: number;
  /** Milliseconds {@link loadModel} took: finding the folder (a download included), reading, converting, uploading. */
  readonly loadMs: number;
  readonly #plans: ModelPlans;
  readonly #weights: Map<string, DeviceTensor>;
  readonly #live = new Set<Sequence>();
  /** Sequences of finished generations, kept with their compiled steps for the next one. */
  readonly #idle: Sequence[] = [];
  #disposed = false;

  /**
   * A model over weights already on `backend`. Use {@link loadModel}, which checks the options.
   *
   * @param dir the model folder
   * @param config the parsed config
   * @param tokenizer the loaded tokenizer
   * @param backend the backend holding `weights`
   * @param weights every weight the config needs, by Hugging Face name
   * @param options context length, prefill chunk, KV cache dtype
   */
  constructor(
    dir: string,
    config: LlamaConfig,
    tokenizer: TextTokenizer,
    backend: Backend,
    weights: Map<string, DeviceTensor>,
    options: ModelOptions,
  ) {
    this.dir = dir;
    this.loadMs = options.loadMs ?? 0;
    this.config = config;
    this.tokenizer = tokenizer;
    this.backend = backend;
    this.#weights = weights;
    this.weightBytes = [...weights.values()].reduce((a, t) => a + t.byteLength, 0);
    this.#plans = new ModelPlans(config, backend, weights, {
      prefillChunk: options.prefillChunk,
      capacity: options.contextLength,
      kvDtype: options.kvDtype ?? "f32",
    });
  }

  /** The dtype of each sequence's KV cache. */
  get kvDtype(): KvDType {
    return this.#plans.kvDtype;
  }

  /** Positions each sequence holds. */
  get contextLength(): number {
    return this.#plans.capacity;
  }

  /** The model's forward graph (for printing): `"last"` gives only the last token's logits (decode), `"all"` every token's. */
  graph(logits: LogitsMode = "last"): Graph {
    return this.#plans.planned(logits).llama.graph;
  }

  /**
   * Sequences of this model not yet disposed: those of {@link Model.createSequence}, those of
   * generations running or abandoned but not yet collected, and the few kept for the next generation.
   */
  get liveSequences(): number {
    return this.#live.size;
  }

  /** A new, empty sequence with its own KV cache. Dispose it when done. */
  createSequence(): Sequence {
    const s = new Sequence(this.#plans, (d) => this.#live.delete(d));
    this.#live.add(s);
    return s;
  }

  /** Token ids of a prompt; throws a {@link ContextOverflowError} if it cannot fit. */
  encodePrompt(prompt: string | readonly number[], options: { addSpecialTokens?: boolean } = {}): number[] {
    const ids = typeof prompt === "string" ? this.tokenizer.encode(prompt, options) : [...prompt];
    if (ids.length === 0) {
      if (this.tokenizer.bosId === undefined) {
        throw new RangeError("Cannot generate from an empty prompt: the tokenizer has no BOS token");
      }
      ids.push(this.tokenizer.bosId);
    }
    if (ids.length >= this.contextLength) throw new ContextOverflowError(ids.length + 1, this.contextLength);
    return ids;
  }

  /**
   * Streams the continuation of `prompt` (text, or token ids) as text pieces.
   * Throws at once for bad options or a prompt past the context, having taken nothing.
   *
   * The stream holds a sequence (a KV cache) until it ends: read to the end, `cancel()`ed (which
   * stops even a prompt's evaluation at the next chunk), errored, or stopped by the signal. A stream
   * dropped before then gives its sequence back when the garbage collector collects it, which may be
   * much later: cancel a stream you stop reading.
   *
   * @example
   * ```ts ignore
   * const model = await loadModel("../shared/models/story");
   * const stream = model.generate("Once upon a time", { maxTokens: 50, seed: 1 });
   * for await (const piece of stream) console.log(piece);
   * console.log(stream.stats.decodeTokensPerSecond);
   * ```
   */
  generate(prompt: string | readonly number[], options: GenerateOptions = {}): TextStream {
    const [gen, end] = this.#generator(prompt, options);
    return textStream(gen, end);
  }

  /** Like {@link Model.generate}, but streams tokens with their log-probabilities. */
  generateTokens(prompt: string | readonly number[], options: GenerateOptions = {}): TokenStream {
    const [gen, end] = this.#generator(prompt, options);
    return tokenStream(gen, end);
  }

  /**
   * Continues `sequence` with `prompt` (may be empty to continue from its last token): a
   * {@link TokenGenerator} to call `next()` on, for callers that manage their own sequences (chat
   * sessions, the server).
   */
  continueSequence(sequence: Sequence, prompt: readonly number[], options: GenerateOptions = {}): TokenGenerator {
    return new TokenGenerator(sequence, prompt, this.tokenizer, this.#sampler(options), options);
  }

  /** Frees the sequences, weights and backend. */
  async dispose(): Promise<void> {
    this.#disposed = true;
    for (const s of [...this.#live]) await s.dispose();
    this.#live.clear();
    this.#idle.length = 0;
    for (const t of this.#weights.values()) this.backend.release(t);
    this.backend.dispose();
  }

  /** A sampler for `options`, checked against the vocabulary and the context. */
  #sampler(options: GenerateOptions): Sampler {
    const vocab = this.config.vocabSize;
    return new Sampler(resolveSampling(options, vocab, this.contextLength), vocab);
  }

  #generator(prompt: string | readonly number[], options: GenerateOptions): [TokenGenerator, () => void] {
    // Everything that can refuse runs before a sequence is taken, so a refusal leaves nothing behind.
    checkGenerateOptions(options);
    const ids = this.encodePrompt(prompt, { addSpecialTokens: options.addSpecialTokens });
    const sampler = this.#sampler(options);
    const seq = this.#idle.pop() ?? this.createSequence();
    const release = () => {
      if (this.#disposed) return; // dispose() freed it
      seq.truncate(0);
      if (this.#idle.length < 2) this.#idle.push(seq);
      else void seq.dispose();
    };
    try {
      return [new TokenGenerator(seq, ids, this.tokenizer, sampler, options), release];
    } catch (e) {
      release();
      throw e;
    }
  }
}

/**
 * Loads a model from a folder in Hugging Face layout, a Hugging Face id, or a
 * name in the `LLM_MODELS_DIR` mirror.
 *
 * @example
 * ```ts ignore
 * const model = await loadModel("../shared/models/story", { backend: "ts" });
 * await model.generate("Once upon a time", { maxTokens: 20, seed: 1 })
 *   .pipeThrough(new TextEncoderStream())
 *   .pipeTo(Deno.stdout.writable, { preventClose: true }); // stdout stays open for what follows
 * console.log(`\n${model.loadMs.toFixed(0)} ms to load`);
 * ```
 */
export async function loadModel(source: string, options: LoadOptions = {}): Promise<Model> {
  const started = performance.now();
  const dir = await resolveModelSource(source, { onProgress: options.onProgress });
  const config = parseConfig(await readJsonFile(`${dir}/config.json`), `${dir}/config.json`);
  const tokenizer = await TextTokenizer.load(dir, config.eosTokenIds);
  if (tokenizer.vocabSize > config.vocabSize) {
    throw new RangeError(
      `Cannot use tokenizer "${dir}/tokenizer.json": it has ${tokenizer.vocabSize} tokens, more than vocab_size ${config.vocabSize}`,
    );
  }
  const contextLength = options.contextLength ?? Math.min(config.maxPositions, 4096);
  if (!Number.isInteger(contextLength) || contextLength < 2 || contextLength > config.maxPositions) {
    throw new RangeError(
      `Invalid contextLength ${contextLength}: expected an integer from 2 to ${config.maxPositions}`,
    );
  }
  const prefillChunk = options.prefillChunk ?? 64;
  if (!Number.isInteger(prefillChunk) || prefillChunk < 1 || prefillChunk > 4096) {
    throw new RangeError(`Invalid prefillChunk ${prefillChunk}: expected an integer from 1 to 4096`);
  }
  const dtype = options.dtype;
  if (dtype !== undefined && !isWeightDType(dtype)) {
    throw new TypeError(`Invalid dtype "${dtype}": expected one of ${WEIGHT_DTYPES.join(", ")}`);
  }
  const kvDtype = options.kvDtype ?? "f32";
  if (!isKvDType(kvDtype)) {
    throw new TypeError(`Invalid kvDtype "${kvDtype}": expected one of ${KV_DTYPES.join(", ")}`);
  }
  if (options.checkWeights !== undefined && typeof options.checkWeights !== "boolean") {
    throw new TypeError(`Invalid checkWeights ${JSON.stringify(options.checkWeights)}: expected a boolean`);
  }
  const host = await readWeights(dir, config, options.onProgress, { checkWeights: options.checkWeights });
  const backend = await createBackend(options.backend ?? "ts", { threads: options.threads });
  const weights = new Map<string, DeviceTensor>();
  try {
    if (!backend.supports("attention", kvDtype)) {
      throw new UnsupportedError(`Backend "${backend.name}" cannot hold a "${kvDtype}" KV cache`);
    }
    let converted = 0;
    for (const [name, t] of host.tensors) {
      if (dtype === undefined) {
        weights.set(name, backend.upload(t));
        continue;
      }
      weights.set(name, backend.upload(convertWeight(t, dtype)));
      options.onProgress?.({ phase: "convert", name, converted: ++converted, total: host.tensors.size, dtype });
    }
  } catch (e) {
    backend.dispose();
    throw e;
  }
  const loadMs = performance.now() - started;
  return new Model(dir, host.config, tokenizer, backend, weights, { contextLength, prefillChunk, kvDtype, loadMs });
}
