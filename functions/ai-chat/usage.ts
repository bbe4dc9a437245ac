import { isRecord } from "./config";
import type { ChatMessage } from "./validate";
import { stringifyJson } from "../shared/json";
import { countTokens, type EncodingName } from "../shared/tokenizer";

export { countTokens, type EncodingName };

/**
 * Validated token counts: non-negative safe integers, `total_tokens` always recomputed as prompt + completion.
 * `cached_tokens` (part of the prompt) and `reasoning_tokens` (part of the completion) are set only when the
 * upstream reported them; pricing uses them, meters may show them.
 */
export interface TokenUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  cached_tokens?: number;
  reasoning_tokens?: number;
}

/** Zero usage: what a request that produced no completion is metered at. */
export const NO_USAGE: TokenUsage = Object.freeze({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });

/**
 * The largest count accepted from an upstream. No model reads or writes a billion tokens in one request, so a
 * larger figure is a broken upstream (and would overflow the cost arithmetic), and the usage is estimated instead.
 */
export const MAX_REPORTED_TOKENS = 1_000_000_000;

/**
 * Reads `usage` from an upstream chat-completion body. Undefined when it is absent or not usable: both counts must
 * be integers in 0…MAX_REPORTED_TOKENS (strings, negatives, fractions are refused). The reported `total_tokens` is
 * ignored and recomputed, so a `total_tokens: 0` next to non-zero parts cannot make a meter bill zero. Cached and
 * reasoning tokens are kept only when valid and not larger than the count they are part of.
 */
export function extractUsage(body: unknown): TokenUsage | undefined {
  if (!isRecord(body) || !isRecord(body.usage)) return undefined;
  return readUsageCounts(body.usage, USAGE_FIELDS_CHAT);
}

/** Where one API reports its counts in its `usage` object. */
export interface UsageFields {
  prompt: string;
  completion: string;
  /** The details object holding `cached_tokens`, and the one holding `reasoning_tokens`. */
  promptDetails: string;
  completionDetails: string;
}

/** Chat Completions: `prompt_tokens`, `completion_tokens`, `*_tokens_details`. */
export const USAGE_FIELDS_CHAT: UsageFields = { prompt: "prompt_tokens", completion: "completion_tokens", promptDetails: "prompt_tokens_details", completionDetails: "completion_tokens_details" };
/** Responses API: `input_tokens`, `output_tokens`, `input_tokens_details`, `output_tokens_details`. */
export const USAGE_FIELDS_RESPONSES: UsageFields = { prompt: "input_tokens", completion: "output_tokens", promptDetails: "input_tokens_details", completionDetails: "output_tokens_details" };

/**
 * Reads validated counts from a `usage` object (the rules of `extractUsage`): both counts integers in
 * 0…MAX_REPORTED_TOKENS, total recomputed, cached and reasoning tokens kept only when valid and within their part.
 */
