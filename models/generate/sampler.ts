/**
 * Token sampling with the options llama.cpp users expect, seeded and allocation
 * free per token.
 *
 * Order of the chain: logit bias → repetition/presence/frequency penalties over
 * the last `penaltyLastN` tokens → greedy if temperature is 0, else top-k →
 * temperature → softmax → top-p → min-p → draw.
 *
 * @module
 */

/** Sampling parameters. Defaults follow llama.cpp's. */
export interface SamplingOptions {
  /** 0 means greedy (argmax). Default 0.8. */
  temperature?: number;
  /** Keep the k most likely tokens; 0 keeps all. Default 40. */
  topK?: number;
  /** Keep the smallest set whose probability reaches p; 1 keeps all. Default 0.95. */
  topP?: number;
  /** Drop tokens less likely than `minP` times the most likely; 0 keeps all. Default 0.05. */
  minP?: number;
  /** Divides positive (multiplies negative) logits of recent tokens; 1 is off. Default 1. */
  repetitionPenalty?: number;
  /** Subtracted once from the logit of every recent token. Default 0. */
  presencePenalty?: number;
  /** Subtracted per occurrence from the logit of recent tokens. Default 0. */
  frequencyPenalty?: number;
  /**
   * How many recent tokens the penalties look at. Default 64. A value past the context length acts
   * as the context length (a generation never sees more tokens), and the sampler's memory grows
   * with the tokens it has seen, not with this number.
   */
  penaltyLastN?: number;
  /**
   * Added to the logits of the given token ids, keyed by the id in canonical decimal (`"0"`,
   * `"42"`: no sign, spaces, exponent, hex or leading zero) below the vocabulary size. Only
   * `-Infinity` bans a token: a finite bias, however large, is added (so `-100` on every token,
   * OpenAI's ban value, shifts them all alike and changes nothing). Banning every token is refused,
   * and a step where bans and penalties leave no token with a logit above `-Infinity` fails with a
   * {@link SamplingOptionError} rather than emit a banned one.
   */
  logitBias?: Readonly<Record<number, number>>;
  /** Seed of the random generator: the same seed gives the same tokens. Default: random. */
  seed?: number;
}

/**
 * Thrown for a sampling parameter of the wrong type or out of range, and for a step where
 * {@link SamplingOptions.logitBias} and the penalties leave no token to pick; `option` names it.
 */
export class SamplingOptionError extends RangeError {
  /** The option at fault. */
  readonly option: string;
  /**
   * An error for sampling option `option`.
   *
   * @param option the option at fault
   * @param message what is wrong
   */
  constructor(option: string, message: string) {
    super(message);
    this.name = "SamplingOptionError";
    this.option = option;
  }
}

/** Validated sampling parameters with defaults applied. */
export interface ResolvedSampling {
  /** {@link SamplingOptions.temperature}: 0 is greedy. */
  readonly temperature: number;
  /** {@link SamplingOptions.topK}: 0 keeps all. */
  readonly topK: number;
  /** {@link SamplingOptions.topP}: 1 keeps all. */
  readonly topP: number;
  /** {@link SamplingOptions.minP}: 0 keeps all. */
  readonly minP: number;
  /** {@link SamplingOptions.repetitionPenalty}: 1 is off. */
  readonly repetitionPenalty: number;
  /** {@link SamplingOptions.presencePenalty}. */
  readonly presencePenalty: number;
  /** {@link SamplingOptions.frequencyPenalty}. */
  readonly frequencyPenalty: number;
  /** {@link SamplingOptions.penaltyLastN}. */
  readonly penaltyLastN: number;
  /** {@link SamplingOptions.logitBias} as `[token id, bias]` pairs. */
  readonly logitBias: readonly [number, number][];
  /** The seed: the one given, else a random one (so that a run can be repeated). */
  readonly seed: number;
}

