/**
 * The entry point for backend authors (`@llm/engine/backend`): everything needed to
 * implement a {@link Backend} and register it — the kernel contract and its
 * checks, the graph IR and the plans a backend runs, the dtypes and their byte
 * layouts, the weight codecs and the reference kernels that specify every op.
 *
 * A backend receives an {@link ExecutionPlan} (ordered nodes of the closed op set,
 * with arena offsets) plus device tensors for the weights and state, and runs the
 * whole plan once per step. The conformance suite (`tests/conformance_test.ts`)
 * checks every registered backend against {@link referenceOp}.
 *
 * The example registers a complete, if slow, backend: every op of an f32 graph run
 * by the reference kernels.
 *
 * @example
 * ```ts
 * import {
 *   type Backend,
 *   checkCopy,
 *   checkInputWrite,
 *   checkOutputRead,
 *   checkRange,
 *   createBackend,
 *   type DeviceTensor,
 *   elementCount,
 *   type Executable,
 *   type ExecutionPlan,
 *   f32Only,
 *   GraphBuilder,
 *   IndexChecks,
 *   type OpSupport,
 *   planGraph,
 *   referenceOp,
 *   registerBackend,
 *   resolveShape,
 *   supportsOp,
 *   UnsupportedError,
 *   validateBindings,
 *   validateStep,
 * } from "@llm/engine/backend";
 *
 * // One entry per op kind: a new op kind is a compile error here until it is handled.
 * const SUPPORT: OpSupport = {
 *   embedding: f32Only, rmsNorm: f32Only, matmul: f32Only, rope: f32Only,
 *   siluMul: f32Only, add: f32Only, attention: f32Only, gatherRows: f32Only,
 * };
 *
 * interface RefDeviceTensor extends DeviceTensor {
 *   readonly values: Float32Array;
 * }
 * const bytesOf = (t: DeviceTensor) => new Uint8Array((t as RefDeviceTensor).values.buffer);
 *
 * function referenceExecutable(plan: ExecutionPlan, bindings: ReadonlyMap<number, DeviceTensor>): Executable {
 *   const values = new Map<number, Float32Array | Int32Array>();
 *   for (const [id, t] of bindings) values.set(id, (t as RefDeviceTensor).values);
 *   // Indices (token ids, positions, page tables, rows) are checked before any kernel sees them.
 *   const indices = new IndexChecks(plan);
 *   return {
 *     writeInput(id, data, count) {
 *       checkInputWrite(plan, id, data, count);
 *       indices.check(id, data, count);
 *       values.set(id, data.slice(0, count));
 *     },
 *     async run(step) {
 *       validateStep(plan, step);
 *       const { graph } = plan;
 *       for (const nodeId of plan.order) {
 *         const node = graph.nodes[nodeId];
 *         const inputs = node.inputs.map((id) => ({
 *           shape: resolveShape(graph.tensors[id].shape, step.dims),
 *           data: values.get(id)!,
 *         }));
 *         values.set(node.output, referenceOp(node.op, inputs));
 *       }
 *     },
 *     async readOutput(id, dst, count) {
 *       checkOutputRead(plan, id, dst, count);
 *       dst.set(values.get(id)!.subarray(0, count));
 *     },
 *     dispose() {},
 *   };
 * }
 *
 * registerBackend("reference", async () => {
 *   const tensor = (name: string, shape: readonly number[], values: Float32Array): RefDeviceTensor => ({
 *     name, dtype: "f32", shape: [...shape], byteLength: values.byteLength, values,
 *   });
 *   const backend: Backend = {
 *     name: "reference",
 *     description: "reference kernels (f64 accumulation)",
 *     supports: (op, dtype) => supportsOp(SUPPORT, op, dtype),
 *     upload(t) {
 *       if (t.dtype !== "f32") throw new UnsupportedError(`Backend "reference" cannot hold "${t.name}" as "${t.dtype}"`);
 *       return tensor(t.name, t.shape, new Float32Array(t.data.slice().buffer));
 *     },
 *     createState(name, dtype, shape) {
 *       if (dtype !== "f32") throw new UnsupportedError(`Backend "reference" cannot hold state "${name}" as "${dtype}"`);
 *       return tensor(name, shape, new Float32Array(elementCount(shape)));
 *     },
 *     async readTensor(t, offset, length) {
 *       checkRange(t, offset, length);
 *       return bytesOf(t).slice(offset, offset + length);
 *     },
 *     writeTensor(t, offset, data) {
 *       checkRange(t, offset, data.byteLength);
 *       bytesOf(t).set(data, offset);
 *     },
 *     copyTensor(src, dst, length, from = 0, to = 0) {
 *       checkCopy(src, dst, length, from, to);
 *       bytesOf(dst).set(bytesOf(src).subarray(from, from + length), to);
 *     },
 *     release() {},
 *     async compile(plan, bindings) {
 *       validateBindings(backend, plan, bindings);
 *       return referenceExecutable(plan, bindings);
 *     },
 *     dispose() {},
 *   };
 *   return backend;
 * });
 *
 * // out = a + b over T rows of 4, run on the new backend.
 * const g = new GraphBuilder();
 * const a = g.input("a", "f32", ["T", 4]);
 * const b = g.input("b", "f32", ["T", 4]);
 * const out = g.add(a, b, "out");
 * g.output(out);
 * const backend = await createBackend("reference");
 * const exec = await backend.compile(planGraph(g.build(), { T: 2 }), new Map());
 * exec.writeInput(a.id, new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]), 8);
 * exec.writeInput(b.id, new Float32Array(8).fill(10), 8);
 * await exec.run({ dims: { T: 2 } });
 * const result = new Float32Array(8);
 * await exec.readOutput(out.id, result, 8);
 * console.log(result); // Float32Array(8) [ 11, 12, 13, 14, 15, 16, 17, 18 ]
 * backend.dispose();
 * ```
 *
 * @module
 */

