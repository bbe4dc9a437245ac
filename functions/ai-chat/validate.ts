import { BadRequestError, PayloadTooLargeError } from "./errors";
import { isRecord } from "./config";

/** Roles the Chat Completions API accepts today. */
export const VALID_ROLES: ReadonlySet<string> = new Set(["system", "developer", "user", "assistant", "tool", "function"]);

export interface ChatMessage {
  role: string;
  content?: unknown;
  name?: string;
  tool_calls?: unknown;
  [field: string]: unknown;
}

export interface ChatCompletionRequest {
  model: string;
  messages: ChatMessage[];
  stream?: boolean;
  [field: string]: unknown;
}

/**
 * Parses and checks a chat-completions body. Only the fields the proxy relies on are checked; everything else is
 * the upstream's business and passes through untouched (the raw text is what gets forwarded).
 */
export function parseChatCompletionRequest(raw: Buffer, maxBytes: number): ChatCompletionRequest {
  if (raw.length > maxBytes) throw new PayloadTooLargeError(maxBytes);
  if (raw.length === 0) throw new BadRequestError("The request body is empty; send a JSON chat-completions request.", null, "invalid_json");

  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(raw);
  } catch {
    throw new BadRequestError("The request body is not valid UTF-8.", null, "invalid_json");
  }

  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new BadRequestError(
      "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
      null,
      "invalid_json",
    );
  }
  if (!isRecord(body)) throw new BadRequestError("The request body must be a JSON object.", null, "invalid_json");

  if (typeof body.model !== "string" || body.model.trim() === "") {
    throw new BadRequestError("`model` must be a non-empty string.", "model", "invalid_type");
  }
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new BadRequestError("`messages` must be a non-empty array of message objects.", "messages", "invalid_type");
  }
  messages.forEach((message, index) => {
    if (!isRecord(message)) {
      throw new BadRequestError(`\`messages[${index}]\` must be an object.`, `messages[${index}]`, "invalid_type");
    }
    if (typeof message.role !== "string" || !VALID_ROLES.has(message.role)) {
      throw new BadRequestError(
        `\`messages[${index}].role\` must be one of ${[...VALID_ROLES].join(", ")}.`,
        `messages[${index}].role`,
        "invalid_value",
      );
    }
  });
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== "boolean") {
    throw new BadRequestError("`stream` must be a boolean.", "stream", "invalid_type");
  }
  if (body.stream === true) {
    throw new BadRequestError(
      "Streaming is not enabled on this endpoint yet; send the request with `stream: false`.",
      "stream",
      "streaming_not_supported",
    );
  }
  return body as ChatCompletionRequest;
}
