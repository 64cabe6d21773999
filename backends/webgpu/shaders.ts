/**
 * WGSL sources of the WebGPU backend, one compute shader per op (two for
 * attention: the KV-cache write, then the fused attention), generated per weight
 * dtype so that the matmul and embedding shaders unpack f16, bf16, q8_0 and q4_0
 * weights themselves, and per KV cache dtype (f32, or f16 packed in pairs). Everything
 * is computed in f32.
 *
 * Matmul shaders write output rows with stride `p.outN`, so a weight split by rows
 * across several bindings runs as one dispatch per part, each writing its columns.
 *
 * Every shader shares one binding scheme:
 * - `@binding(0)` the node's parameters (a uniform struct written once at compile;
 *   its first field `rows` is the node's row count when the graph fixes it, or
 *   {@link ROWS_FROM_STEP} plus the lane of the step uniform that holds it, for rows
 *   over a symbolic dimension such as `T` or `R`),
 * - `@binding(1)` the step's dimensions (a uniform of 4 lanes written before each step),
 * - `@binding(2)` the activation arena (`array<f32>`, offsets in elements),
 * - `@binding(3..5)` the weight, the KV caches and the index buffer (`array<i32>`: every
 *   `i32` graph input, such as token ids, positions and page tables, at its own offset),
 *   when the op has them.
 *
 * Work too large for one dimension of dispatch is spread over `x` and `y`
 * (see {@link gridOf}), so each shader recovers a linear workgroup index.
 *
 * @module
 */

import type { DType, KvDType } from "../../graph/dtype.ts";

/** Invocations of a one-dimensional workgroup. */
export const WG = 64;
/** Output rows per workgroup of the matrix-vector kernel. */
export const MATVEC_ROWS = 4;
/** Most tokens the matrix-vector kernel handles in one step; more use a matrix-matrix kernel. */
export const MATVEC_MAX_T = 4;
/** Tile edge of the matrix-matrix kernels (tokens and weight rows per output tile). */
export const TILE = 32;

/** Lanes (u32 values) of the step uniform: the symbolic dimensions that nodes run their rows over. */
export const STEP_LANES = 4;
/**
 * Flag of a parameter `rows` word that names a lane of the step uniform (in its low
 * bits) instead of a fixed row count.
 */
export const ROWS_FROM_STEP = 0x80000000;

/** Largest workgroup count per dispatch dimension that every adapter allows. */
const MAX_GROUPS_PER_DIM = 65535;

/**
 * Splits `groups` workgroups over x and y so that no dimension exceeds the limit. The
 * grid may then hold up to x - 1 spare workgroups, which every shader leaves idle.
 */
export function gridOf(groups: number): [number, number] {
  if (groups <= MAX_GROUPS_PER_DIM) return [groups, 1];
  return [MAX_GROUPS_PER_DIM, Math.ceil(groups / MAX_GROUPS_PER_DIM)];
}

const HEADER = /* wgsl */ `
struct Step { dims: vec4<u32> }
@group(0) @binding(1) var<uniform> st: Step;
@group(0) @binding(2) var<storage, read_write> arena: array<f32>;

// Rows of the node: p.rows when fixed in the graph, else the step's value of its
// dimension (T, R), from the lane of the step uniform that p.rows names.
fn rowCount() -> u32 {
  if ((p.rows & ${ROWS_FROM_STEP}u) != 0u) { return st.dims[p.rows & ${STEP_LANES - 1}u]; }
  return p.rows;
}

fn groupIndex(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
  return wg.x + wg.y * nwg.x;
}
`;

/**
 * WGSL that declares the index buffer (every `i32` graph input, at the offsets the
 * parameters give) at `@binding(binding)`, read-only.
 */
function indexBuffer(binding: number): string {
  return `@group(0) @binding(${binding}) var<storage, read> ix: array<i32>;`;
}

/**
 * WGSL that declares the weight at `@binding(3)` and `fn wAt(i: u32) -> f32`, the
 * value of element `i` (row-major). Quantized weights read their f16 scales from
 * word `p.wScale` on (the planar layout of `graph/dtype.ts`).
 */
