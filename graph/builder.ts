/**
 * A builder that records ops into a {@link Graph}, checking shapes as it goes.
 *
 * @example
 * ```ts
 * import { GraphBuilder } from "./builder.ts";
 * const g = new GraphBuilder();
 * const x = g.input("x", "f32", ["T", 4]); // T rows, bound when a step runs
 * const w = g.weight("w", "f32", [4]);
 * g.output(g.rmsNorm(x, w, 1e-6, "x_norm"));
 * const graph = g.build();
 * console.log(graph.nodes.map((n) => n.op.kind)); // [ "rmsNorm" ]
 * ```
 *
 * @module
 */

import type { DType } from "./dtype.ts";
import type { Dim, Graph, Node, Op, TensorKind, TensorSpec } from "./ir.ts";
import { formatShape } from "./ir.ts";

/** Records tensors and nodes; {@link GraphBuilder.build} returns the finished graph. */
export class GraphBuilder {
  #tensors: TensorSpec[] = [];
  #nodes: Node[] = [];
  #inputs: number[] = [];
  #outputs: number[] = [];
  #names = new Set<string>();

  /** A tensor written by the caller before each step. */
  input(name: string, dtype: DType, shape: readonly Dim[]): TensorSpec {
    const t = this.#tensor(name, "input", dtype, shape);
    this.#inputs.push(t.id);
    return t;
  }

  /** A read-only parameter, bound to the weight of the same name. */
  weight(name: string, dtype: DType, shape: readonly Dim[]): TensorSpec {
    return this.#tensor(name, "weight", dtype, shape);
  }

  /** Persistent memory kept across steps (a KV cache), bound by the caller. */
  state(name: string, dtype: DType, shape: readonly Dim[]): TensorSpec {
    return this.#tensor(name, "state", dtype, shape);
  }

  /** Marks a tensor as a graph output. */
  output(t: TensorSpec): void {
    this.#outputs.push(t.id);
  }

  /** Row lookup: ids `[T]` into table `[V, D]`. */
  embedding(ids: TensorSpec, table: TensorSpec, name: string): TensorSpec {
    this.#expectRank(ids, 1, "embedding ids");
    this.#expectRank(table, 2, "embedding table");
    if (ids.dtype !== "i32") throw new TypeError(`Cannot embed "${ids.name}": ids must be "i32", got "${ids.dtype}"`);
    return this.#node({ kind: "embedding" }, [ids, table], name, [ids.shape[0], table.shape[1]]);
  }

  /** RMS normalization of each row of x `[T, D]` by weight `[D]`. */
  rmsNorm(x: TensorSpec, w: TensorSpec, eps: number, name: string): TensorSpec {
    this.#expectRank(x, 2, "rmsNorm input");
    this.#expectDims(w.shape, [x.shape[1]], `rmsNorm weight "${w.name}"`);
    return this.#node({ kind: "rmsNorm", eps }, [x, w], name, x.shape);
  }

  /** `x · Wᵀ`: x `[T, K]`, W `[N, K]` gives `[T, N]`. */
  matmul(x: TensorSpec, w: TensorSpec, name: string): TensorSpec {
    this.#expectRank(x, 2, "matmul input");
    this.#expectRank(w, 2, "matmul weight");
    this.#expectDims([w.shape[1]], [x.shape[1]], `matmul weight "${w.name}" columns`);
    return this.#node({ kind: "matmul" }, [x, w], name, [x.shape[0], w.shape[0]]);
  }

  /** Rotary embedding of x `[T, heads * headDim]` at each token's position (`i32 [T]`). */
  rope(x: TensorSpec, positions: TensorSpec, heads: number, headDim: number, theta: number, name: string): TensorSpec {
    this.#expectDims(x.shape.slice(1), [heads * headDim], `rope input "${x.name}"`);
    this.#expectIndex(positions, [x.shape[0]], "rope positions");
    if (headDim % 2 !== 0) throw new RangeError(`Cannot apply rope to head dimension ${headDim}: it must be even`);
    return this.#node({ kind: "rope", heads, headDim, theta }, [x, positions], name, x.shape);
  }

  /** `silu(gate) * up`. */
  siluMul(gate: TensorSpec, up: TensorSpec, name: string): TensorSpec {
    this.#expectDims(up.shape, gate.shape, `siluMul input "${up.name}"`);
    return this.#node({ kind: "siluMul" }, [gate, up], name, gate.shape);
  }

  /** `a + b`. */
  add(a: TensorSpec, b: TensorSpec, name: string): TensorSpec {
    this.#expectDims(b.shape, a.shape, `add input "${b.name}"`);
    return this.#node({ kind: "add" }, [a, b], name, a.shape);
  }

