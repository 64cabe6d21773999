/**
 * `config.json` of a Hugging Face Llama or Mistral model: parsing, defaults and
 * validation. Every bad field gives a {@link ConfigError} naming the file, the
 * field and the value.
 *
 * @module
 */

/** The model hyper-parameters the engine uses, with defaults applied. */
export interface LlamaConfig {
  /** `"llama"` or `"mistral"`. */
  readonly modelType: string;
  /** Width of the residual stream (`hidden_size`). */
  readonly hiddenSize: number;
  /** Width of the feed-forward layer (`intermediate_size`). */
  readonly intermediateSize: number;
  /** Transformer layers (`num_hidden_layers`). */
  readonly numLayers: number;
  /** Query heads (`num_attention_heads`). */
  readonly numHeads: number;
  /** Key/value heads (`num_key_value_heads`; fewer than `numHeads` for grouped-query attention). */
  readonly numKvHeads: number;
  /** Dimension of one head (`head_dim`, default `hiddenSize / numHeads`). */
  readonly headDim: number;
  /** Rows of the embedding table and columns of the logits (`vocab_size`). */
  readonly vocabSize: number;
  /** The epsilon of every RMS norm (`rms_norm_eps`, default 1e-6). */
  readonly rmsNormEps: number;
  /** The RoPE base (`rope_theta`, default 10000). */
  readonly ropeTheta: number;
  /** The longest context the model was trained for (`max_position_embeddings`, default 2048). */
  readonly maxPositions: number;
  /** Whether the output projection is the embedding table (HF `tie_word_embeddings`). */
  readonly tieWordEmbeddings: boolean;
  /**
   * True when `config.json` does not say: the weight files decide (tied unless they hold
   * both an embedding table and a distinct `lm_head.weight`).
   */
  readonly tieWordEmbeddingsInferred: boolean;
  /** Attention window (Mistral), 0 for none. */
  readonly slidingWindow: number;
  /** The beginning-of-sequence token (`bos_token_id`), if the config names one. */
  readonly bosTokenId?: number;
  /** The end-of-sequence tokens (`eos_token_id`, one id or a list). */
  readonly eosTokenIds: readonly number[];
}

/** A config file that cannot be used; `field` names the offending field. */
export class ConfigError extends TypeError {
  /** The config field at fault. */
  readonly field: string;
  /**
   * An error in `file`'s `field`.
   * @param file the config file
   * @param field the field at fault
   * @param message what is wrong, sentence case
   */
  constructor(file: string, field: string, message: string) {
    super(`Invalid config "${file}": ${message}`);
    this.name = "ConfigError";
    this.field = field;
  }
}

const ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM"];

/** Bounds that reject absurd values before anything is allocated. */
const LIMITS = {
  hidden_size: 65536,
  intermediate_size: 262144,
  num_hidden_layers: 1024,
  num_attention_heads: 1024,
  num_key_value_heads: 1024,
  head_dim: 1024,
  vocab_size: 4_000_000,
  max_position_embeddings: 16_777_216,
};

/** Parses and validates a `config.json` object (`file` is used in messages). */
export function parseConfig(json: unknown, file = "config.json"): LlamaConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ConfigError(file, "", "expected a JSON object");
  }
  const raw = json as Record<string, unknown>;
  const fail = (field: string, msg: string): never => {
    throw new ConfigError(file, field, `field "${field}" ${msg}`);
  };
  const int = (field: keyof typeof LIMITS, fallback?: number): number => {
    const v = raw[field] ?? fallback;
    if (v === undefined) return fail(field, "is missing");
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > LIMITS[field]) {
      return fail(field, `is ${JSON.stringify(v)}: expected an integer from 1 to ${LIMITS[field]}`);
    }
    return v;
  };
  const positive = (field: string, fallback: number): number => {
    const v = raw[field] ?? fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      return fail(field, `is ${JSON.stringify(v)}: expected a positive number`);
    }
    return v;
  };

  const archs = raw.architectures;
  if (archs !== undefined) {
    if (!Array.isArray(archs) || !archs.some((a) => ARCHITECTURES.includes(a))) {
      fail("architectures", `is ${JSON.stringify(archs)}: expected one of ${ARCHITECTURES.join(", ")}`);
    }
  }
  const modelType = raw.model_type ?? "llama";
  if (modelType !== "llama" && modelType !== "mistral") {
    fail("model_type", `is ${JSON.stringify(modelType)}: expected "llama" or "mistral"`);
  }
  const act = raw.hidden_act ?? "silu";
  if (act !== "silu") fail("hidden_act", `is ${JSON.stringify(act)}: only "silu" is supported`);
  if (raw.rope_scaling !== undefined && raw.rope_scaling !== null) {
    fail("rope_scaling", `is ${JSON.stringify(raw.rope_scaling)}: RoPE scaling is not supported`);
  }
  for (const bias of ["attention_bias", "mlp_bias"]) {
    if (raw[bias] === true) fail(bias, "is true: biases are not supported");
  }

  const hiddenSize = int("hidden_size");
  const numHeads = int("num_attention_heads");
  const numKvHeads = int("num_key_value_heads", numHeads);
  if (numHeads % numKvHeads !== 0) {
    fail("num_key_value_heads", `is ${numKvHeads}: it must divide num_attention_heads (${numHeads})`);
  }
  if (raw.head_dim === undefined && hiddenSize % numHeads !== 0) {
    fail("num_attention_heads", `is ${numHeads}: it must divide hidden_size (${hiddenSize})`);
  }
  const headDim = int("head_dim", Math.floor(hiddenSize / numHeads));
  if (headDim % 2 !== 0) fail("head_dim", `is ${headDim}: RoPE needs an even head dimension`);

  const window = raw.sliding_window ?? null;
  if (window !== null && (typeof window !== "number" || !Number.isInteger(window) || window < 1)) {
    fail("sliding_window", `is ${JSON.stringify(window)}: expected a positive integer or null`);
  }
  const tie = raw.tie_word_embeddings ?? true;
  if (typeof tie !== "boolean") fail("tie_word_embeddings", `is ${JSON.stringify(tie)}: expected true or false`);

  const vocabSize = int("vocab_size");
  const tokenId = (field: string): number | undefined => {
    const v = raw[field];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v >= vocabSize) {
      return fail(field, `is ${JSON.stringify(v)}: expected a token id below vocab_size (${vocabSize})`);
    }
    return v;
  };
  const eos = Array.isArray(raw.eos_token_id)
    ? raw.eos_token_id.map((_, i) => {
      const v = (raw.eos_token_id as unknown[])[i];
      if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v >= vocabSize) {
        return fail("eos_token_id", `holds ${JSON.stringify(v)}: expected token ids below vocab_size (${vocabSize})`);
      }
      return v;
    })
    : [tokenId("eos_token_id")].filter((v): v is number => v !== undefined);

  return {
    modelType: modelType as string,
    hiddenSize,
    intermediateSize: int("intermediate_size"),
    numLayers: int("num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim,
    vocabSize,
    rmsNormEps: positive("rms_norm_eps", 1e-6),
    ropeTheta: positive("rope_theta", 10000),
    maxPositions: int("max_position_embeddings", 2048),
    tieWordEmbeddings: tie as boolean,
    tieWordEmbeddingsInferred: raw.tie_word_embeddings === undefined,
    slidingWindow: (window as number | null) ?? 0,
    bosTokenId: tokenId("bos_token_id"),
    eosTokenIds: eos,
  };
}
