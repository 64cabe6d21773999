/**
 * A Llama-family inference engine for Deno: models declared as a dataflow graph,
 * run on pluggable backends, generating text as a `ReadableStream`.
 *
 * @example
 * ```ts ignore
 * import { loadModel } from "./mod.ts";
 * const model = await loadModel("../shared/models/story", { backend: "ts" });
 * const stream = model.generate("Once upon a time", { maxTokens: 200, temperature: 0.8, topP: 0.9, seed: 1 });
 * await stream.pipeThrough(new TextEncoderStream()).pipeTo(Deno.stdout.writable);
 * ```
 *
 * @module
 */

export { KV_DTYPES, type KvDType, loadModel, type LoadOptions, Model } from "./models/model.ts";
export type {
  GeneratedToken,
  GenerateOptions,
  GenerationStats,
  StopReason,
  TextStream,
  TokenStream,
} from "./models/generate/token_generator.ts";
export { ContextOverflowError, type EvaluateOptions, Sequence } from "./models/exec/sequence.ts";
export {
  type ChatMessage,
  type ChatReply,
  ChatSession,
  type ChatSessionOptions,
  ChatTemplate,
  ChatTemplateError,
  type ChatUsage,
  type ContextPolicy,
  modelFingerprint,
  SessionBusyError,
  SessionFileError,
  SessionModelMismatchError,
} from "./models/chat/session.ts";
export { SamplingOptionError, type SamplingOptions } from "./models/generate/sampler.ts";
export { ConfigError, type LlamaConfig, parseConfig } from "./models/arch/config.ts";
export { SafetensorsError } from "./models/files/safetensors.ts";
export { type LoadProgress, WeightsError } from "./models/files/weights.ts";
export {
  DEFAULT_MODEL_ID,
  ModelDownloadError,
  ModelNotFoundError,
  resolveModelSource,
  type ResolveOptions,
} from "./models/files/hub.ts";
export { TextTokenizer } from "./models/text/tokenizer.ts";
export { KvCache } from "./models/exec/kv_cache.ts";
export { backendNames, createBackend, registerBackend, UnknownBackendError } from "./backends/registry.ts";
export type { Backend, BackendOptions, DeviceTensor, Executable, HostTensor, StepArgs } from "./backends/contract.ts";
export { UnsupportedError } from "./backends/contract.ts";
export type { Graph, Node, Op, OpKind, TensorSpec } from "./graph/ir.ts";
export type { DType } from "./graph/dtype.ts";
export { graphToDot, graphToText } from "./graph/format.ts";
