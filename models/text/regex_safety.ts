/**
 * A conservative static check for regular expressions whose backtracking can
 * take exponential or high-polynomial time (ReDoS), for the patterns a
 * `tokenizer.json` hands to the JavaScript regex engine (normalizer `Replace`,
 * pre-tokenizer `Split`, decoder `Replace`). JavaScript regexes cannot be
 * interrupted once running, so a bad pattern must be refused before it is used.
 *
 * Two rules, both on the parsed pattern:
 * - **No ambiguous repeated group.** A group repeated more than once (`*`, `+`,
 *   `{n,m}` with m > 1) may not contain an alternation or a quantifier: `(a|a)*`,
 *   `(a+)+` and `(a?){30}` are exponential, and telling the harmless ones apart
 *   needs an automaton; real tokenizers repeat only single atoms.
 * - **At most {@link MAX_REGEX_DEGREE} unbounded quantifiers along one path.**
 *   Each unbounded (or widely bounded) quantifier on the same path can multiply
 *   the backtracking by the input length (`\s*\s*\s*X` is cubic per start). The
 *   pre-tokenizer regexes of GPT-2, Llama 3, Qwen and o200k have two
 *   (` ?[^\s\p{L}\p{N}]+[\r\n]*`).
 *
 * @module
 */

/** Unbounded quantifiers allowed along one path of a pattern (see the module doc). */
export const MAX_REGEX_DEGREE = 2;

/** A repetition bound above this counts as unbounded for the degree rule. */
const WIDE_BOUND = 16;

interface Quantified {
  readonly node: Atom | Group;
  /** The repetition's upper bound (1 without a quantifier). */
  readonly max: number;
  /** Whether a quantifier applies (`?` has max 1 but is one). */
  readonly quantified: boolean;
}
interface Atom {
  readonly kind: "atom";
}
interface Group {
  readonly kind: "group";
  readonly alternatives: Quantified[][];
}

/** Why `pattern` is refused (a sentence fragment), or undefined when it passes both rules. */
export function regexHazard(pattern: string): string | undefined {
  let root: Group;
  try {
    root = parsePattern(pattern);
  } catch (e) {
    return (e as Error).message;
  }
  const ambiguous = findAmbiguousRepeat(root);
  if (ambiguous) return ambiguous;
  const degree = degreeOf(root);
  if (degree > MAX_REGEX_DEGREE) {
    return `it has ${degree} unbounded quantifiers along one path (at most ${MAX_REGEX_DEGREE}): backtracking is polynomial of degree ${degree} in the text length`;
  }
  return undefined;
}

function findAmbiguousRepeat(g: Group): string | undefined {
  for (const seq of g.alternatives) {
    for (const q of seq) {
      if (q.node.kind !== "group") continue;
      if (q.max > 1) {
        if (q.node.alternatives.length > 1) {
          return "a repeated group contains an alternation (like (a|a)*): backtracking is exponential";
        }
        if (q.node.alternatives.some((s) => s.some((inner) => inner.quantified || hasQuantifier(inner.node)))) {
          return "a repeated group contains a quantifier (like (a+)+): backtracking is exponential";
        }
      }
      const inner = findAmbiguousRepeat(q.node);
      if (inner) return inner;
    }
  }
  return undefined;
}

function hasQuantifier(node: Atom | Group): boolean {
  return node.kind === "group" &&
    (node.alternatives.length > 1 ||
      node.alternatives.some((s) => s.some((q) => q.quantified || hasQuantifier(q.node))));
}

function degreeOf(g: Group): number {
  let worst = 0;
  for (const seq of g.alternatives) {
    let sum = 0;
    for (const q of seq) sum += (q.max > WIDE_BOUND ? 1 : 0) + (q.node.kind === "group" ? degreeOf(q.node) : 0);
    worst = Math.max(worst, sum);
  }
  return worst;
}

/** Parses the structure (groups, alternations, quantifiers) of a JavaScript / Oniguruma pattern. */
function parsePattern(src: string): Group {
  let i = 0;
  const group = (depth: number): Group => {
    if (depth > 200) throw new Error("its groups nest more than 200 deep");
    const alternatives: Quantified[][] = [[]];
    while (i < src.length) {
      const c = src[i];
      if (c === ")") {
        if (depth === 0) throw new Error(`it has an unmatched ")" at ${i}`);
        i++;
        return { kind: "group", alternatives };
      }
      if (c === "|") {
        i++;
        alternatives.push([]);
        continue;
      }
      let node: Atom | Group;
      if (c === "(") {
        i++;
        if (src[i] === "?") skipGroupPrefix();
        node = group(depth + 1);
      } else if (c === "[") {
        skipClass();
        node = { kind: "atom" };
      } else if (c === "\\") {
        skipEscape();
        node = { kind: "atom" };
      } else {
        i++;
        node = { kind: "atom" };
      }
      alternatives[alternatives.length - 1].push({ node, ...quantifier() });
    }
    if (depth > 0) throw new Error(`it has an unclosed "("`);
    return { kind: "group", alternatives };
  };
  // `(?:`, `(?=`, `(?!`, `(?<=`, `(?<!`, `(?<name>`, `(?'name'`, `(?i:` / `(?i-m)`: skip to the group's body.
  const skipGroupPrefix = () => {
    i++;
    const named = src[i] === "<" && src[i + 1] !== "=" && src[i + 1] !== "!";
    if (named || src[i] === "'") {
      const close = src.indexOf(named ? ">" : "'", i + 1);
      if (close < 0) throw new Error("it has an unterminated group name");
      i = close + 1;
      return;
    }
    if (src[i] === "<") i++;
    while (i < src.length && /[a-zA-Z\-]/.test(src[i])) i++;
    if (src[i] === ":" || src[i] === "=" || src[i] === "!") i++;
  };
  const skipClass = () => {
    i++;
    if (src[i] === "^") i++;
    if (src[i] === "]") i++;
    while (i < src.length && src[i] !== "]") {
      if (src[i] === "\\") skipEscape();
      else if (src[i] === "[" && src[i + 1] === ":") {
        const close = src.indexOf(":]", i + 2);
        i = close < 0 ? i + 1 : close + 2;
      } else i++;
    }
    if (i >= src.length) throw new Error(`it has an unterminated "["`);
    i++;
  };
  const skipEscape = () => {
    i++;
    const c = src[i++];
    if ((c === "p" || c === "P" || c === "u" || c === "x" || c === "k") && (src[i] === "{" || src[i] === "<")) {
      const close = src.indexOf(src[i] === "{" ? "}" : ">", i);
      if (close < 0) throw new Error(`it has an unterminated "\\${c}" escape`);
      i = close + 1;
    }
  };
  const quantifier = (): { max: number; quantified: boolean } => {
    let max = 1;
    const c = src[i];
    if (c === "*" || c === "+") {
      max = Infinity;
      i++;
    } else if (c === "?") {
      i++;
    } else if (c === "{") {
      const m = /^\{(\d*)(,(\d*))?\}/.exec(src.slice(i, i + 40));
      if (!m || (m[1] === "" && m[3] === undefined)) return { max: 1, quantified: false }; // a literal "{"
      max = m[2] === undefined ? Number(m[1]) : m[3] === "" ? Infinity : Number(m[3]);
      i += m[0].length;
    } else return { max: 1, quantified: false };
    if (src[i] === "?" || src[i] === "+") i++; // lazy or possessive
    if (src[i] === "*" || src[i] === "+") {
      throw new Error(`it repeats a quantifier at ${i} (like a**): backtracking is exponential`);
    }
    return { max, quantified: true };
  };
  return group(0);
}
