/**
 * Op lowering for WebGPU: turns each node of a plan into compute dispatches (a
 * pipeline, a bind group, a workgroup count for a number of rows) and writes
 * their parameters into one uniform buffer, once when a plan is compiled; a step
 * only records the dispatches.
 *
 * @module
 */

import type { KvDType } from "../../graph/dtype.ts";
import type { Node, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import type { TokenIdLimits } from "../checks.ts";
import { UnsupportedError } from "../contract.ts";
import type { DecodeKernel, DeviceHealth, PrefillKernel } from "./device.ts";
import { createLayouts, type GpuTensor, type Layouts, scaleWord } from "./memory.ts";
import {
  attentionShader,
  cacheElementsPerWord,
  elementwiseShader,
  embeddingShader,
  gridOf,
  kvWriteShader,
  lastRowShader,
  matmulSharedShader,
  matmulTiledShader,
  MATVEC_MAX_T,
  MATVEC_ROWS,
  matvecRowsShader,
  matvecShader,
  rmsNormShader,
  ropeShader,
  TILE,
  WG,
} from "./shaders.ts";

/** Bytes per parameter slot in the params uniform buffer (a valid uniform offset alignment). */
export const PARAM_STRIDE = 256;

/** The compute pipelines of a device, created once per shader source and layout. */
export class Pipelines {
  readonly #device: GPUDevice;
  readonly #layouts: Layouts;
  readonly #cache = new Map<string, GPUComputePipeline>();

  /**
   * An empty cache, with the bind group layouts made on `device`.
   * @param device the device the pipelines run on
   */
  constructor(device: GPUDevice) {
    this.#device = device;
    this.#layouts = createLayouts(device);
  }

  /** The pipeline of a shader source over a binding scheme. */
  get(code: string, layout: keyof Layouts): GPUComputePipeline {
    const key = `${layout}\n${code}`;
    let p = this.#cache.get(key);
    if (!p) {
      const module = this.#device.createShaderModule({ code });
      p = this.#device.createComputePipeline({
        layout: this.#device.createPipelineLayout({ bindGroupLayouts: [this.#layouts[layout]] }),
        compute: { module, entryPoint: "main" },
      });
      this.#cache.set(key, p);
    }
    return p;
  }

  /** The bind group layout of a binding scheme. */
  layout(name: keyof Layouts): GPUBindGroupLayout {
    return this.#layouts[name];
  }

  /** Forgets every pipeline (the device is going away). */
  clear(): void {
    this.#cache.clear();
  }
}

/**
 * What the backend shares with its executables: the device, the kernels chosen for
 * it, its pipelines and its health. The backend keeps it private.
 */
export interface GpuContext {
  /** The device. */
  readonly device: GPUDevice;
  /** The matrix-vector kernel in use. */
  readonly decodeKernel: DecodeKernel;
  /** The matrix-matrix kernel in use. */
  readonly prefillKernel: PrefillKernel;
  /** The pipelines, shared by every plan. */
  readonly pipelines: Pipelines;
  /** The device's loss and errors. */
  readonly health: DeviceHealth;
}

/** The buffers and bookkeeping of one executable that its dispatches bind or record. */
export interface LoweringTarget {
  /** The plan being lowered. */
  readonly plan: ExecutionPlan;
  /** The activation arena. */
  readonly arena: GPUBuffer;
  /** The parameter uniforms, {@link PARAM_STRIDE} bytes per dispatch. */
  readonly params: GPUBuffer;
  /** The step uniform (`T`, `pos`). */
  readonly step: GPUBuffer;
  /** The buffers of the i32 graph inputs (token ids), by tensor id. */
  readonly idBuffers: ReadonlyMap<number, GPUBuffer>;
  /** Where the embedding nodes record their table sizes. */
  readonly idLimits: TokenIdLimits;
}

/**
 * Parameter slots (one per dispatch) each op kind takes, given the number of parts of
 * its weight: matmul has two kernels per weight part, embedding one, attention a
 * cache write and the attention.
 */