function weightAccess(dtype: DType): string {
  switch (dtype) {
    case "f32":
      return `@group(0) @binding(3) var<storage, read> w: array<f32>;
fn wAt(i: u32) -> f32 { return w[i]; }`;
    case "f16":
      return `@group(0) @binding(3) var<storage, read> w: array<u32>;
fn wAt(i: u32) -> f32 { return unpack2x16float(w[i >> 1u])[i & 1u]; }`;
    case "bf16":
      return `@group(0) @binding(3) var<storage, read> w: array<u32>;
fn wAt(i: u32) -> f32 {
  let word = w[i >> 1u];
  return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
}`;
    case "q8_0":
      return `@group(0) @binding(3) var<storage, read> w: array<u32>;
fn blockScale(b: u32) -> f32 { return unpack2x16float(w[p.wScale + (b >> 1u)])[b & 1u]; }
fn wAt(i: u32) -> f32 {
  let q = (bitcast<i32>(w[i >> 2u]) << (24u - (i & 3u) * 8u)) >> 24u;
  return f32(q) * blockScale(i >> 5u);
}`;
    case "q4_0":
      return `@group(0) @binding(3) var<storage, read> w: array<u32>;
fn blockScale(b: u32) -> f32 { return unpack2x16float(w[p.wScale + (b >> 1u)])[b & 1u]; }
fn wAt(i: u32) -> f32 {
  let b = i >> 5u;
  let j = i & 31u;
  let byteIndex = b * 16u + (j & 15u);
  let byte = (w[byteIndex >> 2u] >> ((byteIndex & 3u) * 8u)) & 0xffu;
  let q = select(byte & 15u, byte >> 4u, j >= 16u);
  return (f32(q) - 8.0) * blockScale(b);
}`;
    case "i32":
      throw new TypeError(`Cannot read "i32" as weights`);
  }
}

/**
 * WGSL for `fn wQuad(i: u32) -> vec4<f32>`: elements `i .. i + 3` of the weight, for `i`
 * a multiple of 4 within one row (rows of a multiple of 4 elements). One or two word
 * loads and one scale per call; a quantized block never splits a quad.
 */
function weightQuad(dtype: DType): string {
  switch (dtype) {
    case "f32":
      return `fn wQuad(i: u32) -> vec4<f32> { return vec4<f32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]); }`;
    case "f16":
      return `fn wQuad(i: u32) -> vec4<f32> {
  return vec4<f32>(unpack2x16float(w[i >> 1u]), unpack2x16float(w[(i >> 1u) + 1u]));
}`;
    case "bf16":
      return `fn wQuad(i: u32) -> vec4<f32> {
  let a = w[i >> 1u];
  let b = w[(i >> 1u) + 1u];
  return bitcast<vec4<f32>>(vec4<u32>(a << 16u, a & 0xffff0000u, b << 16u, b & 0xffff0000u));
}`;
    case "q8_0":
      return `fn wQuad(i: u32) -> vec4<f32> {
  let q = vec4<i32>(bitcast<i32>(w[i >> 2u]));
  let v = (q << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
  return vec4<f32>(v) * blockScale(i >> 5u);
}`;
    case "q4_0":
      return `fn wQuad(i: u32) -> vec4<f32> {
  let b = i >> 5u;
  let j = i & 31u;
  let word = w[b * 4u + ((j & 15u) >> 2u)];
  let nib = (vec4<u32>(word) >> (vec4<u32>(0u, 8u, 16u, 24u) + select(0u, 4u, j >= 16u))) & vec4<u32>(15u);
  return (vec4<f32>(nib) - 8.0) * blockScale(b);
}`;
    case "i32":
      throw new TypeError(`Cannot read "i32" as weights`);
  }
}

/**
 * out (T, D) = table rows ids (T), for the ids in `first .. first + count - 1` (the
 * rows held by this part of a table split across bindings); the ids are read from the
 * index buffer at `p.ids`. Workgroups: T × ceil(D / WG).
 */
export function embeddingShader(dtype: DType): string {
  return `
struct Params { rows: u32, ids: u32, out: u32, D: u32, wScale: u32, first: u32, count: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${weightAccess(dtype)}
${indexBuffer(4)}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let per = (p.D + ${WG - 1}u) / ${WG}u;
  let g = groupIndex(wg, nwg);
  let t = g / per;
  let d = (g % per) * ${WG}u + lid.x;
  if (t >= rowCount() || d >= p.D) { return; }
  let id = u32(ix[p.ids + t]);
  if (id < p.first || id >= p.first + p.count) { return; }
  arena[p.out + t * p.D + d] = wAt((id - p.first) * p.D + d);
}
`;
}

/** out (T, D) = x / rms(x row) * w (D). One workgroup per row. */
export function rmsNormShader(): string {
  return `
struct Params { rows: u32, x: u32, out: u32, D: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
@group(0) @binding(3) var<storage, read> w: array<f32>;
var<workgroup> red: array<f32, ${WG}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let t = groupIndex(wg, nwg);
  if (t >= rowCount()) { return; } // a spare workgroup of a two-dimensional grid
  let xo = p.x + t * p.D;
  var s = 0.0;
  for (var d = lid.x; d < p.D; d += ${WG}u) {
    let v = arena[xo + d];
    s += v * v;
  }
  red[lid.x] = s;
  workgroupBarrier();
  for (var k = ${WG / 2}u; k > 0u; k >>= 1u) {
    if (lid.x < k) { red[lid.x] += red[lid.x + k]; }
    workgroupBarrier();
  }
  let inv = 1.0 / sqrt(red[0] / f32(p.D) + p.eps);
  let oo = p.out + t * p.D;
  for (var d = lid.x; d < p.D; d += ${WG}u) {
    arena[oo + d] = arena[xo + d] * inv * w[d];
  }
}
`;
}

