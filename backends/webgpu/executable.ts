/**
 * A plan compiled for WebGPU: its arena, parameter, step and read-back buffers,
 * and every node lowered to dispatches once. A step writes `T` and `pos` into the
 * step uniform, records every dispatch into one command encoder and submits once.
 *
 * @module
 */

import type { ExecutionPlan } from "../../graph/plan.ts";
import { checkInputWrite, checkOutputRead, TokenIdLimits } from "../checks.ts";
import type { Executable, StepArgs } from "../contract.ts";
import { cacheCapacity, validateStep } from "../contract.ts";
import {
  DispatchBuilder,
  encodeNode,
  type GpuContext,
  type NodeDispatches,
  PARAM_STRIDE,
  paramSlotCount,
} from "./lowering.ts";
import { COPY_DST, type GpuTensor, MAP_READ, STORAGE, UNIFORM } from "./memory.ts";

/** A compiled plan of the WebGPU backend. */
export class WebGpuExecutable implements Executable {
  readonly #context: GpuContext;
  readonly #device: GPUDevice;
  readonly #plan: ExecutionPlan;
  readonly #capacity: number;
  readonly #arena: GPUBuffer;
  readonly #params: GPUBuffer;
  readonly #step: GPUBuffer;
  readonly #stepData = new Uint32Array(4);
  readonly #staging: GPUBuffer;
  /** Separate buffers of the i32 graph inputs (token ids), by tensor id. */
  readonly #idBuffers = new Map<number, GPUBuffer>();
  readonly #idLimits = new TokenIdLimits();
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
    this.#capacity = cacheCapacity(plan);
    const { graph } = plan;
    const limit = device.limits.maxStorageBufferBindingSize;
    if (plan.arenaBytes > limit) {
      throw new RangeError(
        `Cannot compile the graph for WebGPU: its activation arena (${plan.arenaBytes} bytes) is larger than the ` +
          `device's maxStorageBufferBindingSize (${limit} bytes); use a smaller prefillChunk`,
      );
    }
    this.#arena = device.createBuffer({ label: "arena", size: Math.max(4, plan.arenaBytes), usage: STORAGE });
    this.#step = device.createBuffer({ label: "step", size: 16, usage: UNIFORM | COPY_DST });
    let outBytes = 4;
    for (const id of graph.outputs) outBytes = Math.max(outBytes, plan.slots[id]!.bytes);
    this.#staging = device.createBuffer({ label: "readback", size: outBytes, usage: MAP_READ | COPY_DST });
    for (const id of graph.inputs) {
      const t = graph.tensors[id];
      if (t.dtype === "i32") {
        this.#idBuffers.set(id, device.createBuffer({ label: t.name, size: plan.slots[id]!.bytes, usage: STORAGE }));
      }
    }
    // Parameters: every dispatch gets a 256-byte slot of one uniform buffer.
    const paramBytes = new ArrayBuffer(Math.max(1, paramSlotCount(plan, bindings)) * PARAM_STRIDE);
    this.#params = device.createBuffer({ label: "params", size: paramBytes.byteLength, usage: UNIFORM | COPY_DST });
    const target = {
      plan,
      arena: this.#arena,
      params: this.#params,
      step: this.#step,
      idBuffers: this.#idBuffers,
      idLimits: this.#idLimits,
    };
    const builder = new DispatchBuilder(context, target, paramBytes, bindings);
    for (const id of plan.order) this.#nodes.push(builder.node(graph.nodes[id]));
    device.queue.writeBuffer(this.#params, 0, paramBytes);
  }

  /** Copies token ids (checked against the tables) or activations into a graph input. */
  writeInput(tensorId: number, data: Int32Array | Float32Array, count: number): void {
    this.#checkUsable();
    const slot = checkInputWrite(this.#plan, tensorId, data, count);
    if (count === 0) return;
    const ids = this.#idBuffers.get(tensorId);
    if (ids) {
      this.#idLimits.check(tensorId, data, count);
      const src = data instanceof Int32Array ? data : Int32Array.from(data.subarray(0, count));
      this.#device.queue.writeBuffer(ids, 0, src as Int32Array<ArrayBuffer>, 0, count);
    } else {
      const src = data instanceof Float32Array ? data : Float32Array.from(data.subarray(0, count));
      this.#device.queue.writeBuffer(this.#arena, slot.offset, src as Float32Array<ArrayBuffer>, 0, count);
    }
  }

  /** Records every dispatch into one command encoder and submits it (one per node when profiling). */
  async run(step: StepArgs, profile?: Float64Array): Promise<void> {
    this.#checkUsable();
    validateStep(this.#plan, step, this.#capacity);
    const T = step.dims.T ?? 1;
    const device = this.#device;
    this.#stepData[0] = T;
    this.#stepData[1] = step.pos;
    device.queue.writeBuffer(this.#step, 0, this.#stepData);
    if (!profile) {
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      for (const node of this.#nodes) encodeNode(pass, node, T);
      pass.end();
      device.queue.submit([enc.finish()]);
      return;
    }
    // Profiling: one submission per node, timed to its completion.
    for (let i = 0; i < this.#nodes.length; i++) {
      const t0 = performance.now();
      const enc = device.createCommandEncoder();
      const pass = enc.beginComputePass();
      encodeNode(pass, this.#nodes[i], T);
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
    for (const b of [this.#arena, this.#params, this.#step, this.#staging, ...this.#idBuffers.values()]) b.destroy();
  }

  #checkUsable(): void {
    if (this.#disposed) throw new TypeError("Cannot use a disposed WebGPU executable");
    this.#context.health.check();
  }
}
