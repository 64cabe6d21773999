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
  /** Pages of the shared KV cache pool (each layer's key and value caches hold `poolPages × pageSize` rows). */
  readonly poolPages: number;
  /** Rows of one page. */
  readonly pageSize: number;
  /** Page-table entries per sequence: a sequence holds at most `pagesPerSeq × pageSize` positions. */
  readonly pagesPerSeq: number;
  /** The stored dtype of each weight. */
  readonly weightDType: (name: string) => DType;
  /** Dtype of the KV cache. Default `"f32"`. */
  readonly kvDtype?: KvDType;
}

/** The graph and the tensors a caller binds, writes or reads. */
export interface LlamaGraph {
  /** The forward pass over a step of `T` tokens of `S` sequences, giving `R` rows of logits. */
  readonly graph: Graph;
  /** Token ids in, `i32 [T]`. */
  readonly tokens: TensorSpec;
  /** Each token's position in its sequence, `i32 [T]`. */
  readonly positions: TensorSpec;
  /** Each token's row of the page table, `i32 [T]`. */
  readonly seqOf: TensorSpec;
  /** Per sequence of the step, its pool pages, `i32 [S, pagesPerSeq]`. */
  readonly pages: TensorSpec;
  /** The step rows whose logits are computed, `i32 [R]`. */
  readonly logitRows: TensorSpec;
  /** Logits out, `[R, vocab]`. */
  readonly logits: TensorSpec;
  /** Per layer, the key and value cache state tensors (the pool). */
  readonly caches: readonly { readonly k: TensorSpec; readonly v: TensorSpec }[];
}

/**
 * Declares the forward pass of a Llama/Mistral config over one batched step: `T`
 * tokens of `S` sequences, each with its own position, reading and writing its own
 * sequence's pages of the shared KV pool, with logits for the `R` rows asked for.
 */
export function buildLlamaGraph(c: LlamaConfig, o: LlamaGraphOptions): LlamaGraph {
  const g = new GraphBuilder();
  const shapes = weightShapes(c);
  const w = (name: string) => g.weight(name, o.weightDType(name), shapes.get(name)!);
  const kvDim = c.numKvHeads * c.headDim;
  const kvDtype = o.kvDtype ?? "f32";
  const poolRows = o.poolPages * o.pageSize;

  const tokens = g.input("tokens", "i32", ["T"]);
  const positions = g.input("positions", "i32", ["T"]);
  const seqOf = g.input("seq_of", "i32", ["T"]);
  const pages = g.input("pages", "i32", ["S", o.pagesPerSeq]);
  const logitRows = g.input("logit_rows", "i32", ["R"]);
  const embedding = w(WEIGHT_NAMES.embedding);
  let h = g.embedding(tokens, embedding, "embedding");
  const caches: { k: TensorSpec; v: TensorSpec }[] = [];
  for (let i = 0; i < c.numLayers; i++) {
    const lw = (part: LayerWeight) => w(WEIGHT_NAMES.layer(i, part));
    const name = (s: string) => `l${i}.${s}`;
    const n1 = g.rmsNorm(h, lw("input_layernorm"), c.rmsNormEps, name("attn_norm"));
    const rope = (x: TensorSpec, heads: number, label: string) =>
      g.rope(x, positions, heads, c.headDim, c.ropeTheta, name(label));
    const q = rope(g.matmul(n1, lw("self_attn.q_proj"), name("q")), c.numHeads, "q_rope");
    const k = rope(g.matmul(n1, lw("self_attn.k_proj"), name("k")), c.numKvHeads, "k_rope");
    const v = g.matmul(n1, lw("self_attn.v_proj"), name("v"));
    const kCache = g.state(name("k_cache"), kvDtype, [poolRows, kvDim]);
    const vCache = g.state(name("v_cache"), kvDtype, [poolRows, kvDim]);
    caches.push({ k: kCache, v: vCache });
    const att = g.attention(q, k, v, kCache, vCache, { positions, seqOf, pages }, {
      heads: c.numHeads,
      kvHeads: c.numKvHeads,
      headDim: c.headDim,
      scale: 1 / Math.sqrt(c.headDim),
      window: c.slidingWindow,
      pageSize: o.pageSize,
    }, name("attn"));
    h = g.add(h, g.matmul(att, lw("self_attn.o_proj"), name("attn_out")), name("attn_res"));
    const n2 = g.rmsNorm(h, lw("post_attention_layernorm"), c.rmsNormEps, name("ffn_norm"));
    const gate = g.matmul(n2, lw("mlp.gate_proj"), name("gate"));
    const up = g.matmul(n2, lw("mlp.up_proj"), name("up"));
    const act = g.siluMul(gate, up, name("swiglu"));
    h = g.add(h, g.matmul(act, lw("mlp.down_proj"), name("ffn_out")), name("ffn_res"));
  }
  // Only the rows whose logits someone reads go through the output head.
  h = g.gatherRows(h, logitRows, "logit_rows_h");
  const normed = g.rmsNorm(h, w(WEIGHT_NAMES.finalNorm), c.rmsNormEps, "out_norm");
  const head = c.tieWordEmbeddings ? embedding : w(WEIGHT_NAMES.lmHead);
  const logits = g.matmul(normed, head, "logits");
  g.output(logits);
  return { graph: g.build(), tokens, positions, seqOf, pages, logitRows, logits, caches };
}