const PARAM_SLOTS: Readonly<Record<OpKind, (weightParts: number) => number>> = {
  embedding: (parts) => parts,
  rmsNorm: () => 1,
  matmul: (parts) => 2 * parts,
  rope: () => 1,
  siluMul: () => 1,
  add: () => 1,
  attention: () => 2,
  lastRow: () => 1,
};

/** The parameter slots a plan's dispatches take. */
export function paramSlotCount(plan: ExecutionPlan, bindings: ReadonlyMap<number, GpuTensor>): number {
  let n = 0;
  for (const id of plan.order) {
    const node = plan.graph.nodes[id];
    n += PARAM_SLOTS[node.op.kind](bindings.get(node.inputs[1])?.parts.length ?? 1);
  }
  return n;
}

/** One dispatch of a step: its pipeline, bind group and workgroup count for a number of rows. */
export interface Dispatch {
  /** The compute pipeline of the shader. */
  readonly pipeline: GPUComputePipeline;
  /** Its buffers. */
  readonly bindGroup: GPUBindGroup;
  /** Workgroups to dispatch for `T` rows (0 skips the dispatch). */
  readonly groups: (T: number) => number;
}

/** Per-node dispatches; matmul keeps a matrix-vector and a tiled variant and picks by rows. */
export interface NodeDispatches {
  /** The operand's rows when the graph fixes them (after lastRow), else 0 for the step's T. */
  readonly fixedRows: number;
  /** The node's dispatches, in order (for matmul, the matrix-vector kernel's). */
  readonly dispatches: readonly Dispatch[];
  /** Used instead of `dispatches` for more than MATVEC_MAX_T rows (matmul only). */
  readonly tiled?: readonly Dispatch[];
}

/** Records one node's dispatches for a step of `T` rows (the tiled variant above the matrix-vector limit). */
export function encodeNode(pass: GPUComputePassEncoder, node: NodeDispatches, T: number): void {
  const rows = node.fixedRows || T;
  const list = node.tiled && rows > MATVEC_MAX_T ? node.tiled : node.dispatches;
  for (const d of list) {
    const groups = d.groups(rows);
    if (groups === 0) continue;
    const [x, y] = gridOf(groups);
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, d.bindGroup);
    pass.dispatchWorkgroups(x, y);
  }
}

/** Turns plan nodes into dispatches: parameters, pipelines and bind groups. */
export class DispatchBuilder {
  #slot = 0;
  readonly #u32: Uint32Array;
  readonly #f32: Float32Array;

  readonly #context: GpuContext;
  readonly #target: LoweringTarget;
  readonly #bindings: ReadonlyMap<number, GpuTensor>;

  /**
   * A builder writing parameter slots into `params` from the first one on.
   * @param context the device, its kernels and pipelines
   * @param target the executable's buffers and bookkeeping
   * @param params the host copy of the parameter uniforms, {@link paramSlotCount} slots
   * @param bindings the weight and state tensors
   */
  constructor(
    context: GpuContext,
    target: LoweringTarget,
    params: ArrayBuffer,
    bindings: ReadonlyMap<number, GpuTensor>,
  ) {
    this.#context = context;
    this.#target = target;
    this.#bindings = bindings;
    this.#u32 = new Uint32Array(params);
    this.#f32 = new Float32Array(params);
  }