/** The uniforms, bindings and weight access the two matrix-vector kernels share. */
function matvecPrelude(dtype: DType, quad: boolean): string {
  return `
struct Params { rows: u32, x: u32, out: u32, K: u32, N: u32, wScale: u32, outN: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${weightAccess(dtype)}
${quad ? weightQuad(dtype) : ""}`;
}

/** The mat-vec inner step: token t (up to 4) adds its product with the weight(s) `wv` into lane t of `acc`. */
function matvecTokens(quad: boolean): string {
  const x = (t: number) =>
    quad
      ? `dot(wv, vec4<f32>(arena[xo${t}], arena[xo${t} + 1u], arena[xo${t} + 2u], arena[xo${t} + 3u]))`
      : `wv * arena[xo${t}]`;
  const lane = ["x", "y", "z", "w"];
  return [0, 1, 2, 3].map((t) =>
    `${t > 0 ? `if (T > ${t}u) ` : ""}{ let xo${t} = p.x + ${t}u * p.K + k; acc.${lane[t]} += ${x(t)}; }`
  ).join("\n      ");
}

/**
 * Matrix-vector product for a few tokens (decode): out (T, N) = x (T, K) · W (N, K)ᵀ
 * with T ≤ {@link MATVEC_MAX_T}. Each workgroup computes {@link MATVEC_ROWS} weight
 * rows; the 64 lanes of a row stride over K (adjacent lanes read adjacent weights),
 * each weight is read once for all T tokens (one `vec4` accumulator lane per token),
 * and the lanes sum in workgroup memory. Workgroups: ceil(N / MATVEC_ROWS).
 */
export function matvecShader(dtype: DType, quad: boolean): string {
  const step = quad ? 4 * WG : WG;
  const tokens = matvecTokens(quad);
  return `${matvecPrelude(dtype, quad)}
var<workgroup> red: array<vec4<f32>, ${WG * MATVEC_ROWS}>;

@compute @workgroup_size(${WG}, ${MATVEC_ROWS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let n = groupIndex(wg, nwg) * ${MATVEC_ROWS}u + lid.y;
  let T = rowCount();
  var acc = vec4<f32>();
  if (n < p.N) {
    let wo = n * p.K;
    for (var k = lid.x${quad ? " * 4u" : ""}; k < p.K; k += ${step}u) {
      let wv = ${quad ? "wQuad" : "wAt"}(wo + k);
      ${tokens}
    }
  }
  let i = lid.y * ${WG}u + lid.x;
  red[i] = acc;
  // One barrier, then one lane per row adds the row's 64 partial sums (for long
  // rows these adds cost less than the six more barriers of a tree).
  workgroupBarrier();
  if (lid.x == 0u && n < p.N) {
    var r = vec4<f32>();
    for (var j = 0u; j < ${WG}u; j++) { r += red[i + j]; }
    arena[p.out + n] = r.x;
    if (T > 1u) { arena[p.out + p.outN + n] = r.y; }
    if (T > 2u) { arena[p.out + 2u * p.outN + n] = r.z; }
    if (T > 3u) { arena[p.out + 3u * p.outN + n] = r.w; }
  }
}
`;
}

/**
 * Matrix-vector product for software adapters: the same contract as
 * {@link matvecShader}, one invocation per weight row looping over K in quads, no
 * workgroup memory and no barrier. On Mesa's lavapipe (a CPU) the cost of a
 * dispatch grows with its invocations, and this runs decode about 7× faster than
 * the cooperative kernel; on a GPU the cooperative one reads memory far better.
 * Workgroups: ceil(N / WG).
 */
export function matvecRowsShader(dtype: DType, quad: boolean): string {
  const step = quad ? 4 : 1;
  const tokens = matvecTokens(quad);
  return `${matvecPrelude(dtype, quad)}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let n = groupIndex(wg, nwg) * ${WG}u + lid.x;
  let T = rowCount();
  if (n >= p.N) { return; }
  var acc = vec4<f32>();
  let wo = n * p.K;
  for (var k = 0u; k < p.K; k += ${step}u) {
    let wv = ${quad ? "wQuad" : "wAt"}(wo + k);
    ${tokens}
  }
  arena[p.out + n] = acc.x;
  if (T > 1u) { arena[p.out + p.outN + n] = acc.y; }
  if (T > 2u) { arena[p.out + 2u * p.outN + n] = acc.z; }
  if (T > 3u) { arena[p.out + 3u * p.outN + n] = acc.w; }
}
`;
}

