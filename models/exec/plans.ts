/**
 * Binds the model's graphs to a backend: plans each graph once, and compiles it
 * for a sequence by binding the model's weights and the sequence's KV cache.
 *
 * @module
 */

import type { Backend, DeviceTensor, Executable } from "../../backends/contract.ts";
import type { KvDType } from "../../graph/dtype.ts";
import { type ExecutionPlan, planGraph } from "../../graph/plan.ts";
import type { LlamaConfig } from "../arch/config.ts";
import { debugPlan } from "./debug.ts";
import type { KvCache } from "./kv_cache.ts";
import { buildLlamaGraph, type LlamaGraph } from "../arch/llama.ts";

/** Which logits a graph produces. */
export type LogitsMode = "last" | "all";

/** A planned graph and the ids its caller needs. */
export interface PlannedGraph {
  /** The graph and the tensors a sequence binds and reads. */
  readonly llama: LlamaGraph;
  /** Its plan for steps of up to the prefill chunk. */
  readonly plan: ExecutionPlan;
}

/**
 * The model's graphs, planned once per logits mode, and compiled per KV cache:
 * what a sequence needs to run steps (this class only prepares them; the
 * executables it returns run them).
 */
export class ModelPlans {
  /** The model config the graphs are built from. */
  readonly config: LlamaConfig;
  /** The backend holding the weights, which compiles the plans. */
  readonly backend: Backend;
  /** Most tokens one step evaluates (the prefill chunk: the plans' `maxDims.T`). */
  readonly prefillChunk: number;
  /** KV cache rows of each sequence. */
  readonly capacity: number;
  /** Dtype of each sequence's KV cache. */
  readonly kvDtype: KvDType;
  readonly #weights: ReadonlyMap<string, DeviceTensor>;
  readonly #planned = new Map<LogitsMode, PlannedGraph>();

  /**
   * Plans nothing yet: each logits mode is planned on first use.
   * @param config the model config
   * @param backend the backend holding the weights
   * @param weights device weights by HF name
   * @param options prefill chunk, context capacity and cache dtype
   */
  constructor(
    config: LlamaConfig,
    backend: Backend,
    weights: ReadonlyMap<string, DeviceTensor>,
    options: { prefillChunk: number; capacity: number; kvDtype: KvDType },
  ) {
    this.config = config;
    this.backend = backend;
    this.#weights = weights;
    this.prefillChunk = options.prefillChunk;
    this.capacity = options.capacity;
    this.kvDtype = options.kvDtype;
  }

  /** The planned graph for a logits mode (planned on first use). */
  planned(mode: LogitsMode): PlannedGraph {
    let p = this.#planned.get(mode);
    if (!p) {
      const llama = buildLlamaGraph(this.config, {
        capacity: this.capacity,
        logits: mode,
        weightDType: (name) => this.#weights.get(name)!.dtype,
        kvDtype: this.kvDtype,
      });
      p = { llama, plan: planGraph(llama.graph, { T: this.prefillChunk }) };
      debugPlan(`graph with ${mode} logits`, p.plan);
      this.#planned.set(mode, p);
    }
    return p;
  }

  /** Compiles the graph of `mode` against `kv`. */
  compile(mode: LogitsMode, kv: KvCache): Promise<Executable> {
    const { llama, plan } = this.planned(mode);
    const bindings = new Map<number, DeviceTensor>();
    for (const t of llama.graph.tensors) {
      if (t.kind === "weight") bindings.set(t.id, this.#weights.get(t.name)!);
    }
    llama.caches.forEach((c, i) => {
      bindings.set(c.k.id, kv.layers[i].k);
      bindings.set(c.v.id, kv.layers[i].v);
    });
    return this.backend.compile(plan, bindings);
  }
}
