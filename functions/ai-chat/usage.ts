import { Tiktoken } from "js-tiktoken/lite";
import type { TiktokenBPE } from "js-tiktoken/lite";
import { isRecord } from "./config";
import type { ChatMessage } from "./validate";

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

/** Reads `usage` from an upstream chat-completion body; undefined when absent or malformed. */
export function extractUsage(body: unknown): TokenUsage | undefined {
  if (!isRecord(body) || !isRecord(body.usage)) return undefined;
  const { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total } = body.usage;
  if (!isCount(prompt) || !isCount(completion)) return undefined;
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: isCount(total) ? total : prompt + completion };
}

function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= 0;
}

export type EncodingName = "o200k_base" | "cl100k_base";

/** The encoding OpenAI uses for a model; newer and unknown models use o200k_base. */
export function encodingForModel(model: string): EncodingName {
  const name = model.toLowerCase().replace(/^.*\//, "");
  if (/^(gpt-4(?!o|\.[1-9])|gpt-3\.5|text-embedding-3|text-embedding-ada)/.test(name)) return "cl100k_base";
  return "o200k_base";
}

const encoders = new Map<EncodingName, Tiktoken>();

/**
 * Loads an encoder on first use. The ranks are megabytes of data, so they are required lazily (and kept out of the
 * function bundle by the build): cold starts that never need an estimate never pay for them.
 */
export function getEncoder(encoding: EncodingName): Tiktoken {
  let encoder = encoders.get(encoding);
  if (!encoder) {
    const ranks: TiktokenBPE =
      encoding === "cl100k_base" ? require("js-tiktoken/ranks/cl100k_base") : require("js-tiktoken/ranks/o200k_base");
    encoder = new Tiktoken((ranks as { default?: TiktokenBPE }).default ?? ranks);
    encoders.set(encoding, encoder);
  }
  return encoder;
}

/** Special-token strings such as `<|endoftext|>` in user text are counted as plain text, never rejected. */
export function countTokens(text: string, encoding: EncodingName): number {
  return text ? getEncoder(encoding).encode(text, [], []).length : 0;
}

/** Text of a message's content: a string, or the text parts of a content array. */
function contentText(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content
    .map((part) => (isRecord(part) && typeof part.text === "string" ? part.text : isRecord(part) && typeof part.refusal === "string" ? part.refusal : ""))
    .join("");
}

/**
 * Prompt tokens as OpenAI counts them for chat models: 3 tokens of overhead per message, 1 more when a message has a
 * `name`, and 3 that prime the assistant's reply (OpenAI cookbook, "How to count tokens with tiktoken").
 * Images and audio parts are not counted, so this is a lower bound for multimodal prompts.
 */
export function estimatePromptTokens(messages: ChatMessage[], model: string): number {
  const encoding = encodingForModel(model);
  let tokens = 3;
  for (const message of messages) {
    tokens += 3 + countTokens(message.role, encoding) + countTokens(contentText(message.content), encoding);
    if (typeof message.name === "string") tokens += 1 + countTokens(message.name, encoding);
    if (message.tool_calls !== undefined) tokens += countTokens(JSON.stringify(message.tool_calls), encoding);
  }
  return tokens;
}

/** Completion tokens of every choice's message: content, refusal and tool-call arguments. */
export function estimateCompletionTokens(body: unknown, model: string): number {
  if (!isRecord(body) || !Array.isArray(body.choices)) return 0;
  const encoding = encodingForModel(model);
  let tokens = 0;
  for (const choice of body.choices) {
    if (!isRecord(choice) || !isRecord(choice.message)) continue;
    const message = choice.message;
    tokens += countTokens(contentText(message.content), encoding);
    if (typeof message.refusal === "string") tokens += countTokens(message.refusal, encoding);
    if (Array.isArray(message.tool_calls)) {
      for (const call of message.tool_calls) {
        if (isRecord(call) && isRecord(call.function)) {
          tokens += countTokens(String(call.function.name ?? ""), encoding) + countTokens(String(call.function.arguments ?? ""), encoding);
        }
      }
    }
  }
  return tokens;
}

export function estimateUsage(messages: ChatMessage[], responseBody: unknown, model: string): TokenUsage {
  const prompt = estimatePromptTokens(messages, model);
  const completion = estimateCompletionTokens(responseBody, model);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}
