/**
 * The tokenizer: `tokenizer.json` through `@huggingface/tokenizers`, with the
 * `tokenizer_config.json` settings applied (BOS/EOS insertion, special tokens,
 * chat template).
 *
 * @module
 */

import { Tokenizer } from "@huggingface/tokenizers";
import { readJsonFile } from "../files/json.ts";
import { checkTokenizerJson, TokenizerFileError } from "./tokenizer_file.ts";
import { SegmentEncoder } from "./segment_encoder.ts";

export { MAX_TOKEN_ID, TokenizerFileError } from "./tokenizer_file.ts";
export type { TextSegment } from "./segment_encoder.ts";

/** Options of {@link TextTokenizer.encode}. */
export interface EncodeOptions {
  /** Add BOS/EOS as `tokenizer_config.json` says (default true). */
  addSpecialTokens?: boolean;
}

/** Text ↔ token ids for one model. */
export class TextTokenizer {
  readonly #tok: Tokenizer;
  readonly #addBos: boolean | undefined;
  readonly #addEos: boolean;
  readonly #segments: SegmentEncoder;
  /** Beginning-of-sequence id, when the tokenizer has one. */
  readonly bosId: number | undefined;
  /** End-of-sequence ids (from the tokenizer config and the model config). */
  readonly eosIds: readonly number[];
  /** Ids of the special tokens (skipped when decoding text for display). */
  readonly specialIds: ReadonlySet<number>;
  /** The text of each special token (`<|im_start|>`, `<s>`, …). */
  readonly specialTokens: readonly string[];
  /** Number of ids the tokenizer can produce. */
  readonly vocabSize: number;
  /** The Jinja chat template of `tokenizer_config.json`, if any. */
  readonly chatTemplate: string | undefined;
  /** The BOS and EOS token strings (for chat templates). */
  readonly bosToken: string | undefined;
  /** The EOS token string. */
  readonly eosToken: string | undefined;

  /**
   * A tokenizer from parsed files; {@link TextTokenizer.load} reads them from a folder.
   * @param tokenizerJson parsed `tokenizer.json`
   * @param config parsed `tokenizer_config.json` (or `{}`)
   * @param extraEosIds EOS ids from the model config
   * @param path the file `tokenizerJson` came from, for errors
   * @throws {TokenizerFileError} for an id out of range or used twice, or a regex that backtracks without bound
   */
  constructor(
    tokenizerJson: Record<string, unknown>,
    config: Record<string, unknown>,
    extraEosIds: readonly number[] = [],
    path = "tokenizer.json",
  ) {
    // The library trusts its input: a huge id or a pathological regex would freeze it (see tokenizer_file.ts).
    checkTokenizerJson(tokenizerJson, path);
    this.#tok = new Tokenizer(tokenizerJson, config);
    const tokenString = (v: unknown): string | undefined =>
      typeof v === "string"
        ? v
        : typeof v === "object" && v && typeof (v as { content?: unknown }).content === "string"
        ? (v as { content: string }).content
        : undefined;
    this.bosToken = tokenString(config.bos_token);
    this.eosToken = tokenString(config.eos_token);
    this.bosId = this.bosToken !== undefined ? this.#tok.token_to_id(this.bosToken) : undefined;
    const eos = this.eosToken !== undefined ? this.#tok.token_to_id(this.eosToken) : undefined;
    this.eosIds = [...new Set([...(eos !== undefined ? [eos] : []), ...extraEosIds])];
    this.#addBos = typeof config.add_bos_token === "boolean" ? config.add_bos_token : undefined;
    this.#addEos = config.add_eos_token === true;
    const special = new Set<number>();
    const specialTokens: string[] = [];
    for (const [id, t] of this.#tok.get_added_tokens_decoder()) {
      if (!t.special) continue;
      special.add(id);
      specialTokens.push(t.content);
    }
    this.specialIds = special;
    this.specialTokens = specialTokens;
    this.#segments = new SegmentEncoder(tokenizerJson, config);
    let max = 0;
    for (const id of this.#tok.get_vocab().values()) max = Math.max(max, id);
    for (const id of special) max = Math.max(max, id);
    this.vocabSize = max + 1;
    this.chatTemplate = typeof config.chat_template === "string" ? config.chat_template : undefined;
  }

  /** Loads `tokenizer.json` (required) and `tokenizer_config.json` (optional) from `dir`. */
  static async load(dir: string, extraEosIds: readonly number[] = []): Promise<TextTokenizer> {
    const path = `${dir}/tokenizer.json`;
    const json = await readJsonFile(path);
    let config: Record<string, unknown> = {};
    try {
      config = await readJsonFile(`${dir}/tokenizer_config.json`);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    try {
      return new TextTokenizer(json, config, extraEosIds, path);
    } catch (e) {
      if (e instanceof TokenizerFileError) throw e;
      throw new SyntaxError(`Cannot load tokenizer "${path}": ${(e as Error).message}`);
    }
  }

  /** Token ids of `text`. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    const special = options.addSpecialTokens ?? true;
    if (!special || this.#addBos === undefined) {
      return this.#tok.encode(text, { add_special_tokens: special }).ids;
    }
    const ids = this.#tok.encode(text, { add_special_tokens: false }).ids;
    if (this.#addBos && this.bosId !== undefined) ids.unshift(this.bosId);
    if (this.#addEos && this.eosIds.length) ids.push(this.eosIds[0]);
    return ids;
  }

  /**
   * Token ids of the segments' text as one text, without BOS/EOS, where a special
   * token's text becomes that token only inside a segment with `parseSpecial`
   * (and never across segments); elsewhere it is ordinary text. With every
   * segment parsing special tokens this is `encode(text, { addSpecialTokens: false })`.
   */
  encodeSegments(segments: readonly { readonly text: string; readonly parseSpecial: boolean }[]): number[] {
    if (segments.every((s) => s.parseSpecial)) {
      return this.encode(segments.map((s) => s.text).join(""), { addSpecialTokens: false });
    }
    return this.#segments.encode(segments);
  }

  /** Text of `ids`; special tokens are kept unless `skipSpecialTokens`. */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return "";
    return this.#tok.decode(ids as number[], { skip_special_tokens: options.skipSpecialTokens ?? false });
  }

  /** The id of a token string, if it is in the vocabulary. */
  tokenId(token: string): number | undefined {
    return this.#tok.token_to_id(token);
  }
}
