/**
 * Encoding text in which special tokens count only in some parts: a chat prompt
 * whose template text may hold `<|im_start|>` as a control token while the
 * messages' text may not (llama.cpp's rule: special tokens are parsed from the
 * template, never from message content).
 *
 * `@huggingface/tokenizers` splits a text on every added token before it
 * tokenizes the pieces between them, and has no option to skip the special ones.
 * So this does the split itself, exactly as the library does (greedy longest
 * match over the added tokens that are matched before normalization, then the
 * tokens' `lstrip` / `rstrip`), except that a special token matches only inside
 * one segment that allows it. The pieces between are encoded by a second
 * tokenizer built from the same file without the special tokens, so a literal
 * `<|im_start|>` in a message becomes ordinary text tokens. Text with no
 * protected segment gives exactly the library's ids.
 *
 * @module
 */

import { Tokenizer } from "@huggingface/tokenizers";
import { MAX_TOKEN_ID } from "./tokenizer_file.ts";

/** A part of a text to encode. */
export interface TextSegment {
  /** The text. */
  readonly text: string;
  /** Whether special tokens in it are parsed as such (true for template text, false for message content). */
  readonly parseSpecial: boolean;
}

interface AddedInfo {
  readonly content: string;
  readonly id: number;
  readonly special: boolean;
  readonly lstrip: boolean;
  readonly rstrip: boolean;
}

interface TrieNode {
  next: Map<string, TrieNode>;
  token?: AddedInfo;
}

/** Encodes {@link TextSegment}s with one tokenizer file. */
export class SegmentEncoder {
  readonly #json: Record<string, unknown>;
  readonly #config: Record<string, unknown>;
  readonly #trie: TrieNode = { next: new Map() };
  /** Special tokens the library matches only after normalizing (`normalized: true`), by content. */
  readonly #normalizedSpecial: string[] = [];
  #plain: { tok: Tokenizer; sentinel: string } | undefined;
  #full: { tok: Tokenizer; sentinel: string } | undefined;

  /**
   * An encoder for a parsed `tokenizer.json` (already checked) and its `tokenizer_config.json`.
   * @param json parsed `tokenizer.json`
   * @param config parsed `tokenizer_config.json`
   */
  constructor(json: Record<string, unknown>, config: Record<string, unknown>) {
    this.#json = json;
    this.#config = config;
    for (const t of (json.added_tokens ?? []) as Record<string, unknown>[]) {
      const special = t.special === true;
      // The library splits on tokens with normalized false (default: special ones) before normalizing.
      if ((t.normalized ?? !special) !== false) {
        if (special && typeof t.content === "string") this.#normalizedSpecial.push(t.content);
        continue;
      }
      const info: AddedInfo = {
        content: t.content as string,
        id: t.id as number,
        special,
        lstrip: t.lstrip === true,
        rstrip: t.rstrip === true,
      };
      let node = this.#trie;
      for (let k = 0; k < info.content.length; k++) {
        const ch = info.content[k];
        let child = node.next.get(ch);
        if (!child) node.next.set(ch, child = { next: new Map() });
        node = child;
      }
      node.token = info;
    }
  }

