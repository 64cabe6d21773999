/**
 * Binds the model's graph to a backend: builds and plans the batched step graph
 * for the pool's current size, and compiles it against the model's weights and
 * the pool's tensors.
 *
 * @module
 */

import type { Backend, DeviceTensor, Executable } from "../../backends/contract.ts";
import type { KvDType } from "../../graph/dtype.ts";
import { type ExecutionPlan, planGraph } from "../../graph/plan.ts";
import type { LlamaConfig } from "../arch/config.ts";
import { debugPlan } from "./debug.ts";
import type { KvPool } from "./kv_pool.ts";
import { buildLlamaGraph, type LlamaGraph } from "../arch/llama.ts";

/** A planned graph and the ids its caller needs. */
export interface PlannedGraph {
  /** The graph and the tensors a step writes and reads. */
  readonly llama: LlamaGraph;
  /** Its plan for steps of up to `stepTokens` tokens. */
  readonly plan: ExecutionPlan;
}

/** What {@link ModelPlans} plans for. */
export interface ModelPlansOptions {
  /** Most tokens one step evaluates (the plans' `maxDims.T` and `S`). */
  readonly stepTokens: number;
  /** Positions each sequence holds. */
  readonly capacity: number;
  /** Dtype of the KV pool. */
  readonly kvDtype: KvDType;
  /** Rows of one KV page. */
  readonly pageSize: number;
}

/**
 * The model's step graph, planned once per pool size and compiled against the
 * pool: what the engine needs to run steps (this class only prepares them; the
 * executables it returns run them).
 */
export class ModelPlans {
  /** The model config the graphs are built from. */
  readonly config: LlamaConfig;
  /** The backend holding the weights, which compiles the plans. */
  readonly backend: Backend;
  /** Most tokens one step evaluates. */
  readonly stepTokens: number;
  /** Positions each sequence holds. */
  readonly capacity: number;
  /** Dtype of the KV pool. */
  readonly kvDtype: KvDType;
  /** Rows of one KV page. */
  readonly pageSize: number;
  /** Page-table entries per sequence. */
  readonly pagesPerSeq: number;
  /**
   * Most rows of logits one step computes (the plans' `maxDims.R`): `stepTokens`, capped at 256 so that a
   * large step (a bench's 2048) does not plan 2048 rows of vocabulary-wide logits; the engine keeps a step
   * within it.
   */
  readonly logitRows: number;
  readonly #weights: ReadonlyMap<string, DeviceTensor>;
  #planned: { poolPages: number; planned: PlannedGraph } | undefined;

  /**
   * Plans nothing yet: the graph is planned on first use for the pool's size.
   * @param config the model config
   * @param backend the backend holding the weights
   * @param weights device weights by HF name
   * @param options step size, context capacity, cache dtype and page size
   */
  constructor(
    config: LlamaConfig,
    backend: Backend,
    weights: ReadonlyMap<string, DeviceTensor>,
    options: ModelPlansOptions,
  ) {
    this.config = config;
    this.backend = backend;
    this.#weights = weights;
    this.stepTokens = options.stepTokens;
    this.capacity = options.capacity;
    this.kvDtype = options.kvDtype;
    this.pageSize = options.pageSize;
    this.pagesPerSeq = Math.ceil(options.capacity / options.pageSize);
    this.logitRows = Math.min(options.stepTokens, 256);
  }

  /** The planned graph for a pool of `poolPages` pages (kept until the pool grows). */
  planned(poolPages: number): PlannedGraph {
    if (this.#planned?.poolPages !== poolPages) {
      const llama = buildLlamaGraph(this.config, {
        poolPages,
        pageSize: this.pageSize,
        pagesPerSeq: this.pagesPerSeq,
        weightDType: (name) => this.#weights.get(name)!.dtype,
        kvDtype: this.kvDtype,
      });
      const T = this.stepTokens;
      const planned = { llama, plan: planGraph(llama.graph, { T, S: T, R: this.logitRows }) };
      debugPlan(`step graph over a KV pool of ${poolPages} pages`, planned.plan);
      this.#planned = { poolPages, planned };
    }
    return this.#planned.planned;
  }

  /** Compiles the step graph against `pool`'s tensors. */
  compile(pool: KvPool): Promise<Executable> {
    const { llama, plan } = this.planned(pool.pages);
    const bindings = new Map<number, DeviceTensor>();
    for (const t of llama.graph.tensors) {
      if (t.kind === "weight") bindings.set(t.id, this.#weights.get(t.name)!);
    }
    llama.caches.forEach((c, i) => {
      bindings.set(c.k.id, pool.layers[i].k);
      bindings.set(c.v.id, pool.layers[i].v);
    });
    return this.backend.compile(plan, bindings);
  }
}