/** Logit bias keys as a vocabulary id is written: canonical decimal, so `""`, `"0x2"`, `" 2 "`, `"1e3"` are refused. */
const TOKEN_ID_KEY = /^(0|[1-9][0-9]*)$/;

/** `[id, bias]` pairs of a {@link SamplingOptions.logitBias}, checked (see there). */
function resolveLogitBias(raw: unknown, vocabSize: number): [number, number][] {
  const fail = (message: string) =>
    new SamplingOptionError("logitBias", `Invalid sampling option "logitBias": ${message}`);
  if (raw === undefined) return [];
  const proto = typeof raw === "object" && raw !== null ? Object.getPrototypeOf(raw) : undefined;
  if (proto !== Object.prototype && proto !== null) {
    throw fail(`${describe(raw)}, expected an object of token id → bias`);
  }
  const bias: [number, number][] = [];
  let banned = 0;
  for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
    const id = TOKEN_ID_KEY.test(k) ? Number(k) : NaN;
    if (!(id < vocabSize)) {
      throw fail(`token id ${JSON.stringify(k)} is not a decimal integer from 0 to ${vocabSize - 1}`);
    }
    if (typeof v !== "number" || Number.isNaN(v) || v === Infinity) {
      throw fail(`bias ${describe(v)} for token ${k} is not a finite number or -Infinity`);
    }
    if (v === -Infinity) banned++;
    bias.push([id, v]);
  }
  if (banned === vocabSize) throw fail(`it bans every one of the ${vocabSize} tokens, so none could be generated`);
  return bias;
}

/** A value as an error message shows it: JSON where it has one, else its type. */
function describe(v: unknown): string {
  if (typeof v === "number") return String(v);
  if (v instanceof Map) return "a Map";
  if (Array.isArray(v)) return "an array";
  return JSON.stringify(v) ?? typeof v;
}

/**
 * Applies defaults and checks every option against `vocabSize`; with `contextLength`, a
 * {@link SamplingOptions.penaltyLastN} past it resolves to it (the same penalties: a generation never
 * sees more tokens than its context holds).
 */
export function resolveSampling(o: SamplingOptions, vocabSize: number, contextLength?: number): ResolvedSampling {
  const num = (name: keyof SamplingOptions, v: unknown, def: number, ok: (x: number) => boolean, range: string) => {
    const x = v ?? def;
    if (typeof x !== "number" || Number.isNaN(x) || !ok(x)) {
      throw new SamplingOptionError(name, `Invalid sampling option "${name}": ${JSON.stringify(x)}, expected ${range}`);
    }
    return x;
  };
  const finite = (x: number) => Number.isFinite(x);
  const lastN = num("penaltyLastN", o.penaltyLastN, 64, (x) => Number.isSafeInteger(x) && x >= 0, "an integer ≥ 0");
  return {
    temperature: num("temperature", o.temperature, 0.8, (x) => finite(x) && x >= 0, "a finite number ≥ 0"),
    topK: num("topK", o.topK, 40, (x) => Number.isInteger(x) && x >= 0, "an integer ≥ 0"),
    topP: num("topP", o.topP, 0.95, (x) => x > 0 && x <= 1, "a number in (0, 1]"),
    minP: num("minP", o.minP, 0.05, (x) => x >= 0 && x <= 1, "a number in [0, 1]"),
    repetitionPenalty: num(
      "repetitionPenalty",
      o.repetitionPenalty,
      1,
      (x) => finite(x) && x > 0,
      "a finite number > 0",
    ),
    presencePenalty: num("presencePenalty", o.presencePenalty, 0, finite, "a finite number"),
    frequencyPenalty: num("frequencyPenalty", o.frequencyPenalty, 0, finite, "a finite number"),
    penaltyLastN: contextLength === undefined ? lastN : Math.min(lastN, contextLength),
    logitBias: resolveLogitBias(o.logitBias, vocabSize),
    seed: num(
      "seed",
      o.seed,
      crypto.getRandomValues(new Uint32Array(1))[0],
      (x) => Number.isSafeInteger(x),
      "a safe integer",
    ),
  };
}

