/**
 * The scheduler's planning half: orders a graph's nodes and assigns every
 * activation a byte range in one arena, reusing memory once a tensor's last
 * reader has run. A plan is made once for the largest dimensions a step may
 * bind (e.g. the prefill chunk size) and then replayed for every step, so no
 * step allocates.
 *
 * @module
 */

import { byteSize } from "./dtype.ts";
import type { DimBindings, Graph, TensorSpec } from "./ir.ts";
import { elementCount, formatShape, resolveShape } from "./ir.ts";

/** Byte alignment of every arena slot: enough for any SIMD load. */
export const SLOT_ALIGN = 64;

/** Where a tensor lives in the arena. */
export interface BufferSlot {
  /** Byte offset in the arena. */
  readonly offset: number;
  /** Bytes reserved (for the largest bound dimensions). */
  readonly bytes: number;
  /** Position in {@link ExecutionPlan.order} of the node that writes it (-1 for inputs). */
  readonly firstUse: number;
  /** Position of the last node that reads it (`order.length` for outputs and inputs). */
  readonly lastUse: number;
}

/** A graph ordered and laid out in memory, ready for a backend to run. */
export interface ExecutionPlan {
  /** The graph planned. */
  readonly graph: Graph;
  /** Node ids in execution order. */
  readonly order: readonly number[];
  /** The largest value of each symbolic dimension the plan has room for. */
  readonly maxDims: DimBindings;
  /** Slot per tensor id: set for inputs and activations, undefined for weights and state. */
  readonly slots: readonly (BufferSlot | undefined)[];
  /** Total arena size in bytes. */
  readonly arenaBytes: number;
  /** What the arena would take with no reuse at all (to show what planning saves). */
  readonly unplannedBytes: number;
}

/** Orders `graph` topologically and plans its arena for dimensions up to `maxDims`. */
export function planGraph(graph: Graph, maxDims: DimBindings): ExecutionPlan {
  const order = topologicalOrder(graph);
  const n = graph.tensors.length;
  const firstUse = new Array<number>(n).fill(-1);
  const lastUse = new Array<number>(n).fill(-1);
  order.forEach((nodeId, step) => {
    const node = graph.nodes[nodeId];
    firstUse[node.output] = step;
    lastUse[node.output] = Math.max(lastUse[node.output], step);
    for (const i of node.inputs) lastUse[i] = Math.max(lastUse[i], step);
  });
  const end = order.length;
  for (const id of graph.outputs) lastUse[id] = end;
  for (const id of graph.inputs) {
    firstUse[id] = -1;
    lastUse[id] = end;
  }

  const sizeOf = (t: TensorSpec): number => {
    const count = elementCount(resolveShape(t.shape, maxDims));
    return alignUp(byteSize(t.dtype, count, count), SLOT_ALIGN);
  };

  const slots: (BufferSlot | undefined)[] = new Array(n).fill(undefined);
  const arena = new FreeList();
  let unplanned = 0;
  const place = (t: TensorSpec): void => {
    const bytes = sizeOf(t);
    unplanned += bytes;
    slots[t.id] = { offset: arena.take(bytes), bytes, firstUse: firstUse[t.id], lastUse: lastUse[t.id] };
  };
  for (const id of graph.inputs) place(graph.tensors[id]);
  order.forEach((nodeId, step) => {
    const node = graph.nodes[nodeId];
    place(graph.tensors[node.output]);
    // Free after placing the output, so no node writes over its own inputs.
    for (const id of new Set([...node.inputs, node.output])) {
      const slot = slots[id];
      if (slot && lastUse[id] === step) arena.give(slot.offset, slot.bytes);
    }
  });
  return { graph, order, maxDims: { ...maxDims }, slots, arenaBytes: arena.high, unplannedBytes: unplanned };
}

/** Kahn's algorithm, keeping the recorded order among ready nodes. */
function topologicalOrder(graph: Graph): number[] {
  const producer = new Map<number, number>();
  for (const node of graph.nodes) {
    if (producer.has(node.output)) {
      throw new TypeError(`Cannot plan the graph: tensor "${graph.tensors[node.output].name}" is written twice`);
    }
    producer.set(node.output, node.id);
  }
  const pending = graph.nodes.map((node) => node.inputs.filter((i) => producer.has(i)).length);
  const readers = graph.nodes.map(() => [] as number[]);
  for (const node of graph.nodes) {
    for (const i of node.inputs) {
      const p = producer.get(i);
      if (p !== undefined) readers[p].push(node.id);
      else if (graph.tensors[i].kind === "activation") {
        throw new TypeError(`Cannot plan the graph: activation "${graph.tensors[i].name}" has no producer`);
      }
    }
  }
  const ready = graph.nodes.filter((_, i) => pending[i] === 0).map((node) => node.id);
  const order: number[] = [];
  while (ready.length > 0) {
    ready.sort((a, b) => a - b);
    const id = ready.shift()!;
    order.push(id);
    for (const r of readers[id]) if (--pending[r] === 0) ready.push(r);
  }
  if (order.length !== graph.nodes.length) throw new TypeError("Cannot plan the graph: it has a cycle");
  return order;
}

/** Best-fit allocator over one growing range of bytes. */
class FreeList {
  high = 0;
  #free: { offset: number; bytes: number }[] = [];

  take(bytes: number): number {
    let best = -1;
    for (let i = 0; i < this.#free.length; i++) {
      const f = this.#free[i];
      if (f.bytes >= bytes && (best < 0 || f.bytes < this.#free[best].bytes)) best = i;
    }
    if (best >= 0) {
      const f = this.#free[best];
      const offset = f.offset;
      if (f.bytes === bytes) this.#free.splice(best, 1);
      else this.#free[best] = { offset: f.offset + bytes, bytes: f.bytes - bytes };
      return offset;
    }
    // Grow, absorbing a free block that ends at the top.
    const last = this.#free.find((f) => f.offset + f.bytes === this.high);
    if (last) {
      this.#free.splice(this.#free.indexOf(last), 1);
      this.high = last.offset + bytes;
      return last.offset;
    }
    const offset = this.high;
    this.high += bytes;
    return offset;
  }

  give(offset: number, bytes: number): void {
    this.#free.push({ offset, bytes });
    this.#free.sort((a, b) => a.offset - b.offset);
    const merged: { offset: number; bytes: number }[] = [];
    for (const f of this.#free) {
      const prev = merged[merged.length - 1];
      if (prev && prev.offset + prev.bytes === f.offset) prev.bytes += f.bytes;
      else merged.push({ ...f });
    }
    this.#free = merged;
  }
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** A readable table of the plan: one line per planned tensor. */
export function describePlan(plan: ExecutionPlan): string {
  const { graph } = plan;
  const lines = [
    `buffer plan: ${plan.order.length} nodes, arena ${plan.arenaBytes} bytes ` +
    `(${plan.unplannedBytes} without reuse), dims ${JSON.stringify(plan.maxDims)}`,
  ];
  graph.tensors.forEach((t, id) => {
    const s = plan.slots[id];
    if (!s) return;
    lines.push(
      `  ${t.name.padEnd(28)} ${formatShape(t.shape).padEnd(14)} @${String(s.offset).padStart(9)} ` +
        `+${String(s.bytes).padStart(8)}  live ${s.firstUse}..${s.lastUse}`,
    );
  });
  return lines.join("\n");
}
