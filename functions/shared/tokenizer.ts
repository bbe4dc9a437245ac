/**
 * A byte-pair-encoding token counter for OpenAI's `o200k_base` and `cl100k_base` encodings that runs in
 * O(n log n) time, whatever the input.
 *
 * Why not js-tiktoken's `encode`: its merge loop rescans every pair after every merge, so one long pre-token (a
 * word without spaces, a run of punctuation or whitespace) costs time quadratic in its length — js-tiktoken 1.0.21
 * needs about 75 s for a 32,000-letter word, and even cutting such a word into 16-byte slices leaves it at 2.5 s
 * per megabyte. This counter keeps the same rank data (js-tiktoken's `ranks/*` files, loaded lazily) and the same
 * pre-tokenizing regular expression, and merges with a heap: lowest rank first, leftmost first on equal ranks,
 * which is the order tiktoken merges in, so counts are identical (tests compare it with js-tiktoken on a corpus).
 *
 * Special-token text such as `<|endoftext|>` is counted as plain text, never rejected.
 */
import type { TiktokenBPE } from "js-tiktoken/lite";

export type EncodingName = "o200k_base" | "cl100k_base";

/**
 * Pre-tokens longer than this many bytes are counted in slices of this size, which bounds the memory one piece
 * needs. Each cut can add about one token to the exact count (a merge across the cut is lost); a 1 MB single-word
 * prompt has 16 cuts.
 */
export const MAX_PIECE_BYTES = 64 * 1024;

/** Counts tokens of one encoding. Build it with `getTokenCounter`, which caches one per encoding. */
export class BpeTokenCounter {
  private readonly ranks: Map<string, number>;
  private readonly pattern: RegExp;
  private readonly maxTokenBytes: number;
  /** Ranks of every two-byte token, indexed by the two bytes: the first merges of a long piece skip the map. */
  private readonly pairRanks = new Int32Array(65536).fill(-1);

  constructor(data: TiktokenBPE) {
    this.ranks = new Map();
    let longest = 1;
    // The rank file is lines of "<marker> <first rank> <base64 token> <base64 token> …", ranks counting up.
    for (const line of data.bpe_ranks.split("\n")) {
      if (!line) continue;
      const fields = line.split(" ");
      const offset = Number.parseInt(fields[1], 10);
      for (let i = 2; i < fields.length; i++) {
        // Keys are "binary strings": one char per byte (latin1), so an ASCII piece is its own key.
        const key = Buffer.from(fields[i], "base64").toString("latin1");
        this.ranks.set(key, offset + i - 2);
        if (key.length > longest) longest = key.length;
        if (key.length === 2) this.pairRanks[(key.charCodeAt(0) << 8) | key.charCodeAt(1)] = offset + i - 2;
      }
    }
    this.maxTokenBytes = longest;
    this.pattern = new RegExp(data.pat_str, "gu");
  }

  /** Tokens in `text`, exactly as tiktoken encodes it (special tokens as plain text). */
  count(text: string): number {
    let tokens = 0;
    this.pattern.lastIndex = 0;
    for (const match of text.matchAll(this.pattern)) tokens += this.countPiece(match[0]);
    return tokens;
  }

  private countPiece(piece: string): number {
    // Fast paths: most pieces are ASCII words that are a token of their own.
    const bytes = NON_ASCII.test(piece) ? Buffer.from(piece, "utf8").toString("latin1") : piece;
    if (this.ranks.has(bytes)) return 1;
    if (bytes.length <= MAX_PIECE_BYTES) return this.mergeCount(bytes);
    let tokens = 0;
    for (let start = 0; start < bytes.length; start += MAX_PIECE_BYTES) tokens += this.mergeCount(bytes.slice(start, start + MAX_PIECE_BYTES));
    return tokens;
  }

