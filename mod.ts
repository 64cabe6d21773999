/**
 * A Llama-family inference engine for Deno: models declared as a dataflow graph,
 * run on pluggable backends, generating text as a `ReadableStream`.
 *
 * Backend authors find the kernel contract, the graph IR and the plans in
 * `@llm/engine/backend`; the native and WebGPU backends are `@llm/engine/native` and
 * `@llm/engine/webgpu`, the OpenAI-compatible server `@llm/engine/server`.
 *
 * @example
 * ```ts ignore
 * import { loadModel } from "./mod.ts";
 * const model = await loadModel("../shared/models/story", { backend: "ts" });
 * const stream = model.generate("Once upon a time", { maxTokens: 200, temperature: 0.8, topP: 0.9, seed: 1 });
 * // preventClose: piping into stdout would otherwise close it, and a later console.log would throw.
 * await stream.pipeThrough(new TextEncoderStream()).pipeTo(Deno.stdout.writable, { preventClose: true });
 * console.log(`\n${stream.stats.decodeTokensPerSecond.toFixed(1)} tokens/s`);
 * ```
 *
 * @module
 */

// Models: loading and generating.
export { KV_PAGE_SIZE, loadModel, type LoadOptions, Model, type ModelOptions } from "./models/model.ts";
export {
  type GeneratedToken,
  type GenerateOptions,
  type GenerationStats,
  type StopReason,
  TokenGenerator,
  YIELD_INTERVAL_MS,
} from "./models/generate/token_generator.ts";
export type { TextStream, TokenStream } from "./models/generate/streams.ts";
export {
  argmax,
  type ResolvedSampling,
  resolveSampling,
  Rng,
  Sampler,
  SamplingOptionError,
  type SamplingOptions,
} from "./models/generate/sampler.ts";
export { ContextOverflowError, type EvaluateOptions, Sequence } from "./models/exec/sequence.ts";
export { DisposedError, type LogitsMode } from "./models/exec/engine.ts";
export { KvPool, KvPoolFullError, type KvStats } from "./models/exec/kv_pool.ts";

// Chat sessions.
export {
  type ChatMessage,
  type ChatPromptOptions,
  type ChatReply,
  ChatSession,
  type ChatSessionOptions,
  ChatTemplate,
  ChatTemplateError,
  type ChatUsage,
  type ContextPolicy,
  encodeChatPrompt,
  modelFingerprint,
  SessionBusyError,
  SessionFileError,
  type SessionLoadOptions,
  SessionModelMismatchError,
} from "./models/chat/session.ts";
export { CONTEXT_POLICIES, isContextPolicy } from "./models/chat/context_policy.ts";

// Model definitions, files and where they come from.
export { ConfigError, type LlamaConfig, parseConfig } from "./models/arch/config.ts";
export { WEIGHT_NAMES, weightShapes } from "./models/arch/llama.ts";
export {
  encodeSafetensors,
  parseSafetensors,
  readSafetensors,
  SafetensorsError,
  type SafetensorsFile,
} from "./models/files/safetensors.ts";
export { type LoadProgress, NonFiniteTensorError, WeightsError } from "./models/files/weights.ts";
export { type AtomicWriteOptions, writeFileAtomic } from "./models/files/atomic_write.ts";
export {
  DEFAULT_MODEL_ID,
  isCompleteModelDir,
  ModelDownloadError,
  ModelNotFoundError,
  resolveModelSource,
  type ResolveOptions,
} from "./models/files/hub.ts";
export {
  type EncodeOptions,
  MAX_TOKEN_ID,
  type TextSegment,
  TextTokenizer,
  TokenizerFileError,
} from "./models/text/tokenizer.ts";

// What a caller picks a backend and dtypes by, and the graphs it can print.
export {
  type BackendFactory,
  backendNames,
  createBackend,
  registerBackend,
  UnknownBackendError,
} from "./backends/registry.ts";
export type { Backend, BackendOptions, DeviceTensor, Executable, HostTensor, StepArgs } from "./backends/contract.ts";
export { UnsupportedError } from "./backends/contract.ts";
export type { BufferSlot, ExecutionPlan } from "./graph/plan.ts";
export type { Dim, DimBindings, Graph, Node, Op, OpKind, TensorKind, TensorSpec } from "./graph/ir.ts";
export {
  type DType,
  isKvDType,
  isWeightDType,
  KV_DTYPES,
  type KvDType,
  WEIGHT_DTYPES,
  type WeightDType,
} from "./graph/dtype.ts";
export { graphToDot, graphToText } from "./graph/format.ts";
