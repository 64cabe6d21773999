/**
 * Rendering a Jinja template within a budget. A chat template comes from a
 * model's `tokenizer_config.json` (or a caller), and Jinja is a language with
 * loops: `{% for i in range(100000000) %}` grew to 2.6 GB and never answered.
 *
 * How it is bounded, and why this way: `@huggingface/jinja`'s `Interpreter`
 * sends every statement and expression through its public `evaluate` method
 * (loop bodies, macro calls, filters, operands), so a subclass that overrides
 * `evaluate` sees every step of the program. It counts steps (time: each step's
 * own work is bounded by the sizes of its inputs) and checks the size of every
 * string and list a step produces (memory). That leaves the operations that can
 * make a huge value in one step from small inputs, which are checked before they
 * run: `range` is replaced by one that refuses a range longer than the list
 * budget before building it, and the filters `indent`, `join`, `replace` and
 * `tojson` and the string method `replace` have their result size estimated
 * from their operand and arguments (a filter's arguments are evaluated once
 * more for that; each evaluation counts against the step budget).
 * Walking or rewriting the parsed program instead could not bound loops whose
 * length is only known at run time.
 *
 * @module
 */

import { Environment, Interpreter, Template } from "@huggingface/jinja";

/** Limits of one rendering. */
export interface TemplateBudget {
  /** Statements and expressions evaluated. */
  readonly steps: number;
  /** Characters of any one string the template builds (its output included). */
  readonly chars: number;
  /** Items of any one list the template builds (`range` included). */
  readonly items: number;
}

/**
 * The budget for rendering `messages` messages of `inputChars` characters in all:
 * about 15 times what real chat templates take (measured: ChatML 16, Llama 3 22,
 * Qwen3 64 steps per message) and small enough that a runaway template fails
 * within about 0.2 s plus 4 ms per message (a loop iteration costs about 4 µs).
 */
export function templateBudget(inputChars: number, messages: number): TemplateBudget {
  return {
    steps: 50_000 + 1_000 * messages,
    chars: (1 << 20) + 8 * inputChars,
    items: 10_000 + 16 * messages,
  };
}

/** A rendering went past one of its budgets. */
export class TemplateBudgetExceeded extends Error {
  /** Which budget. */
  readonly budget: keyof TemplateBudget;
  /** Its limit. */
  readonly limit: number;

  /**
   * Says which budget ran out.
   * @param budget which budget
   * @param limit its limit
   * @param what what went past it
   */
  constructor(budget: keyof TemplateBudget, limit: number, what: string) {
    super(`${what} goes past the template's ${budget} budget (${limit})`);
    this.name = "TemplateBudgetExceeded";
    this.budget = budget;
    this.limit = limit;
  }
}

type Statement = Parameters<Interpreter["evaluate"]>[0];
type Value = ReturnType<Interpreter["evaluate"]>;
/** The AST fields read here (the library's node classes are not exported). */
interface FilterNode {
  type: string;
  value?: string;
  callee?: FilterNode;
  args?: FilterNode[];
  key?: FilterNode;
}
/** The interpreter's own filter step, reached to check a filter's operand before it runs. */
interface FilterSteps {
  applyFilter(operand: Value, filter: FilterNode, env: Environment): Value;
  evaluateBlock(statements: Statement[], env: Environment): Value;
}

class BudgetedInterpreter extends Interpreter {
  readonly #budget: TemplateBudget;
  #steps = 0;
  readonly #loopIterables = new WeakSet<object>();
  /** The receivers of `.replace` method calls, with their last value. */
  readonly #receivers = new Map<object, Value | undefined>();

  constructor(env: Environment, budget: TemplateBudget) {
    super(env);
    this.#budget = budget;
  }

