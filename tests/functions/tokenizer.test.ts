import { expect } from "chai";
import { Tiktoken, type TiktokenBPE } from "js-tiktoken/lite";
import { MAX_PIECE_BYTES, countTokens, type EncodingName } from "../../functions/shared/tokenizer";

/** js-tiktoken itself, the reference the counter must agree with (only on inputs it finishes quickly). */
const reference: Record<EncodingName, Tiktoken> = {
  o200k_base: new Tiktoken(require("js-tiktoken/ranks/o200k_base") as TiktokenBPE),
  cl100k_base: new Tiktoken(require("js-tiktoken/ranks/cl100k_base") as TiktokenBPE),
};

/** A deterministic mix of ASCII, Cyrillic, CJK, emoji, combining marks and whitespace. */
function corpus(): string[] {
  let seed = 20240611;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  const fixed = [
    "Hello world! This is a test.",
    "  leading spaces\n\n\ttabs\r\n  trailing  ",
    "日本語のテキストです。中文文本。한국어",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "function foo(x) { return x * 2; } // code\n",
    "don't can't they're I'LL WE'VE",
    "<|endoftext|> and <|endofprompt|> as text",
    "1234567890123 3.14159 1e10",
    "e\u0301\u0301 ÀÉÎÕÜ ñ ß Ω Ж",
    "lone surrogate \ud800 here",
    "a".repeat(2000),
    "ab".repeat(700),
    "!?".repeat(300),
    " ".repeat(500) + "x",
    "https://example.com/path?query=1&other=2#frag",
  ];
  for (let i = 0; i < 150; i++) {
    let text = "";
    const length = Math.floor(random() * 400);
    for (let j = 0; j < length; j++) {
      const r = random();
      if (r < 0.55) text += String.fromCharCode(32 + Math.floor(random() * 95));
      else if (r < 0.7) text += String.fromCharCode(0x400 + Math.floor(random() * 0x100));
      else if (r < 0.8) text += String.fromCharCode(0x4e00 + Math.floor(random() * 0x500));
      else if (r < 0.88) text += String.fromCodePoint(0x1f300 + Math.floor(random() * 400));
      else text += " \n\t\r"[Math.floor(random() * 4)];
    }
    fixed.push(text);
  }
  return fixed;
}

describe("countTokens (O(n log n) byte-pair counter)", () => {
  for (const encoding of ["o200k_base", "cl100k_base"] as const) {
    it(`agrees with js-tiktoken on a mixed corpus in ${encoding}`, () => {
      const mismatches = corpus()
        .map((text) => ({ text, expected: reference[encoding].encode(text, [], []).length, actual: countTokens(text, encoding) }))
        .filter((r) => r.expected !== r.actual)
        .map((r) => `${JSON.stringify(r.text.slice(0, 40))}: ${r.actual} ≠ ${r.expected}`);
      expect(mismatches).to.deep.equal([]);
    });
  }

  it("counts empty text as zero", () => {
    expect(countTokens("", "o200k_base")).to.equal(0);
  });

  it("counts long single pre-tokens that js-tiktoken takes minutes for", () => {
    // Each input is one pre-token of a megabyte: a word, whitespace, punctuation.
    for (const [unit, perToken] of [["a", 8], ["!", 16]] as const) {
      expect(countTokens(unit.repeat(1024 * 1024), "o200k_base")).to.equal((1024 * 1024) / perToken);
    }
    expect(countTokens(" ".repeat(1024 * 1024), "o200k_base")).to.be.within(1, (1024 * 1024) / 64);
    expect(countTokens("語".repeat(200_000), "cl100k_base")).to.be.greaterThan(100_000);
  });

  it("cuts a pre-token only every MAX_PIECE_BYTES, adding at most one token per cut", () => {
    const text = "xq".repeat(MAX_PIECE_BYTES * 2);
    const slice = countTokens("xq".repeat(MAX_PIECE_BYTES / 2), "o200k_base");
    expect(countTokens(text, "o200k_base")).to.be.within(4 * slice - 4, 4 * slice);
  });
});