  /** Parts left after merging `bytes` (a binary string) pair by pair, lowest rank first. */
  private mergeCount(bytes: string): number {
    const n = bytes.length;
    if (n <= 1) return n;
    // Parts are a linked list of start offsets; a part ends where the next one starts (or at n).
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    const alive = new Uint8Array(n).fill(1);
    // pairRank[i]: rank of the part starting at i merged with its right neighbour; -1 when that is no token.
    const pairRank = new Int32Array(n);
    const heap = new MinHeap(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1;
      prev[i] = i - 1;
    }
    for (let i = 0; i < n - 1; i++) {
      pairRank[i] = this.pairRanks[(bytes.charCodeAt(i) << 8) | bytes.charCodeAt(i + 1)];
      if (pairRank[i] >= 0) heap.push(pairRank[i], i);
    }
    pairRank[n - 1] = -1;
    let parts = n;
    while (heap.size > 0) {
      const rank = heap.topRank();
      const at = heap.topPosition();
      heap.pop();
      // Entries are never removed when a neighbour changes; a stale one no longer matches the current pair.
      if (!alive[at] || pairRank[at] !== rank) continue;
      const right = next[at];
      alive[right] = 0;
      next[at] = next[right];
      if (next[at] < n) prev[next[at]] = at;
      parts -= 1;
      pairRank[at] = next[at] < n ? this.rankOf(bytes, at, next[next[at]] ?? n) : -1;
      if (pairRank[at] >= 0) heap.push(pairRank[at], at);
      const left = prev[at];
      if (left >= 0) {
        pairRank[left] = this.rankOf(bytes, left, next[at]);
        if (pairRank[left] >= 0) heap.push(pairRank[left], left);
      }
    }
    return parts;
  }

  private rankOf(bytes: string, start: number, end: number): number {
    if (end - start > this.maxTokenBytes) return -1;
    return this.ranks.get(bytes.slice(start, end)) ?? -1;
  }
}

const NON_ASCII = /[^\x00-\x7f]/;

/** A binary min-heap of (rank, position) pairs ordered by rank, then position: tiktoken's merge order. */
class MinHeap {
  private readonly keys: Float64Array;
  size = 0;

  constructor(capacity: number) {
    // A piece of n bytes pushes at most n - 1 initial pairs plus two per merge (at most n - 1 merges).
    this.keys = new Float64Array(Math.max(4, 3 * capacity));
  }

  /** Ranks are below 2^18 and positions below 2^17 (MAX_PIECE_BYTES), so one double holds both exactly. */
  push(rank: number, position: number): void {
    const key = rank * POSITION_RANGE + position;
    let i = this.size++;
    const keys = this.keys;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (keys[parent] <= key) break;
      keys[i] = keys[parent];
      i = parent;
    }
    keys[i] = key;
  }

  topRank(): number {
    return Math.floor(this.keys[0] / POSITION_RANGE);
  }

  topPosition(): number {
    return this.keys[0] % POSITION_RANGE;
  }

  pop(): void {
    const keys = this.keys;
    const last = keys[--this.size];
    let i = 0;
    for (;;) {
      const left = 2 * i + 1;
      if (left >= this.size) break;
      const right = left + 1;
      const child = right < this.size && keys[right] < keys[left] ? right : left;
      if (keys[child] >= last) break;
      keys[i] = keys[child];
      i = child;
    }
    keys[i] = last;
  }
}

const POSITION_RANGE = 2 ** 20;

const counters = new Map<EncodingName, BpeTokenCounter>();

/**
 * The counter for an encoding, built on first use. The ranks are megabytes of data, so they are required lazily
 * (and kept out of the function bundle by the build): cold starts that never need an estimate never pay for them.
 */
export function getTokenCounter(encoding: EncodingName): BpeTokenCounter {
  let counter = counters.get(encoding);
  if (!counter) {
    const ranks: TiktokenBPE =
      encoding === "cl100k_base" ? require("js-tiktoken/ranks/cl100k_base") : require("js-tiktoken/ranks/o200k_base");
    counter = new BpeTokenCounter((ranks as { default?: TiktokenBPE }).default ?? ranks);
    counters.set(encoding, counter);
  }
  return counter;
}

/** Tokens in `text` for `encoding`: exact, O(n log n). */
export function countTokens(text: string, encoding: EncodingName): number {
  return text ? getTokenCounter(encoding).count(text) : 0;
}
