/**
 * The dataflow graph IR: plain data describing tensors and the ops between them.
 *
 * A graph only records what to compute. The scheduler ({@link planGraph}) orders
 * it and plans its buffers, and a backend runs the plan. Shapes may hold symbolic
 * dimensions (strings) that are bound when a step runs. The model graphs use three:
 *
 * - `T`: the tokens of the step. A step is a batch: its tokens may belong to
 *   several sequences (decode tokens of some, prompt chunks of others), and every
 *   row-wise op sees them as one `[T, …]` batch.
 * - `S`: the sequences the step's tokens belong to (rows of the page table).
 * - `R`: the rows whose logits the step reads (see `gatherRows`).
 *
 * Per-token facts (a token's sequence and position) are `i32` inputs, so nothing
 * about a step is hidden in arguments: a graph and its inputs say everything.
 *
 * @module
 */

import type { DType } from "./dtype.ts";

/** One dimension: a number, or the name of a dimension bound per step (e.g. `"T"`). */
export type Dim = number | string;

/** Where a tensor's memory comes from. */
export type TensorKind =
  /** Written by the caller before each step (token ids). */
  | "input"
  /** Read-only parameters loaded from the model file. */
  | "weight"
  /** Persistent memory owned by the caller and kept across steps (the KV cache). */
  | "state"
  /** Intermediate values; their memory is planned and reused. */
  | "activation";

/** A tensor of the graph. Row-major; the last dimension is contiguous. */
export interface TensorSpec {
  /** Index of the tensor in {@link Graph.tensors}. */
  readonly id: number;
  /** A readable name, unique in the graph (weights use their file names). */
  readonly name: string;
  /** Where its memory comes from. */
  readonly kind: TensorKind;
  /** Its element type (activations are always `f32`). */
  readonly dtype: DType;
  /** Its dimensions: numbers, or names bound per step. */
  readonly shape: readonly Dim[];
}

/** The closed set of operations. Every backend implements these semantics. */
export type Op =
  /** `out[t] = table[ids[t]]`. Inputs: ids `i32 [T]`, table `[V, D]`. Output `[T, D]`. */
  | { readonly kind: "embedding" }
  /** `out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w`. Inputs: x `[T, D]`, w `[D]`. */
  | { readonly kind: "rmsNorm"; readonly eps: number }
  /** `out = x · Wᵀ`. Inputs: x `[T, K]`, W `[N, K]` (any weight dtype). Output `[T, N]`. */
  | { readonly kind: "matmul" }
  /**
   * Rotary position embedding in the "rotate half" layout of Hugging Face Llama:
   * for each head, element `i < d/2` pairs with `i + d/2`, angle
   * `positions[t] * theta^(-2i/d)`. Inputs: x `[T, heads * headDim]`, positions
   * `i32 [T]` (each token's position in its own sequence). Output the shape of x.
   */
  | {
    readonly kind: "rope";
    readonly heads: number;
    readonly headDim: number;
    readonly theta: number;
  }
  /** `out = silu(gate) * up` (SwiGLU). Inputs: gate, up `[T, F]`. */
  | { readonly kind: "siluMul" }
  /** `out = a + b`, same shapes. */
  | { readonly kind: "add" }
  /**
   * Causal self-attention with grouped-query heads over a paged KV cache shared by
   * the step's sequences. Inputs:
   *
   * 0. q `[T, heads * headDim]`; 1, 2. k and v `[T, kvHeads * headDim]`;
   * 3, 4. kCache and vCache (state) `[pageCount * pageSize, kvHeads * headDim]`: the pool;
   * 5. positions `i32 [T]`: each token's position `p` in its sequence;
   * 6. seqOf `i32 [T]`: each token's row of the page table;
   * 7. pages `i32 [S, pagesPerSeq]`: per sequence, the pool page holding each run
   *    of `pageSize` positions.
   *
   * Position `j` of the sequence of page-table row `s` lives in cache row
   * `pages[s][floor(j / pageSize)] * pageSize + j % pageSize`. First every token's k
   * and v are written to the row of its own `(seqOf[t], positions[t])`; then for each
   * token `t` and head `h`, attention runs over the rows of its sequence's positions
   * `max(0, p - window + 1) .. p` (all positions up to `p` when `window` is 0) of kv
   * head `h / (heads / kvHeads)`, with scores scaled by `scale` and a softmax. So the
   * causal rule holds per sequence, and tokens of one sequence in the step see each
   * other as they would in separate steps. The caller keeps the rows a step writes
   * distinct and owned by one sequence. Output `[T, heads * headDim]`.
   */
  | {
    readonly kind: "attention";
    readonly heads: number;
    readonly kvHeads: number;
    readonly headDim: number;
    readonly scale: number;
    readonly window: number;
    readonly pageSize: number;
  }
  /**
   * Picks rows: `out[r] = x[rows[r]]`. Inputs: x `[T, D]`, rows `i32 [R]`. Output
   * `[R, D]`. The model graphs pick the tokens whose logits a step needs (the last
   * token of each sequence that samples next, or every token), so the output head
   * runs on those rows only.
   */
  | { readonly kind: "gatherRows" };

/** The name of an op. */
export type OpKind = Op["kind"];

/** Every op kind, in a stable order. */
export const OP_KINDS: readonly OpKind[] = [
  "embedding",
  "rmsNorm",
  "matmul",
  "rope",
  "siluMul",
  "add",
  "attention",
  "gatherRows",
];

/**
 * The input positions of each op that hold indices (`i32` values a kernel uses to
 * address memory or rows), with what each indexes: backends check every value
 * written to such an input against its bound (see `backends/checks.ts`).
 */
export const INDEX_INPUTS: Readonly<Record<OpKind, readonly number[]>> = {
  embedding: [0],
  rmsNorm: [],
  matmul: [],
  rope: [1],
  siluMul: [],
  add: [],
  attention: [5, 6, 7],
  gatherRows: [1],
};

/** One operation: reads its input tensors, writes its output tensor. */
export interface Node {
  /** Index of the node in {@link Graph.nodes}. */
  readonly id: number;
  /** The operation and its attributes. */
  readonly op: Op;
  /** Tensor ids read, in the order the op documents. */
  readonly inputs: readonly number[];
  /** Tensor id written (an activation). */
  readonly output: number;
}

/** A whole graph: tensors, nodes, and which tensors are the inputs and outputs. */
export interface Graph {
  /** Every tensor, indexed by id. */
  readonly tensors: readonly TensorSpec[];
  /** Every node, indexed by id, in the order recorded (not necessarily the execution order). */
  readonly nodes: readonly Node[];
  /** Input tensor ids (written by the caller each step). */
  readonly inputs: readonly number[];
  /** Output tensor ids (read by the caller after each step). */
  readonly outputs: readonly number[];
}

/** Binds the symbolic dimensions of a graph to numbers. */
export type DimBindings = Readonly<Record<string, number>>;

/** Resolves a shape against bindings; throws a `RangeError` for an unbound name. */
export function resolveShape(shape: readonly Dim[], dims: DimBindings): number[] {
  return shape.map((d) => {
    if (typeof d === "number") return d;
    const v = dims[d];
    if (v === undefined) throw new RangeError(`Cannot resolve dimension "${d}": it is not bound`);
    return v;
  });
}

/** Number of elements of a resolved shape. */
export function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Formats a shape such as `[T, 128]`. */
export function formatShape(shape: readonly Dim[]): string {
  return `[${shape.join(", ")}]`;
}