/**
 * Tiled matrix-matrix product (prefill): out (T, N) = x (T, K) · W (N, K)ᵀ. A
 * workgroup of 8×8 invocations computes a 32×32 output tile, 4×4 per invocation
 * held in four `vec4` accumulators (register tiling): each K step loads four
 * quads of x rows and four quads of (unpacked) weight rows and does 16 dot
 * products, so every loaded value is used four times, and the tile's 32 rows of
 * x and W are shared between the invocations through the cache. Edge tiles clamp
 * their reads and skip their writes.
 *
 * Barrier-free by design, for software adapters (the default there): Mesa's lavapipe
 * compiles a barrier as a coroutine suspension, and a first version staging the tiles in
 * workgroup memory took 30 to 90 s to compile each variant, against 0.3 s for this one.
 * {@link matmulSharedShader} (GPUs) stages them in about 1 s per variant. Workgroups:
 * ceil(T / 32) × ceil(N / 32).
 */
export function matmulTiledShader(dtype: DType, quad: boolean): string {
  const rows = [0, 1, 2, 3];
  const body = quad
    ? `for (var k = 0u; k < p.K; k += 4u) {
    ${rows.map((i) => `let w${i} = wQuad(wr.${"xyzw"[i]} + k);`).join(" ")}
    ${rows.map((i) => `let x${i} = xQuad(xr.${"xyzw"[i]} + k);`).join(" ")}
    ${
      rows.map((i) => `a${i} += vec4<f32>(dot(x${i}, w0), dot(x${i}, w1), dot(x${i}, w2), dot(x${i}, w3));`).join(
        "\n    ",
      )
    }
  }`
    : `for (var k = 0u; k < p.K; k++) {
    let wq = vec4<f32>(wAt(wr.x + k), wAt(wr.y + k), wAt(wr.z + k), wAt(wr.w + k));
    ${rows.map((i) => `a${i} += arena[xr.${"xyzw"[i]} + k] * wq;`).join("\n    ")}
  }`;
  const store = rows.map((i) =>
    `if (t + ${i}u < T) {
    let o = p.out + (t + ${i}u) * p.outN + n;
    if (n < p.N) { arena[o] = a${i}.x; }
    if (n + 1u < p.N) { arena[o + 1u] = a${i}.y; }
    if (n + 2u < p.N) { arena[o + 2u] = a${i}.z; }
    if (n + 3u < p.N) { arena[o + 3u] = a${i}.w; }
  }`
  ).join("\n  ");
  return `
struct Params { rows: u32, x: u32, out: u32, K: u32, N: u32, wScale: u32, outN: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${weightAccess(dtype)}
${quad ? weightQuad(dtype) : ""}
fn xQuad(i: u32) -> vec4<f32> { return vec4<f32>(arena[i], arena[i + 1u], arena[i + 2u], arena[i + 3u]); }

@compute @workgroup_size(8, 8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let tilesN = (p.N + ${TILE - 1}u) / ${TILE}u;
  let g = groupIndex(wg, nwg);
  let T = rowCount();
  let t = (g / tilesN) * ${TILE}u + lid.y * 4u;
  let n = (g % tilesN) * ${TILE}u + lid.x * 4u;
  let tc = min(vec4<u32>(t) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(T - 1u));
  let nc = min(vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.N - 1u));
  let xr = vec4<u32>(p.x) + tc * p.K;
  let wr = nc * p.K;
  var a0 = vec4<f32>(); var a1 = vec4<f32>(); var a2 = vec4<f32>(); var a3 = vec4<f32>();
  ${body}
  ${store}
}
`;
}

/** K elements per step of the shared-memory matrix-matrix kernel (one quantized block). */
export const SHARED_K = 32;
/** Quads (vec4) per padded row of a shared-memory tile: 8 quads of K and one of padding. */
const SHARED_ROW = SHARED_K / 4 + 1;
/** Invocations per workgroup of the shared-memory kernel (8 × 8). */
export const SHARED_INVOCATIONS = 64;
/** Workgroup memory of the shared-memory kernel in bytes: a 32-row tile of x and one of W. */
export const SHARED_BYTES = 2 * TILE * SHARED_ROW * 16;

