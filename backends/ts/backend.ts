/**
 * The pure-TypeScript backend (`ts`): runs anywhere Deno, Node or a browser runs,
 * with no permission. Weights are typed-array views of the loaded bytes; the
 * activation arena is one ArrayBuffer whose views are made at compile time, so a
 * step allocates nothing.
 *
 * @module
 */

import { byteSize, type DType, isKvDType } from "../../graph/dtype.ts";
import type { Node, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { Backend, DeviceTensor, Executable, HostTensor, StepArgs } from "../contract.ts";
import { cacheCapacity, nodeRows, UnsupportedError, validateBindings, validateStep } from "../contract.ts";
import * as k from "./kernels.ts";
import { EMBEDDING_KERNELS, MATMUL_KERNELS, type TsWeight } from "./matmul.ts";

/** A tensor held by the TypeScript backend. */
interface TsTensor extends DeviceTensor, TsWeight {
  /** The f16 bit patterns, set when dtype is f16 (an f16 KV cache reads them). */
  readonly f16Bits?: Uint16Array;
}

function makeTensor(name: string, dtype: DType, shape: readonly number[], bytes: Uint8Array): TsTensor {
  const f32 = dtype === "f32" ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) : undefined;
  const f16Bits = dtype === "f16" ? new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2) : undefined;
  return { name, dtype, shape: [...shape], byteLength: bytes.byteLength, bytes, f32, f16Bits };
}

/** Copies into fresh memory when a view would be misaligned for its element size. */
function aligned(data: Uint8Array, align: number): Uint8Array {
  return data.byteOffset % align === 0 ? data : data.slice();
}

const ELEMENTWISE: readonly OpKind[] = ["rmsNorm", "rope", "siluMul", "add", "lastRow"];

/** The pure-TypeScript backend. */
export class TsBackend implements Backend {
  readonly name = "ts";
  readonly description = "TypeScript (single thread)";

  supports(op: OpKind, dtype: DType): boolean {
    if (op === "matmul") return MATMUL_KERNELS[dtype] !== undefined;
    if (op === "embedding") return EMBEDDING_KERNELS[dtype] !== undefined;
    if (op === "attention") return isKvDType(dtype);
    return ELEMENTWISE.includes(op) && dtype === "f32";
  }

  upload(t: HostTensor): DeviceTensor {
    return makeTensor(t.name, t.dtype, t.shape, aligned(t.data, 4));
  }

  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    if (!isKvDType(dtype)) {
      throw new UnsupportedError(`Backend "ts" cannot hold state "${name}" as "${dtype}": only "f32" or "f16"`);
    }
    return makeTensor(name, dtype, shape, new Uint8Array(byteSize(dtype, shape.reduce((a, b) => a * b, 1))));
  }

  readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    checkRange(t, byteOffset, byteLength);
    return Promise.resolve((t as TsTensor).bytes.slice(byteOffset, byteOffset + byteLength));
  }

  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    checkRange(t, byteOffset, data.byteLength);
    (t as TsTensor).bytes.set(data, byteOffset);
  }

  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number): void {
    checkRange(src, 0, byteLength);
    checkRange(dst, 0, byteLength);
    (dst as TsTensor).bytes.set((src as TsTensor).bytes.subarray(0, byteLength));
  }

  release(_t: DeviceTensor): void {
    // Garbage collected.
  }

  // deno-lint-ignore require-await -- errors must reject, as the contract says
  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    validateBindings(this, plan, bindings);
    return new TsExecutable(plan, bindings as ReadonlyMap<number, TsTensor>);
  }

  dispose(): void {}
}

function checkRange(t: DeviceTensor, offset: number, length: number): void {
  if (
    !Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > t.byteLength
  ) {
    throw new RangeError(`Cannot access bytes ${offset}..${offset + length} of "${t.name}": it holds ${t.byteLength}`);
  }
}

type StepFn = (pos: number, T: number) => void;

class TsExecutable implements Executable {
  readonly #plan: ExecutionPlan;
  readonly #capacity: number;
  readonly #f32: (Float32Array | undefined)[] = [];
  readonly #i32: (Int32Array | undefined)[] = [];
  readonly #steps: StepFn[];
  /** Per input id: the vocabulary sizes of the embedding tables that read it. */
  readonly #idLimit = new Map<number, number>();