  /** Element offset of an arena tensor; throws for tensors that are not in the arena. */
  #at(node: Node, input: number): number {
    const { graph, slots } = this.#target.plan;
    const id = input < 0 ? node.output : node.inputs[input];
    const slot = slots[id];
    if (!slot || graph.tensors[id].dtype !== "f32") {
      const t = graph.tensors[id];
      throw new UnsupportedError(
        `Backend "webgpu" cannot run op "${node.op.kind}" with ${t.kind} "${t.name}" (${t.dtype}) as operand ${input}: ` +
          `expected an f32 activation or input`,
      );
    }
    return slot.offset / 4;
  }

  #bound(node: Node, input: number): GpuTensor {
    const { graph } = this.#target.plan;
    const id = node.inputs[input];
    const b = this.#bindings.get(id);
    if (!b) {
      const t = graph.tensors[id];
      throw new UnsupportedError(
        `Backend "webgpu" cannot run op "${node.op.kind}" with ${t.kind} "${t.name}" as operand ${input}: ` +
          `expected a weight or state tensor`,
      );
    }
    return b;
  }

  /** Writes one parameter slot (u32 values; numbers given as `{ f: x }` are stored as f32). */
  #params(rows: number, values: readonly (number | { f: number })[]): GPUBufferBinding {
    const base = (this.#slot * PARAM_STRIDE) / 4;
    this.#u32[base] = rows;
    values.forEach((v, i) => {
      if (typeof v === "number") this.#u32[base + 1 + i] = v;
      else this.#f32[base + 1 + i] = v.f;
    });
    return { buffer: this.#target.params, offset: this.#slot++ * PARAM_STRIDE, size: PARAM_STRIDE };
  }

  #dispatch(
    code: string,
    layout: "base" | "weight" | "embedding" | "cache",
    params: GPUBufferBinding,
    extra: GPUBuffer[],
    groups: (T: number) => number,
  ): Dispatch {
    const entries: GPUBindGroupEntry[] = [
      { binding: 0, resource: params },
      { binding: 1, resource: { buffer: this.#target.step } },
      { binding: 2, resource: { buffer: this.#target.arena } },
      ...extra.map((buffer, i) => ({ binding: 3 + i, resource: { buffer } })),
    ];
    const bindGroup = this.#context.device.createBindGroup({ layout: this.#context.pipelines.layout(layout), entries });
    return { pipeline: this.#context.pipelines.get(code, layout), bindGroup, groups };
  }

  /** The dispatches of one node, with their parameters written. */
  node(node: Node): NodeDispatches {
    const op = node.op;
    const { graph } = this.#target.plan;
    // The operand's rows: fixed by the graph (after lastRow, say), or the step's T (0 here).
    const rowsId = op.kind === "lastRow" ? node.inputs[0] : node.output;
    const dim = graph.tensors[rowsId].shape[0];
    if (typeof dim === "string" && dim !== "T") {
      throw new UnsupportedError(`Backend "webgpu" cannot run op "${op.kind}" over rows "${dim}": expected "T"`);
    }
    const fixed = typeof dim === "number" ? dim : 0;
    return { ...this.#build(node, fixed), fixedRows: fixed };
  }

  #build(node: Node, fixed: number): Omit<NodeDispatches, "fixedRows"> {
    const op = node.op;
    const { graph } = this.#target.plan;
    const width = (id: number) => graph.tensors[id].shape[1] as number;
    const ceil = (a: number, b: number) => Math.ceil(a / b);
    switch (op.kind) {
      case "embedding": {
        const table = this.#bound(node, 1);
        const ids = this.#target.idBuffers.get(node.inputs[0]);
        if (!ids) {
          throw new UnsupportedError(`Backend "webgpu" needs the ids of "embedding" to be an "i32" graph input`);
        }
        const [V, D] = table.shape;
        this.#target.idLimits.add(node.inputs[0], V);
        const out = this.#at(node, -1);
        const dispatches = table.parts.map((part) =>
          this.#dispatch(
            embeddingShader(table.dtype),
            "embedding",
            this.#params(fixed, [0, out, D, scaleWord(table.dtype, part, D), part.firstRow, part.rows]),
            [part.buffer, ids],
            (T) => T * ceil(D, WG),
          )
        );
        return { dispatches };
      }
      case "rmsNorm": {
        const w = this.#bound(node, 1);
        if (w.dtype !== "f32") throw new UnsupportedError(`Backend "webgpu" needs an "f32" rmsNorm weight`);
        const D = width(node.inputs[0]);
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), D, { f: op.eps }]);
        return { dispatches: [this.#dispatch(rmsNormShader(), "weight", params, [w.buffer], (T) => T)] };
      }
      case "matmul": {
        const w = this.#bound(node, 1);
        const [N, K] = w.shape;
        const [x, out] = [this.#at(node, 0), this.#at(node, -1)];
        const rowsKernel = this.#context.decodeKernel === "rows";
        const quad = K % 4 === 0;
        const dispatches: Dispatch[] = [];
        const tiled: Dispatch[] = [];
        for (const part of w.parts) {
          // Each part writes its own columns of the output rows.
          const values = [x, out + part.firstRow, K, part.rows, scaleWord(w.dtype, part, K), N];
          dispatches.push(this.#dispatch(
            (rowsKernel ? matvecRowsShader : matvecShader)(w.dtype, quad),
            "weight",
            this.#params(fixed, values),
            [part.buffer],
            () => ceil(part.rows, rowsKernel ? WG : MATVEC_ROWS),
          ));
          tiled.push(this.#dispatch(
            (this.#context.prefillKernel === "shared" ? matmulSharedShader : matmulTiledShader)(w.dtype, quad),
            "weight",
            this.#params(fixed, values),
            [part.buffer],
            (T) => ceil(T, TILE) * ceil(part.rows, TILE),
          ));
        }
        return { dispatches, tiled };
      }
      case "rope": {
        const { heads, headDim, theta } = op;
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), heads, headDim, {
          f: Math.log2(theta),
        }]);
        return {
          dispatches: [this.#dispatch(ropeShader(), "base", params, [], (T) => ceil((T * heads * headDim) / 2, WG))],
        };
      }
      case "siluMul":
      case "add": {
        const F = width(node.output);
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, 1), this.#at(node, -1), F]);
        return {
          dispatches: [this.#dispatch(elementwiseShader(op.kind), "base", params, [], (T) => ceil(T * F, WG))],
        };
      }
      case "lastRow": {
        const D = width(node.output);
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), D, 0]);
        return { dispatches: [this.#dispatch(lastRowShader(), "base", params, [], () => ceil(D, WG))] };
      }
      case "attention": {
        const { heads, kvHeads, headDim, scale, window } = op;
        if (heads % kvHeads !== 0) {
          throw new UnsupportedError(
            `Backend "webgpu" cannot run attention with ${heads} heads over ${kvHeads} kv heads: expected a multiple`,
          );
        }
        const kc = this.#bound(node, 3);
        const vc = this.#bound(node, 4);
        if (kc.dtype !== vc.dtype) {
          throw new UnsupportedError(
            `Backend "webgpu" cannot run attention with a "${kc.dtype}" key cache and a "${vc.dtype}" value cache`,
          );
        }
        // supports() admitted the key cache's dtype.
        const dtype = kc.dtype as KvDType;
        if (headDim % cacheElementsPerWord(dtype) !== 0) {
          // Attention reads a head's keys a whole word at a time, so a head must start on a word.
          throw new UnsupportedError(
            `Backend "webgpu" cannot run attention with head dim ${headDim} over a "${dtype}" cache: expected an even one`,
          );
        }
        const kvDim = kvHeads * headDim;
        const write = this.#dispatch(
          kvWriteShader(dtype),
          "cache",
          this.#params(fixed, [this.#at(node, 1), this.#at(node, 2), kvDim, 0]),
          [kc.buffer, vc.buffer],
          (T) => ceil((T * kvDim) / cacheElementsPerWord(dtype), WG),
        );
        const params = this.#params(fixed, [this.#at(node, 0), this.#at(node, -1), heads, kvHeads, window, {
          f: scale,
        }]);
        const att = this.#dispatch(
          attentionShader(headDim, dtype),
          "cache",
          params,
          [kc.buffer, vc.buffer],
          (T) => T * heads,
        );
        return { dispatches: [write, att] };
      }
    }
  }
}
