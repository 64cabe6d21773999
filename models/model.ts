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
import { ModelPlans } from "./exec/plans.ts";
import { Engine } from "./exec/engine.ts";
import { KvPool, type KvStats } from "./exec/kv_pool.ts";
import { resolveSampling, Sampler } from "./generate/sampler.ts";
import { ContextOverflowError, Sequence } from "./exec/sequence.ts";
import { TextTokenizer } from "./text/tokenizer.ts";
import { type LoadProgress, readWeights } from "./files/weights.ts";
import { convertWeight } from "./files/weight_dtype.ts";

export type { GeneratedToken, GenerateOptions, KvStats, LoadProgress, TextStream, TokenStream, WeightDType };
export { KV_DTYPES, type KvDType };

/** Rows of one page of the shared KV pool: what forks share and what the pool hands out at a time. */
export const KV_PAGE_SIZE = 16;

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
  /** Context length (the most positions one sequence holds). Default: the config's maximum, capped at 4096. */
  contextLength?: number;
  /**
   * Most tokens evaluated in one step, all sequences together: each step runs one token of every
   * decoding sequence and fills the rest with chunks of pending prompts. Default 64.
   */
  prefillChunk?: number;
  /**
   * The most tokens the KV cache pool shared by all sequences may hold (it grows on demand, a page
   * of {@link KV_PAGE_SIZE} tokens at a time, up to this; a sequence takes only the pages its tokens
   * fill). Default: 4 × the context length. A sequence that needs a page past it fails with a
   * `KvPoolFullError`.
   */
  kvCacheTokens?: number;
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
  /** Most tokens evaluated in one step, all sequences together. */
  prefillChunk: number;
  /** Dtype of the KV cache. Default `"f32"`. */
  kvDtype?: KvDType;
  /** The most tokens the shared KV pool may hold. Default: 4 × `contextLength`. */
  kvCacheTokens?: number;
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
  readonly #engine: Engine;
  readonly #weights: Map<string, DeviceTensor>;

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
    const kvDtype = options.kvDtype ?? "f32";
    this.#plans = new ModelPlans(config, backend, weights, {
      stepTokens: options.prefillChunk,
      capacity: options.contextLength,
      kvDtype,
      pageSize: KV_PAGE_SIZE,
    });
    const maxPages = Math.ceil((options.kvCacheTokens ?? 4 * options.contextLength) / KV_PAGE_SIZE);
    const pool = new KvPool(backend, {
      numLayers: config.numLayers,
      rowLength: config.numKvHeads * config.headDim,
      dtype: kvDtype,
      pageSize: KV_PAGE_SIZE,
      initialPages: Math.min(maxPages, this.#plans.pagesPerSeq),
      maxPages,
    });
    this.#engine = new Engine(this.#plans, pool);
  }

  /** The dtype of each sequence's KV cache. */
  get kvDtype(): KvDType {
    return this.#plans.kvDtype;
  }

  /** Positions each sequence holds. */
  get contextLength(): number {
    return this.#plans.capacity;
  }

  /**
   * The model's step graph (for printing): a batch of `T` tokens of `S` sequences over the shared
   * KV pool, with logits for the `R` rows a step asks for.
   */
  graph(): Graph {
    return this.#plans.planned(this.#engine.pool.pages).llama.graph;
  }

  /**
   * Sequences of this model not yet disposed: those of {@link Model.createSequence} and their forks,
   * and those of generations running or abandoned but not yet collected.
   */
  get liveSequences(): number {
    return this.#engine.liveSequences;
  }

  /** How full the KV cache pool shared by the model's sequences is. */
  kvStats(): KvStats {
    return this.#engine.pool.stats();
  }

  /** Batched steps run so far (each may hold tokens of many sequences). */
  get steps(): number {
    return this.#engine.steps;
  }

  /**
   * A new, empty sequence. Its evaluations are batched with those of every other sequence of the
   * model; it takes KV pages from the shared pool as its tokens fill them. Dispose it when done.
   */
  createSequence(): Sequence {
    return new Sequence(this.#engine, this.contextLength);
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

  /** Frees the sequences (their queued evaluations are refused), the KV pool, the weights and the backend. */
  async dispose(): Promise<void> {
    await this.#engine.dispose();
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
    const seq = this.createSequence();
    const release = () => void seq.dispose();
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
  const kvCacheTokens = options.kvCacheTokens ?? 4 * contextLength;
  if (!Number.isInteger(kvCacheTokens) || kvCacheTokens < contextLength || kvCacheTokens > 2 ** 24) {
    throw new RangeError(
      `Invalid kvCacheTokens ${kvCacheTokens}: expected an integer from the context length (${contextLength}) to ${
        2 ** 24
      }`,
    );
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
  try {
    return new Model(dir, host.config, tokenizer, backend, weights, {
      contextLength,
      prefillChunk,
      kvDtype,
      kvCacheTokens,
      loadMs,
    });
  } catch (e) {
    // The KV pool could not be allocated: nothing of the backend outlives the refusal.
    for (const t of weights.values()) backend.release(t);
    backend.dispose();
    throw e;
  }
}