  constructor(plan: ExecutionPlan, bindings: ReadonlyMap<number, TsTensor>) {
    this.#plan = plan;
    this.#capacity = cacheCapacity(plan);
    const arena = new ArrayBuffer(plan.arenaBytes);
    const { graph } = plan;
    graph.tensors.forEach((t, id) => {
      const slot = plan.slots[id];
      if (slot) {
        if (t.dtype === "i32") this.#i32[id] = new Int32Array(arena, slot.offset, slot.bytes / 4);
        else this.#f32[id] = new Float32Array(arena, slot.offset, slot.bytes / 4);
      } else {
        const b = bindings.get(id)!;
        this.#f32[id] = b.f32;
      }
    });
    this.#steps = plan.order.map((nodeId) => {
      const node = graph.nodes[nodeId];
      const step = this.#prepare(node, bindings);
      // A node whose input has a fixed row count (after lastRow: 1) runs on those rows, not on the step's T.
      const rows = nodeRows(graph, node, -1);
      return rows >= 0 ? (pos: number) => step(pos, rows) : step;
    });
  }

  #prepare(node: Node, bindings: ReadonlyMap<number, TsTensor>): StepFn {
    const { graph } = this.#plan;
    const f = (i: number) => this.#f32[node.inputs[i]]!;
    const out = this.#f32[node.output]!;
    const width = (id: number) => graph.tensors[id].shape[1] as number;
    const op = node.op;
    switch (op.kind) {
      case "embedding": {
        const ids = this.#i32[node.inputs[0]]!;
        const table = bindings.get(node.inputs[1])!;
        const kernel = EMBEDDING_KERNELS[table.dtype]!;
        const D = table.shape[1];
        this.#idLimit.set(node.inputs[0], Math.min(this.#idLimit.get(node.inputs[0]) ?? Infinity, table.shape[0]));
        return (_pos, T) => kernel(out, ids, table, T, D);
      }
      case "rmsNorm": {
        const [x, w, D, eps] = [f(0), f(1), width(node.inputs[0]), op.eps];
        return (_pos, T) => k.rmsNorm(out, x, w, T, D, eps);
      }
      case "matmul": {
        const w = bindings.get(node.inputs[1])!;
        const kernel = MATMUL_KERNELS[w.dtype]!;
        const [x, N, K] = [f(0), w.shape[0], w.shape[1]];
        return (_pos, T) => kernel(out, x, w, T, K, N);
      }
      case "rope": {
        const { heads, headDim, theta } = op;
        const invFreq = Float64Array.from({ length: headDim / 2 }, (_, i) => theta ** (-2 * i / headDim));
        const x = f(0);
        return (pos, T) => k.rope(out, x, T, heads, headDim, pos, invFreq);
      }
      case "siluMul": {
        const [g, u, F] = [f(0), f(1), width(node.output)];
        return (_pos, T) => k.siluMul(out, g, u, T * F);
      }
      case "add": {
        const [a, b, D] = [f(0), f(1), width(node.output)];
        return (_pos, T) => k.add(out, a, b, T * D);
      }
      case "lastRow": {
        const [x, D] = [f(0), width(node.output)];
        return (_pos, T) => k.lastRow(out, x, T, D);
      }
      case "attention": {
        const { heads, kvHeads, headDim, scale, window } = op;
        const [q, kk, v] = [f(0), f(1), f(2)];
        const [kc, vc] = [bindings.get(node.inputs[3])!, bindings.get(node.inputs[4])!];
        if (kc.dtype !== vc.dtype) {
          throw new UnsupportedError(
            `Backend "ts" cannot run attention with a "${kc.dtype}" key cache and a "${vc.dtype}" value cache`,
          );
        }
        const scores = new Float32Array(kc.shape[0]);
        if (kc.dtype === "f16") {
          const [kb, vb] = [kc.f16Bits!, vc.f16Bits!];
          return (pos, T) =>
            k.attentionF16(out, q, kk, v, kb, vb, scores, T, pos, heads, kvHeads, headDim, scale, window);
        }
        const [kf, vf] = [kc.f32!, vc.f32!];
        return (pos, T) => k.attention(out, q, kk, v, kf, vf, scores, T, pos, heads, kvHeads, headDim, scale, window);
      }
    }
  }

  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    const { graph } = this.#plan;
    const dst = this.#i32[tensorId] ?? this.#f32[tensorId];
    if (!dst || !graph.inputs.includes(tensorId)) {
      throw new TypeError(`Cannot write input ${tensorId}: it is not a graph input`);
    }
    const name = graph.tensors[tensorId].name;
    if (count > dst.length || count > data.length) {
      throw new RangeError(`Cannot write ${count} values to input "${name}": it holds ${dst.length}`);
    }
    if (dst instanceof Float32Array) {
      dst.set(data.subarray(0, count));
      return;
    }
    const limit = this.#idLimit.get(tensorId) ?? Infinity;
    for (let i = 0; i < count; i++) {
      const id = data[i];
      if (!(id >= 0 && id < limit) || !Number.isInteger(id)) {
        throw new RangeError(`Cannot embed token id ${id}: expected an integer from 0 to ${limit - 1}`);
      }
      dst[i] = id;
    }
  }

  run(step: StepArgs, profile?: Float64Array): Promise<void> {
    // A bad step rejects the promise, as on the other backends, rather than throwing.
    try {
      validateStep(this.#plan, step, this.#capacity);
    } catch (e) {
      return Promise.reject(e);
    }
    const T = step.dims.T ?? 1;
    const steps = this.#steps;
    if (profile) {
      for (let i = 0; i < steps.length; i++) {
        const t0 = performance.now();
        steps[i](step.pos, T);
        profile[i] += performance.now() - t0;
      }
    } else {
      for (let i = 0; i < steps.length; i++) steps[i](step.pos, T);
    }
    return Promise.resolve();
  }

  readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    const src = this.#f32[tensorId];
    if (!src || !this.#plan.graph.outputs.includes(tensorId) || count > src.length) {
      throw new RangeError(`Cannot read ${count} values of output ${tensorId}`);
    }
    dst.set(src.subarray(0, count));
    return Promise.resolve();
  }

  dispose(): void {}
}

/** Creates the TypeScript backend. */
export function createTsBackend(): Promise<Backend> {
  return Promise.resolve(new TsBackend());
}
