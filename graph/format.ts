/**
 * Printing a graph as readable text and as Graphviz DOT.
 *
 * @module
 */

import type { Graph, Node, Op } from "./ir.ts";
import { formatShape } from "./ir.ts";

function opLabel(op: Op): string {
  const { kind, ...attrs } = op;
  const parts = Object.entries(attrs).map(([k, v]) => `${k}=${v}`);
  return parts.length ? `${kind}(${parts.join(", ")})` : kind;
}

function tensorLabel(graph: Graph, id: number): string {
  const t = graph.tensors[id];
  return `${t.name}: ${t.dtype}${formatShape(t.shape)}`;
}

/** One line per node: `out = op(inputs)`, after a header listing inputs, weights and state. */
export function graphToText(graph: Graph): string {
  const lines: string[] = [];
  const byKind = (kind: string) => graph.tensors.filter((t) => t.kind === kind);
  for (const kind of ["input", "weight", "state"]) {
    for (const t of byKind(kind)) lines.push(`${kind.padEnd(6)} ${tensorLabel(graph, t.id)}`);
  }
  for (const node of graph.nodes) {
    const ins = node.inputs.map((i) => graph.tensors[i].name).join(", ");
    lines.push(`${tensorLabel(graph, node.output)} = ${opLabel(node.op)}(${ins})`);
  }
  lines.push(`output ${graph.outputs.map((o) => graph.tensors[o].name).join(", ")}`);
  return lines.join("\n");
}

/** The graph in Graphviz DOT: boxes for ops, ellipses for inputs, weights and state. */
export function graphToDot(graph: Graph): string {
  const q = (s: string) => JSON.stringify(s);
  const lines = ["digraph model {", "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];'];
  for (const t of graph.tensors) {
    if (t.kind === "activation") continue;
    const color = t.kind === "weight" ? "lightgray" : t.kind === "state" ? "khaki" : "lightblue";
    lines.push(`  t${t.id} [label=${q(tensorLabel(graph, t.id))}, shape=ellipse, style=filled, fillcolor=${color}];`);
  }
  const producer = new Map<number, Node>(graph.nodes.map((n) => [n.output, n]));
  for (const node of graph.nodes) {
    lines.push(`  n${node.id} [label=${q(`${opLabel(node.op)}\n${tensorLabel(graph, node.output)}`)}, shape=box];`);
    for (const i of node.inputs) {
      const p = producer.get(i);
      lines.push(`  ${p ? `n${p.id}` : `t${i}`} -> n${node.id};`);
    }
  }
  for (const o of graph.outputs) {
    lines.push(`  out${o} [label=${q(`output ${graph.tensors[o].name}`)}, shape=plaintext];`);
    lines.push(`  n${producer.get(o)!.id} -> out${o};`);
  }
  lines.push("}");
  return lines.join("\n");
}
