/**
 * A plan compiled for WebGPU: its arena, index, parameter, step and read-back
 * buffers, and every node lowered to dispatches once. A step writes its dimensions
 * into the step uniform, records every dispatch into one command encoder and submits
 * once.
 *
 * @module
 */

import type { ExecutionPlan } from "../../graph/plan.ts";
import { checkInputWrite, checkOutputRead, IndexChecks } from "../checks.ts";
import type { Executable, StepArgs } from "../contract.ts";
import { validateStep } from "../contract.ts";
import {
  DispatchBuilder,
  encodeNode,
  type GpuContext,
  IndexLayout,
  type NodeDispatches,
  PARAM_STRIDE,
  paramSlotCount,
  stepLanes,
} from "./lowering.ts";
import { COPY_DST, type GpuTensor, MAP_READ, STORAGE, UNIFORM } from "./memory.ts";
import { STEP_LANES } from "./shaders.ts";

/**
 * A compiled plan of the WebGPU backend.
 *
 * `run` resolves once the step is submitted, before the GPU has run it: later queue
 * operations (`writeInput`'s buffer writes, `readOutput`'s copy) are ordered after it by
 * the queue, so they see the step's results and never overwrite an input it still reads.
 */
export class WebGpuExecutable implements Executable {
  readonly #context: GpuContext;
  readonly #device: GPUDevice;
  readonly #plan: ExecutionPlan;
  readonly #arena: GPUBuffer;
  readonly #params: GPUBuffer;
  readonly #step: GPUBuffer;
  /** The step's values of {@link WebGpuExecutable.#lanes}, written into the step uniform. */
  readonly #stepData = new Uint32Array(STEP_LANES);
  /** The symbolic dimensions the nodes run their rows over, by step-uniform lane. */
  readonly #lanes: readonly string[];
  readonly #staging: GPUBuffer;
  /** Every `i32` graph input (token ids, positions, page tables, rows), each at its own offset. */
  readonly #index: GPUBuffer;
  /** Byte offset of each `i32` graph input in the index buffer. */
  readonly #indexBytes = new Map<number, number>();
  readonly #indexChecks: IndexChecks;
  readonly #nodes: NodeDispatches[] = [];
  #disposed = false;

