/**
 * Op lowering for WebGPU: turns each node of a plan into compute dispatches (a
 * pipeline, a bind group, a workgroup count for a number of rows) and writes
 * their parameters into one uniform buffer, once when a plan is compiled; a step
 * only writes its dimensions into the step uniform and records the dispatches, each
 * node for its own rows (`nodeRows`: the step's `T`, or `R` after `gatherRows`).
 *
 * @module
 */

import type { KvDType } from "../../graph/dtype.ts";
import type { Node, Op, OpKind } from "../../graph/ir.ts";
import type { ExecutionPlan } from "../../graph/plan.ts";
import { nodeRows, UnsupportedError } from "../contract.ts";
import type { DecodeKernel, DeviceHealth, PrefillKernel } from "./device.ts";
import { createLayouts, type GpuTensor, type Layouts, scaleWord } from "./memory.ts";
import {
  attentionShader,
  cacheElementsPerWord,
  elementwiseShader,
  embeddingShader,
  gatherRowsShader,
  gridOf,
  kvWriteShader,
  matmulSharedShader,
  matmulTiledShader,
  MATVEC_MAX_T,
  MATVEC_ROWS,
  matvecRowsShader,
  matvecShader,
  rmsNormShader,
  ropeShader,
  ropeTurns,
  ROWS_FROM_STEP,
  STEP_LANES,
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
  /** The step uniform: the step's value of each dimension in {@link LoweringTarget.lanes}. */
  readonly step: GPUBuffer;
  /** The index buffer: every `i32` graph input (token ids, positions, page tables, rows), then constant tables. */
  readonly index: GPUBuffer;
  /** Where the index buffer holds what. */
  readonly indexLayout: IndexLayout;
  /** The lane of the step uniform that holds each symbolic dimension nodes run their rows over. */
  readonly lanes: ReadonlyMap<string, number>;
}

/**
 * What the index buffer of an executable holds, in 4-byte words: every `i32` graph
 * input at its own offset (room for its largest step), then the constant tables the
 * shaders read (the rope turns of each distinct `headDim` and `theta`).
 */
export class IndexLayout {
  /** Word offset of each `i32` graph input, by tensor id. */
  readonly inputs: ReadonlyMap<number, number>;
  /** Words the inputs take (the constants start there). */
  readonly inputWords: number;
  /** The constant tables, after the inputs: written once when the plan is compiled. */
  readonly constants: Int32Array<ArrayBuffer>;
  /** Word offset of the rope table of each `headDim/theta`. */
  readonly #rope = new Map<string, number>();

