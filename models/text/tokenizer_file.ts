/**
 * Checks of a parsed `tokenizer.json` before it reaches `@huggingface/tokenizers`,
 * which trusts its input: a vocabulary id of 2,000,000,000 makes it build and walk
 * a sparse array for over a minute, and a pathological normalizer or
 * pre-tokenizer regex makes every encode exponential in the text length.
 *
 * @module
 */

import { regexHazard } from "./regex_safety.ts";

/**
 * Token ids must be below this: it is `config.json`'s `vocab_size` limit
 * (models/arch/config.ts), and a model refuses a tokenizer with more ids than its
 * `vocab_size`, so a larger id can never be valid. Walking a vocabulary array of
 * this length takes a few milliseconds.
 */
export const MAX_TOKEN_ID = 4_000_000;

/** A `tokenizer.json` that is refused: `field` is where in the file, `value` what was found. */
export class TokenizerFileError extends SyntaxError {
  /** The file. */
  readonly path: string;
  /** Where in the file, as a JSON path (`model.vocab["abc"]`, `added_tokens[3].id`). */
  readonly field: string;
  /** What was found there (a short JSON rendering). */
  readonly value: string;

  /**
   * A refused field of a tokenizer file.
   * @param path the file
   * @param field where in the file
   * @param value what was found there
   * @param problem why it is refused, a sentence fragment
   */
  constructor(path: string, field: string, value: unknown, problem: string) {
    const shown = shortJson(value);
    super(`Cannot load tokenizer "${path}": ${field} is ${shown}: ${problem}`);
    this.name = "TokenizerFileError";
    this.path = path;
    this.field = field;
    this.value = shown;
  }
}

function shortJson(v: unknown): string {
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}

/**
 * Throws a {@link TokenizerFileError} unless every vocabulary and added-token id of
 * `json` (a parsed `tokenizer.json` read from `path`) is an integer in
 * [0, {@link MAX_TOKEN_ID}) used once, and every regex pattern in it passes
 * {@link regexHazard}.
 */
export function checkTokenizerJson(json: Record<string, unknown>, path: string): void {
  const fail = (field: string, value: unknown, problem: string): never => {
    throw new TokenizerFileError(path, field, value, problem);
  };
  const checkId = (field: string, id: unknown) => {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= MAX_TOKEN_ID) {
      fail(field, id, `expected a token id, an integer in [0, ${MAX_TOKEN_ID})`);
    }
  };
  const model = json.model;
  if (typeof model !== "object" || model === null || Array.isArray(model)) {
    fail("model", model, "expected an object with the tokenizer model");
  }
  const vocab = (model as Record<string, unknown>).vocab;
  if (Array.isArray(vocab)) {
    // Unigram: [piece, score] pairs whose ids are their indices.
    if (vocab.length > MAX_TOKEN_ID) fail("model.vocab", `${vocab.length} entries`, `expected at most ${MAX_TOKEN_ID}`);
    for (const [i, entry] of vocab.entries()) {
      if (!Array.isArray(entry) || typeof entry[0] !== "string" || !Number.isFinite(entry[1])) {
        fail(`model.vocab[${i}]`, entry, "expected a [piece, score] pair");
      }
    }
  } else if (typeof vocab === "object" && vocab !== null) {
    // One bit per possible id: a 500 KB bitmap beats a Map on 150k-entry vocabularies.
    const used = new Uint8Array(MAX_TOKEN_ID >> 3);
    const ids = vocab as Record<string, unknown>;
    for (const token in ids) {
      const id = ids[token];
      if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= MAX_TOKEN_ID) {
        checkId(`model.vocab[${JSON.stringify(token)}]`, id);
      }
      const n = id as number;
      if (used[n >> 3] & (1 << (n & 7))) {
        const other = Object.keys(ids).find((t) => ids[t] === n);
        fail(`model.vocab[${JSON.stringify(token)}]`, n, `the id is also the id of ${JSON.stringify(other)}`);
      }
      used[n >> 3] |= 1 << (n & 7);
    }
  } else if (vocab !== undefined) {
    fail("model.vocab", vocab, "expected an object of token ids or a list of [piece, score] pairs");
  }
  // BPE merges: "a b" strings or [a, b] pairs (the library calls split / indexes them unchecked).
  const merges = (model as Record<string, unknown>).merges;
  if (merges !== undefined) {
    if (!Array.isArray(merges)) fail("model.merges", merges, "expected a list of merges");
    const pairs = (merges as unknown[]).length > 0 && Array.isArray((merges as unknown[])[0]);
    for (const [i, m] of (merges as unknown[]).entries()) {
      const ok = pairs
        ? Array.isArray(m) && m.length === 2 && typeof m[0] === "string" && typeof m[1] === "string"
        : typeof m === "string";
      if (!ok) fail(`model.merges[${i}]`, m, pairs ? "expected a pair of strings" : 'expected a string "a b"');
    }
  }
  const added = json.added_tokens ?? [];
  if (!Array.isArray(added)) fail("added_tokens", added, "expected a list of tokens");
  const seen = new Set<number>();
  for (const [i, t] of (added as unknown[]).entries()) {
    const field = `added_tokens[${i}]`;
    if (typeof t !== "object" || t === null) fail(field, t, "expected an object with id and content");
    const { id, content } = t as { id?: unknown; content?: unknown };
    checkId(`${field}.id`, id);
    if (seen.has(id as number)) fail(`${field}.id`, id, "the id is used by an earlier added token");
    seen.add(id as number);
    if (typeof content !== "string" || content === "") fail(`${field}.content`, content, "expected a non-empty string");
  }
  for (const key of ["normalizer", "pre_tokenizer", "decoder", "post_processor"]) checkPatterns(json[key], key, fail);
}

/** Every `{ "Regex": "…" }` pattern below `node` must pass {@link regexHazard}. */
function checkPatterns(
  node: unknown,
  field: string,
  fail: (field: string, value: unknown, problem: string) => never,
  depth = 0,
): void {
  if (typeof node !== "object" || node === null) return;
  if (depth > 64) fail(field, "…", "expected at most 64 levels of nesting");
  for (const [key, value] of Object.entries(node)) {
    const at = Array.isArray(node) ? `${field}[${key}]` : `${field}.${key}`;
    if (key === "pattern" && !Array.isArray(node)) {
      // The library warns and drops a pattern of any other shape, silently changing the tokenizer.
      const keys = typeof value === "object" && value !== null && !Array.isArray(value) ? Object.keys(value) : [];
      const shaped = keys.length === 1 && (keys[0] === "String" || keys[0] === "Regex") &&
        typeof (value as Record<string, unknown>)[keys[0]] === "string";
      if (!shaped) fail(at, value, 'expected { "String": "…" } or { "Regex": "…" }');
    }
    if (key === "Regex" && !Array.isArray(node)) {
      if (typeof value !== "string") fail(at, value, "expected a regular expression");
      const hazard = regexHazard(value as string);
      if (hazard) fail(at, value, `the pattern is refused: ${hazard}`);
    } else checkPatterns(value, at, fail, depth + 1);
  }
}
