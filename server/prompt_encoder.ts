/**
 * Prompt text → token ids for the server without freezing it. Each model gets
 * a character bound (its context times its longest token): a prompt past it
 * cannot fit however it tokenizes, so it is refused before any tokenizing. A
 * short prompt is encoded at once (a few milliseconds at most); a longer one in
 * a worker that holds its own copy of the tokenizer, so that the event loop
 * keeps answering other requests meanwhile.
 *
 * @module
 */

import type { Model } from "../models/model.ts";
import type { ChatMessage, ChatTemplate } from "../models/text/chat_template.ts";
import { encodeChatPrompt } from "../models/text/chat_prompt.ts";
import type { EncodeInput, EncodeJob, EncodeReply } from "./tokenize_worker.ts";

/** A prompt to encode: a text, or a conversation with its template (see {@link EncodeInput}). */
export type PromptInput =
  | { readonly text: string; readonly addSpecialTokens: boolean }
  | { readonly template: ChatTemplate; readonly messages: readonly ChatMessage[]; readonly renderedChars: number };

/** Texts up to this many characters are encoded on the event loop (about 30 ms at 8 µs a character). */
export const INLINE_CHARS = 4096;

/** The most characters one token of `model` stands for: the longest decoded token of its vocabulary. */
export function maxTokenChars(model: Model): number {
  const tok = model.tokenizer;
  let max = 1;
  for (let id = 0; id < tok.vocabSize; id++) {
    const n = tok.decode([id]).length;
    if (n > max) max = n;
  }
  return max;
}

/** Encodes prompts inline or in a worker (started at the first long prompt, stopped by {@link close}). */
export class PromptEncoder {
  #worker: Worker | undefined;
  #next = 0;
  readonly #pending = new Map<number, { resolve: (ids: number[]) => void; reject: (e: Error) => void }>();

  /**
   * The ids of a prompt for `model`'s tokenizer: for a text the same as `model.tokenizer.encode(text, options)`,
   * for a conversation as `encodeChatPrompt(template, model.tokenizer, messages)`. Rejects with `signal`'s reason
   * once it aborts (a worker still finishes its job, bounded by the caller's size check).
   *
   * @param model whose tokenizer
   * @param prompt the text, or the conversation and its template (with the length of its rendered text)
   * @param signal stops the wait
   */
  encode(model: Model, prompt: PromptInput, signal?: AbortSignal): Promise<number[]> {
    signal?.throwIfAborted();
    const chars = "text" in prompt ? prompt.text.length : prompt.renderedChars;
    if (chars <= INLINE_CHARS) {
      return Promise.resolve(
        "text" in prompt
          ? model.tokenizer.encode(prompt.text, { addSpecialTokens: prompt.addSpecialTokens })
          : encodeChatPrompt(prompt.template, model.tokenizer, prompt.messages),
      );
    }
    const id = this.#next++;
    const input: EncodeInput = "text" in prompt
      ? prompt
      : { template: prompt.template.source, messages: prompt.messages };
    const job: EncodeJob = { id, dir: model.dir, eosIds: model.config.eosTokenIds, input };
    const { promise, resolve, reject } = Promise.withResolvers<number[]>();
    const onAbort = () => {
      this.#pending.delete(id);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    this.#pending.set(id, {
      resolve: (ids) => {
        signal?.removeEventListener("abort", onAbort);
        resolve(ids);
      },
      reject: (e) => {
        signal?.removeEventListener("abort", onAbort);
        reject(e);
      },
    });
    this.#start().postMessage(job);
    return promise;
  }

  /** Stops the worker; waiting encodes reject. */
  close(): void {
    this.#worker?.terminate();
    this.#worker = undefined;
    this.#failAll(new Error("The server is closing"));
  }

  #start(): Worker {
    if (this.#worker) return this.#worker;
    const worker = new Worker(new URL("./tokenize_worker.ts", import.meta.url), { type: "module" });
    worker.onmessage = (e: MessageEvent<EncodeReply>) => {
      const reply = e.data;
      const waiter = this.#pending.get(reply.id);
      this.#pending.delete(reply.id);
      if (!waiter) return;
      if ("ids" in reply) waiter.resolve(reply.ids);
      else waiter.reject(new Error(`Cannot tokenize the prompt: ${reply.error}`));
    };
    worker.onerror = (e) => {
      e.preventDefault();
      this.#worker?.terminate();
      this.#worker = undefined; // the next long prompt starts a new one
      this.#failAll(new Error(`The tokenizer worker failed: ${e.message}`));
    };
    return this.#worker = worker;
  }

  #failAll(e: Error): void {
    const waiting = [...this.#pending.values()];
    this.#pending.clear();
    for (const w of waiting) w.reject(e);
  }
}
