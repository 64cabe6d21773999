/**
 * What the chat tests share: a chat template for the story model and a stream reader.
 *
 * @module
 */

/** A chat template for the story model (which has none): plain "Question:/Answer:" turns. */
export const STORY_TEMPLATE: string = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'system' %}{{ m.content }}\n" +
  "{% elif m.role == 'user' %}Question: {{ m.content }}\n" +
  "{% else %}Answer:{{ m.content }}\n{% endif %}" +
  "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";

/** Everything a text stream yields, joined. */
export async function readAll(stream: ReadableStream<string>): Promise<string> {
  let text = "";
  for await (const piece of stream) text += piece;
  return text;
}
