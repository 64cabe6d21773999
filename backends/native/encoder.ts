/**
 * The native plan encoder: checks every node of a plan against what the C kernels
 * accept (shapes, dtypes, slot sizes, bindings, index inputs) and writes one
 * fixed-size record per node (`llm_node` in `c/llm.h`), so that the C side never
 * reads or writes outside the buffers it is given.
 *
 * The kernels trust the index inputs (token ids, positions, page tables, rows):
 * what keeps them in bounds is that every such input is a graph input whose arena
 * slot only `writeInput` writes, after `IndexChecks` checked each value, and that
 * starts zeroed (a valid index). So the encoder refuses an index operand that is
 * not an `i32` graph input, and any node output whose slot overlaps one.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, isQuantized, QUANT_BLOCK } from "../../graph/dtype.ts";
import type { Dim, Node, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import { nodeRows, UnsupportedError } from "../contract.ts";
import type { AttentionWork, MatmulWork, PlanWork } from "./threads.ts";
import type { NativeTensor } from "./tensor.ts";

/** int32 slots per node record (`LLM_NODE_INTS` in `c/llm.h`). */
export const NODE_INTS = 24;

/** Symbolic dimensions a step passes to the C side (`LLM_MAX_DIMS` in `c/llm.h`). */
export const MAX_DIMS = 4;

/** Where the fields of a record start (`llm_node` in `c/llm.h`), in int32 slots. */
const FIELD = { op: 0, dtype: 1, out: 2, rows: 3, in: 4, p: 12, f: 20 } as const;
/** int32 slots of `in` and `p`, and float slots of `f`. */
const IN_SLOTS = 8, P_SLOTS = 8, F_SLOTS = 2;
/** Rope keeps theta (f64) in `p[6..7]`. */
const THETA_SLOT = FIELD.p + 6;

/** Op codes of the C side (`llm.h`). */
const OP_CODES: Readonly<Record<OpKind, number>> = {
  embedding: 0,
  rmsNorm: 1,
  matmul: 2,
  rope: 3,
  siluMul: 4,
  add: 5,
  attention: 6,
  gatherRows: 7,
};

/** Dtype codes of the C side (`llm.h`). */
const DTYPE_CODES: Readonly<Record<DType, number>> = { f32: 0, f16: 1, bf16: 2, q8_0: 3, q4_0: 4, i32: 5 };

/** A plan encoded for `llm_exec_new`. */
export interface EncodedPlan {
  /** {@link NODE_INTS} int32 values per node, in the plan's order. */
  readonly nodes: Int32Array;
  /**
   * The symbolic dimensions node row counts name, in the order the C side reads
   * their values (a node's rows of `-1 - k` are the step's value of `dims[k]`).
   */
  readonly dims: readonly string[];
  /** The plan's largest value of each of {@link EncodedPlan.dims}. */
  readonly maxDims: Int32Array;
  /** The plan's work, for the thread and blocking choices. */
  readonly work: PlanWork;
}

/** What encoding one node reads and writes. */
interface Target {
  readonly plan: ExecutionPlan;
  readonly bindings: ReadonlyMap<number, NativeTensor>;
  readonly dims: string[];
  readonly nodes: Int32Array;
  readonly floats: Float32Array;
  readonly view: DataView;
  readonly matmuls: MatmulWork[];
  readonly attention: AttentionWork[];
  /** Index inputs, checked against every node output's slot once all nodes are encoded. */
  readonly indexInputs: Set<number>;
  work: { weightBytes: number };
}

/**
 * Checks and encodes every node of `plan`. Throws a `TypeError` (or an
 * {@link UnsupportedError}) naming the node for anything the kernels do not accept.
 */