  /**
   * Lays out `plan`'s `i32` inputs and constant tables.
   * @param plan the plan to lay out
   */
  constructor(plan: ExecutionPlan) {
    const { graph } = plan;
    const inputs = new Map<number, number>();
    let words = 0;
    for (const id of graph.inputs) {
      if (graph.tensors[id].dtype !== "i32") continue;
      inputs.set(id, words);
      words += plan.slots[id]!.bytes / 4;
    }
    this.inputs = inputs;
    this.inputWords = words;
    const tables: Int32Array[] = [];
    for (const id of plan.order) {
      const op = graph.nodes[id].op;
      if (op.kind !== "rope") continue;
      const key = `${op.headDim}/${op.theta}`;
      if (this.#rope.has(key)) continue;
      this.#rope.set(key, words);
      const table = ropeTurns(op.headDim, op.theta);
      tables.push(table);
      words += table.length;
    }
    this.constants = new Int32Array(words - this.inputWords);
    let at = 0;
    for (const t of tables) {
      this.constants.set(t, at);
      at += t.length;
    }
  }

  /** Words of the whole buffer. */
  get words(): number {
    return this.inputWords + this.constants.length;
  }

  /** Word offset of the rope turns table of `headDim` and `theta` (laid out for every rope node of the plan). */
  ropeTable(headDim: number, theta: number): number {
    return this.#rope.get(`${headDim}/${theta}`)!;
  }
}

/**
 * The symbolic dimensions that a plan's nodes run their rows over (`nodeRows`: `"T"`,
 * `"R"`), in order of first use: lane `i` of the step uniform holds the step's value of
 * entry `i`. An {@link UnsupportedError} when there are more than the uniform's lanes.
 */
export function stepLanes(plan: ExecutionPlan): string[] {
  const lanes: string[] = [];
  for (const id of plan.order) {
    const rows = nodeRows(plan.graph, plan.graph.nodes[id]);
    if (typeof rows === "string" && !lanes.includes(rows)) lanes.push(rows);
  }
  if (lanes.length > STEP_LANES) {
    throw new UnsupportedError(
      `Backend "webgpu" cannot run nodes over ${lanes.length} symbolic row dimensions (${lanes.join(", ")}): ` +
        `expected at most ${STEP_LANES}`,
    );
  }
  return lanes;
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
  gatherRows: () => 1,
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
  /** Workgroups to dispatch for the node's rows in a step (0 skips the dispatch). */
  readonly groups: (rows: number) => number;
}

/** Per-node dispatches; matmul keeps a matrix-vector and a tiled variant and picks by rows. */
export interface NodeDispatches {
  /**
   * The rows the node processes ({@link nodeRows}): a count the graph fixes, or the
   * symbolic dimension (`"T"`, `"R"`) whose value in the step's `dims` it is.
   */
  readonly rows: number | string;
  /** The node's dispatches, in order (for matmul, the matrix-vector kernel's). */
  readonly dispatches: readonly Dispatch[];
  /** Used instead of `dispatches` for more than MATVEC_MAX_T rows (matmul only). */
  readonly tiled?: readonly Dispatch[];
}

/**
 * Records one node's dispatches for a step in which it processes `rows` rows (the
 * tiled variant above the matrix-vector limit). Allocates nothing.
 */
export function encodeNode(pass: GPUComputePassEncoder, node: NodeDispatches, rows: number): void {
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

/** The binding schemes of `memory.ts` that a dispatch may use. */
type LayoutName = keyof Layouts;

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

  /** Element offset of an `i32` graph input in the index buffer; throws for any other operand. */
  #index(node: Node, input: number): number {
    const id = node.inputs[input];
    const offset = this.#target.indexLayout.inputs.get(id);
    if (offset === undefined) {
      const t = this.#target.plan.graph.tensors[id];
      throw new UnsupportedError(
        `Backend "webgpu" cannot run op "${node.op.kind}" with ${t.kind} "${t.name}" (${t.dtype}) as operand ${input}: ` +
          `expected an "i32" graph input`,
      );
    }
    return offset;
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

  /**
   * Writes one parameter slot: the rows word, then the values (u32; numbers given as
   * `{ f: x }` are stored as f32).
   */
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
    layout: LayoutName,
    params: GPUBufferBinding,
    extra: GPUBuffer[],
    groups: (rows: number) => number,
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
    const rows = nodeRows(this.#target.plan.graph, node);
    // The shaders' `rows` word: a fixed count, or the step uniform's lane of the dimension.
    const rowsWord = typeof rows === "number" ? rows : ROWS_FROM_STEP + this.#target.lanes.get(rows)!;
    return { ...this.#build(node, rowsWord), rows };
  }

  #build(node: Node, rows: number): Omit<NodeDispatches, "rows"> {
    const op = node.op;
    const { graph } = this.#target.plan;
    const width = (id: number) => graph.tensors[id].shape[1] as number;
    const ceil = (a: number, b: number) => Math.ceil(a / b);
    switch (op.kind) {
      case "embedding": {
        const table = this.#bound(node, 1);
        const ids = this.#index(node, 0);
        const D = table.shape[1];
        const out = this.#at(node, -1);
        const dispatches = table.parts.map((part) =>
          this.#dispatch(
            embeddingShader(table.dtype),
            "embedding",
            this.#params(rows, [ids, out, D, scaleWord(table.dtype, part, D), part.firstRow, part.rows]),
            [part.buffer, this.#target.index],
            (T) => T * ceil(D, WG),
          )
        );
        return { dispatches };
      }
      case "rmsNorm": {
        const w = this.#bound(node, 1);
        if (w.dtype !== "f32") throw new UnsupportedError(`Backend "webgpu" needs an "f32" rmsNorm weight`);
        const D = width(node.inputs[0]);
        const params = this.#params(rows, [this.#at(node, 0), this.#at(node, -1), D, { f: op.eps }]);
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
            this.#params(rows, values),
            [part.buffer],
            () => ceil(part.rows, rowsKernel ? WG : MATVEC_ROWS),
          ));
          tiled.push(this.#dispatch(
            (this.#context.prefillKernel === "shared" ? matmulSharedShader : matmulTiledShader)(w.dtype, quad),
            "weight",
            this.#params(rows, values),
            [part.buffer],
            (T) => ceil(T, TILE) * ceil(part.rows, TILE),
          ));
        }
        return { dispatches, tiled };
      }
      case "rope": {
        const { heads, headDim, theta } = op;
        const params = this.#params(rows, [
          this.#at(node, 0),
          this.#at(node, -1),
          heads,
          headDim,
          this.#index(node, 1),
          this.#target.indexLayout.ropeTable(headDim, theta),
        ]);
        return {
          dispatches: [
            this.#dispatch(
              ropeShader(),
              "index",
              params,
              [this.#target.index],
              (T) => ceil((T * heads * headDim) / 2, WG),
            ),
          ],
        };
      }
      case "siluMul":
      case "add": {
        const F = width(node.output);
        const params = this.#params(rows, [this.#at(node, 0), this.#at(node, 1), this.#at(node, -1), F]);
        return {
          dispatches: [this.#dispatch(elementwiseShader(op.kind), "base", params, [], (T) => ceil(T * F, WG))],
        };
      }
      case "gatherRows": {
        const D = width(node.output);
        const params = this.#params(rows, [this.#at(node, 0), this.#at(node, -1), D, this.#index(node, 1)]);
        return {
          dispatches: [
            this.#dispatch(gatherRowsShader(), "index", params, [this.#target.index], (R) => R * ceil(D, WG)),
          ],
        };
      }
      case "attention":
        return { dispatches: this.#attention(node, op, rows) };
    }
  }

  /** The cache write and the fused attention of an attention node. */
  #attention(node: Node, op: Extract<Op, { kind: "attention" }>, rows: number): Dispatch[] {
    const { heads, kvHeads, headDim, scale, window, pageSize } = op;
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
    const perSeq = this.#target.plan.graph.tensors[node.inputs[7]].shape[1];
    const poolRows = Math.min(kc.shape[0], vc.shape[0]);
    if (typeof perSeq !== "number" || !Number.isInteger(pageSize) || pageSize < 1 || poolRows % pageSize !== 0) {
      // The graph builder guarantees these; a graph made another way is refused before a kernel runs off the pool.
      throw new UnsupportedError(
        `Backend "webgpu" cannot run attention with pages of ${pageSize} rows over a pool of ${poolRows} rows ` +
          `and page tables of ${perSeq} pages: expected a whole number of pages and a fixed page-table width`,
      );
    }
    const paging = [this.#index(node, 5), this.#index(node, 6), this.#index(node, 7), perSeq, pageSize];
    const kvDim = kvHeads * headDim;
    const buffers = [kc.buffer, vc.buffer, this.#target.index];
    const write = this.#dispatch(
      kvWriteShader(dtype),
      "cache",
      this.#params(rows, [this.#at(node, 1), this.#at(node, 2), kvDim, ...paging]),
      buffers,
      (T) => Math.ceil((T * kvDim) / cacheElementsPerWord(dtype) / WG),
    );
    const params = this.#params(rows, [
      this.#at(node, 0),
      this.#at(node, -1),
      heads,
      kvHeads,
      window,
      { f: scale },
      ...paging,
    ]);
    const att = this.#dispatch(attentionShader(headDim, dtype), "cache", params, buffers, (T) => T * heads);
    return [write, att];
  }
}