/**
 * Matrix-matrix product through workgroup memory (prefill), the same contract as
 * {@link matmulTiledShader}: out (T, N) = x (T, K) · W (N, K)ᵀ, a 32×32 output tile per
 * workgroup of 8×8 invocations, 4×4 outputs each in registers. K is walked 32 at a time:
 * the 64 invocations stage a 32×32 tile of x and one of W (weights unpacked to f32 once,
 * by one invocation, instead of by each of the 8 that use them), a barrier, then each
 * invocation does 8 × 16 quad dot products from workgroup memory, and a second barrier.
 *
 * Invocation (i, j) owns rows t0 + j + 8r and columns n0 + i + 8c (r, c < 4), so adjacent
 * invocations read adjacent padded tile rows (9 quads apart: no bank conflicts on
 * GPUs) and write adjacent output columns. Edge tiles clamp their rows (and zero the
 * K tail), and skip their writes. `quad`: K is a multiple of 4, so staging loads whole
 * quads (`wQuad`, for quantized weights one block per tile row); else element by element.
 *
 * Kept simple for Mesa's lavapipe, which compiles a barrier as a coroutine suspension:
 * one loop with a dynamic bound (over K) holding both barriers, the staging unrolled in
 * the source, one constant-bound inner loop (the tile's 8 quads of K), and 16
 * accumulators as four `vec4`; each variant compiles there in about 1 s.
 * Workgroups: ceil(T / 32) × ceil(N / 32).
 */
export function matmulSharedShader(dtype: DType, quad: boolean): string {
  const four = [0, 1, 2, 3];
  const lane = "xyzw";
  // Staging: invocation l loads quad l % 8 of rows l / 8 + 8r of both tiles (r < 4).
  const load = (src: "x" | "w", r: number) => {
    const row = `${src}r${r}`;
    const value = quad
      ? `select(vec4<f32>(), ${src === "x" ? "xQuad" : "wQuad"}(${row} + k), k < p.K)`
      : `vec4<f32>(${four.map((e) => `${src}El(${row}, k + ${e}u)`).join(", ")})`;
    return `${src}s[(lr + ${8 * r}u) * ${SHARED_ROW}u + lq] = ${value};`;
  };
  const dots = four.map((r) => {
    const d = four.map((c) => `dot(x${r}, w${c})`).join(", ");
    return `a${r} += vec4<f32>(${d});`;
  }).join("\n      ");
  const store = four.map((r) =>
    `if (t0 + lid.y + ${8 * r}u < T) {
    let o = p.out + (t0 + lid.y + ${8 * r}u) * p.outN + n0 + lid.x;
    ${four.map((c) => `if (n0 + lid.x + ${8 * c}u < p.N) { arena[o + ${8 * c}u] = a${r}.${lane[c]}; }`).join("\n    ")}
  }`
  ).join("\n  ");
  return `
struct Params { rows: u32, x: u32, out: u32, K: u32, N: u32, wScale: u32, outN: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${weightAccess(dtype)}
${quad ? weightQuad(dtype) : ""}
fn xQuad(i: u32) -> vec4<f32> { return vec4<f32>(arena[i], arena[i + 1u], arena[i + 2u], arena[i + 3u]); }
// Element k of the row starting at o, 0 past K (reads clamped into the row).
fn xEl(o: u32, k: u32) -> f32 { return select(0.0, arena[o + min(k, p.K - 1u)], k < p.K); }
fn wEl(o: u32, k: u32) -> f32 { return select(0.0, wAt(o + min(k, p.K - 1u)), k < p.K); }
var<workgroup> xs: array<vec4<f32>, ${TILE * SHARED_ROW}>;
var<workgroup> ws: array<vec4<f32>, ${TILE * SHARED_ROW}>;

@compute @workgroup_size(8, 8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let tilesN = (p.N + ${TILE - 1}u) / ${TILE}u;
  let g = groupIndex(wg, nwg);
  let T = rowCount();
  let t0 = (g / tilesN) * ${TILE}u;
  let n0 = (g % tilesN) * ${TILE}u;
  // A spare workgroup of a two-dimensional grid returns as a whole (before any barrier).
  if (t0 >= T) { return; }
  let l = lid.y * 8u + lid.x;
  let lr = l / 8u;
  let lq = l % 8u;
  ${four.map((r) => `let xr${r} = p.x + min(t0 + lr + ${8 * r}u, T - 1u) * p.K;`).join("\n  ")}
  ${four.map((r) => `let wr${r} = min(n0 + lr + ${8 * r}u, p.N - 1u) * p.K;`).join("\n  ")}
  var a0 = vec4<f32>(); var a1 = vec4<f32>(); var a2 = vec4<f32>(); var a3 = vec4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += ${SHARED_K}u) {
    let k = k0 + lq * 4u;
    ${four.map((r) => load("x", r)).join("\n    ")}
    ${four.map((r) => load("w", r)).join("\n    ")}
    workgroupBarrier();
    for (var q = 0u; q < ${SHARED_K / 4}u; q++) {
      ${four.map((r) => `let x${r} = xs[(lid.y + ${8 * r}u) * ${SHARED_ROW}u + q];`).join(" ")}
      ${four.map((c) => `let w${c} = ws[(lid.x + ${8 * c}u) * ${SHARED_ROW}u + q];`).join(" ")}
      ${dots}
    }
    workgroupBarrier();
  }
  ${store}
}
`;
}