  /** Token ids of the segments' text, with special tokens matched only inside segments that parse them. */
  encode(segments: readonly TextSegment[]): number[] {
    const text = segments.map((s) => s.text).join("");
    // For each position: the end of its segment when that segment parses special tokens, else -1.
    const parseEnd = new Int32Array(text.length);
    let at = 0;
    for (const s of segments) {
      parseEnd.fill(s.parseSpecial ? at + s.text.length : -1, at, at + s.text.length);
      at += s.text.length;
    }
    const sections: { text: string; from: number; token?: AddedInfo }[] = [];
    let start = 0;
    let i = 0;
    while (i < text.length) {
      let node: TrieNode | undefined = this.#trie;
      let match: AddedInfo | undefined;
      // Index by UTF-16 unit like the library does (its trie walks `text[j]`).
      for (let j = i; j < text.length && (node = node.next.get(text[j])); j++) {
        const t = node.token;
        if (t && (!t.special || (parseEnd[i] >= 0 && j < parseEnd[i]))) match = t;
      }
      if (match) {
        if (i > start) sections.push({ text: text.slice(start, i), from: start });
        sections.push({ text: match.content, from: i, token: match });
        i += match.content.length;
        start = i;
      } else i++;
    }
    if (start < text.length) sections.push({ text: text.slice(start), from: start });
    for (const [k, s] of sections.entries()) {
      if (s.token?.lstrip && k > 0) sections[k - 1].text = sections[k - 1].text.trimEnd();
      if (s.token?.rstrip && k < sections.length - 1) {
        const next = sections[k + 1];
        const trimmed = next.text.trimStart();
        next.from += next.text.length - trimmed.length;
        next.text = trimmed;
      }
    }
    const ids: number[] = [];
    for (const [k, s] of sections.entries()) {
      if (s.token && s.text === s.token.content) ids.push(s.token.id);
      else if (s.text.length > 0) {
        for (const run of this.#runs(s.text, s.from, parseEnd)) {
          ids.push(...this.#encodeSection(run.text, k + run.offset, run.parseSpecial));
        }
      }
    }
    return ids;
  }

  /**
   * How to encode the text between added tokens, at `from` in the whole text: as one section, with the
   * special tokens the library matches after normalizing when all of it parses special tokens, without
   * them when none or only part of it does — except when a part that parses them holds one, when the
   * parts are encoded one by one (so a template's `normalized` BOS stays a control token).
   */
  #runs(
    text: string,
    from: number,
    parseEnd: Int32Array,
  ): { text: string; offset: number; parseSpecial: boolean }[] {
    const runs: { text: string; offset: number; parseSpecial: boolean }[] = [];
    for (let i = 0; i < text.length;) {
      const special = parseEnd[from + i] >= 0;
      let j = i + 1;
      while (j < text.length && (parseEnd[from + j] >= 0) === special) j++;
      runs.push({ text: text.slice(i, j), offset: runs.length, parseSpecial: special });
      i = j;
    }
    if (runs.length === 1 || this.#normalizedSpecial.length === 0) {
      return [{ text, offset: 0, parseSpecial: runs.length === 1 && runs[0].parseSpecial }];
    }
    const needsSplit = runs.some((r) => r.parseSpecial && this.#normalizedSpecial.some((c) => r.text.includes(c)));
    return needsSplit ? runs : [{ text, offset: 0, parseSpecial: false }];
  }

  /** Ids of one section: with the normalized special tokens when `parseSpecial`, else with none. */
  #encodeSection(text: string, index: number, parseSpecial: boolean): number[] {
    return parseSpecial && this.#normalizedSpecial.length > 0
      ? this.#encodeWith(this.#full ??= this.#build(true), text, index)
      : this.#encodePlain(text, index);
  }

  /** Ids of text with no special tokens in it, as the library encodes the `index`-th section of a text. */
  #encodePlain(text: string, index: number): number[] {
    return this.#encodeWith(this.#plain ??= this.#build(false), text, index);
  }

  #encodeWith({ tok, sentinel }: { tok: Tokenizer; sentinel: string }, text: string, index: number): number[] {
    if (index === 0) return tok.encode(text, { add_special_tokens: false }).ids;
    // A pre-tokenizer may treat the first section apart (Metaspace's prepend_scheme "first"): lead with a sentinel.
    const ids = tok.encode(sentinel + text, { add_special_tokens: false }).ids;
    if (ids[0] !== MAX_TOKEN_ID || ids.indexOf(MAX_TOKEN_ID, 1) >= 0) {
      throw new Error("Cannot encode the text: it contains the tokenizer's section sentinel");
    }
    return ids.slice(1);
  }

  /** A tokenizer of the same file plus a section sentinel, with its special tokens (`withSpecial`) or without. */
  #build(withSpecial: boolean): { tok: Tokenizer; sentinel: string } {
    const sentinel = `\uE000section-${crypto.randomUUID()}\uE001`;
    const added = ((this.#json.added_tokens ?? []) as Record<string, unknown>[])
      .filter((t) => withSpecial || t.special !== true);
    added.push({ id: MAX_TOKEN_ID, content: sentinel, special: false, normalized: false });
    return { tok: new Tokenizer({ ...this.#json, added_tokens: added }, this.#config), sentinel };
  }
}
