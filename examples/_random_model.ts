/**
 * A deterministic generator of random-weight models of real shapes, written as
 * ordinary Hugging Face folders (`config.json`, `model.safetensors`, tokenizer
 * files) so that any engine can load the very same weights.
 *
 * @module
 */

import { elementCount, encodeWeights, type HostTensor } from "../backends/mod.ts";
import { encodeSafetensors, type LlamaConfig, parseConfig, Rng, weightShapes, writeFileAtomic } from "../mod.ts";

/** The `config.json` fields of a shape. */
export type ShapeConfig = Record<string, unknown>;

const TINY_VOCAB = 32002;

/** Named shapes: real models' configs, with no weights. */
export const SHAPES: Readonly<Record<string, ShapeConfig>> = {
  stories15m: llama(288, 6, 6, 6, 768, TINY_VOCAB, true, 256),
  stories110m: llama(768, 12, 12, 12, 2048, TINY_VOCAB, true, 1024),
  "tinyllama-1.1b": llama(2048, 22, 32, 4, 5632, TINY_VOCAB, false, 2048),
  "minueza-32m-shape": {
    architectures: ["MistralForCausalLM"],
    model_type: "mistral",
    hidden_size: 312,
    intermediate_size: 1092,
    num_hidden_layers: 10,
    num_attention_heads: 12,
    num_key_value_heads: 4,
    vocab_size: 32002,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    sliding_window: 1024,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 32000,
    hidden_act: "silu",
  },
};

function llama(
  hidden: number,
  layers: number,
  heads: number,
  kvHeads: number,
  ffn: number,
  vocab: number,
  tied: boolean,
  maxPositions: number,
): ShapeConfig {
  return {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: hidden,
    intermediate_size: ffn,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    vocab_size: vocab,
    max_position_embeddings: maxPositions,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: tied,
    bos_token_id: 1,
    eos_token_id: 2,
    hidden_act: "silu",
  };
}

/** Options of {@link writeRandomModel}. */
export interface RandomModelOptions {
  /** Stored dtype of the 2-D weights: `"f32"` (default) or `"f16"`. Norms are always f32. */
  dtype?: "f32" | "f16";
  /** Seed of the weights. Default 1. */
  seed?: number;
  /** Folder whose `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` are copied. */
  tokenizerFrom: string;
}

/**
 * Writes a model of `shape` with random weights to `dir`: the same seed and
 * shape always give the same bytes. Weights are uniform with the standard
 * deviation of a typical initialisation (0.02), norms are 1.
 */
export async function writeRandomModel(
  dir: string,
  shape: ShapeConfig,
  options: RandomModelOptions,
): Promise<LlamaConfig> {
  const config = parseConfig(shape, "shape");
  const dtype = options.dtype ?? "f32";
  const seed = options.seed ?? 1;
  await Deno.mkdir(dir, { recursive: true });
  const tensors: HostTensor[] = [];
  let index = 0;
  for (const [name, dims] of weightShapes(config)) {
    const count = elementCount(dims);
    const values = new Float32Array(count);
    if (dims.length === 1) values.fill(1);
    else {
      const rng = new Rng(seed * 100_003 + index);
      const half = 0.02 * Math.sqrt(3); // uniform on [-a, a] has std a / sqrt(3)
      for (let i = 0; i < count; i++) values[i] = (rng.next() * 2 - 1) * half;
    }
    index++;
    const stored = dims.length === 1 ? "f32" : dtype;
    tensors.push({
      name,
      dtype: stored,
      shape: dims,
      data: encodeWeights(stored, values, dims[dims.length - 1], name),
    });
  }
  // Each file all or nothing, so a run stopped midway never leaves a truncated file in an existing folder.
  await writeFileAtomic(`${dir}/model.safetensors`, encodeSafetensors(tensors, { format: "pt" }));
  const configJson = JSON.stringify({ ...shape, torch_dtype: dtype === "f16" ? "float16" : "float32" }, null, 2);
  await writeFileAtomic(`${dir}/config.json`, new TextEncoder().encode(configJson));
  for (const f of ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]) {
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(`${options.tokenizerFrom}/${f}`);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound) || f === "tokenizer.json") throw e;
      continue;
    }
    await writeFileAtomic(`${dir}/${f}`, bytes);
  }
  return config;
}
