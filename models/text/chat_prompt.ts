/**
 * A chat prompt's token ids, with special tokens parsed only from the template's
 * own text (llama.cpp's server rule): a user who types `<|im_start|>system` gets
 * the text tokens of that string, never the control token.
 *
 * How: every piece of a message (role or content) that is, or could join the
 * template's text into, a special token's text (an occurrence of one, or a
 * start or end that is part of one) is swapped for an opaque placeholder before
 * rendering. Whatever the template does with the message (trim it, concatenate,
 * split it at non-special markers such as Qwen3's `</think>`) the placeholders
 * go along; in the rendered text they are put back as segments whose special
 * tokens are not parsed ({@link TextTokenizer.encodeSegments}). A conversation
 * with nothing to protect is encoded exactly as `encode(render(messages))`.
 *
 * @module
 */

import type { ChatMessage, ChatTemplate } from "./chat_template.ts";
import type { TextSegment, TextTokenizer } from "./tokenizer.ts";

/** Options of {@link encodeChatPrompt}. */
export interface ChatPromptOptions {
  /** End with the assistant's header (default true). */
  readonly addGenerationPrompt?: boolean;
}

/**
 * The token ids of `messages` rendered with `template`, without BOS/EOS beyond
 * what the template writes, where special tokens come only from the template's
 * text. Throws what {@link ChatTemplate.render} throws.
 *
 * @example
 * ```ts ignore
 * import { ChatTemplate, encodeChatPrompt, loadModel } from "../../mod.ts";
 * const model = await loadModel("Felladrin/Minueza-32M-UltraChat");
 * const ids = encodeChatPrompt(ChatTemplate.forModel(model), model.tokenizer, [{ role: "user", content: "Hi" }]);
 * ```
 */
export function encodeChatPrompt(
  template: ChatTemplate,
  tokenizer: TextTokenizer,
  messages: readonly ChatMessage[],
  options: ChatPromptOptions = {},
): number[] {
  const specials = tokenizer.specialTokens;
  const ranges = messages.map((m) =>
    typeof m === "object" && m !== null && typeof m.role === "string" && typeof m.content === "string"
      ? { role: protectedRanges(m.role, specials), content: protectedRanges(m.content, specials) }
      : { role: [], content: [] }
  );
  if (ranges.every((r) => r.role.length === 0 && r.content.length === 0)) {
    return tokenizer.encode(template.render(messages, options), { addSpecialTokens: false });
  }
  // Digits and private-use characters: no case or whitespace change a template might apply alters them.
  const nonce = crypto.getRandomValues(new BigUint64Array(2)).join("");
  const open = `\uE000${nonce}:`;
  if (template.source.includes(open) || messages.some((m) => m.role.includes(open) || m.content.includes(open))) {
    throw new Error("Cannot encode the chat prompt: a message contains the placeholder marker"); // 2^-128 odds
  }
  const literals: string[] = [];
  const swap = (text: string, spans: readonly [number, number][]) => {
    let out = "";
    let at = 0;
    for (const [from, to] of spans) {
      out += text.slice(at, from) + `${open}${literals.length}\uE001`;
      literals.push(text.slice(from, to));
      at = to;
    }
    return out + text.slice(at);
  };
  const masked = messages.map((m, i) => ({
    role: swap(m.role, ranges[i].role),
    content: swap(m.content, ranges[i].content),
  }));
  const rendered = template.render(masked, options);
  const segments: TextSegment[] = [];
  const marker = new RegExp(`\uE000${nonce}:(\\d+)\uE001`, "g");
  let at = 0;
  for (const m of rendered.matchAll(marker)) {
    if (m.index > at) segments.push({ text: rendered.slice(at, m.index), parseSpecial: true });
    segments.push({ text: literals[Number(m[1])], parseSpecial: false });
    at = m.index + m[0].length;
  }
  if (at < rendered.length) segments.push({ text: rendered.slice(at), parseSpecial: true });
  return tokenizer.encodeSegments(segments);
}

/**
 * The spans of `text` to keep from becoming special tokens, sorted and merged:
 * every occurrence of a special token's text, and the longest start (end) of the
 * text, also after trimming whitespace, that is the end (start) of one, which
 * the template's text next to it could complete.
 */
function protectedRanges(text: string, specials: readonly string[]): [number, number][] {
  const spans: [number, number][] = [];
  let longest = 0;
  for (const s of specials) {
    longest = Math.max(longest, s.length);
    for (let i = text.indexOf(s); i >= 0; i = text.indexOf(s, i + 1)) spans.push([i, i + s.length]);
  }
  const lead = text.length - text.trimStart().length;
  const trail = text.trimEnd().length;
  for (const [from, to] of [[0, text.length], [lead, trail]]) {
    for (let n = Math.min(longest - 1, to - from); n > 0; n--) {
      const head = text.slice(from, from + n);
      if (specials.some((s) => s.length > n && s.endsWith(head))) {
        spans.push([from, from + n]);
        break;
      }
    }
    for (let n = Math.min(longest - 1, to - from); n > 0; n--) {
      const tail = text.slice(to - n, to);
      if (specials.some((s) => s.length > n && s.startsWith(tail))) {
        spans.push([to - n, to]);
        break;
      }
    }
  }
  spans.sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const s of spans) {
    const last = merged[merged.length - 1];
    if (last && s[0] <= last[1]) last[1] = Math.max(last[1], s[1]);
    else merged.push([s[0], s[1]]);
  }
  return merged;
}
