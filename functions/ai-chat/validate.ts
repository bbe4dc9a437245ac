import { BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError } from "./errors";
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

/** A validated request and the exact text it was parsed from (what goes upstream). */
export interface ParsedChatCompletion {
  request: ChatCompletionRequest;
  text: string;
}

/** Longest model name kept for metering and logs; longer names are cut (a model name is a short identifier). */
export const MAX_MODEL_NAME_CHARS = 256;

/** What the parser learnt about a request before it failed (or succeeded): the model it named, for metering. */
export interface RequestFacts {
  model?: string;
}

// ignoreBOM keeps a byte-order mark in the text, so JSON.parse rejects it: what is validated is exactly the text
// that is forwarded. Without `stream`, decode() keeps no state between calls, so one decoder serves every request.
const UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/**
 * Parses and checks a chat-completions body: JSON content type, UTF-8, the fields the proxy relies on (model,
 * messages, roles) and the types of the fields OpenAI documents. Unknown fields are the upstream's business and pass
 * through untouched (the caller's text is what gets forwarded).
 *
 * `facts.model` is set as soon as the body parses and names a model as a non-empty string (cut to
 * MAX_MODEL_NAME_CHARS), even when a later check fails: a 400 is metered with the model it was for.
 */
export function parseChatCompletionRequest(raw: Buffer, maxBytes: number, contentType?: string, facts: RequestFacts = {}): ParsedChatCompletion {
  const { body, text } = parseJsonBody(raw, maxBytes, contentType, facts, "a JSON chat-completions request");

  checkModel(body);
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
  checkMessageFields(messages as Array<Record<string, unknown>>);
  checkKnownFieldTypes(body);
  checkChoiceCount(body);
  checkStreamOptions(body);
  checkServiceTier(body);
  if (body.web_search_options !== undefined && body.web_search_options !== null) {
    throw new BadRequestError(
      `\`web_search_options\` is not supported by this service: ${BUILT_IN_TOOLS_REASON}`,
      "web_search_options",
      "unsupported_parameter",
    );
  }
  return { request: body as ChatCompletionRequest, text };
}

/** The model a parsed request body names, cut to `MAX_MODEL_NAME_CHARS`, for metering; undefined if none. */
export function modelOf(body: unknown): string | undefined {
  return isRecord(body) && typeof body.model === "string" && body.model !== "" ? body.model.slice(0, MAX_MODEL_NAME_CHARS) : undefined;
}

/**
 * The checks every JSON route shares, in OpenAI's order: 415 for a content type that is not JSON (none is taken as
 * JSON, as the SDKs always send one), 413 over `maxBytes`, 400 `invalid_json` for an empty body, invalid UTF-8, text
 * that is not JSON or not a JSON object. `facts.model` is set as soon as the object parses (see `modelOf`).
 *
 * `JSON.parse` is bounded by `maxBytes` and is iterative in V8 (arrays nested 200,000 deep parse); what walks the
 * result afterwards must not recurse (see `../shared/json`).
 *
 * @param expected what the body should be, for the message of an empty body ("a JSON embeddings request").
 */
