/**
 * A small HTTP/1.1 server on `Deno.listen`, for what `Deno.serve` cannot do: a
 * deadline on each request's head and on its body, and a cap on open
 * connections, so that clients trickling bytes cannot hold the server's
 * connections (or memory) for ever. It hands the handler standard `Request`s
 * whose `signal` aborts when the client goes away before its response is
 * complete (never after a response that was delivered), and writes the
 * handler's `Response`s chunked, streaming as the body is produced. A response
 * body that is not written to its end (the client went away, a write failed)
 * is always cancelled, so that whatever produces it (a generation holding a
 * slot) stops.
 *
 * Supported: keep-alive and pipelining, `Content-Length` and chunked request
 * bodies, `Expect: 100-continue`, `HEAD`, HTTP/1.0 clients (answered without
 * chunking, then closed). Not supported: upgrades, TLS (put a proxy in front).
 * A client that shuts down its sending side after its request counts as gone,
 * as with hyper's (and so `Deno.serve`'s) default.
 *
 * @module
 */

import { ApiError, BodyTimeoutError } from "./protocol.ts";

/** Options of {@link serveHttp1}. */
export interface Http1Options {
  /** Address to listen on. */
  hostname: string;
  /** Port (0 picks a free one). */
  port: number;
  /**
   * Milliseconds a request's line and headers may take to arrive, counted from when the connection opens or
   * finishes its previous response (an idle keep-alive connection is closed after as long).
   */
  headersTimeoutMs: number;
  /** Milliseconds a request's whole body may take to arrive, counted from the end of its headers. */
  bodyTimeoutMs: number;
  /** Connections open at once; one more is answered `503` and closed. */
  maxConnections: number;
  /** Largest request head (line and headers) in bytes; past it, `431`. Default 32 KiB. */
  maxHeadBytes?: number;
  /** Called once listening. */
  onListen?: (addr: Deno.NetAddr) => void;
  /** Where the server's own log lines go (a handler's errors are its own business). */
  onLog: (line: string) => void;
}

/** A listening {@link serveHttp1} server. */
export interface Http1Server {
  /** The address listened on (with the port picked when `port` was 0). */
  readonly addr: Deno.NetAddr;
  /** Resolves when the server has stopped and every connection is closed. */
  readonly finished: Promise<void>;
  /** Connections open now. */
  readonly connections: number;
  /** Stops accepting, closes idle connections, lets running responses end (closing them after `graceMs`). */
  shutdown(graceMs?: number): Promise<void>;
}

/** A request handler, as for `Deno.serve`. */
export type Http1Handler = (req: Request) => Promise<Response>;

const CRLF = new Uint8Array([13, 10]);
const CRLFCRLF = [13, 10, 13, 10];
/** Bytes of each connection's read buffer (one per connection: an idle one always has a read waiting). */
const READ_SIZE = 8 * 1024;
/**
 * Bytes a connection keeps reading ahead while a response is in progress (pipelined requests), watching for the
 * client going away; past them it stops reading until the response is done, and a failed write tells instead.
 */
const WATCH_BYTES = 64 * 1024;
const enc = new TextEncoder();
const latin1 = new TextDecoder("latin1");

const REASONS: Readonly<Record<number, string>> = {
  200: "OK",
  204: "No Content",
  304: "Not Modified",
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  413: "Content Too Large",
  415: "Unsupported Media Type",
  429: "Too Many Requests",
  431: "Request Header Fields Too Large",
  499: "Client Closed Request",
  500: "Internal Server Error",
  501: "Not Implemented",
  503: "Service Unavailable",
  505: "HTTP Version Not Supported",
};

