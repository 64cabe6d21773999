/**
 * Generation as pull-driven streams over a {@link TokenGenerator}: nothing is computed until the
 * consumer reads, and each read runs as many steps as the next chunk needs. `cancel()` on the stream
 * or the generation's `AbortSignal` stops the work. A stream dropped before it ends runs its end
 * when the garbage collector collects it, so that what it holds (a sequence) is given back.
 *
 * @module
 */

import type { GeneratedToken, GenerationStats, TokenGenerator } from "./token_generator.ts";

/** A stream of text pieces with its statistics. */
export type TextStream = ReadableStream<string> & { readonly stats: GenerationStats };
/** A stream of tokens with its statistics. */
export type TokenStream = ReadableStream<GeneratedToken> & { readonly stats: GenerationStats };

/**
 * Runs the `onEnd` of streams collected before they ended. What it holds for a stream (the guarded
 * `onEnd`) must not reach the stream, or the stream could never be collected.
 */
const abandoned = new FinalizationRegistry<() => void>((end) => end());

/**
 * A pull-driven stream of what `chunk` makes of each token (tokens it maps to undefined are skipped);
 * `onEnd` runs once when the stream ends for any reason, being collected unended included.
 */
function generatorStream<T>(
  gen: TokenGenerator,
  onEnd: () => void,
  chunk: (t: GeneratedToken) => T | undefined,
): ReadableStream<T> & { readonly stats: GenerationStats } {
  let ended = false;
  /** Set by cancel(): a step that finishes after it leaves the (closed) controller alone. */
  let cancelled = false;
  const end = () => {
    if (!ended) {
      ended = true;
      abandoned.unregister(end);
      onEnd();
    }
  };
  const stream = new ReadableStream<T>({
    async pull(controller) {
      try {
        for (;;) {
          const t = await gen.next();
          if (cancelled) return;
          if (!t) {
            end();
            controller.close();
            return;
          }
          const value = chunk(t);
          if (value !== undefined) {
            controller.enqueue(value);
            return;
          }
        }
      } catch (e) {
        gen.cancel();
        if (cancelled) return; // cancel() ends it
        end();
        controller.error(e);
      }
    },
    async cancel() {
      cancelled = true;
      gen.cancel();
      await gen.settled();
      end();
    },
  }, { highWaterMark: 0 });
  abandoned.register(stream, end, end);
  return Object.assign(stream, { stats: gen.stats });
}

/** A pull-driven stream of tokens; `onEnd` runs once when it ends for any reason. */
export function tokenStream(gen: TokenGenerator, onEnd: () => void): TokenStream {
  return generatorStream(gen, onEnd, (t) => t);
}

/** A pull-driven stream of text pieces (no empty pieces); ends like {@link tokenStream}. */
export function textStream(gen: TokenGenerator, onEnd: () => void): TextStream {
  return generatorStream(gen, onEnd, (t) => t.text || undefined);
}