  /**
   * Causal grouped-query attention over a paged cache that writes k, v first: see the
   * `attention` op for the page table (`index.pages [S, pagesPerSeq]`) and the
   * per-token `index.positions` and `index.seqOf` (`i32 [T]`).
   */
  attention(
    q: TensorSpec,
    k: TensorSpec,
    v: TensorSpec,
    kCache: TensorSpec,
    vCache: TensorSpec,
    index: { positions: TensorSpec; seqOf: TensorSpec; pages: TensorSpec },
    attrs: { heads: number; kvHeads: number; headDim: number; scale: number; window: number; pageSize: number },
    name: string,
  ): TensorSpec {
    const { heads, kvHeads, headDim, pageSize } = attrs;
    if (heads % kvHeads !== 0) {
      throw new RangeError(`Cannot group ${heads} query heads over ${kvHeads} kv heads: not a multiple`);
    }
    const rows = kCache.shape[0];
    if (!Number.isInteger(pageSize) || pageSize < 1 || typeof rows !== "number" || rows % pageSize !== 0) {
      throw new RangeError(
        `Cannot page cache "${kCache.name}" of ${rows} rows in pages of ${pageSize}: expected a whole number of pages`,
      );
    }
    this.#expectIndex(index.positions, [q.shape[0]], "attention positions");
    this.#expectIndex(index.seqOf, [q.shape[0]], "attention sequence rows");
    this.#expectRank(index.pages, 2, "attention page table");
    this.#expectIndex(index.pages, index.pages.shape, "attention page table");
    this.#expectDims(q.shape.slice(1), [heads * headDim], `attention query "${q.name}"`);
    this.#expectDims(k.shape.slice(1), [kvHeads * headDim], `attention key "${k.name}"`);
    this.#expectDims(v.shape.slice(1), [kvHeads * headDim], `attention value "${v.name}"`);
    this.#expectDims(kCache.shape.slice(1), [kvHeads * headDim], `attention key cache "${kCache.name}"`);
    this.#expectDims(vCache.shape, kCache.shape, `attention value cache "${vCache.name}"`);
    for (const c of [kCache, vCache]) {
      if (c.kind !== "state") throw new TypeError(`Cannot use "${c.name}" as a cache: it must be a state tensor`);
    }
    const { positions, seqOf, pages } = index;
    return this.#node(
      { kind: "attention", ...attrs },
      [q, k, v, kCache, vCache, positions, seqOf, pages],
      name,
      q.shape,
    );
  }

  /** Rows `rows` (`i32 [R]`) of x `[T, D]`, as `[R, D]`. */
  gatherRows(x: TensorSpec, rows: TensorSpec, name: string): TensorSpec {
    this.#expectRank(x, 2, "gatherRows input");
    this.#expectRank(rows, 1, "gatherRows rows");
    this.#expectIndex(rows, rows.shape, "gatherRows rows");
    return this.#node({ kind: "gatherRows" }, [x, rows], name, [rows.shape[0], x.shape[1]]);
  }

  /** The finished graph (the builder can keep adding afterwards). */
  build(): Graph {
    if (this.#outputs.length === 0) throw new RangeError("Cannot build a graph without outputs");
    return {
      tensors: [...this.#tensors],
      nodes: [...this.#nodes],
      inputs: [...this.#inputs],
      outputs: [...this.#outputs],
    };
  }

  #tensor(name: string, kind: TensorKind, dtype: DType, shape: readonly Dim[]): TensorSpec {
    if (this.#names.has(name)) throw new TypeError(`Cannot add tensor "${name}": the name is taken`);
    for (const d of shape) {
      if (typeof d === "number" && (!Number.isInteger(d) || d <= 0)) {
        throw new RangeError(
          `Cannot add tensor "${name}" of shape ${formatShape(shape)}: dimensions must be positive integers`,
        );
      }
    }
    this.#names.add(name);
    const t: TensorSpec = { id: this.#tensors.length, name, kind, dtype, shape: [...shape] };
    this.#tensors.push(t);
    return t;
  }

  #node(op: Op, inputs: TensorSpec[], name: string, shape: readonly Dim[]): TensorSpec {
    const out = this.#tensor(name, "activation", "f32", shape);
    this.#nodes.push({ id: this.#nodes.length, op, inputs: inputs.map((t) => t.id), output: out.id });
    return out;
  }

  #expectRank(t: TensorSpec, rank: number, what: string): void {
    if (t.shape.length !== rank) {
      throw new TypeError(`Cannot use "${t.name}" of shape ${formatShape(t.shape)} as ${what}: expected rank ${rank}`);
    }
  }

  /** An `i32` tensor of shape `want`. */
  #expectIndex(t: TensorSpec, want: readonly Dim[], what: string): void {
    if (t.dtype !== "i32") throw new TypeError(`Cannot use "${t.name}" as ${what}: it must be "i32", got "${t.dtype}"`);
    this.#expectDims(t.shape, want, `${what} "${t.name}"`);
  }

  #expectDims(got: readonly Dim[], want: readonly Dim[], what: string): void {
    if (got.length !== want.length || got.some((d, i) => d !== want[i])) {
      throw new TypeError(`Cannot use ${what} of shape ${formatShape(got)}: expected ${formatShape(want)}`);
    }
  }
}
