/**
 * The pure-TypeScript backend (`ts`): runs anywhere Deno, Node or a browser runs,
 * with no permission. Weights are typed-array views of the loaded bytes; the
 * activation arena is one ArrayBuffer whose views are made at compile time, so a
 * step allocates nothing.
 *
 * @module
 */

import { byteSize, type DType, isKvDType, isWeightDType, type WeightDType } from "../../graph/dtype.ts";
import { elementCount, type Node, type OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { Backend, DeviceTensor, Executable, HostTensor, StepArgs } from "../contract.ts";
import { cacheCapacity, fixedRows, UnsupportedError, validateBindings, validateStep } from "../contract.ts";
import {
  checkInputWrite,
  checkOutputRead,
  checkRange,
  checkStateDType,
  checkUploadSize,
  f32Only,
  type OpSupport,
  supportsOp,
  TokenIdLimits,
} from "../checks.ts";
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

/** What the ts backend runs: a kernel for every weight dtype, both cache dtypes, f32 activations. */
const SUPPORT: OpSupport = {
  embedding: isWeightDType,
  rmsNorm: f32Only,
  matmul: isWeightDType,
  rope: f32Only,
  siluMul: f32Only,
  add: f32Only,
  attention: isKvDType,
  lastRow: f32Only,
};

/** The pure-TypeScript backend. */
export class TsBackend implements Backend {
  /** The registry name, `"ts"`. */
  readonly name = "ts";
  /** A line for logs. */
  readonly description = "TypeScript (single thread)";

  /** Whether an op runs with an operand dtype: see {@link Backend.supports}. */
  supports(op: OpKind, dtype: DType): boolean {
    return supportsOp(SUPPORT, op, dtype);
  }

  /** Makes a weight resident: a view of the host bytes (a copy when they are misaligned). */
  upload(t: HostTensor): DeviceTensor {
    checkUploadSize(t);
    return makeTensor(t.name, t.dtype, t.shape, aligned(t.data, 4));
  }

  /** Allocates a zero-filled f32 or f16 KV cache. */
  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor {
    checkStateDType(this.name, name, dtype);
    return makeTensor(name, dtype, shape, new Uint8Array(byteSize(dtype, elementCount(shape))));
  }

  /** Copies bytes out of a tensor. */
  readTensor(t: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array> {
    try {
      checkRange(t, byteOffset, byteLength);
    } catch (e) {
      return Promise.reject(e);
    }
    return Promise.resolve((t as TsTensor).bytes.slice(byteOffset, byteOffset + byteLength));
  }

  /** Copies bytes into a tensor. */
  writeTensor(t: DeviceTensor, byteOffset: number, data: Uint8Array): void {
    checkRange(t, byteOffset, data.byteLength);
    (t as TsTensor).bytes.set(data, byteOffset);
  }

  /** Copies the first bytes of one tensor into another. */
  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number): void {
    checkRange(src, 0, byteLength);
    checkRange(dst, 0, byteLength);
    (dst as TsTensor).bytes.set((src as TsTensor).bytes.subarray(0, byteLength));
  }

  /** Nothing to free: the garbage collector owns the memory. */
  release(_t: DeviceTensor): void {
    // Garbage collected.
  }

  /** Prepares a plan: typed-array views of the arena and one closure per node. */
  // deno-lint-ignore require-await -- errors must reject, as the contract says
  async compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable> {
    validateBindings(this, plan, bindings);
    return new TsExecutable(plan, bindings as ReadonlyMap<number, TsTensor>);
  }

  /** Nothing to free. */
  dispose(): void {}
}

type StepFn = (pos: number, T: number) => void;

class TsExecutable implements Executable {
  readonly #plan: ExecutionPlan;
  readonly #capacity: number;
  readonly #f32: (Float32Array | undefined)[] = [];
  readonly #i32: (Int32Array | undefined)[] = [];
  readonly #steps: StepFn[];
  readonly #idLimits = new TokenIdLimits();

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
      const rows = fixedRows(graph, node);
      return rows === undefined ? step : (pos: number) => step(pos, rows);
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
        const kernel = EMBEDDING_KERNELS[table.dtype as WeightDType];
        const D = table.shape[1];
        this.#idLimits.add(node.inputs[0], table.shape[0]);
        return (_pos, T) => kernel(out, ids, table, T, D);
      }
      case "rmsNorm": {
        const [x, w, D, eps] = [f(0), f(1), width(node.inputs[0]), op.eps];
        return (_pos, T) => k.rmsNorm(out, x, w, T, D, eps);
      }
      case "matmul": {
        const w = bindings.get(node.inputs[1])!;
        const kernel = MATMUL_KERNELS[w.dtype as WeightDType];
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
    checkInputWrite(this.#plan, tensorId, data, count);
    const ids = this.#i32[tensorId];
    if (ids) {
      this.#idLimits.check(tensorId, data, count);
      for (let i = 0; i < count; i++) ids[i] = data[i];
    } else {
      this.#f32[tensorId]!.set(data.subarray(0, count));
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
    try {
      checkOutputRead(this.#plan, tensorId, dst, count);
    } catch (e) {
      return Promise.reject(e);
    }
    dst.set(this.#f32[tensorId]!.subarray(0, count));
    return Promise.resolve();
  }

  dispose(): void {}
}

/** Creates the TypeScript backend. */
export function createTsBackend(): Promise<Backend> {
  return Promise.resolve(new TsBackend());
}