import "./builtin.ts";

export {
  type Backend,
  type BackendOptions,
  type DeviceTensor,
  type Executable,
  type HostTensor,
  type IndexLimit,
  indexLimits,
  nodeRows,
  operandDType,
  type StepArgs,
  UnsupportedError,
  validateBindings,
  validateStep,
} from "./contract.ts";
export {
  checkCopy,
  checkInputWrite,
  checkOutputRead,
  checkRange,
  checkStateDType,
  checkUploadSize,
  f32Only,
  IndexChecks,
  type OpSupport,
  supportsOp,
} from "./checks.ts";
export {
  type BackendFactory,
  backendNames,
  createBackend,
  registerBackend,
  registerLazyBackend,
  UnknownBackendError,
} from "./registry.ts";
export { referenceOp, type RefTensor } from "./reference.ts";
export { type BufferSlot, describePlan, type ExecutionPlan, planGraph, SLOT_ALIGN } from "../graph/plan.ts";
export {
  type Dim,
  type DimBindings,
  elementCount,
  formatShape,
  type Graph,
  INDEX_INPUTS,
  type Node,
  type Op,
  OP_KINDS,
  type OpKind,
  resolveShape,
  type TensorKind,
  type TensorSpec,
} from "../graph/ir.ts";
export { GraphBuilder } from "../graph/builder.ts";
export {
  byteSize,
  type DType,
  DTYPES,
  isKvDType,
  isQuantized,
  isWeightDType,
  KV_DTYPES,
  type KvDType,
  parseDType,
  QUANT_BLOCK,
  quantScalesOffset,
  WEIGHT_DTYPES,
  type WeightDType,
} from "../graph/dtype.ts";
export { decodeWeights, encodeWeights, NonFiniteWeightError } from "../graph/weight_codec.ts";
export { bf16ToF32, f16Table, f16ToF32, f32BitsToBf16, f32BitsToF16, f32ToBf16, f32ToF16 } from "../graph/half.ts";
