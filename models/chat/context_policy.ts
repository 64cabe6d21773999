/**
 * What a chat session does when a conversation no longer fits in the context.
 *
 * @module
 */

/**
 * `"error"` refuses the turn with a `ContextOverflowError`; `"drop-oldest"` drops
 * the oldest exchanges (keeping the system prompt and the new user message) until
 * the conversation fits.
 */
export type ContextPolicy = "error" | "drop-oldest";

/** Every {@link ContextPolicy}. */
export const CONTEXT_POLICIES: readonly ContextPolicy[] = ["error", "drop-oldest"];

/**
 * True when `value` is a {@link ContextPolicy}.
 *
 * @example
 * ```ts
 * import { isContextPolicy } from "./context_policy.ts";
 * isContextPolicy("drop-oldest"); // true
 * ```
 */
export function isContextPolicy(value: unknown): value is ContextPolicy {
  return (CONTEXT_POLICIES as readonly unknown[]).includes(value);
}