export function encodePlan(plan: ExecutionPlan, bindings: ReadonlyMap<number, NativeTensor>): EncodedPlan {
  const nodes = new Int32Array(plan.order.length * NODE_INTS);
  const target: Target = {
    plan,
    bindings,
    dims: [],
    nodes,
    floats: new Float32Array(nodes.buffer),
    view: new DataView(nodes.buffer),
    matmuls: [],
    attention: [],
    indexInputs: new Set(),
    work: { weightBytes: 0 },
  };
  plan.order.forEach((nodeId, i) => encodeNode(target, plan.graph.nodes[nodeId], i * NODE_INTS));
  checkIndexSlots(plan, target.indexInputs);
  const maxDims = Int32Array.from(target.dims, (d) => plan.maxDims[d]);
  return {
    nodes,
    dims: target.dims,
    maxDims,
    work: { matmuls: target.matmuls, attention: target.attention, weightBytes: target.work.weightBytes },
  };
}

/** No node writes over an index input: its values are only ever the ones `writeInput` checked. */
function checkIndexSlots(plan: ExecutionPlan, indexInputs: ReadonlySet<number>): void {
  const { graph, slots } = plan;
  for (const id of indexInputs) {
    const a = slots[id]!;
    for (const node of graph.nodes) {
      const b = slots[node.output];
      if (b && a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes) {
        throw new TypeError(
          `Cannot compile node ${node.id} (${node.op.kind}) on backend "native": its output "${
            graph.tensors[node.output].name
          }" overlaps index input "${graph.tensors[id].name}" in the arena`,
        );
      }
    }
  }
}

