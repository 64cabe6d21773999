/**
 * A compiled plan of the TypeScript backend: typed-array views of the arena and of
 * the bound tensors, and one closure per node, built once. The same code builds it
 * on the caller's thread (in-thread mode) and in the backend's worker, from plain
 * data and the memory of the tensors, so both modes run the very same kernels.
 *
 * @module
 */

import type { DType, WeightDType } from "../../graph/dtype.ts";
import type { Graph, Node } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import { nodeRows, UnsupportedError } from "../contract.ts";
import * as k from "./kernels.ts";
import { EMBEDDING_KERNELS, MATMUL_KERNELS, type TsWeight } from "./matmul.ts";

/** A tensor's memory as plain data: what a worker needs to view the same bytes. */
export interface TensorMemory {
  /** The tensor's name, for errors. */
  readonly name: string;
  /** How its bytes are laid out. */
  readonly dtype: DType;
  /** Its dimensions. */
  readonly shape: readonly number[];
  /** The buffer holding it (a `SharedArrayBuffer` when a worker runs the plan). */
  readonly buffer: ArrayBufferLike;
  /** Where its bytes start in `buffer`. */
  readonly byteOffset: number;
  /** How many bytes it has. */
  readonly byteLength: number;
}

/** A tensor as the kernels read it: its bytes and the typed views its dtype needs. */
export interface TsTensor extends TsWeight {
  /** The tensor's name, for errors. */
  readonly name: string;
  /** f32 view, set when dtype is f32. */
  readonly f32?: Float32Array;
  /** The f16 bit patterns, set when dtype is f16 (an f16 KV cache reads them). */
  readonly f16Bits?: Uint16Array;
}

/** Typed views of a tensor's memory (see {@link TsTensor}). */
export function viewTensor(m: TensorMemory): TsTensor {
  const { name, dtype, shape, buffer, byteOffset, byteLength } = m;
  const bytes = new Uint8Array(buffer, byteOffset, byteLength);
  const f32 = dtype === "f32" ? new Float32Array(buffer, byteOffset, byteLength / 4) : undefined;
  const f16Bits = dtype === "f16" ? new Uint16Array(buffer, byteOffset, byteLength / 2) : undefined;
  return { name, dtype, shape, bytes, f32, f16Bits };
}

/**
 * Where a step's dimension values and per-node times live next to the arena in an
 * executable's memory: the arena, then `dims` (i32, in the order of the plan's
 * `maxDims` keys), then `times` (f64, one per node of the plan's order).
 */
export interface StepLayout {
  /** The plan's symbolic dimension names, in the order their values are stored. */
  readonly dimNames: readonly string[];
  /** Byte offset of the dimension values. */
  readonly dimsOffset: number;
  /** Byte offset of the per-node times. */
  readonly timesOffset: number;
  /** Bytes of the whole memory. */
  readonly byteLength: number;
}

/** The memory layout of an executable of `plan` (see {@link StepLayout}). */
export function stepLayout(plan: ExecutionPlan): StepLayout {
  const dimNames = Object.keys(plan.maxDims);
  const dimsOffset = align8(plan.arenaBytes);
  const timesOffset = align8(dimsOffset + dimNames.length * 4);
  return { dimNames, dimsOffset, timesOffset, byteLength: timesOffset + plan.order.length * 8 };
}

function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** One node's work for a step of `rows` rows. */
type NodeStep = (rows: number) => void;

/**
 * A plan ready to run over one executable's memory. Not safe to run twice at once:
 * its kernels share scratch memory.
 */
export class Program {
  /** The step's dimension values, in {@link StepLayout.dimNames} order: the caller writes them before `run`. */
  readonly dims: Int32Array;
  /** Milliseconds per node of the last profiled run, in the plan's order. */
  readonly times: Float64Array;
  readonly #steps: NodeStep[];
  /** Per node: its fixed row count, or -1 when its rows are a dimension. */
  readonly #fixedRows: Int32Array;
  /** Per node: the index in {@link dims} of its rows' dimension (when not fixed). */
  readonly #rowDim: Int32Array;
  readonly #f32: (Float32Array | undefined)[] = [];
  readonly #i32: (Int32Array | undefined)[] = [];