  /**
   * Creates the buffers and lowers every node; GPU errors surface in the backend's
   * `compile`, which wraps this in error scopes.
   * @param context the backend's device, kernels, pipelines and health
   * @param plan the plan
   * @param bindings the weight and state tensors, checked by `validateBindings`
   */
  constructor(context: GpuContext, plan: ExecutionPlan, bindings: ReadonlyMap<number, GpuTensor>) {
    this.#context = context;
    const device = this.#device = context.device;
    this.#plan = plan;
    this.#indexChecks = new IndexChecks(plan);
    this.#lanes = stepLanes(plan);
    const { graph } = plan;
    const limit = device.limits.maxStorageBufferBindingSize;
    if (plan.arenaBytes > limit) {
      throw new RangeError(
        `Cannot compile the graph for WebGPU: its activation arena (${plan.arenaBytes} bytes) is larger than the ` +
          `device's maxStorageBufferBindingSize (${limit} bytes); use a smaller prefillChunk`,
      );
    }
    const indexLayout = new IndexLayout(plan);
    for (const [id, word] of indexLayout.inputs) this.#indexBytes.set(id, word * 4);
    const indexBytes = indexLayout.words * 4;
    if (indexBytes > limit) {
      throw new RangeError(
        `Cannot compile the graph for WebGPU: its i32 inputs and tables (${indexBytes} bytes) are larger than the ` +
          `device's maxStorageBufferBindingSize (${limit} bytes)`,
      );
    }
    this.#arena = device.createBuffer({ label: "arena", size: Math.max(4, plan.arenaBytes), usage: STORAGE });
    this.#index = device.createBuffer({ label: "index inputs", size: Math.max(4, indexBytes), usage: STORAGE });
    this.#step = device.createBuffer({ label: "step", size: STEP_LANES * 4, usage: UNIFORM | COPY_DST });
    let outBytes = 4;
    for (const id of graph.outputs) outBytes = Math.max(outBytes, plan.slots[id]!.bytes);
    this.#staging = device.createBuffer({ label: "readback", size: outBytes, usage: MAP_READ | COPY_DST });
    // Parameters: every dispatch gets a 256-byte slot of one uniform buffer.
    const paramBytes = new ArrayBuffer(Math.max(1, paramSlotCount(plan, bindings)) * PARAM_STRIDE);
    this.#params = device.createBuffer({ label: "params", size: paramBytes.byteLength, usage: UNIFORM | COPY_DST });
    const target = {
      plan,
      arena: this.#arena,
      params: this.#params,
      step: this.#step,
      index: this.#index,
      indexLayout,
      lanes: new Map(this.#lanes.map((name, lane) => [name, lane])),
    };
    const builder = new DispatchBuilder(context, target, paramBytes, bindings);
    for (const id of plan.order) this.#nodes.push(builder.node(graph.nodes[id]));
    device.queue.writeBuffer(this.#params, 0, paramBytes);
    const { constants, inputWords } = indexLayout;
    if (constants.length > 0) device.queue.writeBuffer(this.#index, inputWords * 4, constants);
  }

  /**
   * Copies the first `count` values into a graph input: `i32` values (token ids,
   * positions, page tables, rows: each checked against what it indexes) into the index
   * buffer, `f32` activations into the arena. Only those `count` values are written.
   */
  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    this.#checkUsable();
    const slot = checkInputWrite(this.#plan, tensorId, data, count);
    const indexAt = this.#indexBytes.get(tensorId);
    if (indexAt !== undefined) this.#indexChecks.check(tensorId, data, count);
    if (count === 0) return;
    const queue = this.#device.queue;
    if (indexAt !== undefined) {
      // Checked above: every value is an integer the kernels may use as an index.
      const src = data instanceof Int32Array ? data : Int32Array.from(data.subarray(0, count));
      queue.writeBuffer(this.#index, indexAt, src as Int32Array<ArrayBuffer>, 0, count);
    } else {
      const src = data instanceof Float32Array ? data : Float32Array.from(data.subarray(0, count));
      queue.writeBuffer(this.#arena, slot.offset, src as Float32Array<ArrayBuffer>, 0, count);
    }
  }

  /**
   * Writes the step's dimensions into the step uniform, records every node for its rows
   * into one command encoder and submits it (one submission per node, each awaited, when
   * profiling). Resolves once submitted (see the class).
   */
  async run(step: StepArgs, profile?: Float64Array): Promise<void> {
    this.#checkUsable();
    validateStep(this.#plan, step);
    const { dims } = step;
    const device = this.#device;
    for (let i = 0; i < this.#lanes.length; i++) this.#stepData[i] = dims[this.#lanes[i]];
    device.queue.writeBuffer(this.#step, 0, this.#stepData);
    if (!profile) {
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      for (const node of this.#nodes) encodeNode(pass, node, rowsOf(node, dims));
      pass.end();
      device.queue.submit([enc.finish()]);
      return;
    }
    // Profiling: one submission per node, timed to its completion.
    for (let i = 0; i < this.#nodes.length; i++) {
      const t0 = performance.now();
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      encodeNode(pass, this.#nodes[i], rowsOf(this.#nodes[i], dims));
      pass.end();
      device.queue.submit([enc.finish()]);
      await this.#context.health.whileAlive(device.queue.onSubmittedWorkDone());
      profile[i] += performance.now() - t0;
    }
    this.#context.health.check();
  }

  /** Copies the first values of a graph output into `dst`, through the read-back buffer. */
  async readOutput(tensorId: number, dst: Float32Array, count: number): Promise<void> {
    this.#checkUsable();
    const slot = checkOutputRead(this.#plan, tensorId, dst, count);
    if (count === 0) return;
    if (this.#staging.mapState !== "unmapped") {
      throw new TypeError(`Cannot read output ${tensorId}: another read of this executable is in progress`);
    }
    const bytes = count * 4;
    const enc = this.#device.createCommandEncoder();
    enc.copyBufferToBuffer(this.#arena, slot.offset, this.#staging, 0, bytes);
    this.#device.queue.submit([enc.finish()]);
    await this.#context.health.whileAlive(this.#staging.mapAsync(MAP_READ, 0, bytes));
    try {
      this.#context.health.check();
      dst.set(new Float32Array(this.#staging.getMappedRange(0, bytes)), 0);
    } finally {
      this.#staging.unmap();
    }
  }

  /** Destroys the executable's buffers. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const b of [this.#arena, this.#index, this.#params, this.#step, this.#staging]) b.destroy();
  }

  #checkUsable(): void {
    if (this.#disposed) throw new TypeError("Cannot use a disposed WebGPU executable");
    this.#context.health.check();
  }
}

/** The rows a node processes in a step: its fixed count, or the step's value of its dimension (checked by `validateStep`). */
function rowsOf(node: NodeDispatches, dims: StepArgs["dims"]): number {
  return typeof node.rows === "number" ? node.rows : dims[node.rows];
}