/** Checks one node's shapes and writes its record. */
function encodeNode(target: Target, node: Node, at: number): void {
  const { plan, bindings, dims, nodes, floats, view } = target;
  const { graph, slots } = plan;
  const op = node.op;
  const label = `node ${node.id} (${op.kind})`;
  const tensor = (id: number) => graph.tensors[id];
  const fail = (msg: string): never => {
    throw new TypeError(`Cannot compile ${label} on backend "native": ${msg}`);
  };
  const maxOf = (d: Dim): number => (typeof d === "number" ? d : plan.maxDims[d]);
  /** A row count as the C side reads it: a fixed count, or -1 - k for symbolic dimension k. */
  const rowsCode = (d: Dim): number => {
    if (typeof d === "number") {
      if (!Number.isInteger(d) || d < 1) fail(`row count ${d} is not a positive integer`);
      return d;
    }
    if (!Number.isInteger(plan.maxDims[d])) fail(`dimension "${d}" has no size in the plan`);
    let k = dims.indexOf(d);
    if (k < 0) {
      if (dims.length === MAX_DIMS) {
        throw new UnsupportedError(
          `Backend "native" cannot run ${label}: its rows "${d}" make more than ${MAX_DIMS} symbolic row dimensions`,
        );
      }
      k = dims.push(d) - 1;
    }
    return -1 - k;
  };
  const slotOf = (id: number, what: string) => {
    const slot = slots[id];
    if (!slot) fail(`${what} "${tensor(id).name}" is not an activation or input`);
    return slot!;
  };
  // An f32 activation or input [rows, width] whose slot holds the plan's largest rows.
  const act = (id: number, width: number, what: string): Dim => {
    const t = tensor(id);
    const slot = slotOf(id, what);
    if (t.shape.length !== 2 || t.shape[1] !== width) {
      fail(`${what} "${t.name}" has shape [${t.shape}], expected [rows, ${width}]`);
    }
    if (t.dtype !== "f32") fail(`${what} "${t.name}" is "${t.dtype}", expected "f32"`);
    const rows = t.shape[0];
    if (slot.bytes < maxOf(rows) * width * 4) fail(`${what} "${t.name}" has a slot of ${slot.bytes} bytes`);
    return rows;
  };
  // The node's output: an activation (never an input, so no kernel writes over one) with the node's rows.
  const output = (width: number): Dim => {
    const t = tensor(node.output);
    if (t.kind !== "activation") fail(`output "${t.name}" is a ${t.kind}, expected an activation`);
    const rows = act(node.output, width, "output");
    if (rows !== nodeRows(graph, node)) fail(`output "${t.name}" has rows ${rows}`);
    return rows;
  };
  // An index operand: an i32 graph input of the given shape, so IndexChecks sees every value it holds.
  const index = (id: number, shape: readonly Dim[], what: string): void => {
    const t = tensor(id);
    const slot = slotOf(id, what);
    if (t.kind !== "input" || !graph.inputs.includes(id)) fail(`${what} "${t.name}" must be a graph input`);
    if (t.dtype !== "i32") fail(`${what} "${t.name}" is "${t.dtype}", expected "i32"`);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      fail(`${what} "${t.name}" has shape [${t.shape}], expected [${shape}]`);
    }
    const count = shape.reduce<number>((n, d) => n * maxOf(d), 1);
    if (slot.bytes < count * 4) fail(`${what} "${t.name}" has a slot of ${slot.bytes} bytes`);
    target.indexInputs.add(id);
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
    if (ins.length > IN_SLOTS || params.length > P_SLOTS || fl.length > F_SLOTS) fail("too many operands");
    nodes[at + FIELD.op] = OP_CODES[op.kind];
    nodes[at + FIELD.dtype] = DTYPE_CODES[dtype];
    nodes[at + FIELD.out] = node.output;
    nodes[at + FIELD.rows] = rowsCode(rows);
    ins.forEach((v, i) => (nodes[at + FIELD.in + i] = v));
    params.forEach((v, i) => {
      if (!Number.isSafeInteger(v) || Math.abs(v) > 0x7fffffff) fail(`parameter ${v} is not an int32`);
      nodes[at + FIELD.p + i] = v;
    });
    fl.forEach((v, i) => (floats[at + FIELD.f + i] = v));
  };
  const [a, b] = node.inputs;
  switch (op.kind) {
    case "embedding": {
      const table = bound(b, "table");
      if (table.shape.length !== 2) fail(`table "${table.name}" has shape [${table.shape}]`);
      const [V, D] = table.shape;
      const rows = output(D);
      index(a, [rows], "ids");
      if (isQuantized(table.dtype) && D % QUANT_BLOCK !== 0) fail(`rows of ${D} are not whole blocks`);
      set(table.dtype, rows, [a, b], [D, V]);
      return;
    }
    case "rmsNorm": {
      const w = bound(b, "weight");
      const D = w.shape[0];
      if (w.shape.length !== 1 || w.dtype !== "f32") fail(`weight "${w.name}" must be f32 [D]`);
      const rows = output(D);
      sameRows(rows, act(a, D, "input"), "the input");
      set("f32", rows, [a, b], [D], [op.eps]);
      return;
    }
    case "matmul": {
      const w = bound(b, "weight");
      if (w.shape.length !== 2) fail(`weight "${w.name}" has shape [${w.shape}]`);
      const [N, K] = w.shape;
      if (isQuantized(w.dtype) && K % QUANT_BLOCK !== 0) fail(`rows of ${K} are not whole ${w.dtype} blocks`);
      const rows = output(N);
      sameRows(rows, act(a, K, "input"), "the input");
      target.matmuls.push({ rows, macsPerRow: K * N });
      target.work.weightBytes += w.byteLength;
      set(w.dtype, rows, [a, b], [K, N]);
      return;
    }
    case "rope": {
      const { heads, headDim, theta } = op;
      if (headDim % 2 !== 0 || headDim / 2 > 512 || heads < 1) fail(`head dimension ${headDim} is not supported`);
      const rows = output(heads * headDim);
      sameRows(rows, act(a, heads * headDim, "input"), "the input");
      index(b, [rows], "positions");
      set("f32", rows, [a, b], [heads, headDim]);
      view.setFloat64((at + THETA_SLOT) * 4, theta, true);
      return;
    }
    case "siluMul":
    case "add": {
      const F = width(node.output);
      const rows = output(F);
      sameRows(rows, act(a, F, "first input"), "the first input");
      sameRows(rows, act(b, F, "second input"), "the second input");
      set("f32", rows, [a, b], [F]);
      return;
    }
    case "gatherRows": {
      const D = width(a);
      const rows = output(D);
      act(a, D, "input");
      index(b, [rows], "rows");
      set("f32", rows, [a, b], [D]);
      return;
    }
    case "attention":
      return encodeAttention(target, node, op, { fail, act, output, index, sameRows, bound, set });
  }
}