  /**
   * Builds the node closures.
   * @param plan the plan
   * @param memory the executable's memory, laid out by {@link stepLayout}
   * @param bindings the tensors bound to the graph's weight and state tensors
   */
  constructor(plan: ExecutionPlan, memory: ArrayBufferLike, bindings: ReadonlyMap<number, TsTensor>) {
    const layout = stepLayout(plan);
    if (memory.byteLength < layout.byteLength) {
      throw new RangeError(`Cannot run the plan in ${memory.byteLength} bytes: it needs ${layout.byteLength}`);
    }
    this.dims = new Int32Array(memory, layout.dimsOffset, layout.dimNames.length);
    this.times = new Float64Array(memory, layout.timesOffset, plan.order.length);
    const { graph } = plan;
    graph.tensors.forEach((t, id) => {
      const slot = plan.slots[id];
      if (slot) {
        if (t.dtype === "i32") this.#i32[id] = new Int32Array(memory, slot.offset, slot.bytes / 4);
        else this.#f32[id] = new Float32Array(memory, slot.offset, slot.bytes / 4);
      } else {
        this.#f32[id] = bindings.get(id)?.f32;
      }
    });
    const count = plan.order.length;
    this.#fixedRows = new Int32Array(count);
    this.#rowDim = new Int32Array(count);
    this.#steps = plan.order.map((nodeId, i) => {
      const node = graph.nodes[nodeId];
      const rows = nodeRows(graph, node);
      if (typeof rows === "number") {
        this.#fixedRows[i] = rows;
      } else {
        const dim = layout.dimNames.indexOf(rows);
        if (dim < 0) {
          throw new TypeError(`Cannot compile node ${node.id} (${node.op.kind}): its rows "${rows}" are not planned`);
        }
        this.#fixedRows[i] = -1;
        this.#rowDim[i] = dim;
      }
      return this.#prepare(graph, node, bindings);
    });
  }

  /**
   * Runs every node once with the dimension values in {@link dims}. With `profile`,
   * writes each node's milliseconds into {@link times}. `stop` (a control word and its
   * index) is read between nodes: when it is no longer 0 the step ends early, so
   * disposing a backend does not wait for a long step.
   */
  run(profile: boolean, stop?: Int32Array, stopIndex = 0): void {
    const steps = this.#steps;
    const fixed = this.#fixedRows;
    const rowDim = this.#rowDim;
    const dims = this.dims;
    for (let i = 0; i < steps.length; i++) {
      if (stop !== undefined && Atomics.load(stop, stopIndex) !== 0) return;
      const rows = fixed[i] >= 0 ? fixed[i] : dims[rowDim[i]];
      if (profile) {
        const t0 = performance.now();
        steps[i](rows);
        this.times[i] = performance.now() - t0;
      } else {
        steps[i](rows);
      }
    }
  }

  #prepare(graph: Graph, node: Node, bindings: ReadonlyMap<number, TsTensor>): NodeStep {
    const f = (i: number) => this.#view(this.#f32, graph, node, i, "f32");
    const i32 = (i: number) => this.#view(this.#i32, graph, node, i, "i32");
    const out = this.#view(this.#f32, graph, node, -1, "f32");
    const width = (id: number) => rowWidth(graph, id);
    const op = node.op;
    switch (op.kind) {
      case "embedding": {
        const ids = i32(0);
        const table = bindings.get(node.inputs[1])!;
        const kernel = EMBEDDING_KERNELS[table.dtype as WeightDType];
        const D = table.shape[1];
        return (T) => kernel(out, ids, table, T, D);
      }
      case "rmsNorm": {
        const [x, w, D, eps] = [f(0), f(1), width(node.inputs[0]), op.eps];
        return (T) => k.rmsNorm(out, x, w, T, D, eps);
      }
      case "matmul": {
        const w = bindings.get(node.inputs[1])!;
        const kernel = MATMUL_KERNELS[w.dtype as WeightDType];
        const [x, N, K] = [f(0), w.shape[0], w.shape[1]];
        return (T) => kernel(out, x, w, T, K, N);
      }
      case "rope": {
        const { heads, headDim, theta } = op;
        const invFreq = Float64Array.from({ length: headDim / 2 }, (_, i) => theta ** (-2 * i / headDim));
        const [x, positions] = [f(0), i32(1)];
        return (T) => k.rope(out, x, positions, T, heads, headDim, invFreq);
      }
      case "siluMul": {
        const [g, u, F] = [f(0), f(1), width(node.output)];
        return (T) => k.siluMul(out, g, u, T * F);
      }
      case "add": {
        const [a, b, D] = [f(0), f(1), width(node.output)];
        return (T) => k.add(out, a, b, T * D);
      }
      case "gatherRows": {
        const [x, rows, D] = [f(0), i32(1), width(node.output)];
        return (R) => k.gatherRows(out, x, rows, R, D);
      }
      case "attention":
        return this.#prepareAttention(graph, node, op, bindings);
    }
  }

  /**
   * The view of input `i` of `node` (its output for -1), which the kernel reads as
   * `dtype`: a `TypeError` names the tensor when the plan gives it another dtype.
   */
  #view<V>(views: readonly (V | undefined)[], graph: Graph, node: Node, i: number, dtype: DType): V {
    const id = i < 0 ? node.output : node.inputs[i];
    const view = views[id];
    if (view === undefined) {
      const t = graph.tensors[id];
      const what = i < 0 ? "output" : `input ${i}`;
      throw new TypeError(
        `Cannot compile node ${node.id} (${node.op.kind}): its ${what} "${t?.name}" is ${t?.dtype} ${t?.kind}, expected ${dtype}`,
      );
    }
    return view;
  }

  #prepareAttention(
    graph: Graph,
    node: Node,
    op: Extract<Node["op"], { kind: "attention" }>,
    bindings: ReadonlyMap<number, TsTensor>,
  ): NodeStep {
    const out = this.#view(this.#f32, graph, node, -1, "f32");
    const [q, kk, v] = [0, 1, 2].map((i) => this.#view(this.#f32, graph, node, i, "f32"));
    const [positions, seqOf, pages] = [5, 6, 7].map((i) => this.#view(this.#i32, graph, node, i, "i32"));
    const [kc, vc] = [bindings.get(node.inputs[3])!, bindings.get(node.inputs[4])!];
    if (kc.dtype !== vc.dtype) {
      throw new UnsupportedError(
        `Backend "ts" cannot run attention with a "${kc.dtype}" key cache and a "${vc.dtype}" value cache`,
      );
    }
    const pagesPerSeq = graph.tensors[node.inputs[7]].shape[1];
    if (typeof pagesPerSeq !== "number") {
      throw new TypeError(
        `Cannot compile attention node ${node.id}: its page table's width "${pagesPerSeq}" is symbolic`,
      );
    }
    const shape: k.AttentionShape = { ...op, pagesPerSeq };
    const scratch = k.attentionScratch(shape);
    if (kc.dtype === "f16") {
      const [kb, vb] = [kc.f16Bits!, vc.f16Bits!];
      return (T) => k.attentionF16(out, q, kk, v, kb, vb, positions, seqOf, pages, T, shape, scratch);
    }
    const [kf, vf] = [kc.f32!, vc.f32!];
    return (T) => k.attention(out, q, kk, v, kf, vf, positions, seqOf, pages, T, shape, scratch);
  }
}

/** Values per row of a tensor: the product of its dimensions after the first, which must be numbers. */
function rowWidth(graph: Graph, id: number): number {
  const t = graph.tensors[id];
  let n = 1;
  for (const d of t.shape.slice(1)) {
    if (typeof d !== "number") {
      throw new TypeError(
        `Cannot compile a row-wise op over "${t.name}" [${t.shape}]: only its first dimension may be symbolic`,
      );
    }
    n *= d;
  }
  return n;
}