export function readUsageCounts(usage: Record<string, unknown>, fields: UsageFields): TokenUsage | undefined {
  const prompt = usage[fields.prompt];
  const completion = usage[fields.completion];
  if (!isCount(prompt) || !isCount(completion)) return undefined;
  const result: TokenUsage = { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
  const promptDetails = usage[fields.promptDetails];
  const cached = isRecord(promptDetails) ? promptDetails.cached_tokens : undefined;
  if (isCount(cached) && cached <= prompt) result.cached_tokens = cached;
  const completionDetails = usage[fields.completionDetails];
  const reasoning = isRecord(completionDetails) ? completionDetails.reasoning_tokens : undefined;
  if (isCount(reasoning) && reasoning <= completion) result.reasoning_tokens = reasoning;
  return result;
}

/** Longest token of o200k_base and cl100k_base, in bytes: no text can be fewer tokens than its bytes / this. */
export const MAX_TOKEN_BYTES = 128;

/**
 * Whether reported usage can be true of a completion whose text is `completionBytes` long: an upstream that reports
 * 0 (or 1) completion tokens for a long answer, or 0 prompt tokens, is not believed, and the usage is estimated
 * instead. The bound is loose on purpose (a token is at most 128 bytes), so honest counts from other tokenizers pass.
 */
export function isPlausibleUsage(usage: TokenUsage, completionBytes: number): boolean {
  if (usage.prompt_tokens === 0) return false;
  return usage.completion_tokens >= Math.ceil(completionBytes / MAX_TOKEN_BYTES);
}

/** Bytes of the text of a completion's choices (content, refusal, tool-call arguments): for `isPlausibleUsage`. */
export function completionTextBytes(body: unknown): number {
  if (!isRecord(body) || !Array.isArray(body.choices)) return 0;
  let bytes = 0;
  for (const choice of body.choices) {
    if (!isRecord(choice) || !isRecord(choice.message)) continue;
    const message = choice.message;
    for (const field of ["content", "refusal"]) if (typeof message[field] === "string") bytes += Buffer.byteLength(message[field] as string, "utf8");
    if (Array.isArray(message.tool_calls)) {
      for (const call of message.tool_calls) {
        if (isRecord(call) && isRecord(call.function) && typeof call.function.arguments === "string") bytes += Buffer.byteLength(call.function.arguments, "utf8");
      }
    }
  }
  return bytes;
}

/** A token count an upstream may report: a safe integer in 0…MAX_REPORTED_TOKENS (no strings, fractions, negatives). */
export function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0 && value <= MAX_REPORTED_TOKENS;
}