/** The helpers of {@link encodeNode} that attention needs. */
interface NodeHelpers {
  fail(msg: string): never;
  act(id: number, width: number, what: string): Dim;
  output(width: number): Dim;
  index(id: number, shape: readonly Dim[], what: string): void;
  sameRows(a: Dim, b: Dim, what: string): void;
  bound(id: number, what: string): NativeTensor;
  set(dtype: DType, rows: Dim, ins: readonly number[], params: readonly number[], fl?: readonly number[]): void;
}

function encodeAttention(
  target: Target,
  node: Node,
  op: Extract<Node["op"], { kind: "attention" }>,
  { fail, act, output, index, sameRows, bound, set }: NodeHelpers,
): void {
  const { heads, kvHeads, headDim, scale, window, pageSize } = op;
  if (!(Number.isInteger(heads) && Number.isInteger(kvHeads) && Number.isInteger(headDim))) {
    fail(`${heads} heads over ${kvHeads} kv heads of ${headDim} is not supported`);
  }
  if (!(heads >= 1 && kvHeads >= 1 && heads % kvHeads === 0 && headDim >= 1)) {
    fail(`${heads} heads over ${kvHeads} kv heads of ${headDim} is not supported`);
  }
  if (!Number.isInteger(window) || window < 0) fail(`window ${window} is not supported`);
  if (!Number.isInteger(pageSize) || pageSize < 1) fail(`page size ${pageSize} is not supported`);
  const [q, k, v, kc, vc, positions, seqOf, pages] = node.inputs;
  const graph = target.plan.graph;
  const kvDim = kvHeads * headDim;
  const rows = output(heads * headDim);
  sameRows(rows, act(q, heads * headDim, "query"), "the query");
  sameRows(rows, act(k, kvDim, "key"), "the key");
  sameRows(rows, act(v, kvDim, "value"), "the value");
  const kCache = bound(kc, "key cache"), vCache = bound(vc, "value cache");
  const kv = kCache.dtype;
  if (!isKvDType(kv)) fail(`key cache "${kCache.name}" is "${kv}"`);
  const poolRows = kCache.shape[0];
  for (const c of [kCache, vCache]) {
    // Both caches share one dtype and shape: the kernel reads them with the same element size and row count.
    if (
      c.dtype !== kv || c.shape.length !== 2 || c.shape[1] !== kvDim || c.shape[0] !== poolRows ||
      c.byteLength !== byteSize(kv, poolRows * kvDim)
    ) {
      fail(`cache "${c.name}" is ${c.dtype} [${c.shape}], expected ${kv} [pool rows, ${kvDim}]`);
    }
  }
  // Whole pages: the last page's rows must lie inside the pool, whatever page a table names.
  if (poolRows % pageSize !== 0) fail(`a pool of ${poolRows} rows is not whole pages of ${pageSize}`);
  const table = graph.tensors[pages].shape;
  if (table.length !== 2 || typeof table[1] !== "number") {
    fail(`page table "${graph.tensors[pages].name}" has shape [${table}], expected [sequences, pages per sequence]`);
  }
  const pagesPerSeq = table[1] as number;
  if (!Number.isInteger(pagesPerSeq) || pagesPerSeq < 1 || pagesPerSeq * pageSize > 0x7fffffff) {
    fail(`${pagesPerSeq} pages per sequence of ${pageSize} rows is not supported`);
  }
  index(positions, [rows], "positions");
  index(seqOf, [rows], "sequence rows");
  index(pages, table, "page table");
  target.attention.push({
    rows,
    positions,
    window,
    macsPerRow: 2 * heads * headDim,
    bytesPerRow: 2 * byteSize(kv, kvDim),
  });
  set(kv, rows, [q, k, v, kc, vc, positions, seqOf, pages], [heads, kvHeads, headDim, window, pageSize, pagesPerSeq], [
    scale,
  ]);
}
