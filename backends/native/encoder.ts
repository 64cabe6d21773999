/**
 * The native plan encoder: checks every node of a plan against what the C kernels
 * accept (shapes, dtypes, slot sizes, bindings) and writes one fixed-size record
 * per node (`llm_node` in `c/llm.h`), so that the C side never reads or writes
 * outside the buffers it is given.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, isQuantized, QUANT_BLOCK } from "../../graph/dtype.ts";
import type { Dim, Node, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { TokenIdLimits } from "../checks.ts";
import { UnsupportedError } from "../contract.ts";
import type { PlanWork } from "./threads.ts";
import type { NativeTensor } from "./tensor.ts";

/** int32 slots per node record (`LLM_NODE_INTS` in `c/llm.h`). */
export const NODE_INTS = 24;

/** Op codes of the C side (`exec.c`). */
const OP_CODES: Readonly<Record<OpKind, number>> = {
  embedding: 0,
  rmsNorm: 1,
  matmul: 2,
  rope: 3,
  siluMul: 4,
  add: 5,
  attention: 6,
  lastRow: 7,
};

/** Dtype codes of the C side (`llm.h`). */
const DTYPE_CODES: Readonly<Record<DType, number>> = { f32: 0, f16: 1, bf16: 2, q8_0: 3, q4_0: 4, i32: 5 };

/** The row count the C side reads as "the step's T" (`rows_of` in `exec.c`). */
const STEP_ROWS = -1;

/** Rows of a tensor as the C side reads them: a fixed count, or {@link STEP_ROWS}. */
function rowsCode(d: Dim, what: string): number {
  if (typeof d === "number") return d;
  if (d === "T") return STEP_ROWS;
  throw new UnsupportedError(`Backend "native" cannot run ${what}: symbolic dimension "${d}" (only "T")`);
}

/** A plan encoded for `llm_exec_new`. */
export interface EncodedPlan {
  /** {@link NODE_INTS} int32 values per node, in the plan's order. */
  readonly nodes: Int32Array;
  /** The fewest rows of any attention node's caches (Infinity without attention). */
  readonly capacity: number;
  /** The plan's matmul work, for the thread choice. */
  readonly work: PlanWork;
}

/** What encoding one node reads and writes. */
interface Target {
  readonly plan: ExecutionPlan;
  readonly bindings: ReadonlyMap<number, NativeTensor>;
  readonly maxT: number;
  readonly idLimits: TokenIdLimits;
  readonly nodes: Int32Array;
  readonly floats: Float32Array;
  readonly view: DataView;
  readonly work: { macsPerRow: number; weightBytes: number };
}

/**
 * Checks and encodes every node of `plan` for steps of up to `maxT` rows; records in
 * `idLimits` the table size behind every ids input. Throws a `TypeError` (or an
 * {@link UnsupportedError}) naming the node for anything the kernels do not accept.
 */
export function encodePlan(
  plan: ExecutionPlan,
  bindings: ReadonlyMap<number, NativeTensor>,
  maxT: number,
  idLimits: TokenIdLimits,
): EncodedPlan {
  const nodes = new Int32Array(plan.order.length * NODE_INTS);
  const target: Target = {
    plan,
    bindings,
    maxT,
    idLimits,
    nodes,
    floats: new Float32Array(nodes.buffer),
    view: new DataView(nodes.buffer),
    work: { macsPerRow: 0, weightBytes: 0 },
  };
  let capacity = Infinity;
  plan.order.forEach((nodeId, i) => {
    capacity = Math.min(capacity, encodeNode(target, plan.graph.nodes[nodeId], i * NODE_INTS));
  });
  return { nodes, capacity, work: target.work };
}