export function parseJsonBody(raw: Buffer, maxBytes: number, contentType: string | undefined, facts: RequestFacts, expected: string): { body: Record<string, unknown>; text: string } {
  if (contentType !== undefined && contentType.trim() !== "" && !JSON_CONTENT_TYPE.test(contentType)) {
    throw new UnsupportedMediaTypeError(contentType);
  }
  if (raw.length > maxBytes) throw new PayloadTooLargeError(maxBytes);
  if (raw.length === 0) throw new BadRequestError(`The request body is empty; send ${expected}.`, null, "invalid_json");

  let text: string;
  try {
    text = UTF8.decode(raw);
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
  facts.model = modelOf(body);
  return { body, text };
}

/**
 * `model` is a non-empty string (400 param `model` otherwise), as every route that names a model requires; with
 * `maxChars`, also at most that long (a model name is a short identifier).
 */
export function checkModel(body: Record<string, unknown>, maxChars?: number): void {
  if (typeof body.model !== "string" || body.model.trim() === "") {
    throw new BadRequestError("`model` must be a non-empty string.", "model", "invalid_type");
  }
  if (maxChars !== undefined && body.model.length > maxChars) {
    throw new BadRequestError(`\`model\` must be at most ${maxChars} characters.`, "model", "invalid_value");
  }
}

/** `application/json`, optionally with parameters or a `+json` suffix type. */
const JSON_CONTENT_TYPE = /^\s*application\/([\w.-]+\+)?json\s*(;|$)/i;

/** A type check of one field; with the phrase that names what it expects ("a boolean"). */
export type FieldCheck = (value: unknown) => boolean;
export type FieldTypes = Record<string, [FieldCheck, string]>;
export const isString: FieldCheck = (v) => typeof v === "string";
export const isBoolean: FieldCheck = (v) => typeof v === "boolean";
export const isNumber: FieldCheck = (v) => typeof v === "number" && Number.isFinite(v);
export const isInteger: FieldCheck = (v) => Number.isInteger(v);
export const isPositiveInteger: FieldCheck = (v) => Number.isInteger(v) && (v as number) >= 1;
export const isObject: FieldCheck = (v) => isRecord(v);
export const isArray: FieldCheck = (v) => Array.isArray(v);
const isStop: FieldCheck = (v) => typeof v === "string" || (Array.isArray(v) && v.every((s) => typeof s === "string"));
const isToolChoice: FieldCheck = (v) => typeof v === "string" || isRecord(v);

/**
 * Types of the Chat Completions fields OpenAI documents. Only types are checked (ranges differ between
 * OpenAI-compatible servers); `null` is accepted wherever OpenAI accepts it; unknown fields are not checked.
 */
const FIELD_TYPES: FieldTypes = {
  temperature: [isNumber, "a number"],
  top_p: [isNumber, "a number"],
  n: [isPositiveInteger, "an integer from 1 to 128"],
  max_tokens: [isPositiveInteger, "an integer of at least 1"],
  max_completion_tokens: [isPositiveInteger, "an integer of at least 1"],
  presence_penalty: [isNumber, "a number"],
  frequency_penalty: [isNumber, "a number"],
  seed: [isInteger, "an integer"],
  top_logprobs: [isInteger, "an integer"],
  logprobs: [isBoolean, "a boolean"],
  stream: [isBoolean, "a boolean"],
  store: [isBoolean, "a boolean"],
  parallel_tool_calls: [isBoolean, "a boolean"],
  user: [isString, "a string"],
  stop: [isStop, "a string or an array of strings"],
  stream_options: [isObject, "an object"],
  response_format: [isObject, "an object"],
  logit_bias: [isObject, "an object"],
  metadata: [isObject, "an object"],
  tools: [isArray, "an array"],
  tool_choice: [isToolChoice, "a string or an object"],
};

function checkKnownFieldTypes(body: Record<string, unknown>): void {
  checkFieldTypes(body, FIELD_TYPES);
}

/**
 * Checks the type of each field of `types` that `body` has (400 with the field as `param`); `null` and absent
 * fields pass, as OpenAI accepts `null` for every optional field.
 */
export function checkFieldTypes(body: Record<string, unknown>, types: FieldTypes): void {
  for (const [field, [check, expected]] of Object.entries(types)) {
    const value = body[field];
    if (value === undefined || value === null) continue;
    if (!check(value)) throw new BadRequestError(`\`${field}\` must be ${expected}.`, field, "invalid_type");
  }
}

/**
 * Most choices one request may ask for: OpenAI's own bound on `n` (API reference, create chat completion: "minimum
 * 1, maximum 128"). A prepaid request reserves `n` times its maximum output, so the bound also bounds a reservation.
 */
export const MAX_CHOICES = 128;

function checkChoiceCount(body: Record<string, unknown>): void {
  const n = body.n;
  if (typeof n === "number" && n > MAX_CHOICES) throw new BadRequestError(`\`n\` must be an integer from 1 to ${MAX_CHOICES}.`, "n", "invalid_value");
}

/**
 * `stream_options` only goes with `stream: true`, as OpenAI answers ("The 'stream_options' parameter is only allowed
 * when 'stream' is enabled.", 400, param `stream_options`); `include_usage` is a boolean.
 */
function checkStreamOptions(body: Record<string, unknown>): void {
  const options = body.stream_options;
  if (options === undefined || options === null) return;
  if (body.stream !== true) {
    throw new BadRequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options", "invalid_value");
  }
  const includeUsage = (options as Record<string, unknown>).include_usage;
  if (includeUsage !== undefined && includeUsage !== null && typeof includeUsage !== "boolean") {
    throw new BadRequestError("`stream_options.include_usage` must be a boolean.", "stream_options.include_usage", "invalid_type");
  }
}

/**
 * Why built-in (hosted) tools are refused, for the messages that refuse them: OpenAI bills them per call or per session (web
 * search and file search per 1,000 calls, code-interpreter containers, generated images; https://openai.com/api/pricing/),
 * on top of tokens, and this service bills tokens only.
 */
export const BUILT_IN_TOOLS_REASON =
  "built-in tools (web search, file search, code interpreter, image generation, MCP, computer use, …) are billed per call by OpenAI and this service does not meter them. Use function tools and run the tool yourself.";

/**
 * `service_tier` values that cost no more per token than the plan's price: `auto` and `default` are standard
 * processing, `flex` is cheaper. `priority` costs more per token (e.g. gpt-4.1: $3.50 instead of $2.00 per million
 * input tokens, https://openai.com/api-priority-processing/) and `scale` draws on reserved capacity the operator pays
 * for separately; the plan prices neither, so both (and any value OpenAI adds later) are refused.
 */
export const ALLOWED_SERVICE_TIERS: ReadonlySet<string> = new Set(["auto", "default", "flex"]);

/** `service_tier` absent, null, or one of `ALLOWED_SERVICE_TIERS` (400 param `service_tier` otherwise). */
export function checkServiceTier(body: Record<string, unknown>): void {
  const tier = body.service_tier;
  if (tier === undefined || tier === null) return;
  if (typeof tier === "string" && ALLOWED_SERVICE_TIERS.has(tier)) return;
  throw new BadRequestError(
    `\`service_tier\` must be "auto", "default" or "flex" on this service: other tiers (priority, scale) cost more per token than your plan's price.`,
    "service_tier",
    typeof tier === "string" ? "unsupported_parameter" : "invalid_type",
  );
}

/**
 * The message for an id of a stored OpenAI object (a file, a stored item, a prompt…) that the caller cannot own here:
 * every customer shares the service's OpenAI project, which resolves such ids project-wide, and none of the APIs that
 * create them is proxied, so the id can only be someone else's (or the operator's).
 */
export function storedObjectRefused(what: string): string {
  return `${what} is not supported by this service: the objects such ids name live in the service's shared OpenAI project, which this service does not let callers create or reference. Send the content inline instead.`;
}

/** Content is a string, null, or an array of typed parts; `name` and `tool_call_id` are strings. */
function checkMessageFields(messages: Array<Record<string, unknown>>): void {
  messages.forEach((message, index) => {
    const content = message.content;
    const validContent =
      content === undefined ||
      content === null ||
      typeof content === "string" ||
      (Array.isArray(content) && content.every((part) => isRecord(part) && typeof part.type === "string"));
    if (!validContent) {
      throw new BadRequestError(
        `\`messages[${index}].content\` must be a string or an array of content parts with a \`type\`.`,
        `messages[${index}].content`,
        "invalid_type",
      );
    }
    if (Array.isArray(content)) {
      content.forEach((part, j) => {
        // A file part by id names an upload in the shared project (the Files API is not proxied): see storedObjectRefused.
        const file = (part as Record<string, unknown>).file;
        if (isRecord(file) && file.file_id !== undefined && file.file_id !== null) {
          throw new BadRequestError(storedObjectRefused("A file by `file_id`"), `messages[${index}].content[${j}].file.file_id`, "unsupported_parameter");
        }
      });
    }
    for (const field of ["name", "tool_call_id"]) {
      if (message[field] !== undefined && typeof message[field] !== "string") {
        throw new BadRequestError(`\`messages[${index}].${field}\` must be a string.`, `messages[${index}].${field}`, "invalid_type");
      }
    }
  });
}
