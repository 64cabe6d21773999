/**
 * Chat templates: a model's Jinja `chat_template` rendered with `@huggingface/jinja`.
 *
 * @module
 */

import type { TextTokenizer } from "./tokenizer.ts";
import { BudgetedTemplate, templateBudget, TemplateBudgetExceeded } from "./template_budget.ts";

/** One message of a conversation. */
export interface ChatMessage {
  /** `"system"`, `"user"` or `"assistant"` (templates may accept others). */
  readonly role: string;
  /** The message text. */
  readonly content: string;
}

/** A chat template that is missing, does not parse, or fails to render. */
export class ChatTemplateError extends Error {
  /**
   * A template error with its message.
   * @param message what is wrong, sentence case
   * @param options the underlying error, if any
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ChatTemplateError";
  }
}

/** A model's Jinja chat template, ready to render conversations. */
export class ChatTemplate {
  /** The template source. */
  readonly source: string;
  readonly #template: BudgetedTemplate;
  readonly #bos: string;
  readonly #eos: string;

  /**
   * Parses `source`; throws a {@link ChatTemplateError} when it is not a valid template.
   * @param source Jinja source, as in `tokenizer_config.json`'s `chat_template`
   * @param tokens the BOS and EOS token strings the template may use
   */
  constructor(source: string, tokens: { bosToken?: string; eosToken?: string } = {}) {
    if (typeof source !== "string" || source.trim() === "") {
      throw new ChatTemplateError(`Invalid chat template ${JSON.stringify(source)}: expected Jinja source text`);
    }
    try {
      this.#template = new BudgetedTemplate(source);
    } catch (e) {
      throw new ChatTemplateError(`Cannot parse the chat template: ${(e as Error).message}`, { cause: e });
    }
    this.source = source;
    this.#bos = tokens.bosToken ?? "";
    this.#eos = tokens.eosToken ?? "";
  }

  /**
   * The template of `model` (its tokenizer's `chat_template`), or `override` when
   * given. Throws a {@link ChatTemplateError} when the model has none and no
   * override is passed. `model` is any loaded model (a `Model`): only its folder
   * and tokenizer are read.
   */
  static forModel(model: { readonly dir: string; readonly tokenizer: TextTokenizer }, override?: string): ChatTemplate {
    const source = override ?? model.tokenizer.chatTemplate;
    if (source === undefined) {
      throw new ChatTemplateError(
        `Model "${model.dir}" has no chat template (no "chat_template" in tokenizer_config.json): pass one`,
      );
    }
    return new ChatTemplate(source, { bosToken: model.tokenizer.bosToken, eosToken: model.tokenizer.eosToken });
  }

  /**
   * The prompt text of `messages`, ending with the assistant's header when
   * `addGenerationPrompt` (default true). The template runs within a budget of
   * steps, string length and list length that grows with the messages
   * (models/text/template_budget.ts); past it, or when the template fails, this
   * throws a {@link ChatTemplateError}.
   */
  render(messages: readonly ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    let inputChars = this.#bos.length + this.#eos.length;
    for (const [i, m] of messages.entries()) {
      if (typeof m !== "object" || m === null || typeof m.role !== "string" || typeof m.content !== "string") {
        throw new TypeError(`Invalid message ${i} ${JSON.stringify(m)}: expected { role: string, content: string }`);
      }
      inputChars += m.role.length + m.content.length;
    }
    const variables = {
      messages: messages.map((m) => ({ role: m.role, content: m.content })),
      add_generation_prompt: options.addGenerationPrompt ?? true,
      bos_token: this.#bos,
      eos_token: this.#eos,
    };
    try {
      return this.#template.render(variables, templateBudget(inputChars, messages.length));
    } catch (e) {
      const why = e instanceof TemplateBudgetExceeded
        ? `${e.message}: the template loops or grows without bound`
        : e instanceof RangeError
        ? `${e.message} (the template recurses or grows without bound)`
        : (e as Error).message;
      throw new ChatTemplateError(`Cannot render the chat template: ${why}`, { cause: e });
    }
  }
}