/** The encoding OpenAI uses for a model; newer and unknown models use o200k_base. */
export function encodingForModel(model: string): EncodingName {
  const name = model.toLowerCase().replace(/^.*\//, "");
  if (/^(gpt-4(?!o|\.[1-9])|gpt-3\.5|text-embedding-3|text-embedding-ada)/.test(name)) return "cl100k_base";
  return "o200k_base";
}

/**
 * UTF-8 bytes one estimate tokenizes exactly. Text beyond it (only reachable with a raised MAX_REQUEST_BYTES or
 * an answer of several megabytes) is counted at the token-per-byte ratio of the text counted so far, never below
 * one token per 4 bytes. This bounds the time of one estimate to about a second.
 */
export const ESTIMATE_EXACT_BYTES = 2 * 1024 * 1024;

/** Counts text for one estimate, exactly up to a byte budget and by ratio beyond it. */
export class TokenTally {
  private exactBytesLeft: number;
  private countedBytes = 0;
  private countedTokens = 0;

  constructor(readonly encoding: EncodingName, budgetBytes = ESTIMATE_EXACT_BYTES) {
    this.exactBytesLeft = budgetBytes;
  }

  count(text: string): number {
    if (!text) return 0;
    const bytes = Buffer.byteLength(text, "utf8");
    if (bytes <= this.exactBytesLeft) return this.exact(text, bytes);
    // The head is the budget's worth of bytes, cut back to a character boundary (never inside a UTF-8 sequence).
    const utf8 = Buffer.from(text, "utf8");
    let headBytes = this.exactBytesLeft;
    while (headBytes > 0 && (utf8[headBytes] & 0xc0) === 0x80) headBytes -= 1;
    let tokens = headBytes > 0 ? this.exact(utf8.toString("utf8", 0, headBytes), headBytes) : 0;
    const rest = bytes - headBytes;
    const byRatio = this.countedBytes > 0 ? Math.ceil((rest * this.countedTokens) / this.countedBytes) : 0;
    tokens += Math.max(byRatio, Math.ceil(rest / 4));
    this.exactBytesLeft = 0;
    return tokens;
  }

  private exact(text: string, bytes: number): number {
    const tokens = countTokens(text, this.encoding);
    this.exactBytesLeft -= bytes;
    this.countedBytes += bytes;
    this.countedTokens += tokens;
    return tokens;
  }
}

/** What the prompt side of an estimate reads from a chat-completions request. */
export interface EstimatedRequest {
  messages: ChatMessage[];
  tools?: unknown;
  functions?: unknown;
  tool_choice?: unknown;
  response_format?: unknown;
  [field: string]: unknown;
}

/**
 * Prompt tokens of the messages as OpenAI counts them for chat models: 3 tokens of overhead per message, 1 more
 * when a message has a `name`, and 3 that prime the assistant's reply (OpenAI cookbook, "How to count tokens with
 * tiktoken"). Content parts: text and refusals as text, images by OpenAI's vision rules (`imageTokens`), audio and
 * files by the conservative figures below, unknown part types as their JSON. Tool calls in assistant messages
 * count as their JSON.
 */
export function estimatePromptTokens(messages: ChatMessage[], model: string, tally = new TokenTally(encodingForModel(model))): number {
  let tokens = 3;
  for (const message of messages) {
    if (!isRecord(message)) continue;
    tokens += 3 + tally.count(typeof message.role === "string" ? message.role : "");
    tokens += contentTokens(message.content, model, tally);
    if (typeof message.name === "string") tokens += 1 + tally.count(message.name);
    if (message.tool_calls !== undefined) tokens += tally.count(stringifyJson(message.tool_calls));
    if (message.function_call !== undefined) tokens += tally.count(stringifyJson(message.function_call));
  }
  return tokens;
}

/** Per-function overheads from OpenAI's cookbook ("Counting tokens for chat completions with tool calls", gpt-4o). */
export const TOKENS_PER_TOOL = 7;
export const TOKENS_PER_TOOL_LIST = 12;

/**
 * Prompt tokens of a whole request: the messages, plus what OpenAI also feeds the model. Tool (and legacy
 * `functions`) definitions count as the tokens of each definition's compact JSON plus 7 per tool and 12 per list —
 * the cookbook's overheads around a JSON rendering, which counts a few more tokens than OpenAI's internal
 * TypeScript-like rendering (quotes and braces), never the 8 tokens a 180 KB schema used to count. A non-text
 * `response_format` (a JSON schema) and an object `tool_choice` count as their JSON.
 */
export function estimateRequestTokens(request: EstimatedRequest, model: string, tally = new TokenTally(encodingForModel(model))): number {
  let tokens = estimatePromptTokens(Array.isArray(request.messages) ? request.messages : [], model, tally);
  tokens += estimateToolTokens(request, tally);
  if (isRecord(request.response_format) && request.response_format.type !== "text") tokens += tally.count(stringifyJson(request.response_format));
  return tokens;
}

/**
 * Tokens of a request's tool definitions (`tools`, legacy `functions`) and an object `tool_choice`, counted as
 * `estimateRequestTokens` describes. A Chat Completions tool wraps its definition in `function`; a Responses API
 * function tool is flat (`{type, name, parameters}`) and counts whole.
 */
export function estimateToolTokens(request: { tools?: unknown; functions?: unknown; tool_choice?: unknown }, tally: TokenTally): number {
  let tokens = 0;
  for (const list of [request.tools, request.functions]) {
    if (!Array.isArray(list) || list.length === 0) continue;
    tokens += TOKENS_PER_TOOL_LIST;
    for (const tool of list) {
      const definition = isRecord(tool) && isRecord(tool.function) ? tool.function : tool;
      tokens += TOKENS_PER_TOOL + tally.count(stringifyJson(definition));
    }
  }
  if (isRecord(request.tool_choice)) tokens += tally.count(stringifyJson(request.tool_choice));
  return tokens;
}

function contentTokens(content: unknown, model: string, tally: TokenTally): number {
  if (typeof content === "string") return tally.count(content);
  if (!Array.isArray(content)) return 0;
  let tokens = 0;
  for (const part of content) {
    if (!isRecord(part)) continue;
    // The part's type decides, so a `"text": ""` added to an image or audio part cannot make it count as nothing.
    if (part.type === "image_url") tokens += imageTokens(part.image_url, model);
    else if (part.type === "input_audio") tokens += audioTokens(part.input_audio);
    else if (part.type === "file") tokens += fileTokens(part.file, model);
    else if (typeof part.text === "string") tokens += tally.count(part.text);
    else if (typeof part.refusal === "string") tokens += tally.count(part.refusal);
    else tokens += tally.count(stringifyJson(part));
  }
  return tokens;
}

/**
 * Completion tokens of every choice's message: content, refusal, reasoning text (`reasoning_content` /
 * `reasoning`, as vLLM and DeepSeek return it), an audio transcript, and tool calls (name and arguments; arguments
 * that are not a string count as their JSON).
 */
export function estimateCompletionTokens(body: unknown, model: string, tally = new TokenTally(encodingForModel(model))): number {
  if (!isRecord(body) || !Array.isArray(body.choices)) return 0;
  let tokens = 0;
  for (const choice of body.choices) {
    if (!isRecord(choice) || !isRecord(choice.message)) continue;
    const message = choice.message;
    tokens += contentTokens(message.content, model, tally);
    for (const field of ["refusal", "reasoning_content", "reasoning"]) {
      if (typeof message[field] === "string") tokens += tally.count(message[field] as string);
    }
    if (isRecord(message.audio) && typeof message.audio.transcript === "string") tokens += tally.count(message.audio.transcript);
    const calls: unknown[] = Array.isArray(message.tool_calls) ? [...message.tool_calls] : [];
    if (message.function_call !== undefined) calls.push({ function: message.function_call });
    for (const call of calls) {
      if (!isRecord(call) || !isRecord(call.function)) {
        tokens += tally.count(stringifyJson(call));
        continue;
      }
      const { name, arguments: args } = call.function;
      tokens += tally.count(typeof name === "string" ? name : stringifyJson(name ?? ""));
      tokens += tally.count(typeof args === "string" ? args : stringifyJson(args ?? ""));
    }
  }
  return tokens;
}

/**
 * Usage of a request and its answer when the upstream did not report it: prompt by `estimateRequestTokens`,
 * completion by `estimateCompletionTokens`, one byte budget for both.
 */
export function estimateUsage(request: EstimatedRequest, responseBody: unknown, model: string): TokenUsage {
  const tally = new TokenTally(encodingForModel(model));
  const prompt = estimateRequestTokens(request, model, tally);
  const completion = estimateCompletionTokens(responseBody, model, tally);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

// ---------------------------------------------------------------------------------------------------------------
// Images, audio, files

/**
 * How a model family prices images (OpenAI, "Images and vision" guide, "Calculating costs"): tile models cost
 * `base` plus `tile` per 512 px tile after scaling; patch models cost one token per 32 px patch (at most 1536)
 * times a multiplier.
 */
type VisionRule = { kind: "tile"; base: number; tile: number } | { kind: "patch"; percent: number };

export function visionRule(model: string): VisionRule {
  const name = model.toLowerCase().replace(/^.*\//, "");
  if (/^(gpt-5-mini|gpt-4\.1-mini)/.test(name)) return { kind: "patch", percent: 162 };
  if (/^(gpt-5-nano|gpt-4\.1-nano)/.test(name)) return { kind: "patch", percent: 246 };
  if (/^o4-mini/.test(name)) return { kind: "patch", percent: 172 };
  if (/^gpt-4o-mini/.test(name)) return { kind: "tile", base: 2833, tile: 5667 };
  if (/^(o1|o3)/.test(name)) return { kind: "tile", base: 75, tile: 150 };
  if (/^gpt-5/.test(name)) return { kind: "tile", base: 70, tile: 140 };
  if (/^computer-use/.test(name)) return { kind: "tile", base: 65, tile: 129 };
  return { kind: "tile", base: 85, tile: 170 };
}

/** The most 512 px tiles an image can need after OpenAI's scaling (fit 2048 × 2048, shortest side 768): 768 × 2048. */
export const MAX_IMAGE_TILES = 8;
export const MAX_IMAGE_PATCHES = 1536;

/**
 * Tokens of one `image_url` part. `detail: "low"` is the base figure of tile models. Otherwise (`high`, `auto`,
 * absent) the image's size decides: it is read from the header of a `data:` URL (PNG, JPEG, GIF, WebP); for a
 * remote URL or an unreadable image, the largest figure the model can charge (8 tiles, or 1536 patches) is used.
 */
export function imageTokens(image: unknown, model: string): number {
  const url = typeof image === "string" ? image : isRecord(image) && typeof image.url === "string" ? image.url : "";
  const detail = isRecord(image) && typeof image.detail === "string" ? image.detail : "auto";
  const size = url.startsWith("data:") ? imageSize(decodeDataUrlPrefix(url, 256 * 1024)) : undefined;
  const rule = visionRule(model);
  if (rule.kind === "patch") {
    const patches = size ? Math.min(Math.ceil(size.width / 32) * Math.ceil(size.height / 32), MAX_IMAGE_PATCHES) : MAX_IMAGE_PATCHES;
    return Math.ceil((patches * rule.percent) / 100);
  }
  if (detail === "low") return rule.base;
  if (!size) return rule.base + rule.tile * MAX_IMAGE_TILES;
  let { width, height } = size;
  const fit = Math.min(1, 2048 / Math.max(width, height));
  width *= fit;
  height *= fit;
  const shorten = Math.min(1, 768 / Math.min(width, height));
  width *= shorten;
  height *= shorten;
  return rule.base + rule.tile * Math.ceil(width / 512) * Math.ceil(height / 512);
}

/** Audio is about 10 tokens per second (OpenAI Realtime guide: user audio is one token per 100 ms). */
export const AUDIO_TOKENS_PER_SECOND = 10;
/** Bytes per second assumed for compressed audio: 32 kbit/s, the low end, so the duration is not underestimated. */
export const COMPRESSED_AUDIO_BYTES_PER_SECOND = 4000;

/** Tokens of an `input_audio` part: its duration (from the WAV header, else size at 32 kbit/s) at 10 per second. */
export function audioTokens(audio: unknown): number {
  if (!isRecord(audio) || typeof audio.data !== "string") return 0;
  const bytes = base64Bytes(audio.data);
  const header = decodeBase64Prefix(audio.data, 4096);
  const byteRate = wavByteRate(header);
  const seconds = bytes / (byteRate ?? COMPRESSED_AUDIO_BYTES_PER_SECOND);
  return Math.ceil(seconds * AUDIO_TOKENS_PER_SECOND);
}

/**
 * Tokens of a `file` part (a PDF): the file's size at one token per 4 bytes when its data is inline, which is
 * deliberately high; a file referenced by id counts as one page, i.e. the model's largest image figure.
 */
export function fileTokens(file: unknown, model: string): number {
  if (!isRecord(file)) return 0;
  if (typeof file.file_data === "string") {
    const data = file.file_data.startsWith("data:") ? file.file_data.slice(file.file_data.indexOf(",") + 1) : file.file_data;
    return Math.ceil(base64Bytes(data) / 4);
  }
  return imageTokens(undefined, model);
}

function base64Bytes(data: string): number {
  const trimmed = data.replace(/=+$/, "");
  return Math.floor((trimmed.length * 3) / 4);
}

function decodeBase64Prefix(data: string, maxBytes: number): Buffer {
  const chars = Math.ceil(maxBytes / 3) * 4;
  return Buffer.from(data.slice(0, chars), "base64");
}

function decodeDataUrlPrefix(url: string, maxBytes: number): Buffer {
  const comma = url.indexOf(",");
  if (comma < 0 || !/;base64$/i.test(url.slice(0, comma))) return Buffer.alloc(0);
  return decodeBase64Prefix(url.slice(comma + 1), maxBytes);
}

/** Width and height from a PNG, GIF, JPEG or WebP header; undefined when the bytes are none of these. */
export function imageSize(bytes: Buffer): { width: number; height: number } | undefined {
  const size = readImageSize(bytes);
  if (!size || size.width < 1 || size.height < 1 || size.width > 100_000 || size.height > 100_000) return undefined;
  return size;
}

function readImageSize(b: Buffer): { width: number; height: number } | undefined {
  if (b.length >= 24 && b.readUInt32BE(0) === 0x89504e47 && b.toString("latin1", 12, 16) === "IHDR") {
    return { width: b.readUInt32BE(16), height: b.readUInt32BE(20) };
  }
  if (b.length >= 10 && /^GIF8[79]a$/.test(b.toString("latin1", 0, 6))) return { width: b.readUInt16LE(6), height: b.readUInt16LE(8) };
  if (b.length >= 30 && b.toString("latin1", 0, 4) === "RIFF" && b.toString("latin1", 8, 12) === "WEBP") {
    const chunk = b.toString("latin1", 12, 16);
    if (chunk === "VP8X") return { width: 1 + b.readUIntLE(24, 3), height: 1 + b.readUIntLE(27, 3) };
    if (chunk === "VP8L") return { width: 1 + (((b[22] & 0x3f) << 8) | b[21]), height: 1 + (((b[24] & 0x0f) << 10) | (b[23] << 2) | ((b[22] & 0xc0) >> 6)) };
    if (chunk === "VP8 ") return { width: b.readUInt16LE(26) & 0x3fff, height: b.readUInt16LE(28) & 0x3fff };
    return undefined;
  }
  if (b.length >= 4 && b[0] === 0xff && b[1] === 0xd8) {
    // Walk the JPEG segments to the first start-of-frame marker (SOF0-SOF15 except DHT, JPG and DAC).
    let at = 2;
    while (at + 9 < b.length) {
      if (b[at] !== 0xff) return undefined;
      const marker = b[at + 1];
      if (marker === 0xff) {
        at += 1;
        continue;
      }
      if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
        return { width: b.readUInt16BE(at + 7), height: b.readUInt16BE(at + 5) };
      }
      if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) at += 2;
      else at += 2 + b.readUInt16BE(at + 2);
    }
  }
  return undefined;
}

/** 8 kHz mono 8-bit, the lowest rate a WAV file plausibly has. */
const MIN_PCM_BYTES_PER_SECOND = 8_000;
/** 192 kHz stereo 16-bit, the highest rate counted: a header claiming more is counted at this rate. */
const MAX_PCM_BYTES_PER_SECOND = 768_000;

/** Bytes per second of a WAV file, from its `fmt ` chunk; undefined for anything else. */
function wavByteRate(b: Buffer): number | undefined {
  if (b.length < 12 || b.toString("latin1", 0, 4) !== "RIFF" || b.toString("latin1", 8, 12) !== "WAVE") return undefined;
  let at = 12;
  while (at + 8 <= b.length) {
    const id = b.toString("latin1", at, at + 4);
    const length = b.readUInt32LE(at + 4);
    if (id === "fmt " && at + 24 <= b.length) {
      // The header's own byte-rate field can claim anything; compute it from the sample rate and the block size
      // (bytes per sample frame) and keep it within what PCM audio can be, so a lying header cannot make minutes of
      // audio count as a few tokens.
      const sampleRate = b.readUInt32LE(at + 12);
      const blockAlign = b.readUInt16LE(at + 20);
      const rate = sampleRate * blockAlign;
      return rate > 0 ? Math.min(Math.max(rate, MIN_PCM_BYTES_PER_SECOND), MAX_PCM_BYTES_PER_SECOND) : undefined;
    }
    at += 8 + length + (length % 2);
  }
  return undefined;
}