/** 2π / 2^32: radians per unit of the top word of a rope angle's turns. */
const TWO_PI_OVER_2_32 = (2 * Math.PI / 2 ** 32).toExponential(16);

/**
 * Rotate-half rotary embedding: one invocation per (token, head, i < headDim / 2), at
 * the token's own position `pos` (the index buffer at `p.positions`).
 *
 * The angle `pos × θ^(-2i/d)` is reduced modulo 2π exactly, in integers: the index
 * buffer holds at `p.turns` each frequency's turns per position (`θ^(-2i/d) / 2π`,
 * modulo 1) as a 64-bit binary fraction (two words, high first), computed in f64 on
 * the host ({@link ropeTurns}). `pos` times that fraction modulo 1 is exact in 32-bit
 * integer arithmetic; its top word, read as signed, is the angle in [-π, π) in units
 * of 2π / 2^32. So the error stays near f32 rounding (about 1e-7 rad) at any position,
 * where an f32 angle would lose about |angle| × 6e-8, and `cos`/`sin` run in [-π, π],
 * where WGSL bounds their error. Workgroups: ceil(T × heads × headDim / 2 / WG).
 */
export function ropeShader(): string {
  return `
struct Params { rows: u32, x: u32, out: u32, heads: u32, headDim: u32, positions: u32, turns: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${indexBuffer(3)}

// The high word of the 64-bit product a × b.
fn mulHi(a: u32, b: u32) -> u32 {
  let a0 = a & 0xffffu;
  let a1 = a >> 16u;
  let b0 = b & 0xffffu;
  let b1 = b >> 16u;
  let p01 = a0 * b1;
  let p10 = a1 * b0;
  let mid = ((a0 * b0) >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
  return a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let half = p.headDim / 2u;
  let idx = groupIndex(wg, nwg) * ${WG}u + lid.x;
  if (idx >= rowCount() * p.heads * half) { return; }
  let i = idx % half;
  let th = idx / half;
  let t = th / p.heads;
  let pos = bitcast<u32>(ix[p.positions + t]);
  // The top word of the fraction of pos × turns (u32 arithmetic wraps: that is the modulo).
  let turns = pos * bitcast<u32>(ix[p.turns + 2u * i]) + mulHi(pos, bitcast<u32>(ix[p.turns + 2u * i + 1u]));
  let a = f32(bitcast<i32>(turns)) * ${TWO_PI_OVER_2_32};
  let c = cos(a);
  let s = sin(a);
  let b = th * p.headDim + i;
  let x0 = arena[p.x + b];
  let x1 = arena[p.x + b + half];
  arena[p.out + b] = x0 * c - x1 * s;
  arena[p.out + b + half] = x1 * c + x0 * s;
}
`;
}

/**
 * The table {@link ropeShader} reads for `headDim` and `theta`: for each frequency
 * `i < headDim / 2`, `θ^(-2i/d) / 2π` modulo 1 as a 64-bit binary fraction, high word
 * then low word (as i32 bit patterns, for the index buffer). The frequency is the
 * reference's own f64 value.
 */
export function ropeTurns(headDim: number, theta: number): Int32Array {
  const half = headDim / 2;
  const words = new Uint32Array(2 * half);
  for (let i = 0; i < half; i++) {
    const perTurn = theta ** (-2 * i / headDim) / (2 * Math.PI);
    // Scaling by powers of two and taking the floor are exact in f64.
    const scaled = (perTurn - Math.floor(perTurn)) * 2 ** 32;
    let high = Math.floor(scaled);
    let low = Math.round((scaled - high) * 2 ** 32);
    if (low === 2 ** 32) [high, low] = [high + 1, 0];
    words[2 * i] = high % 2 ** 32;
    words[2 * i + 1] = low;
  }
  return new Int32Array(words.buffer);
}

/** Elementwise ops over T rows of `width`: `siluMul` or `add`. Workgroups: ceil(T × width / WG). */
export function elementwiseShader(kind: "siluMul" | "add"): string {
  const expr = kind === "add" ? "arena[p.a + i] + arena[p.b + i]" : "g / (1.0 + exp(-g)) * arena[p.b + i]";
  return `
struct Params { rows: u32, a: u32, b: u32, out: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = groupIndex(wg, nwg) * ${WG}u + lid.x;
  if (i >= rowCount() * p.width) { return; }
  let g = arena[p.a + i];
  arena[p.out + i] = ${expr};
}
`;
}

