/**
 * A worker that tokenizes long prompts off the server's event loop. It loads
 * each model's tokenizer from the model folder the way `loadModel` does, so
 * its ids are the main thread's; see `prompt_encoder.ts`.
 *
 * @module
 */

import { TextTokenizer } from "../models/text/tokenizer.ts";
import { type ChatMessage, ChatTemplate } from "../models/text/chat_template.ts";
import { encodeChatPrompt } from "../models/text/chat_prompt.ts";

/** What to encode: a text, or a conversation through its template (special tokens only from the template). */
export type EncodeInput =
  | { readonly text: string; readonly addSpecialTokens: boolean }
  | { readonly template: string; readonly messages: readonly ChatMessage[] };

/** One prompt to encode, with the tokenizer's folder and the model's EOS ids. */
export interface EncodeJob {
  /** Matches the reply to the job. */
  readonly id: number;
  /** The model folder holding `tokenizer.json`. */
  readonly dir: string;
  /** The EOS ids of the model's config. */
  readonly eosIds: readonly number[];
  /** The prompt. */
  readonly input: EncodeInput;
}

/** The ids of a job, or why there are none. */
export type EncodeReply = { readonly id: number; readonly ids: number[] } | {
  readonly id: number;
  readonly error: string;
};

const tokenizers = new Map<string, Promise<TextTokenizer>>();

/** The worker's own scope (typed here rather than through a `lib` directive, which JSR refuses). */
const scope = self as unknown as {
  onmessage: (e: MessageEvent<EncodeJob>) => void;
  postMessage: (reply: EncodeReply) => void;
};

scope.onmessage = async (e: MessageEvent<EncodeJob>) => {
  const job = e.data;
  let reply: EncodeReply;
  try {
    let tok = tokenizers.get(job.dir);
    if (!tok) tokenizers.set(job.dir, tok = TextTokenizer.load(job.dir, job.eosIds));
    const tokenizer = await tok;
    const input = job.input;
    const ids = "text" in input
      ? tokenizer.encode(input.text, { addSpecialTokens: input.addSpecialTokens })
      : encodeChatPrompt(ChatTemplate.forModel({ dir: job.dir, tokenizer }, input.template), tokenizer, input.messages);
    reply = { id: job.id, ids };
  } catch (err) {
    reply = { id: job.id, error: (err as Error).message };
  }
  scope.postMessage(reply);
};