/** Listens and serves `handler` until {@link Http1Server.shutdown}. */
export function serveHttp1(options: Http1Options, handler: Http1Handler): Http1Server {
  for (const k of ["headersTimeoutMs", "bodyTimeoutMs", "maxConnections"] as const) {
    const v = options[k];
    if (!(typeof v === "number" && v > 0 && Number.isFinite(v))) {
      throw new RangeError(`Invalid ${k} ${v}: expected a positive number`);
    }
  }
  if (!Number.isInteger(options.maxConnections)) {
    throw new RangeError(`Invalid maxConnections ${options.maxConnections}: expected a positive integer`);
  }
  const listener = Deno.listen({ hostname: options.hostname, port: options.port, transport: "tcp" });
  const addr = listener.addr as Deno.NetAddr;
  const open = new Set<Connection>();
  let refusing = 0;
  let stopping = false;
  const settings: Settings = {
    headersTimeoutMs: options.headersTimeoutMs,
    bodyTimeoutMs: options.bodyTimeoutMs,
    maxHeadBytes: options.maxHeadBytes ?? 32 * 1024,
    host: addr.hostname.includes(":") ? `[${addr.hostname}]:${addr.port}` : `${addr.hostname}:${addr.port}`,
    onLog: options.onLog,
  };
  options.onListen?.(addr);

  const accepting = (async () => {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (stopping) return;
        if (e instanceof Deno.errors.BadResource) return;
        options.onLog(`Accepting a connection failed: ${(e as Error).message}`);
        continue;
      }
      try {
        conn.setNoDelay(true); // each streamed token goes out at once
      } catch { /* closed already */ }
      if (open.size >= options.maxConnections) {
        // Answer why (a client may retry), unless refusals themselves pile up.
        if (refusing >= options.maxConnections) closeQuietly(conn);
        else {
          refusing++;
          void refuse(conn, options.maxConnections).finally(() => refusing--);
        }
        continue;
      }
      const c = new Connection(conn, settings, handler);
      open.add(c);
      void c.serve().finally(() => open.delete(c));
    }
  })();

  const finished = (async () => {
    await accepting;
    while (open.size > 0) await Promise.all([...open].map((c) => c.done));
  })();

  return {
    addr,
    finished,
    get connections() {
      return open.size;
    },
    async shutdown(graceMs = 5000) {
      if (!stopping) {
        stopping = true;
        try {
          listener.close();
        } catch { /* closed */ }
        for (const c of open) c.stop();
      }
      const timer = setTimeout(() => {
        for (const c of open) c.close();
      }, graceMs);
      try {
        await finished;
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

interface Settings {
  readonly headersTimeoutMs: number;
  readonly bodyTimeoutMs: number;
  readonly maxHeadBytes: number;
  /** `hostname:port` of the listener, for requests without a `Host`. */
  readonly host: string;
  readonly onLog: (line: string) => void;
}

/** A request head, parsed. */
interface Head {
  readonly method: string;
  readonly target: string;
  readonly http10: boolean;
  readonly headers: Headers;
}

/** Why a head could not be read: the status to answer (or `null`: close without answering). */
class HeadError extends Error {
  constructor(readonly status: number | null, message: string) {
    super(message);
  }
}

/** One client connection: reads requests one after another and writes their responses. */
class Connection {
  readonly #conn: Deno.TcpConn;
  readonly #settings: Settings;
  readonly #handler: Http1Handler;
  /** Bytes read and not yet consumed. */
  #buf: Uint8Array = new Uint8Array(0);
  /**
   * The read in flight, shared by whoever waits for bytes and the watch for a vanished client: it appends what it
   * got to {@link Connection.#buf} itself (once, however many wait), and says whether the stream goes on.
   */
  #filling: Promise<boolean> | undefined;
  /** The one buffer reads go into (one read is in flight at a time). */
  readonly #readBuf = new Uint8Array(READ_SIZE);
  #eof = false;
  #closed = false;
  /** Waiting for a request head (nothing in progress): shutdown closes such a connection at once. */
  #idle = true;
  #stopping = false;
  readonly #done = Promise.withResolvers<void>();

  constructor(conn: Deno.TcpConn, settings: Settings, handler: Http1Handler) {
    this.#conn = conn;
    this.#settings = settings;
    this.#handler = handler;
  }

  /** The body timeout of this connection's requests. */
  get bodyTimeoutMs(): number {
    return this.#settings.bodyTimeoutMs;
  }

  /** Resolves when the connection is closed. */
  get done(): Promise<void> {
    return this.#done.promise;
  }

  /** Closes now if idle, else after the response in progress. */
  stop(): void {
    this.#stopping = true;
    if (this.#idle) this.close();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeQuietly(this.#conn);
  }

  async serve(): Promise<void> {
    try {
      while (!this.#closed && !this.#stopping) {
        if (!(await this.#exchange())) break;
      }
    } catch (e) {
      this.#settings.onLog(`Connection error: ${(e as Error).message}`);
    } finally {
      this.close();
      this.#done.resolve();
    }
  }

  /** One request and its response; whether the connection may carry another. */
  async #exchange(): Promise<boolean> {
    this.#idle = true;
    let head: Head;
    try {
      head = await this.#readHead();
    } catch (e) {
      if (!(e instanceof HeadError)) throw e;
      if (e.status !== null) await this.#writeError(e.status, e.message, e.status === 408 ? "request_timeout" : null);
      return false;
    }
    this.#idle = false;
    const body = this.#bodyFor(head);
    if (body instanceof ApiError) {
      await this.#writeError(body.status, body.message, body.code);
      return false;
    }
    const gone = new AbortController();
    let request: Request;
    try {
      const host = head.headers.get("host") ?? this.#settings.host;
      if (!head.target.startsWith("/")) throw new TypeError(`request target ${JSON.stringify(head.target)}`);
      request = new Request(`http://${host}${head.target}`, {
        method: head.method,
        headers: head.headers,
        body: body.stream,
        signal: gone.signal,
      });
    } catch (e) {
      body.stream?.cancel().catch(() => {});
      await this.#writeError(400, `Bad request: ${(e as Error).message}`, null);
      return false;
    }
    // Once the body is read (at once when there is none), a read that ends means the client went away. The watch
    // stops with this exchange: a client that leaves after its response was delivered has not left this request.
    let unwatch = () => {};
    const watch = () => {
      unwatch = this.#watch(() => gone.abort(new DOMException("The client disconnected", "AbortError")));
    };
    if (body.stream === null) watch();
    else body.onEnd = watch;
    let response: Response;
    try {
      response = await this.#handler(request);
    } catch (e) {
      this.#settings.onLog(`Handler error: ${(e as Error).message}`);
      response = new ApiError(500, `Internal error: ${(e as Error).message}`, "server_error").toResponse();
    }
    const keepAlive = !head.http10 && !/\bclose\b/i.test(head.headers.get("connection") ?? "") &&
      body.complete() && !this.#stopping;
    const delivered = await this.#writeResponse(response, head, keepAlive, gone.signal);
    body.onEnd = () => {};
    unwatch();
    if (!delivered && !gone.signal.aborted) gone.abort(new DOMException("The client disconnected", "AbortError"));
    if (delivered && !body.complete()) await this.#linger();
    return delivered && keepAlive && body.complete();
  }

  /**
   * Before closing a connection whose client may still be sending (a body answered without being read, a 401
   * say): stop writing, then read and drop what comes for a moment, so that closing with unread bytes does not
   * reset the connection before the client has read the answer.
   */
  async #linger(): Promise<void> {
    try {
      await this.#conn.closeWrite();
    } catch {
      return;
    }
    const until = timeout(500);
    try {
      for (let dropped = 0; dropped < 1 << 20;) {
        dropped += this.#buf.length;
        this.#buf = new Uint8Array(0);
        const got = await Promise.race([this.#readMore(), until.expired]);
        if (got !== true) return;
      }
    } finally {
      until.clear();
    }
  }

  /** Reads and parses a request head within the headers timeout. */
  async #readHead(): Promise<Head> {
    const deadline = timeout(this.#settings.headersTimeoutMs);
    try {
      let searchFrom = 0;
      for (;;) {
        // Empty lines before a request are allowed (RFC 9112 §2.2).
        while (this.#buf.length >= 2 && this.#buf[0] === 13 && this.#buf[1] === 10) this.#buf = this.#buf.subarray(2);
        const end = indexOf(this.#buf, CRLFCRLF, searchFrom);
        if (end > this.#settings.maxHeadBytes || (end < 0 && this.#buf.length > this.#settings.maxHeadBytes)) {
          throw new HeadError(431, `Request head too large: the limit is ${this.#settings.maxHeadBytes} bytes`);
        }
        if (end >= 0) {
          const text = latin1.decode(this.#buf.subarray(0, end));
          this.#buf = this.#buf.subarray(end + 4);
          return parseHead(text);
        }
        searchFrom = Math.max(0, this.#buf.length - 3);
        const got = await Promise.race([this.#readMore(), deadline.expired]);
        if (got === "timeout") {
          // A client that sent part of a head is told; an idle keep-alive connection is just closed.
          throw new HeadError(
            this.#buf.length > 0 ? 408 : null,
            `Request header timeout: the request line and headers must arrive within ${
              this.#settings.headersTimeoutMs / 1000
            } s`,
          );
        }
        if (!got) throw new HeadError(null, "closed");
      }
    } finally {
      deadline.clear();
    }
  }

  /** The request body as a stream (`null` when it has none), or the error to answer. */
  #bodyFor(head: Head): BodyReader | ApiError {
    const te = head.headers.get("transfer-encoding");
    const cl = head.headers.get("content-length");
    if (te !== null) {
      if (cl !== null) return new ApiError(400, "Bad request: both Transfer-Encoding and Content-Length");
      if (te.trim().toLowerCase() !== "chunked") {
        return new ApiError(501, `Unsupported Transfer-Encoding ${JSON.stringify(te)}: only chunked`);
      }
      return new BodyReader(this, "chunked", 0, head);
    }
    if (cl !== null) {
      if (!/^\d{1,15}$/.test(cl.trim())) return new ApiError(400, `Bad request: Content-Length ${JSON.stringify(cl)}`);
      const length = Number(cl.trim());
      if (length > 0) return new BodyReader(this, "length", length, head);
    }
    return new BodyReader(this, "none", 0, head);
  }

  /** Body bytes for {@link BodyReader}: up to `max` buffered bytes, reading more when there are none. */
  async takeBytes(max: number, deadline: Deadline): Promise<Uint8Array | "eof" | "timeout"> {
    if (this.#buf.length === 0) {
      const got = await Promise.race([this.#readMore(), deadline.expired]);
      if (got === "timeout") return "timeout";
      if (!got) return "eof";
    }
    const n = Math.min(max, this.#buf.length);
    const out = this.#buf.slice(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }

  /** A CRLF-terminated line for the chunked decoder (without its CRLF), at most `max` bytes. */
  async takeLine(max: number, deadline: Deadline): Promise<string | "eof" | "timeout" | "toolong"> {
    let from = 0;
    for (;;) {
      const end = indexOf(this.#buf, [13, 10], from);
      if (end >= 0) {
        const line = latin1.decode(this.#buf.subarray(0, end));
        this.#buf = this.#buf.subarray(end + 2);
        return line;
      }
      if (this.#buf.length > max) return "toolong";
      from = Math.max(0, this.#buf.length - 1);
      const got = await Promise.race([this.#readMore(), deadline.expired]);
      if (got === "timeout") return "timeout";
      if (!got) return "eof";
    }
  }

  /** Writes `100 Continue` for a client that waits for it before sending its body. */
  async sendContinue(): Promise<void> {
    await this.#write(enc.encode("HTTP/1.1 100 Continue\r\n\r\n"));
  }

  /** Appends the next bytes from the socket to the buffer; false at its end (or on an error). */
  #readMore(): Promise<boolean> {
    if (this.#eof) return Promise.resolve(false);
    return this.#filling ??= this.#fill();
  }

  async #fill(): Promise<boolean> {
    let n: number | null;
    try {
      n = await this.#conn.read(this.#readBuf);
    } catch {
      n = null; // reset, or closed here: the stream is over either way
    }
    this.#filling = undefined;
    if (n === null) {
      this.#eof = true;
      return false;
    }
    const joined = new Uint8Array(this.#buf.length + n); // a copy: the read buffer is reused
    joined.set(this.#buf);
    joined.set(this.#readBuf.subarray(0, n), this.#buf.length);
    this.#buf = joined;
    return true;
  }

  /**
   * Until the returned function is called: keeps reading what the client sends (kept for its next requests, up to
   * {@link WATCH_BYTES}), and calls `onGone` once its side of the connection ends. Not just the next read: a client
   * that pipelines a request and then goes away is gone too.
   */
  #watch(onGone: () => void): () => void {
    let watching = true;
    void (async () => {
      while (watching && this.#buf.length < WATCH_BYTES) {
        const more = await this.#readMore();
        if (!watching) return;
        if (!more) {
          onGone();
          return;
        }
      }
    })();
    return () => {
      watching = false;
    };
  }

  /** Writes `response`; whether all of it was delivered to the socket. */
  async #writeResponse(response: Response, head: Head, keepAlive: boolean, gone: AbortSignal): Promise<boolean> {
    const status = response.status;
    const bodyless = head.method === "HEAD" || status === 204 || status === 304;
    const chunked = !head.http10 && !bodyless;
    let text = `HTTP/1.1 ${status} ${response.statusText || REASONS[status] || "Status"}\r\n`;
    for (const [name, value] of response.headers) {
      if (name === "connection" || name === "transfer-encoding" || name === "content-length") continue;
      text += `${name}: ${value}\r\n`;
    }
    if (chunked) text += "transfer-encoding: chunked\r\n";
    else if (bodyless && !head.http10) text += "content-length: 0\r\n";
    text += keepAlive && !head.http10 ? "connection: keep-alive\r\n\r\n" : "connection: close\r\n\r\n";
    const body = bodyless ? null : response.body;
    if (body === null) {
      response.body?.cancel().catch(() => {}); // a HEAD's (or 204's) body is not sent
      return !gone.aborted && await this.#write(enc.encode(chunked ? `${text}0\r\n\r\n` : text));
    }
    const reader = body.getReader();
    const onGone = () => reader.cancel().catch(() => {});
    gone.addEventListener("abort", onGone, { once: true });
    let delivered = false;
    try {
      if (gone.aborted || !(await this.#write(enc.encode(text)))) return false;
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch {
          return false; // the body failed midway: breaking the connection is all that is left
        }
        if (gone.aborted) return false;
        if (chunk.done) break;
        const data = chunk.value;
        if (data.byteLength === 0) continue;
        const framed = chunked ? frameChunk(data) : data;
        if (!(await this.#write(framed))) return false;
      }
      delivered = !chunked || await this.#write(enc.encode("0\r\n\r\n"));
      return delivered;
    } finally {
      gone.removeEventListener("abort", onGone);
      // However it ended undelivered (the client went away, a write failed first, the body failed), the body is
      // cancelled: its producer may hold a generation slot until then, and nobody else will ever read it.
      if (!delivered) reader.cancel().catch(() => {});
      reader.releaseLock();
    }
  }

  async #writeError(status: number, message: string, code: string | null): Promise<void> {
    const res = new ApiError(status, message, "invalid_request_error", null, code).toResponse();
    const head: Head = { method: "GET", target: "/", http10: false, headers: new Headers() };
    if (await this.#writeResponse(res, head, false, new AbortController().signal)) await this.#linger();
  }

  /** Writes all of `data`; false if the socket is gone. */
  async #write(data: Uint8Array): Promise<boolean> {
    try {
      for (let at = 0; at < data.length;) at += await this.#conn.write(data.subarray(at));
      return true;
    } catch {
      this.close();
      return false;
    }
  }
}

/** A request body, read from the connection as the handler pulls it, within the body timeout. */
class BodyReader {
  /** The stream given to the `Request` (`null`: no body). */
  readonly stream: ReadableStream<Uint8Array> | null;
  /** Called once the whole body has been read. */
  onEnd: () => void = () => {};
  #ended: boolean;

  constructor(conn: Connection, kind: "none" | "length" | "chunked", length: number, head: Head) {
    this.#ended = kind === "none";
    if (kind === "none" || head.method === "GET" || head.method === "HEAD") {
      // A GET's body is not the handler's: the connection closes after it unless there is none.
      this.stream = null;
      return;
    }
    let remaining = length;
    let chunkLeft = 0; // bytes left of the current chunk (chunked)
    let deadline: Deadline | undefined;
    let continued = !/^100-continue$/i.test(head.headers.get("expect") ?? "");
    const finish = (controller: ReadableStreamDefaultController<Uint8Array>) => {
      this.#ended = true;
      deadline?.clear();
      controller.close();
      this.onEnd();
    };
    const fail = (controller: ReadableStreamDefaultController<Uint8Array>, got: "eof" | "timeout" | "toolong") => {
      deadline?.clear();
      controller.error(
        got === "timeout"
          ? new BodyTimeoutError(deadline!.ms)
          : new Error(got === "eof" ? "the connection closed before the body ended" : "a malformed chunked body"),
      );
      // The body is incomplete, so the connection closes once the handler's answer (a 408, say) is written.
    };
    this.stream = new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        deadline ??= timeout(conn.bodyTimeoutMs);
        if (!continued) {
          continued = true;
          await conn.sendContinue();
        }
        if (kind === "length") {
          const got = await conn.takeBytes(remaining, deadline);
          if (typeof got === "string") return fail(controller, got);
          remaining -= got.length;
          controller.enqueue(got);
          if (remaining === 0) finish(controller);
          return;
        }
        if (chunkLeft === 0) {
          const line = await conn.takeLine(1024, deadline);
          if (line === "eof" || line === "timeout" || line === "toolong") return fail(controller, line);
          const size = /^([0-9a-fA-F]{1,12})[ \t]*(;.*)?$/.exec(line);
          if (!size) return fail(controller, "toolong");
          chunkLeft = parseInt(size[1], 16);
          if (chunkLeft === 0) {
            for (;;) { // trailers, up to the empty line
              const trailer = await conn.takeLine(8192, deadline);
              if (trailer === "eof" || trailer === "timeout" || trailer === "toolong") return fail(controller, trailer);
              if (trailer === "") return finish(controller);
            }
          }
        }
        const got = await conn.takeBytes(chunkLeft, deadline);
        if (typeof got === "string") return fail(controller, got);
        chunkLeft -= got.length;
        controller.enqueue(got);
        if (chunkLeft === 0) {
          const crlf = await conn.takeLine(2, deadline);
          if (crlf !== "") return fail(controller, crlf === "eof" || crlf === "timeout" ? crlf : "toolong");
        }
      },
      cancel: () => {
        deadline?.clear();
      },
    }, { highWaterMark: 0 });
  }

  /** Whether the body was read to its end (else the connection cannot carry another request). */
  complete(): boolean {
    return this.#ended;
  }
}

interface Deadline {
  readonly ms: number;
  readonly expired: Promise<"timeout">;
  clear(): void;
}

function timeout(ms: number): Deadline {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), ms);
  });
  return { ms, expired, clear: () => clearTimeout(timer) };
}

/** Parses the request line and header lines of a head (without its final CRLFCRLF). */
function parseHead(text: string): Head {
  const lines = text.split("\r\n");
  const m = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]);
  if (!m) {
    throw new HeadError(
      /^\S+ \S+ HTTP\/\d/.test(lines[0]) ? 505 : 400,
      `Bad request line ${JSON.stringify(lines[0].slice(0, 100))}`,
    );
  }
  const headers = new Headers();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    const name = colon > 0 ? line.slice(0, colon) : "";
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) {
      throw new HeadError(400, `Bad header line ${JSON.stringify(line.slice(0, 100))}`);
    }
    try {
      headers.append(name, line.slice(colon + 1).trim());
    } catch {
      throw new HeadError(400, `Bad header ${JSON.stringify(name)}`);
    }
  }
  return { method: m[1], target: m[2], http10: m[3] === "0", headers };
}

function frameChunk(data: Uint8Array): Uint8Array {
  const size = enc.encode(`${data.byteLength.toString(16)}\r\n`);
  const out = new Uint8Array(size.length + data.byteLength + 2);
  out.set(size);
  out.set(data, size.length);
  out.set(CRLF, size.length + data.byteLength);
  return out;
}

function indexOf(haystack: Uint8Array, needle: readonly number[], from: number): number {
  outer: for (let i = from; i <= haystack.length - needle.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/**
 * Milliseconds a refused connection's request head may take to arrive before the `503` goes anyway: an answer that
 * comes before the request is sent is, to an HTTP client, a broken connection (Deno's fetch fails "received
 * unexpected message from connection") instead of a `503` it can retry.
 */
const REFUSE_WAIT_MS = 500;

/**
 * Answers a connection past the cap with `503` once its request head is in (or after {@link REFUSE_WAIT_MS}),
 * and closes it once the client has had time to read the answer.
 */
async function refuse(conn: Deno.TcpConn, max: number): Promise<void> {
  const body = JSON.stringify({
    error: {
      message: `Too many connections: this server holds at most ${max} at once; try again later`,
      type: "server_error",
      param: null,
      code: "too_many_connections",
    },
  });
  const text = `HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n` +
    `content-length: ${enc.encode(body).length}\r\nretry-after: 1\r\nconnection: close\r\n\r\n${body}`;
  const buf = new Uint8Array(16 * 1024);
  // One read at a time: one that lost a race with a timer is still the one to wait for next.
  let reading: Promise<number | null> | undefined;
  const read = () => reading ??= conn.read(buf).finally(() => reading = undefined);
  try {
    const headIn = timeout(REFUSE_WAIT_MS);
    try {
      // The head's end may straddle two reads: keep the last 3 bytes of each.
      const tail = new Uint8Array(3 + buf.length);
      let kept = 0;
      for (let reads = 0; reads < 16; reads++) {
        const got = await Promise.race([read(), headIn.expired]);
        if (got === null || got === "timeout") break;
        tail.set(buf.subarray(0, got), kept);
        const seen = tail.subarray(0, kept + got);
        if (indexOf(seen, CRLFCRLF, 0) >= 0) break;
        kept = Math.min(3, seen.length);
        tail.copyWithin(0, seen.length - kept, seen.length);
      }
    } finally {
      headIn.clear();
    }
    await conn.write(enc.encode(text));
    await conn.closeWrite();
    // Read (and drop) what the client sent for a moment, so that closing does not reset the reply away.
    const until = timeout(200);
    try {
      for (let i = 0; i < 16; i++) {
        const got = await Promise.race([read(), until.expired]);
        if (got === null || got === "timeout") break;
      }
    } finally {
      until.clear();
    }
  } catch { /* the client is gone */ }
  closeQuietly(conn);
  reading?.catch(() => {}); // the read that lost its race ends with the close
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* closed already */ }
}