/** Checks one node's shapes and writes its record; returns its cache capacity (Infinity if none). */
function encodeNode(
  target: Target,
  node: Node,
  at: number,
): number {
  const { plan, bindings, maxT, idLimits, nodes, floats, view, work } = target;
  const { graph, slots } = plan;
  const op = node.op;
  const label = `node ${node.id} (${op.kind})`;
  const tensor = (id: number) => graph.tensors[id];
  const fail = (msg: string): never => {
    throw new TypeError(`Cannot compile ${label} on backend "native": ${msg}`);
  };
  const maxRows = (d: Dim) => (typeof d === "number" ? d : maxT);
  // An activation/input must be [rows, width] f32 (or i32 ids [rows]) with a slot large enough.
  const act = (id: number, width: number | undefined, what: string): Dim => {
    const t = tensor(id);
    const slot = slots[id];
    if (!slot) fail(`${what} "${t.name}" is not an activation or input`);
    const rank = width === undefined ? 1 : 2;
    if (t.shape.length !== rank || (width !== undefined && t.shape[1] !== width)) {
      fail(`${what} "${t.name}" has shape [${t.shape}], expected [rows${width === undefined ? "" : `, ${width}`}]`);
    }
    const dtype = width === undefined ? "i32" : "f32";
    if (t.dtype !== dtype) fail(`${what} "${t.name}" is "${t.dtype}", expected "${dtype}"`);
    const rows = t.shape[0];
    rowsCode(rows, `${what} "${t.name}"`);
    if (slot!.bytes < maxRows(rows) * (width ?? 1) * 4) {
      fail(`${what} "${t.name}" has a slot of ${slot!.bytes} bytes`);
    }
    return rows;
  };
  const sameRows = (a: Dim, b: Dim, what: string) => {
    if (a !== b) fail(`${what} has ${b} rows, expected ${a}`);
  };
  const bound = (id: number, what: string): NativeTensor => {
    const b = bindings.get(id);
    if (!b) fail(`${what} "${tensor(id).name}" is not bound`);
    return b!;
  };
  const width = (id: number): number => {
    const w = tensor(id).shape[1];
    if (typeof w !== "number") fail(`"${tensor(id).name}" has a symbolic width`);
    return w as number;
  };
  const set = (
    dtype: DType,
    rows: Dim,
    ins: readonly number[],
    params: readonly number[],
    fl: readonly number[] = [],
  ) => {
    nodes[at] = OP_CODES[op.kind];
    nodes[at + 1] = DTYPE_CODES[dtype];
    nodes[at + 2] = node.output;
    nodes[at + 3] = rowsCode(rows, label);
    ins.forEach((v, i) => (nodes[at + 4 + i] = v));
    params.forEach((v, i) => (nodes[at + 9 + i] = v));
    fl.forEach((v, i) => (floats[at + 16 + i] = v));
    for (const v of nodes.subarray(at, at + 16)) {
      if (!Number.isInteger(v)) fail(`parameter ${v} is not an integer`);
    }
  };
  const [a, b] = node.inputs;
  switch (op.kind) {
    case "embedding": {
      const table = bound(b, "table");
      if (table.shape.length !== 2) fail(`table "${table.name}" has shape [${table.shape}]`);
      const [V, D] = table.shape;
      const rows = act(a, undefined, "ids");
      if (!graph.inputs.includes(a)) fail(`ids "${tensor(a).name}" must be a graph input`);
      sameRows(rows, act(node.output, D, "output"), "the output");
      idLimits.add(a, V);
      if (isQuantized(table.dtype) && D % QUANT_BLOCK !== 0) fail(`rows of ${D} are not whole blocks`);
      set(table.dtype, rows, [a, b], [D, V]);
      return Infinity;
    }
    case "rmsNorm": {
      const w = bound(b, "weight");
      const D = w.shape[0];
      if (w.shape.length !== 1 || w.dtype !== "f32") fail(`weight "${w.name}" must be f32 [D]`);
      const rows = act(a, D, "input");
      sameRows(rows, act(node.output, D, "output"), "the output");
      set("f32", rows, [a, b], [D], [op.eps]);
      return Infinity;
    }
    case "matmul": {
      const w = bound(b, "weight");
      if (w.shape.length !== 2) fail(`weight "${w.name}" has shape [${w.shape}]`);
      const [N, K] = w.shape;
      if (isQuantized(w.dtype) && K % QUANT_BLOCK !== 0) fail(`rows of ${K} are not whole ${w.dtype} blocks`);
      const rows = act(a, K, "input");
      sameRows(rows, act(node.output, N, "output"), "the output");
      work.macsPerRow += K * N;
      work.weightBytes += w.byteLength;
      set(w.dtype, rows, [a, b], [K, N]);
      return Infinity;
    }
    case "rope": {
      const { heads, headDim, theta } = op;
      if (headDim % 2 !== 0 || headDim / 2 > 512 || heads < 1) fail(`head dimension ${headDim} is not supported`);
      const rows = act(a, heads * headDim, "input");
      sameRows(rows, act(node.output, heads * headDim, "output"), "the output");
      set("f32", rows, [a], [heads, headDim]);
      view.setFloat64((at + 14) * 4, theta, true);
      return Infinity;
    }
    case "siluMul":
    case "add": {
      const F = width(node.output);
      const rows = act(node.output, F, "output");
      sameRows(rows, act(a, F, "first input"), "the first input");
      sameRows(rows, act(b, F, "second input"), "the second input");
      set("f32", rows, [a, b], [F]);
      return Infinity;
    }
    case "lastRow": {
      const D = width(a);
      const rows = act(a, D, "input");
      const outRows = act(node.output, D, "output");
      if (outRows !== 1) fail(`output has ${outRows} rows, expected 1`);
      set("f32", 1, [a], [D, rowsCode(rows, label)]);
      return Infinity;
    }
    case "attention": {
      const { heads, kvHeads, headDim, scale, window } = op;
      if (!(heads >= 1 && kvHeads >= 1 && heads % kvHeads === 0 && headDim >= 1)) {
        fail(`${heads} heads over ${kvHeads} kv heads of ${headDim} is not supported`);
      }
      if (!Number.isInteger(window) || window < 0) fail(`window ${window} is not supported`);
      const [, , v, kc, vc] = node.inputs;
      const kvDim = kvHeads * headDim;
      const rows = act(a, heads * headDim, "query");
      sameRows(rows, act(b, kvDim, "key"), "the key");
      sameRows(rows, act(v, kvDim, "value"), "the value");
      sameRows(rows, act(node.output, heads * headDim, "output"), "the output");
      const kCache = bound(kc, "key cache"), vCache = bound(vc, "value cache");
      const kv = kCache.dtype;
      if (!isKvDType(kv)) fail(`key cache "${kCache.name}" is "${kv}"`);
      const cap = kCache.shape[0];
      for (const c of [kCache, vCache]) {
        // Both caches share one dtype and shape: the kernel reads them with the same element size and row count.
        if (
          c.dtype !== kv || c.shape.length !== 2 || c.shape[1] !== kvDim || c.shape[0] !== cap ||
          c.byteLength !== byteSize(kv, cap * kvDim)
        ) {
          fail(`cache "${c.name}" is ${c.dtype} [${c.shape}], expected ${kv} [capacity, ${kvDim}]`);
        }
      }
      set(kv, rows, [a, b, v, kc, vc], [heads, kvHeads, headDim, window, cap], [scale]);
      return cap;
    }
  }
}
