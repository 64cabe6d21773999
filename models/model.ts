/**
 * `loadModel` and the {@link Model} it returns: a tokenizer, weights resident on a
 * backend, and the planned graphs, with streaming generation on top.
 *
 * @module
 */

import "../backends/builtin.ts";
import { type Backend, type DeviceTensor, UnsupportedError } from "../backends/contract.ts";
import { createBackend } from "../backends/registry.ts";
import type { Graph } from "../graph/ir.ts";
import { type LlamaConfig, parseConfig } from "./arch/config.ts";
import { readJsonFile } from "./files/json.ts";
import {
  type GeneratedToken,
  type GenerateOptions,
  type TextStream,
  textStream,
  TokenGenerator,
  type TokenStream,
  tokenStream,
} from "./generate/token_generator.ts";
import { resolveModelSource } from "./files/hub.ts";
import { type LogitsMode, ModelPlans } from "./exec/plans.ts";
import { resolveSampling, Sampler } from "./generate/sampler.ts";
import { KV_DTYPES, type KvDType } from "./exec/kv_cache.ts";
import { ContextOverflowError, Sequence } from "./exec/sequence.ts";
import { TextTokenizer } from "./text/tokenizer.ts";
import { type LoadProgress, readWeights } from "./files/weights.ts";
import { convertWeight, type WeightDType } from "./files/weight_dtype.ts";

export type { GeneratedToken, GenerateOptions, LoadProgress, TextStream, TokenStream, WeightDType };
export { KV_DTYPES, type KvDType };

/** Options of {@link loadModel}. */
export interface LoadOptions {
  /** Backend name (`"ts"`, `"native"`, `"webgpu"`). Default `"ts"`. */
  backend?: string;
  /** Worker threads, for backends that have them. */
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
  /** Called as files download and tensors load. */
  onProgress?: (p: LoadProgress) => void;
}

/** A loaded model, ready to generate. */
export class Model {
  /** The model folder. */
  readonly dir: string;
  readonly config: LlamaConfig;
  readonly tokenizer: TextTokenizer;
  readonly backend: Backend;
  /** Total bytes of the weights as held by the backend. */
  readonly weightBytes: number;
  readonly #plans: ModelPlans;
  readonly #weights: Map<string, DeviceTensor>;
  readonly #live = new Set<Sequence>();
  /** Sequences of finished generations, kept with their compiled steps for the next one. */
  readonly #idle: Sequence[] = [];

  /** Use {@link loadModel}. */
  constructor(
    dir: string,
    config: LlamaConfig,
    tokenizer: TextTokenizer,
    backend: Backend,
    weights: Map<string, DeviceTensor>,
    options: { contextLength: number; prefillChunk: number; kvDtype?: KvDType },
  ) {
    this.dir = dir;
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

  /** The model's forward graph (for printing). */
  graph(logits: LogitsMode = "last"): Graph {
    return this.#plans.planned(logits).llama.graph;
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
   * Throws at once for bad options or a prompt past the context.
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

  /** Continues `sequence` with `prompt` (may be empty to continue from its last token). */
  continueSequence(sequence: Sequence, prompt: readonly number[], options: GenerateOptions = {}): TokenGenerator {
    const sampler = new Sampler(resolveSampling(options, this.config.vocabSize), this.config.vocabSize);
    return new TokenGenerator(sequence, prompt, this.tokenizer, sampler, options);
  }

  /** Frees the sequences, weights and backend. */
  async dispose(): Promise<void> {
    for (const s of [...this.#live]) await s.dispose();
    this.#live.clear();
    this.#idle.length = 0;
    for (const t of this.#weights.values()) this.backend.release(t);
    this.backend.dispose();
  }

  #generator(prompt: string | readonly number[], options: GenerateOptions): [TokenGenerator, () => void] {
    const ids = this.encodePrompt(prompt, { addSpecialTokens: options.addSpecialTokens });
    const sampler = new Sampler(resolveSampling(options, this.config.vocabSize), this.config.vocabSize);
    const seq = this.#idle.pop() ?? this.createSequence();
    const gen = new TokenGenerator(seq, ids, this.tokenizer, sampler, options);
    const end = () => {
      seq.truncate(0);
      if (this.#idle.length < 2) this.#idle.push(seq);
      else void seq.dispose();
    };
    return [gen, end];
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
 *   .pipeTo(Deno.stdout.writable);
 * ```
 */
export async function loadModel(source: string, options: LoadOptions = {}): Promise<Model> {
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
  const dtypes: readonly string[] = ["f32", "f16", "bf16", "q8_0", "q4_0"];
  if (options.dtype !== undefined && !dtypes.includes(options.dtype)) {
    throw new TypeError(`Invalid dtype "${options.dtype}": expected one of ${dtypes.join(", ")}`);
  }
  const kvDtype = options.kvDtype ?? "f32";
  if (!KV_DTYPES.includes(kvDtype)) {
    throw new TypeError(`Invalid kvDtype "${kvDtype}": expected one of ${KV_DTYPES.join(", ")}`);
  }
  const host = await readWeights(dir, config, options.onProgress);
  const backend = await createBackend(options.backend ?? "ts", { threads: options.threads });
  const weights = new Map<string, DeviceTensor>();
  try {
    if (!backend.supports("attention", kvDtype)) {
      throw new UnsupportedError(`Backend "${backend.name}" cannot hold a "${kvDtype}" KV cache`);
    }
    for (const [name, t] of host.tensors) {
      weights.set(name, backend.upload(options.dtype ? convertWeight(t, options.dtype) : t));
    }
  } catch (e) {
    backend.dispose();
    throw e;
  }
  return new Model(dir, host.config, tokenizer, backend, weights, { contextLength, prefillChunk, kvDtype });
}