/** xoshiro128** — small, fast, and good enough for sampling. */
export class Rng {
  #s = new Uint32Array(4);

  /**
   * A generator whose sequence is fixed by `seed`.
   *
   * @param seed any safe integer
   */
  constructor(seed: number) {
    // splitmix32 spreads the seed over the state.
    let z = (seed >>> 0) ^ Math.floor(seed / 2 ** 32);
    for (let i = 0; i < 4; i++) {
      z = (z + 0x9e3779b9) >>> 0;
      let t = z;
      t = Math.imul(t ^ (t >>> 16), 0x85ebca6b);
      t = Math.imul(t ^ (t >>> 13), 0xc2b2ae35);
      this.#s[i] = (t ^ (t >>> 16)) >>> 0;
    }
  }

  /** A uniform number in [0, 1). */
  next(): number {
    const s = this.#s;
    const r = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return r / 2 ** 32;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** Recent-token slots a sampler starts with: the default `penaltyLastN` fits without growing. */
const RECENT_START = 64;

/** Picks tokens from logits. Buffers are sized to the vocabulary once. */
export class Sampler {
  /** The options it samples with. */
  readonly options: ResolvedSampling;
  readonly #rng: Rng;
  readonly #work: Float32Array;
  readonly #idx: Int32Array;
  readonly #prob: Float64Array;
  readonly #stamp: Uint32Array;
  readonly #count: Uint32Array;
  #stampNow = 0;
  /** The recent tokens, a ring of up to `penaltyLastN` once full; grown by doubling until then. */
  #recent: Int32Array;
  #recentLen = 0;
  /** Sorts candidate ids by working logit, descending (made once, not per token). */
  readonly #byLogit = (a: number, b: number): number => this.#work[b] - this.#work[a] || a - b;
  #recentAt = 0;

  /**
   * A sampler for logits of `vocabSize` tokens.
   *
   * @param options validated options ({@link resolveSampling})
   * @param vocabSize logits per step
   */
  constructor(options: ResolvedSampling, vocabSize: number) {
    this.options = options;
    this.#rng = new Rng(options.seed);
    this.#work = new Float32Array(vocabSize);
    this.#idx = new Int32Array(vocabSize);
    this.#prob = new Float64Array(vocabSize);
    this.#stamp = new Uint32Array(vocabSize);
    this.#count = new Uint32Array(vocabSize);
    this.#recent = new Int32Array(Math.max(1, Math.min(options.penaltyLastN, RECENT_START)));
  }

  /** Logits per step. */
  get vocabSize(): number {
    return this.#work.length;
  }

  /** Records a token (prompt or generated) for the penalties. */
  accept(id: number): void {
    const lastN = this.options.penaltyLastN;
    if (lastN === 0) return;
    if (this.#recentLen === this.#recent.length && this.#recentLen < lastN) {
      // Not yet a ring (nothing was overwritten): grow, so memory follows the tokens seen, not penaltyLastN.
      const grown = new Int32Array(Math.min(lastN, this.#recentLen * 2));
      grown.set(this.#recent);
      this.#recent = grown;
      this.#recentAt = this.#recentLen;
    }
    const cap = this.#recent.length;
    this.#recent[this.#recentAt] = id;
    this.#recentAt = (this.#recentAt + 1) % cap;
    if (this.#recentLen < cap) this.#recentLen++;
  }

  /** Chooses the next token from `logits` (left unchanged). */
  sample(logits: Float32Array): number {
    const o = this.options;
    const w = this.#work;
    const V = w.length;
    w.set(logits.subarray(0, V));
    for (const [id, b] of o.logitBias) w[id] += b;
    this.#applyPenalties(w);
    if (o.temperature === 0) {
      const best = argmax(w, V);
      if (!(w[best] > -Infinity)) throw noTokenLeft();
      return best;
    }

    // Candidates: the top k (or all), sorted by logit, descending.
    const idx = this.#idx;
    for (let i = 0; i < V; i++) idx[i] = i;
    let n = V;
    if (o.topK > 0 && o.topK < V) {
      selectTop(idx, w, o.topK);
      n = o.topK;
    }
    const cand = idx.subarray(0, n);
    cand.sort(this.#byLogit);

    const p = this.#prob;
    const max = w[cand[0]];
    if (!(max > -Infinity)) throw noTokenLeft();
    let sum = 0;
    for (let i = 0; i < n; i++) {
      const e = Math.exp((w[cand[i]] - max) / o.temperature);
      p[i] = e;
      sum += e;
    }
    // top-p: the shortest prefix reaching topP of the mass; min-p: relative to the top.
    let keep = n;
    if (o.topP < 1) {
      let acc = 0;
      for (let i = 0; i < n; i++) {
        acc += p[i] / sum;
        if (acc >= o.topP) {
          keep = i + 1;
          break;
        }
      }
    }
    if (o.minP > 0) {
      const floor = o.minP * p[0];
      let i = 1;
      while (i < keep && p[i] >= floor) i++;
      keep = i;
    }
    let total = 0;
    for (let i = 0; i < keep; i++) total += p[i];
    let r = this.#rng.next() * total;
    for (let i = 0; i < keep; i++) {
      r -= p[i];
      if (r < 0) return cand[i];
    }
    return cand[keep - 1];
  }

  #applyPenalties(w: Float32Array): void {
    const o = this.options;
    if (this.#recentLen === 0) return;
    if (o.repetitionPenalty === 1 && o.presencePenalty === 0 && o.frequencyPenalty === 0) return;
    const stamp = ++this.#stampNow;
    const count = this.#count;
    for (let i = 0; i < this.#recentLen; i++) {
      const id = this.#recent[i];
      if (this.#stamp[id] !== stamp) {
        this.#stamp[id] = stamp;
        count[id] = 0;
      }
      count[id]++;
    }
    for (let i = 0; i < this.#recentLen; i++) {
      const id = this.#recent[i];
      const c = count[id];
      if (c === 0) continue; // already penalized
      count[id] = 0;
      let l = w[id];
      if (o.repetitionPenalty !== 1) l = l > 0 ? l / o.repetitionPenalty : l * o.repetitionPenalty;
      w[id] = l - c * o.frequencyPenalty - o.presencePenalty;
    }
  }
}

/** The error of a step where no token has a logit above -Infinity (bans, penalties that overflow). */
function noTokenLeft(): SamplingOptionError {
  return new SamplingOptionError(
    "logitBias",
    'Cannot sample: after "logitBias" and the penalties every token\'s logit is -Infinity, so no token can be generated',
  );
}

/** Index of the largest value (the first on ties, as llama.cpp's greedy sampler). */
export function argmax(x: Float32Array, n = x.length): number {
  let best = 0;
  let v = x[0];
  for (let i = 1; i < n; i++) {
    if (x[i] > v) {
      v = x[i];
      best = i;
    }
  }
  return best;
}

/** Moves the `k` indices with the largest values to the front of `idx` (quickselect). */
function selectTop(idx: Int32Array, v: Float32Array, k: number): void {
  let lo = 0;
  let hi = idx.length - 1;
  while (lo < hi) {
    const pivot = v[idx[(lo + hi) >> 1]];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (v[idx[i]] > pivot) i++;
      while (v[idx[j]] < pivot) j--;
      if (i <= j) {
        const t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
        i++;
        j--;
      }
    }
    if (k - 1 <= j) hi = j;
    else if (k - 1 >= i) lo = i;
    else return;
  }
}

/** log softmax(logits)[id], in f64. */
export function logProb(logits: Float32Array, id: number, n = logits.length): number {
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(logits[i] - max);
  return logits[id] - max - Math.log(sum);
}