/**
 * out (R, D) = x rows picks (R): row r copies row `picks[r]` of x (the index buffer at
 * `p.picks`). Workgroups: R × ceil(D / WG).
 */
export function gatherRowsShader(): string {
  return `
struct Params { rows: u32, x: u32, out: u32, D: u32, picks: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${indexBuffer(3)}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let per = (p.D + ${WG - 1}u) / ${WG}u;
  let g = groupIndex(wg, nwg);
  let r = g / per;
  let d = (g % per) * ${WG}u + lid.x;
  if (r >= rowCount() || d >= p.D) { return; }
  arena[p.out + r * p.D + d] = arena[p.x + u32(ix[p.picks + r]) * p.D + d];
}
`;
}

/**
 * How the cache shaders store a KV cache element, as WGSL over words of the `kc`/`vc`
 * arrays. An f16 cache packs elements 2i and 2i + 1 into u32 word i with core
 * `pack2x16float` / `unpack2x16float` (the bytes of a little-endian f16 array), so the
 * optional `shader-f16` feature is not needed.
 */
interface CacheFormat {
  /** Cache elements per word. */
  readonly perWord: number;
  /**
   * The `kc`/`vc` bindings, `PER_WORD`, `packWord(src)` (the word of arena elements
   * `src ..`), `kWord(w)` (word `w` of the key cache in f32) and `vAt(i)` (element `i`
   * of the value cache in f32).
   */
  readonly wgsl: string;
  /** Suffixes that select the elements of a `kWord` value, in element order. */
  readonly keyElements: readonly string[];
}

const CACHE_FORMATS: Record<KvDType, CacheFormat> = {
  f32: {
    perWord: 1,
    keyElements: [""],
    wgsl: `
@group(0) @binding(3) var<storage, read_write> kc: array<f32>;
@group(0) @binding(4) var<storage, read_write> vc: array<f32>;
const PER_WORD = 1u;
fn packWord(src: u32) -> f32 { return arena[src]; }
fn kWord(w: u32) -> f32 { return kc[w]; }
fn vAt(i: u32) -> f32 { return vc[i]; }
`,
  },
  f16: {
    perWord: 2,
    keyElements: [".x", ".y"],
    wgsl: `
@group(0) @binding(3) var<storage, read_write> kc: array<u32>;
@group(0) @binding(4) var<storage, read_write> vc: array<u32>;
const PER_WORD = 2u;
fn packWord(src: u32) -> u32 { return pack2x16float(vec2<f32>(arena[src], arena[src + 1u])); }
fn kWord(w: u32) -> vec2<f32> { return unpack2x16float(kc[w]); }
fn vAt(i: u32) -> f32 { return unpack2x16float(vc[i >> 1u])[i & 1u]; }
`,
  },
};

/**
 * Cache elements per 4-byte word of a KV cache of `dtype` (rows of an f16 cache hold an
 * even number of elements, so a row is whole words).
 */
export function cacheElementsPerWord(dtype: KvDType): number {
  return CACHE_FORMATS[dtype].perWord;
}

/**
 * WGSL of the paged cache: the index buffer, and `cacheRow(pt, j)`, the pool row of
 * position `j` of the sequence whose page-table row starts at index `pt` (the `attention`
 * op's rule: `pages[s][j / pageSize] * pageSize + j % pageSize`). The shader's parameters
 * hold `pageSize`.
 */
const PAGED_CACHE = /* wgsl */ `
${indexBuffer(5)}
fn cacheRow(pt: u32, j: u32) -> u32 {
  return u32(ix[pt + j / p.pageSize]) * p.pageSize + j % p.pageSize;
}
`;

/**
 * Writes k and v (T, kvDim) to the pool: row t goes to the cache row of
 * (`seqOf[t]`, `positions[t]`) through the page table. One cache word per invocation
 * (a pair of elements for f16), so no two invocations write one word.
 * Workgroups: ceil(T × kvDim / {@link cacheElementsPerWord} / WG).
 */
export function kvWriteShader(dtype: KvDType): string {
  return `
struct Params {
  rows: u32, k: u32, v: u32, kvDim: u32, positions: u32, seqOf: u32, pages: u32, perSeq: u32, pageSize: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${CACHE_FORMATS[dtype].wgsl}
${PAGED_CACHE}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let words = p.kvDim / PER_WORD;
  let i = groupIndex(wg, nwg) * ${WG}u + lid.x;
  if (i >= rowCount() * words) { return; }
  let t = i / words;
  let pt = p.pages + u32(ix[p.seqOf + t]) * p.perSeq;
  let dst = cacheRow(pt, u32(ix[p.positions + t])) * words + i % words;
  kc[dst] = packWord(p.k + i * PER_WORD);
  vc[dst] = packWord(p.v + i * PER_WORD);
}
`;
}

