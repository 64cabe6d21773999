/**
 * The Llama (and Mistral) forward pass declared as a graph. This file only
 * describes the computation; the scheduler and a backend run it.
 *
 * Per layer: `h += o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))`
 * with `n = rmsNorm(h)`, then `h += down_proj(silu(gate_proj(n)) * up_proj(n))`
 * with `n = rmsNorm(h)`; finally `logits = lm_head(rmsNorm(h))`.
 *
 * @module
 */

import type { DType, KvDType } from "../../graph/dtype.ts";
import { GraphBuilder } from "../../graph/builder.ts";
import type { Graph, TensorSpec } from "../../graph/ir.ts";
import type { LlamaConfig } from "./config.ts";

/** Hugging Face names of the weights the graph reads. */
export const WEIGHT_NAMES = {
  embedding: "model.embed_tokens.weight",
  finalNorm: "model.norm.weight",
  lmHead: "lm_head.weight",
  layer: (i: number, part: LayerWeight): string => `model.layers.${i}.${part}.weight`,
} as const;

/** The per-layer weights, by their HF suffix. */
export type LayerWeight =
  | "input_layernorm"
  | "self_attn.q_proj"
  | "self_attn.k_proj"
  | "self_attn.v_proj"
  | "self_attn.o_proj"
  | "post_attention_layernorm"
  | "mlp.gate_proj"
  | "mlp.up_proj"
  | "mlp.down_proj";

/** Every weight name of a config and its shape, in load order. */
export function weightShapes(c: LlamaConfig): Map<string, number[]> {
  const m = new Map<string, number[]>();
  const [D, F, q, kv] = [c.hiddenSize, c.intermediateSize, c.numHeads * c.headDim, c.numKvHeads * c.headDim];
  m.set(WEIGHT_NAMES.embedding, [c.vocabSize, D]);
  for (let i = 0; i < c.numLayers; i++) {
    const w = (part: LayerWeight, shape: number[]) => m.set(WEIGHT_NAMES.layer(i, part), shape);
    w("input_layernorm", [D]);
    w("self_attn.q_proj", [q, D]);
    w("self_attn.k_proj", [kv, D]);
    w("self_attn.v_proj", [kv, D]);
    w("self_attn.o_proj", [D, q]);
    w("post_attention_layernorm", [D]);
    w("mlp.gate_proj", [F, D]);
    w("mlp.up_proj", [F, D]);
    w("mlp.down_proj", [D, F]);
  }
  m.set(WEIGHT_NAMES.finalNorm, [D]);
  if (!c.tieWordEmbeddings) m.set(WEIGHT_NAMES.lmHead, [c.vocabSize, D]);
  return m;
}

/** Options of {@link buildLlamaGraph}. */
export interface LlamaGraphOptions {
  /** KV cache rows (the context length). */
  readonly capacity: number;
  /** Logits for every new token (`[T, V]`) or only the last (`[1, V]`). */
  readonly logits: "all" | "last";
  /** The stored dtype of each weight. */
  readonly weightDType: (name: string) => DType;
  /** Dtype of the KV cache. Default `"f32"`. */
  readonly kvDtype?: KvDType;
}

/** The graph and the tensors a caller binds or reads. */
export interface LlamaGraph {
  /** The forward pass over `T` new tokens. */
  readonly graph: Graph;
  /** Token ids in, `i32 [T]`. */
  readonly tokens: TensorSpec;
  /** Logits out. */
  readonly logits: TensorSpec;
  /** Per layer, the key and value cache state tensors. */
  readonly caches: readonly { readonly k: TensorSpec; readonly v: TensorSpec }[];
}

/** Declares the forward pass of a Llama/Mistral config over `T` new tokens. */
export function buildLlamaGraph(c: LlamaConfig, o: LlamaGraphOptions): LlamaGraph {
  const g = new GraphBuilder();
  const shapes = weightShapes(c);
  const w = (name: string) => g.weight(name, o.weightDType(name), shapes.get(name)!);
  const kvDim = c.numKvHeads * c.headDim;
  const kvDtype = o.kvDtype ?? "f32";

  const tokens = g.input("tokens", "i32", ["T"]);
  const embedding = w(WEIGHT_NAMES.embedding);
  let h = g.embedding(tokens, embedding, "embedding");
  const caches: { k: TensorSpec; v: TensorSpec }[] = [];
  for (let i = 0; i < c.numLayers; i++) {
    const lw = (part: LayerWeight) => w(WEIGHT_NAMES.layer(i, part));
    const name = (s: string) => `l${i}.${s}`;
    const n1 = g.rmsNorm(h, lw("input_layernorm"), c.rmsNormEps, name("attn_norm"));
    const q = g.rope(
      g.matmul(n1, lw("self_attn.q_proj"), name("q")),
      c.numHeads,
      c.headDim,
      c.ropeTheta,
      name("q_rope"),
    );
    const k = g.rope(
      g.matmul(n1, lw("self_attn.k_proj"), name("k")),
      c.numKvHeads,
      c.headDim,
      c.ropeTheta,
      name("k_rope"),
    );
    const v = g.matmul(n1, lw("self_attn.v_proj"), name("v"));
    const kCache = g.state(name("k_cache"), kvDtype, [o.capacity, kvDim]);
    const vCache = g.state(name("v_cache"), kvDtype, [o.capacity, kvDim]);
    caches.push({ k: kCache, v: vCache });
    const att = g.attention(q, k, v, kCache, vCache, {
      heads: c.numHeads,
      kvHeads: c.numKvHeads,
      headDim: c.headDim,
      scale: 1 / Math.sqrt(c.headDim),
      window: c.slidingWindow,
    }, name("attn"));
    h = g.add(h, g.matmul(att, lw("self_attn.o_proj"), name("attn_out")), name("attn_res"));
    const n2 = g.rmsNorm(h, lw("post_attention_layernorm"), c.rmsNormEps, name("ffn_norm"));
    const gate = g.matmul(n2, lw("mlp.gate_proj"), name("gate"));
    const up = g.matmul(n2, lw("mlp.up_proj"), name("up"));
    const act = g.siluMul(gate, up, name("swiglu"));
    h = g.add(h, g.matmul(act, lw("mlp.down_proj"), name("ffn_out")), name("ffn_res"));
  }
  if (o.logits === "last") h = g.lastRow(h, "last");
  const normed = g.rmsNorm(h, w(WEIGHT_NAMES.finalNorm), c.rmsNormEps, "out_norm");
  const head = c.tieWordEmbeddings ? embedding : w(WEIGHT_NAMES.lmHead);
  const logits = g.matmul(normed, head, "logits");
  g.output(logits);
  return { graph: g.build(), tokens, logits, caches };
}