  override evaluate(statement: Statement, environment: Environment): Value {
    if (++this.#steps > this.#budget.steps) {
      throw new TemplateBudgetExceeded("steps", this.#budget.steps, "Evaluating the template");
    }
    const node = statement as unknown as {
      type?: string;
      operand?: Statement;
      filter?: FilterNode;
      body?: Statement[];
      iterable?: { type: string; lhs?: unknown };
    };
    const member = statement as unknown as {
      type?: string;
      computed?: boolean;
      object?: object;
      property?: FilterNode;
    };
    const isReplaceMethod = member?.type === "MemberExpression" && !member.computed &&
      member.property?.type === "Identifier" && member.property.value === "replace";
    if (isReplaceMethod) this.#receivers.set(member.object!, undefined);
    if (node?.type === "For" && node.iterable) {
      // An empty loop body evaluates nothing: charge each loop its iterations when its iterable is evaluated.
      this.#loopIterables.add(node.iterable.type === "SelectExpression" ? node.iterable.lhs as object : node.iterable);
    }
    let value: Value;
    if (node?.type === "FilterExpression" || node?.type === "FilterStatement") {
      const steps = this as unknown as FilterSteps;
      const operand = node.type === "FilterExpression"
        ? this.evaluate(node.operand, environment)
        : steps.evaluateBlock(node.body ?? [], environment);
      this.#checkFilter(operand, node.filter!, environment);
      value = steps.applyFilter(operand, node.filter!, environment);
    } else value = super.evaluate(statement, environment);
    this.#checkSize(value);
    if (this.#receivers.has(statement as object)) this.#receivers.set(statement as object, value);
    if (isReplaceMethod && value.type === "FunctionValue") {
      value = this.#checkedReplace(value, this.#receivers.get(member.object!));
    }
    if (this.#loopIterables.has(statement as object)) {
      const n = value.value instanceof Map ? value.value.size : Array.isArray(value.value) ? value.value.length : 0;
      this.#steps += n;
      if (this.#steps > this.#budget.steps) {
        throw new TemplateBudgetExceeded("steps", this.#budget.steps, `A loop of ${n} iterations`);
      }
    }
    return value;
  }

  /** `s.replace(old, new)` (a string's method), checked like the filter before it runs. */
  #checkedReplace(method: Value, receiver: Value | undefined): Value {
    if (receiver?.type !== "StringValue") return method;
    const s = receiver.value as string;
    const run = method.value as (args: Value[], env: Environment) => Value;
    // The library's FunctionValue class is not exported: make one through the method's own constructor.
    const FunctionValue = method.constructor as new (fn: (args: Value[], env: Environment) => Value) => Value;
    return new FunctionValue((args, env) => {
      const text = (v: Value | undefined) => (v?.type === "StringValue" ? v.value as string : "");
      const old = text(args[0]), replacement = text(args[1]);
      const estimate = s.length + (old === "" ? s.length + 1 : s.split(old).length - 1) * replacement.length;
      if (estimate > this.#budget.chars) {
        throw new TemplateBudgetExceeded("chars", this.#budget.chars, `A replace() result of about ${estimate}`);
      }
      return run(args, env);
    });
  }

  #checkSize(value: Value): void {
    if (value.type === "StringValue" && (value.value as string).length > this.#budget.chars) {
      throw new TemplateBudgetExceeded("chars", this.#budget.chars, `A string of ${(value.value as string).length}`);
    }
    if (
      (value.type === "ArrayValue" || value.type === "TupleValue") &&
      (value.value as Value[]).length > this.#budget.items
    ) {
      throw new TemplateBudgetExceeded("items", this.#budget.items, `A list of ${(value.value as Value[]).length}`);
    }
  }

  /** Estimates the size of what the filters that amplify (indent, join, replace, tojson) would build. */
  #checkFilter(operand: Value, filter: FilterNode, env: Environment): void {
    const name = filter.type === "CallExpression" ? filter.callee?.value : filter.value;
    const args = filter.args ?? [];
    const arg = (position: number, keyword: string): Value | undefined => {
      const kw = args.find((a) => a.type === "KeywordArgumentExpression" && a.key?.value === keyword);
      const positional = args.filter((a) => a.type !== "KeywordArgumentExpression")[position];
      const node = kw ? (kw as unknown as { value: Statement }).value : positional as unknown as Statement;
      return node === undefined ? undefined : this.evaluate(node, env);
    };
    const text = (v: Value | undefined) => (v?.type === "StringValue" ? v.value as string : "");
    let estimate = 0;
    if (name === "indent" && operand.type === "StringValue") {
      const width = arg(0, "width");
      const w = width?.type === "IntegerValue" ? Math.max(0, width.value as number) : text(width).length || 4;
      const s = operand.value as string;
      estimate = s.length + w * (s.split("\n").length);
    } else if (name === "join") {
      const sep = text(arg(0, "separator")).length;
      const items = operand.type === "StringValue" ? [...(operand.value as string)] : operand.value;
      if (Array.isArray(items)) {
        for (const item of items) estimate += String((item as Value)?.value ?? item).length + sep;
      }
    } else if (name === "replace" && operand.type === "StringValue") {
      const s = operand.value as string, old = text(arg(0, "old")), replacement = text(arg(1, "new"));
      const matches = old === "" ? s.length + 1 : s.split(old).length - 1;
      estimate = s.length + matches * replacement.length;
    } else if (name === "tojson") {
      const indent = arg(0, "indent");
      estimate = jsonEstimate(operand, indent?.type === "IntegerValue" ? Math.max(0, indent.value as number) : 0, 0);
    }
    if (estimate > this.#budget.chars) {
      throw new TemplateBudgetExceeded("chars", this.#budget.chars, `The ${name} filter's result of about ${estimate}`);
    }
  }
}

/** An upper estimate of the characters `tojson` writes for `v` (six per character when escaped). */
function jsonEstimate(v: Value, indent: number, depth: number): number {
  const pad = indent * (depth + 1) + 2;
  if (v.type === "StringValue") return 6 * (v.value as string).length + 2 + pad;
  if (v.type === "ArrayValue" || v.type === "TupleValue") {
    let n = pad;
    for (const item of v.value as Value[]) n += jsonEstimate(item, indent, depth + 1);
    return n;
  }
  if (v.type === "ObjectValue" || v.type === "NamespaceValue") {
    let n = pad;
    for (const [k, item] of v.value as Map<string, Value>) {
      n += 6 * k.length + 4 + jsonEstimate(item, indent, depth + 1);
    }
    return n;
  }
  return 32 + pad;
}

/** The library's `strftime_now`, reached through a template of its own (it is not exported). */
const strftimeTemplate = new Template("{{ strftime_now(format) }}");

/** A range like the library's (Python's `range`), refused before it is built when longer than `limit`. */
function boundedRange(limit: number) {
  return (start: number, stop?: number, step = 1): number[] => {
    if (stop === undefined) [start, stop] = [0, start];
    if (step === 0) throw new Error("range() step must not be zero");
    const length = Math.max(0, Math.ceil((stop - start) / step));
    if (length > limit) throw new TemplateBudgetExceeded("items", limit, `range(${start}, ${stop}, ${step})`);
    const out: number[] = [];
    if (step > 0) { for (let i = start; i < stop; i += step) out.push(i); }
    else for (let i = start; i > stop; i += step) out.push(i);
    return out;
  };
}

/** A parsed Jinja template that renders within a {@link TemplateBudget}. */
export class BudgetedTemplate {
  readonly #template: Template;

  /**
   * Parses `source`; throws the library's error when it is not a valid template.
   * @param source Jinja source
   */
  constructor(source: string) {
    this.#template = new Template(source);
  }

  /**
   * Renders with `variables` within `budget`; throws a {@link TemplateBudgetExceeded}
   * past it. The globals are the library's (`Template.render` sets the same ones),
   * with `range` bounded.
   */
  render(variables: Record<string, unknown>, budget: TemplateBudget): string {
    const env = new Environment();
    const globals: Record<string, unknown> = {
      false: false,
      true: true,
      none: null,
      False: false,
      True: true,
      None: null,
      raise_exception: (message: string) => {
        throw new Error(message);
      },
      range: boundedRange(Math.min(budget.items, budget.steps)),
      strftime_now: (format: string) => strftimeTemplate.render({ format }),
    };
    for (const [key, value] of Object.entries({ ...globals, ...variables })) env.set(key, value);
    const result = new BudgetedInterpreter(env, budget).run(this.#template.parsed);
    return result.value as string;
  }
}
