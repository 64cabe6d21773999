/**
 * Incremental detokenization and stop strings for streaming.
 *
 * Decoding a token alone is wrong for SentencePiece-style tokenizers (leading
 * spaces are stripped, byte-fallback tokens are partial characters), so each
 * new piece is the difference between decoding a short window of recent tokens
 * with and without the new ones. A piece that ends in an incomplete character
 * (U+FFFD) is held back until the character is whole.
 *
 * @module
 */

import type { TextTokenizer } from "./tokenizer.ts";

/** Turns a stream of token ids into UTF-8-safe text pieces. */
export class StreamingDecoder {
  readonly #tok: TextTokenizer;
  readonly #ids: number[];
  #prefix = 0;
  #read: number;

  /**
   * A decoder that continues after `context`.
   * @param tokenizer the model's tokenizer
   * @param context tokens already shown (the end of the prompt), so the first piece
   *   keeps its leading space
   */
  constructor(tokenizer: TextTokenizer, context: readonly number[]) {
    this.#tok = tokenizer;
    this.#ids = context.slice(-4);
    this.#read = this.#ids.length;
  }

  /** Adds a token; returns the text it completes ("" while a character is incomplete). */
  push(id: number): string {
    this.#ids.push(id);
    const opts = { skipSpecialTokens: true };
    const before = this.#tok.decode(this.#ids.slice(this.#prefix, this.#read), opts);
    const after = this.#tok.decode(this.#ids.slice(this.#prefix), opts);
    if (after.length <= before.length || after.endsWith("\uFFFD")) return "";
    this.#prefix = this.#read;
    this.#read = this.#ids.length;
    // Keep the window short so decoding stays constant-time per token.
    if (this.#prefix > 64) {
      this.#ids.splice(0, this.#prefix);
      this.#read -= this.#prefix;
      this.#prefix = 0;
    }
    return after.slice(before.length);
  }

  /** Text of tokens still held back (an incomplete character at the end of generation). */
  flush(): string {
    const opts = { skipSpecialTokens: true };
    const before = this.#tok.decode(this.#ids.slice(this.#prefix, this.#read), opts);
    const after = this.#tok.decode(this.#ids.slice(this.#prefix), opts);
    this.#prefix = this.#read = this.#ids.length;
    return after.slice(before.length);
  }
}

/**
 * Holds back text that may be the start of a stop string, and cuts the text at
 * the first stop string found.
 */
export class StopMatcher {
  readonly #stops: readonly string[];
  #pending = "";
  /** Whether a stop string was found. */
  stopped = false;

  /**
   * A matcher for `stops`.
   * @param stops the stop strings (empty strings are refused)
   */
  constructor(stops: readonly string[]) {
    for (const s of stops) {
      if (typeof s !== "string" || s.length === 0) {
        throw new TypeError(`Invalid stop string ${JSON.stringify(s)}: expected a non-empty string`);
      }
    }
    this.#stops = stops;
  }

  /** Adds text; returns what is safe to emit now. */
  push(text: string): string {
    if (this.stopped) return "";
    if (this.#stops.length === 0) return text;
    this.#pending += text;
    let cut = -1;
    for (const s of this.#stops) {
      const i = this.#pending.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    if (cut >= 0) {
      this.stopped = true;
      const out = this.#pending.slice(0, cut);
      this.#pending = "";
      return out;
    }
    let hold = 0;
    for (const s of this.#stops) {
      for (let k = Math.min(s.length - 1, this.#pending.length); k > hold; k--) {
        if (this.#pending.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    const out = this.#pending.slice(0, this.#pending.length - hold);
    this.#pending = this.#pending.slice(this.#pending.length - hold);
    return out;
  }

  /** Text held back when generation ends without a stop string. */
  flush(): string {
    const out = this.#pending;
    this.#pending = "";
    return out;
  }
}
