/**
 * The choices of one request (OpenAI's `n`), generated at the same time: every choice that is
 * still running keeps one token in flight, so that the model's engine batches them all into its
 * shared steps, and {@link Choices.next} hands out whichever token comes first. A consumer that
 * stops reading holds every choice at its next token (the streams' backpressure).
 *
 * @module
 */

import type { StopReason, TokenGenerator } from "../models/generate/token_generator.ts";

/** What one choice did: produced text (possibly empty), or ended. */
export type ChoiceEvent =
  | { readonly kind: "text"; readonly index: number; readonly text: string }
  | { readonly kind: "end"; readonly index: number; readonly reason: StopReason | undefined };

/** One settled `next()` of a choice's generator. */
type Settled =
  | { readonly index: number; readonly token: Awaited<ReturnType<TokenGenerator["next"]>> }
  | { readonly index: number; readonly error: unknown };

/** The generators of a request's choices, read together. */
export class Choices {
  /** Each choice's text so far. */
  readonly texts: string[];
  readonly #gens: readonly TokenGenerator[];
  readonly #pending: (Promise<Settled> | undefined)[];
  readonly #ended: boolean[];
  #running: number;

  /**
   * Reads `gens`, choice `i` being `gens[i]`; nothing runs until {@link Choices.next}.
   *
   * @param gens one generator per choice, each over its own sequence
   */
  constructor(gens: readonly TokenGenerator[]) {
    if (gens.length === 0) throw new RangeError("Cannot generate zero choices");
    this.#gens = gens;
    this.texts = gens.map(() => "");
    this.#pending = gens.map(() => undefined);
    this.#ended = gens.map(() => false);
    this.#running = gens.length;
  }

  /** How many choices there are. */
  get count(): number {
    return this.#gens.length;
  }

  /** Tokens generated so far, all choices together. */
  get generatedTokens(): number {
    return this.#gens.reduce((n, g) => n + g.stats.generatedTokens, 0);
  }

  /** Why choice `index` ended (undefined while it runs). */
  stopReason(index: number): StopReason | undefined {
    return this.#gens[index].stats.stopReason;
  }

  /**
   * The next thing any choice did, or undefined once every choice has ended. Throws the first
   * error of any choice's generator (the caller then cancels them all). One call at a time.
   */
  async next(): Promise<ChoiceEvent | undefined> {
    if (this.#running === 0) return undefined;
    const inFlight: Promise<Settled>[] = [];
    for (let i = 0; i < this.#gens.length; i++) {
      if (this.#ended[i]) continue;
      // Every running choice asks for its next token now, so they all join the engine's next step.
      this.#pending[i] ??= this.#gens[i].next().then(
        (token) => ({ index: i, token }),
        (error) => ({ index: i, error }),
      );
      inFlight.push(this.#pending[i]!);
    }
    const settled = await Promise.race(inFlight);
    const i = settled.index;
    this.#pending[i] = undefined;
    if ("error" in settled) throw settled.error;
    if (settled.token === undefined) {
      this.#ended[i] = true;
      this.#running--;
      return { kind: "end", index: i, reason: this.#gens[i].stats.stopReason };
    }
    this.texts[i] += settled.token.text;
    return { kind: "text", index: i, text: settled.token.text };
  }

  /** Cancels every choice (each stops at its next chance; see `TokenGenerator.cancel`). */
  cancel(): void {
    for (const g of this.#gens) g.cancel();
  }

  /** Resolves once no choice has a step running (before the sequences are reused or disposed). */
  async settled(): Promise<void> {
    await Promise.all(this.#gens.map((g) => g.settled()));
  }
}
