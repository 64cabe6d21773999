/**
 * The kernel contract: what every backend implements.
 *
 * A backend owns device memory (weights, KV cache state, the activation arena)
 * and runs whole planned graphs. It never sees a model: it gets an
 * {@link ExecutionPlan} (ordered nodes of the closed op set in `graph/ir.ts`,
 * with arena offsets) and the device tensors bound to its weight and state
 * tensors, and it runs the plan once per step. The semantics of every op are
 * documented on {@link Op}; `backends/reference.ts` is their executable
 * specification, and the conformance suite checks each backend against it.
 *
 * Running the whole plan (rather than one exported function per op) lets the
 * native backend execute a step in one foreign call and the WebGPU backend record
 * a step into one command encoder.
 *
 * A step runs off the caller's thread where the backend can (the ts backend's
 * worker, the native library's threads, the GPU), so `run()` returns at once and
 * the caller's event loop stays free. While a `run()` is pending the caller makes no
 * other call on that executable or on the tensors bound to it (`writeInput`,
 * `readOutput`, `readTensor`, `writeTensor`, `copyTensor`); backends rely on that.
 *
 * @module
 */

import type { DType } from "../graph/dtype.ts";
import type { DimBindings, Graph, Node, Op, OpKind } from "../graph/ir.ts";
import type { ExecutionPlan } from "../graph/plan.ts";

export type { DType, ExecutionPlan, Op, OpKind };

/** A tensor in host memory: raw bytes in the layout `graph/dtype.ts` gives for its dtype. */
export interface HostTensor {
  /** The tensor's name (a weight's name in the model files). */
  readonly name: string;
  /** How `data` is laid out. */
  readonly dtype: DType;
  /** The dimensions, row-major. */
  readonly shape: readonly number[];
  /** The bytes; may be a view into a larger buffer (for example a whole model file). */
  readonly data: Uint8Array;
}

/** A tensor held by a backend (weights and state). Opaque beyond these fields. */
export interface DeviceTensor {
  /** The tensor's name, for errors and logs. */
  readonly name: string;
  /** How the bytes are laid out (`graph/dtype.ts`). */
  readonly dtype: DType;
  /** The dimensions, row-major. */
  readonly shape: readonly number[];
  /** Bytes the tensor holds. */
  readonly byteLength: number;
}

/**
 * What changes from one step to the next besides the inputs: the values of the
 * symbolic dimensions, e.g. `{ T: 5, S: 2, R: 2 }`, each an integer from 1 to the
 * plan's `maxDims`. Which sequence and position each token has are inputs of the
 * graph (see the `rope` and `attention` ops).
 */
export interface StepArgs {
  /** Values of the symbolic dimensions. */
  readonly dims: DimBindings;
}

/** A plan prepared to run on one backend, with its activation arena allocated. */
export interface Executable {
  /**
   * Copies `count` values into a graph input before a step: token ids, positions,
   * page tables and rows (`i32`), or activations (`f32`) when a graph takes them as
   * input (the conformance suite does). An index outside what it indexes (see
   * `indexLimits`) gives a `RangeError`, so no kernel addresses memory it must not.
   */
  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void;
  /**
   * Runs every node of the plan once. When `profile` is given (one slot per node of
   * the plan's order), adds each node's milliseconds to it where the backend can time
   * ops one by one.
   */
  run(step: StepArgs, profile?: Float64Array): Promise<void>;
  /** Copies the first `count` values of an output tensor into `dst`. */
  readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void>;
  /** Frees the arena. Bound weights and state stay alive. */
  dispose(): void;
}

/** Options every backend factory accepts. */
export interface BackendOptions {
  /** Worker threads for backends that have them; default: the backend's choice. */
  readonly threads?: number;
  /**
   * Where the ts backend runs its steps: `true` in a worker it owns (the factory fails with an
   * `UnsupportedError` where `Worker`, `SharedArrayBuffer` or `Atomics.waitAsync` is missing),
   * `false` on the caller's thread; default: in a worker where the platform allows it. Other
   * backends ignore it.
   */
  readonly worker?: boolean;
}