/**
 * Fused causal attention with grouped-query heads over the paged pool, one workgroup
 * per (token, head), reading the cache (of `dtype`, summed in f32) after
 * {@link kvWriteShader} has run. A token attends over its own sequence's positions
 * `max(0, p - window + 1) .. p` (its position `p` and page-table row from the index
 * buffer). The positions are taken 64 at a time: each lane looks up one position's pool
 * row through the page table (once per position and workgroup: the row bases are shared
 * in workgroup memory for the value pass) and scores it, the workgroup reduces the
 * chunk's maximum and sum, and an online softmax rescales the running output, which the
 * lanes hold split by dimension. No score buffer, so any context length fits. An f16
 * cache halves the bytes read; keys are unpacked a word (two elements) at a time, summed
 * in the same order as f32 keys. A workgroup's work depends only on its own token, so a
 * token's output is the same whatever else shares the step. Workgroups: T × heads.
 */
export function attentionShader(headDim: number, dtype: KvDType): string {
  const perLane = Math.ceil(headDim / WG);
  const format = CACHE_FORMATS[dtype];
  // A key word's elements in order, so the dot product sums in the same order for every dtype.
  const keyDot = format.keyElements.map((el, e) => `dot += qs[d${e ? ` + ${e}u` : ""}] * kw${el};`).join(" ");
  return `
struct Params {
  rows: u32, q: u32, out: u32, heads: u32, kvHeads: u32, window: u32, scale: f32,
  positions: u32, seqOf: u32, pages: u32, perSeq: u32, pageSize: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
${HEADER}
${format.wgsl}
${PAGED_CACHE}
const HD = ${headDim}u;
var<workgroup> qs: array<f32, ${headDim}>;
var<workgroup> ps: array<f32, ${WG}>;
var<workgroup> red: array<f32, ${WG}>;
// Element index of each position's head in the cache (its pool row × kvDim + the kv head's offset).
var<workgroup> rb: array<u32, ${WG}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let g = groupIndex(wg, nwg);
  let t = g / p.heads;
  let h = g % p.heads;
  if (t >= rowCount()) { return; } // a spare workgroup of a two-dimensional grid
  let pp = u32(ix[p.positions + t]);
  let pt = p.pages + u32(ix[p.seqOf + t]) * p.perSeq;
  var start = 0u;
  if (p.window > 0u && pp + 1u > p.window) { start = pp + 1u - p.window; }
  let kvDim = p.kvHeads * HD;
  let kvo = (h / (p.heads / p.kvHeads)) * HD;
  let qo = p.q + (t * p.heads + h) * HD;
  for (var d = lid.x; d < HD; d += ${WG}u) { qs[d] = arena[qo + d]; }
  workgroupBarrier();
  var m = -3.0e38;
  var l = 0.0;
  var acc = array<f32, ${perLane}>();
  for (var j0 = start; j0 <= pp; j0 += ${WG}u) {
    let j = j0 + lid.x;
    var s = -3.0e38;
    var ko = 0u;
    if (j <= pp) {
      ko = cacheRow(pt, j) * kvDim + kvo;
      var dot = 0.0;
      for (var d = 0u; d < HD; d += PER_WORD) {
        let kw = kWord((ko + d) / PER_WORD);
        ${keyDot}
      }
      s = dot * p.scale;
    }
    red[lid.x] = s;
    rb[lid.x] = ko;
    workgroupBarrier();
    for (var k = ${WG / 2}u; k > 0u; k >>= 1u) {
      if (lid.x < k) { red[lid.x] = max(red[lid.x], red[lid.x + k]); }
      workgroupBarrier();
    }
    let mNew = max(m, red[0]);
    workgroupBarrier();
    var e = 0.0;
    if (j <= pp) { e = exp(s - mNew); }
    ps[lid.x] = e;
    red[lid.x] = e;
    workgroupBarrier();
    for (var k = ${WG / 2}u; k > 0u; k >>= 1u) {
      if (lid.x < k) { red[lid.x] += red[lid.x + k]; }
      workgroupBarrier();
    }
    let corr = exp(m - mNew);
    l = l * corr + red[0];
    m = mNew;
    let count = min(${WG}u, pp + 1u - j0);
    for (var r = 0u; r < ${perLane}u; r++) {
      let d = lid.x + r * ${WG}u;
      if (d < HD) {
        var a = acc[r] * corr;
        for (var jj = 0u; jj < count; jj++) { a += ps[jj] * vAt(rb[jj] + d); }
        acc[r] = a;
      }
    }
    workgroupBarrier();
  }
  for (var r = 0u; r < ${perLane}u; r++) {
    let d = lid.x + r * ${WG}u;
    if (d < HD) { arena[p.out + (t * p.heads + h) * HD + d] = acc[r] / l; }
  }
}
`;
}
