/**
 * The server's door: who may ask. An API key (a Bearer token, compared in
 * constant time), the `Host` a request names (against DNS rebinding: a page
 * on another site whose name resolves to 127.0.0.1 could otherwise read the
 * replies). (The `Content-Type` of bodies is checked where they are read, in
 * `protocol.ts`.)
 *
 * @module
 */

import { ApiError } from "./protocol.ts";

/** What {@link Door} checks. */
export interface DoorOptions {
  /** Keys accepted as `Authorization: Bearer KEY`; none (or empty) lets every request in. */
  apiKeys?: readonly string[];
  /**
   * Host names (without port) a request's `Host` may name, besides the loopback names (`localhost`,
   * `*.localhost`, `127.x.x.x`, `::1`); `undefined` accepts any `Host`.
   */
  allowedHosts?: readonly string[];
}

/** Checks requests against the keys and hosts it was made with. */
export class Door {
  readonly #keyDigests: readonly Uint8Array[];
  readonly #hosts: ReadonlySet<string> | undefined;

  private constructor(keyDigests: Uint8Array[], hosts: Set<string> | undefined) {
    this.#keyDigests = keyDigests;
    this.#hosts = hosts;
  }

  /**
   * A door for `options`; throws a `TypeError` naming a key or host that is not a non-empty string without spaces.
   *
   * @param options the keys and hosts
   */
  static async create(options: DoorOptions): Promise<Door> {
    const digests: Uint8Array[] = [];
    for (const [i, key] of (options.apiKeys ?? []).entries()) {
      if (typeof key !== "string" || key === "" || /\s/.test(key)) {
        throw new TypeError(`Invalid apiKeys[${i}]: expected a non-empty string without spaces`);
      }
      digests.push(await sha256(key));
    }
    let hosts: Set<string> | undefined;
    if (options.allowedHosts !== undefined) {
      hosts = new Set();
      for (const [i, host] of options.allowedHosts.entries()) {
        if (typeof host !== "string" || !(/^\[?[0-9a-fA-F:.]+\]?$/.test(host) || /^[^\s/:@\[\]]+$/.test(host))) {
          throw new TypeError(
            `Invalid allowedHosts[${i}] ${JSON.stringify(host)}: expected a host name or address without a port`,
          );
        }
        hosts.add(normalizeHost(host));
      }
    }
    return new Door(digests, hosts);
  }

  /** Whether requests need an API key. */
  get locked(): boolean {
    return this.#keyDigests.length > 0;
  }

  /** Throws a `403` unless the request's `Host` is allowed (always allowed when no list was given). */
  checkHost(req: Request): void {
    if (this.#hosts === undefined) return;
    const header = req.headers.get("host");
    const name = header === null ? undefined : hostName(header);
    if (name !== undefined && (isLoopbackName(name) || this.#hosts.has(name))) return;
    throw new ApiError(
      403,
      `Host ${JSON.stringify(header)} is not allowed: this server answers only for ` +
        `${["localhost", ...this.#hosts].join(", ")} (start it with --allowed-hosts to add names)`,
      "invalid_request_error",
      null,
      "host_not_allowed",
    );
  }

  /** Rejects with a `401` unless the request carries one of the keys (in constant time over the key's bytes). */
  async checkKey(req: Request): Promise<void> {
    if (!this.locked) return;
    const auth = req.headers.get("authorization") ?? "";
    const match = /^Bearer +(\S+) *$/i.exec(auth);
    if (match) {
      const given = await sha256(match[1]);
      let ok = 0;
      for (const d of this.#keyDigests) ok |= equalDigests(given, d) ? 1 : 0;
      if (ok === 1) return;
    }
    throw new ApiError(
      401,
      match
        ? "Invalid API key: the Authorization header's Bearer token is not one of this server's keys"
        : "Missing API key: send it as the header 'Authorization: Bearer KEY'",
      "invalid_request_error",
      null,
      "invalid_api_key",
    );
  }
}

/** Whether a listening address is a loopback one (only this machine can connect). */
export function isLoopbackAddress(hostname: string): boolean {
  return isLoopbackName(normalizeHost(hostname));
}

/** Names that always mean this machine: browsers resolve `localhost` and `*.localhost` themselves, never by DNS. */
function isLoopbackName(name: string): boolean {
  return name === "localhost" || name.endsWith(".localhost") || name === "::1" ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name);
}

/** The host name of a `Host` header (`name`, `name:port`, `[v6]` or `[v6]:port`), lower case; `undefined` if malformed. */
function hostName(header: string): string | undefined {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^\s:/@\[\]]+)(?::\d{1,5})?$/.exec(header.trim());
  return m ? normalizeHost(m[1]) : undefined;
}

function normalizeHost(host: string): string {
  return host.toLowerCase().replace(/^\[(.*)\]$/, "$1").replace(/\.$/, "");
}

async function sha256(text: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

/** Compares two digests of the same length without stopping at the first difference. */
function equalDigests(a: Uint8Array, b: Uint8Array): boolean {
  let diff = a.length ^ b.length;
  for (let i = 0; i < a.length && i < b.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}