/** A compute backend. */
export interface Backend {
  /** The registry name (`"ts"`, `"native"`, `"webgpu"`). */
  readonly name: string;
  /** A line for logs: the device and the settings in force. */
  readonly description: string;
  /**
   * Whether the backend runs `op` with operand dtype `dtype`: the weight's dtype for
   * `matmul` and `embedding`, the cache dtype for `attention`, `"f32"` for the rest.
   */
  supports(op: OpKind, dtype: DType): boolean;
  /** Makes a weight resident on the backend (a view of the host bytes when it can). */
  upload(tensor: HostTensor): DeviceTensor;
  /** Allocates zero-filled persistent state (a KV cache). */
  createState(name: string, dtype: DType, shape: readonly number[]): DeviceTensor;
  /** Reads `byteLength` bytes of a tensor from `byteOffset`. */
  readTensor(tensor: DeviceTensor, byteOffset: number, byteLength: number): Promise<Uint8Array>;
  /** Writes bytes into a tensor at `byteOffset`. */
  writeTensor(tensor: DeviceTensor, byteOffset: number, data: Uint8Array): void;
  /**
   * Copies `byteLength` bytes of `src` from `srcOffset` into `dst` at `dstOffset`
   * (offsets default to 0). `src` and `dst` may be the same tensor when the two
   * ranges do not overlap (a KV page copied within the pool).
   */
  copyTensor(src: DeviceTensor, dst: DeviceTensor, byteLength: number, srcOffset?: number, dstOffset?: number): void;
  /** Frees a weight or state tensor. */
  release(tensor: DeviceTensor): void;
  /**
   * Prepares a plan to run. `bindings` maps the id of every weight and state tensor of
   * the graph to a device tensor of this backend with the same dtype and shape.
   */
  compile(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Promise<Executable>;
  /** Frees everything the backend holds. */
  dispose(): void;
}

/** Where each op kind's operand dtype comes from: its weight, its cache, or `"f32"` activations. */
const OPERAND_DTYPE: Readonly<Record<OpKind, (graph: Graph, node: Node) => DType>> = {
  embedding: (graph, node) => graph.tensors[node.inputs[1]].dtype,
  rmsNorm: () => "f32",
  matmul: (graph, node) => graph.tensors[node.inputs[1]].dtype,
  rope: () => "f32",
  siluMul: () => "f32",
  add: () => "f32",
  attention: (graph, node) => graph.tensors[node.inputs[3]].dtype,
  gatherRows: () => "f32",
};

/**
 * The operand dtype that {@link Backend.supports} is asked about for a node: the
 * weight's dtype for `matmul` and `embedding`, the key cache's for `attention`, `"f32"`
 * for the rest.
 */
export function operandDType(graph: Graph, node: Node): DType {
  return OPERAND_DTYPE[node.op.kind](graph, node);
}

/** Thrown when a backend cannot run something it was given; names the backend and what. */
export class UnsupportedError extends Error {
  /**
   * Creates the error.
   * @param message sentence-case description naming the backend and the op/dtype.
   */
  constructor(message: string) {
    super(message);
    this.name = "UnsupportedError";
  }
}

/**
 * Checks what every backend's `compile` must check before running anything: each op
 * is supported, and each binding exists with the graph's dtype and shape.
 */
export function validateBindings(
  backend: Backend,
  plan: ExecutionPlan,
  bindings: ReadonlyMap<number, DeviceTensor>,
): void {
  const { graph } = plan;
  for (const node of graph.nodes) {
    const dtype = operandDType(graph, node);
    if (!backend.supports(node.op.kind, dtype)) {
      throw new UnsupportedError(
        `Backend "${backend.name}" does not support op "${node.op.kind}" with dtype "${dtype}"`,
      );
    }
  }
  for (const t of graph.tensors) {
    if (t.kind !== "weight" && t.kind !== "state") continue;
    const b = bindings.get(t.id);
    if (!b) throw new TypeError(`Cannot compile the graph: ${t.kind} "${t.name}" is not bound`);
    const same = b.dtype === t.dtype && b.shape.length === t.shape.length &&
      b.shape.every((d, i) => d === t.shape[i]);
    if (!same) {
      throw new TypeError(
        `Cannot bind "${b.name}" (${b.dtype} [${b.shape}]) to ${t.kind} "${t.name}": expected ${t.dtype} [${t.shape}]`,
      );
    }
  }
}

/**
 * Checks a step's dimensions against the plan's room: every symbolic dimension of
 * the plan bound to an integer from 1 to its `maxDims`; a `RangeError` names the
 * offending value.
 */
export function validateStep(plan: ExecutionPlan, step: StepArgs): void {
  for (const [name, max] of Object.entries(plan.maxDims)) {
    const v = step.dims?.[name];
    if (!Number.isInteger(v) || v < 1 || v > max) {
      throw new RangeError(`Cannot run a step with ${name} = ${v}: expected an integer from 1 to ${max}`);
    }
  }
}

/**
 * The name of the symbolic dimension a node's rows run over (`"T"`, `"R"`), or its
 * fixed row count: the first dimension of its output. Row-wise kernels process that
 * many rows of a step.
 */
export function nodeRows(graph: Graph, node: Node): number | string {
  return graph.tensors[node.output].shape[0];
}

/** What the values of an index input address, and one past the largest allowed. */
export interface IndexLimit {
  /** One past the largest value: every value is an integer from 0 to `limit - 1`. */
  readonly limit: number;
  /** What the values index, for the error message (`"token id"`, `"page"`, …). */
  readonly what: string;
}

/**
 * The bound of every `i32` graph input that some op uses as an index (see
 * `INDEX_INPUTS` in `graph/ir.ts`), the smallest over its uses: token ids below the
 * embedding table's rows; positions below the page table's reach
 * (`pagesPerSeq × pageSize`); page-table rows below the plan's largest `S`; pages
 * below the pool's page count; gathered rows below the plan's largest row count.
 * Positions read only by `rope` must be non-negative integers. Index values beyond
 * the step's own `S` or `T` but inside these bounds stay inside the buffers.
 */
export function indexLimits(plan: ExecutionPlan): Map<number, IndexLimit> {
  const { graph, maxDims } = plan;
  const dim = (d: number | string): number => typeof d === "number" ? d : maxDims[d] ?? Infinity;
  const limits = new Map<number, IndexLimit>();
  const add = (id: number, limit: number, what: string) => {
    const old = limits.get(id);
    if (!old || limit < old.limit) limits.set(id, { limit, what });
  };
  for (const node of graph.nodes) {
    const op = node.op;
    const shape = (i: number) => graph.tensors[node.inputs[i]].shape;
    if (op.kind === "embedding") add(node.inputs[0], dim(shape(1)[0]), "token id");
    else if (op.kind === "rope") add(node.inputs[1], Infinity, "position");
    else if (op.kind === "gatherRows") add(node.inputs[1], dim(shape(0)[0]), "row");
    else if (op.kind === "attention") {
      const pages = shape(7);
      add(node.inputs[5], dim(pages[1]) * op.pageSize, "position");
      add(node.inputs[6], dim(pages[0]), "page-table row");
      add(node.inputs[7], Math.min(dim(shape(3)[0]), dim(shape(4)[0])) / op.pageSize, "page");
    }
  }
  return limits;
}
