/**
 * `LLM_DEBUG`: 1 prints each buffer plan as it is compiled, 2 also prints the
 * per-op timings of the first prefill chunk and the first decode step, to stderr.
 *
 * @module
 */

import type { ExecutionPlan } from "../../graph/plan.ts";
import { describePlan } from "../../graph/plan.ts";

let level: number | undefined;

/** The debug level from `LLM_DEBUG` (0 without the variable or the permission to read it). */
export function debugLevel(): number {
  level ??= readLevel();
  return level;
}

function readLevel(): number {
  try {
    if (Deno.permissions.querySync({ name: "env", variable: "LLM_DEBUG" }).state !== "granted") return 0;
    const v = Number(Deno.env.get("LLM_DEBUG") ?? 0);
    return Number.isFinite(v) ? v : 0;
  } catch {
    return 0;
  }
}

/** Prints a plan at level ≥ 1. */
export function debugPlan(label: string, plan: ExecutionPlan): void {
  if (debugLevel() >= 1) console.error(`[llm] ${label}\n${describePlan(plan)}`);
}

/** Prints per-node and per-op-kind timings (ms) of one step at level ≥ 2. */
export function debugTimings(label: string, plan: ExecutionPlan, profile: Float64Array): void {
  const { graph } = plan;
  const byKind = new Map<string, number>();
  const lines: string[] = [];
  let total = 0;
  plan.order.forEach((nodeId, i) => {
    const node = graph.nodes[nodeId];
    const ms = profile[i];
    total += ms;
    byKind.set(node.op.kind, (byKind.get(node.op.kind) ?? 0) + ms);
    lines.push(`  ${graph.tensors[node.output].name.padEnd(20)} ${node.op.kind.padEnd(10)} ${ms.toFixed(4)} ms`);
  });
  const kinds = [...byKind].sort((a, b) => b[1] - a[1])
    .map(([k, ms]) => `  ${k.padEnd(10)} ${ms.toFixed(3)} ms (${((100 * ms) / total).toFixed(1)}%)`);
  console.error(`[llm] op timings, ${label}: ${total.toFixed(3)} ms\n${kinds.join("\n")}\n${lines.join("\n")}`);
}
