/**
 * The Responses API (`POST /v1/responses`): request validation, the input-side token estimate, and reading or
 * estimating the usage of an answer. Pure: no I/O. Shapes follow the `openai` SDK's types
 * (node_modules/openai/resources/responses/responses.d.ts: `ResponseCreateParamsBase`, `ResponseInputItem`,
 * `ResponseOutputItem`, `ResponseUsage`).
 */
import { isRecord } from "./config";
import { BadRequestError } from "./errors";
import {
  BUILT_IN_TOOLS_REASON,
  MAX_MODEL_NAME_CHARS,
  checkFieldTypes,
  checkServiceTier,
  checkModel,
  isArray,
  isBoolean,
  isInteger,
  isNumber,
  isObject,
  isPositiveInteger,
  isString,
  parseJsonBody,
  storedObjectRefused,
  type FieldTypes,
  type RequestFacts,
} from "./validate";
import {
  TokenTally,
  USAGE_FIELDS_RESPONSES,
  audioTokens,
  encodingForModel,
  estimateToolTokens,
  fileTokens,
  imageTokens,
  readUsageCounts,
  type TokenUsage,
} from "./usage";
import { stringifyJson } from "../shared/json";

/** A validated Responses API request. Unknown fields pass through to the upstream untouched. */
export interface ResponsesRequest {
  model: string;
  input?: string | unknown[];
  instructions?: string | null;
  stream?: boolean;
  max_output_tokens?: number;
  previous_response_id?: string;
  store?: boolean;
  tools?: unknown[];
  [key: string]: unknown;
}

const isToolChoice = (v: unknown) => typeof v === "string" || isRecord(v);

/**
 * Types of the `responses.create` fields the `openai` SDK documents (`ResponseCreateParamsBase`). Only types are
 * checked; `null` passes wherever it is accepted; unknown fields are the upstream's business.
 */
const RESPONSES_FIELD_TYPES: FieldTypes = {
  instructions: [isString, "a string"],
  stream: [isBoolean, "a boolean"],
  store: [isBoolean, "a boolean"],
  max_output_tokens: [isPositiveInteger, "an integer of at least 1"],
  max_tool_calls: [isPositiveInteger, "an integer of at least 1"],
  previous_response_id: [isString, "a string"],
  temperature: [isNumber, "a number"],
  top_p: [isNumber, "a number"],
  top_logprobs: [isInteger, "an integer"],
  parallel_tool_calls: [isBoolean, "a boolean"],
  tools: [isArray, "an array"],
  tool_choice: [isToolChoice, "a string or an object"],
  include: [isArray, "an array"],
  metadata: [isObject, "an object"],
  text: [isObject, "an object"],
  reasoning: [isObject, "an object"],
  prompt: [isObject, "an object"],
  stream_options: [isObject, "an object"],
  truncation: [isString, "a string"],
  service_tier: [isString, "a string"],
  user: [isString, "a string"],
  safety_identifier: [isString, "a string"],
  prompt_cache_key: [isString, "a string"],
};

/**
 * Parses and checks a `POST /v1/responses` body with chat's body rules (415, 413, 400 `invalid_json`; see
 * `parseJsonBody`), then: `model` a non-empty string of at most 256 characters; `input` a string or an array of
 * item objects (a message item's `content` a string or an array of typed parts); the documented fields' types;
 * `background: true` and `conversation` refused (400 with that `param`): a background response's usage is only known
 * after this request has ended (unmeterable), and a conversation id could be anyone's (the Conversations API is not
 * proxied, so its ownership cannot be checked).
 *
 * `facts.model` is set as soon as the body parses (see `parseChatCompletionRequest`).
 */
export function parseResponsesRequest(raw: Buffer, maxBytes: number, contentType: string | undefined, facts: RequestFacts = {}): { request: ResponsesRequest; text: string } {
  const { body, text } = parseJsonBody(raw, maxBytes, contentType, facts, "a JSON Responses API request");
  checkModel(body, MAX_MODEL_NAME_CHARS);
  checkInput(body.input);
  checkFieldTypes(body, RESPONSES_FIELD_TYPES);
  checkServiceTier(body);
  checkTools(body);
  if (body.prompt !== undefined && body.prompt !== null) {
    throw new BadRequestError(storedObjectRefused("A stored prompt (`prompt`)"), "prompt", "unsupported_parameter");
  }
  if (body.background === true) {
    throw new BadRequestError(
      "Background responses (background: true) are not supported by this service: their usage would only be known after this request ended.",
      "background",
      "unsupported_parameter",
    );
  }
  if (body.background !== undefined && body.background !== null && typeof body.background !== "boolean") {
    throw new BadRequestError("`background` must be a boolean.", "background", "invalid_type");
  }
  if (body.conversation !== undefined && body.conversation !== null) {
    throw new BadRequestError(
      "Conversations (conversation) are not supported by this service; continue a response with previous_response_id.",
      "conversation",
      "unsupported_parameter",
    );
  }
  if (isRecord(body.stream_options) && body.stream !== true) {
    throw new BadRequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options", "invalid_value");
  }
  return { request: body as ResponsesRequest, text };
}

/**
 * Tool types a caller may send: tools the caller's own code runs, which cost tokens only. Every other type is an
 * OpenAI built-in billed per call (see `BUILT_IN_TOOLS_REASON`); an allow-list, as new built-ins appear often.
 */
export const ALLOWED_TOOL_TYPES: ReadonlySet<string> = new Set(["function", "custom"]);

/**
 * `tools[i].type` in `ALLOWED_TOOL_TYPES` (400 param `tools[i].type`); a `tool_choice` object naming a type outside
 * it, or an `allowed_tools` choice listing one, is refused the same way (400 param `tool_choice`). Built-ins also
 * carry project-scoped ids (containers, vector stores), so refusing them covers those too.
 */
function checkTools(body: Record<string, unknown>): void {
  const tools = body.tools;
  if (Array.isArray(tools)) {
    tools.forEach((tool, index) => {
      const type = isRecord(tool) ? tool.type : undefined;
      if (typeof type !== "string") throw new BadRequestError(`\`tools[${index}].type\` must be a string.`, `tools[${index}].type`, "invalid_type");
      if (!ALLOWED_TOOL_TYPES.has(type)) throw builtInToolRefused(`tools[${index}].type`, type);
    });
  }
  const choice = body.tool_choice;
  if (!isRecord(choice)) return;
  if (choice.type === "allowed_tools") {
    const listed = Array.isArray(choice.tools) ? choice.tools : [];
    for (const tool of listed) {
      const type = isRecord(tool) ? tool.type : undefined;
      if (typeof type !== "string" || !ALLOWED_TOOL_TYPES.has(type)) throw builtInToolRefused("tool_choice", String(type));
    }
    return;
  }
  if (typeof choice.type !== "string" || !ALLOWED_TOOL_TYPES.has(choice.type)) throw builtInToolRefused("tool_choice", String(choice.type));
}

function builtInToolRefused(param: string, type: string): BadRequestError {
  const shown = type.length > 64 ? `${type.slice(0, 64)}…` : type;
  return new BadRequestError(`The tool type "${shown}" is not supported by this service (only "function" and "custom"): ${BUILT_IN_TOOLS_REASON}`, param, "unsupported_parameter");
}

/** A `file_id` that is present (not absent or null): an uploaded file of the shared project. */
const hasFileId = (value: unknown): boolean => isRecord(value) && value.file_id !== undefined && value.file_id !== null;

/**
 * `input`: absent, null, a string, or an array whose items are objects; a message's content is text or typed parts.
 * Ids of stored objects are refused (400 `unsupported_parameter`, see `storedObjectRefused`): `item_reference` items
 * (also written as an object with neither `type` nor `role`, as the API reads one), and a `file_id` on an item, on
 * its `output` object (a computer screenshot), or on a part of its `content` or `output` (`input_file`, `input_image`).
 */
function checkInput(input: unknown): void {
  if (input === undefined || input === null || typeof input === "string") return;
  if (!Array.isArray(input)) throw new BadRequestError("`input` must be a string or an array of input items.", "input", "invalid_type");
  // A loop, not a recursive walk: only the first two levels are looked at, so 20,000 nested arrays fail at once.
  for (let index = 0; index < input.length; index++) {
    const item = input[index];
    if (!isRecord(item)) throw new BadRequestError(`\`input[${index}]\` must be an object.`, `input[${index}]`, "invalid_type");
    if (item.type !== undefined && typeof item.type !== "string") {
      throw new BadRequestError(`\`input[${index}].type\` must be a string.`, `input[${index}].type`, "invalid_type");
    }
    if (item.type === "item_reference" || (item.type === undefined && item.role === undefined)) {
      throw new BadRequestError(storedObjectRefused("An item reference (`item_reference`)"), `input[${index}]`, "unsupported_parameter");
    }
    if (hasFileId(item)) throw new BadRequestError(storedObjectRefused("A file by `file_id`"), `input[${index}].file_id`, "unsupported_parameter");
    if (hasFileId(item.output)) throw new BadRequestError(storedObjectRefused("A file by `file_id`"), `input[${index}].output.file_id`, "unsupported_parameter");
    for (const field of ["content", "output"]) {
      const parts = item[field];
      if (!Array.isArray(parts)) continue;
      parts.forEach((part, j) => {
        if (hasFileId(part)) throw new BadRequestError(storedObjectRefused("A file by `file_id`"), `input[${index}].${field}[${j}].file_id`, "unsupported_parameter");
      });
    }
    const isMessage = item.type === "message" || (item.type === undefined && item.role !== undefined);
    if (!isMessage) continue;
    if (typeof item.role !== "string") throw new BadRequestError(`\`input[${index}].role\` must be a string.`, `input[${index}].role`, "invalid_type");
    const content = item.content;
    const valid = typeof content === "string" || (Array.isArray(content) && content.every((part) => isRecord(part) && typeof part.type === "string"));
    if (!valid) {
      throw new BadRequestError(
        `\`input[${index}].content\` must be a string or an array of content parts with a \`type\`.`,
        `input[${index}].content`,
        "invalid_type",
      );
    }
  }
}

/** Tokens of overhead per input message (role and separators), as chat counts them (OpenAI cookbook). */
const TOKENS_PER_MESSAGE = 3;
/** Tokens that prime the model's reply. */
const REPLY_PRIMING_TOKENS = 3;

/**
 * Input tokens of a Responses API request by the tokenizer: `instructions`; `input` as a user message when it is a
 * string, else item by item (message text and refusals as text, `input_image` by OpenAI's vision rules, `input_file`
 * and `input_audio` as chat counts them, function calls by name and arguments, their outputs, reasoning summaries
 * and text; other items as their JSON); tools and an object `tool_choice` as chat counts them; a structured-output
 * schema (`text.format` other than text) and a reusable prompt's variables as their JSON. A `previous_response_id`'s
 * context is not known here (the core adds it).
 */
export function estimateResponsesInputTokens(request: ResponsesRequest, model: string, tally: TokenTally = new TokenTally(encodingForModel(model))): number {
  let tokens = REPLY_PRIMING_TOKENS;
  if (typeof request.instructions === "string") tokens += TOKENS_PER_MESSAGE + tally.count("developer") + tally.count(request.instructions);
  const input = request.input;
  if (typeof input === "string") tokens += TOKENS_PER_MESSAGE + tally.count("user") + tally.count(input);
  else if (Array.isArray(input)) for (const item of input) tokens += inputItemTokens(item, model, tally);
  tokens += estimateToolTokens(request, tally);
  const format = isRecord(request.text) ? request.text.format : undefined;
  if (isRecord(format) && format.type !== "text") tokens += tally.count(stringifyJson(format));
  if (isRecord(request.prompt) && request.prompt.variables !== undefined) tokens += tally.count(stringifyJson(request.prompt.variables));
  return tokens;
}

function inputItemTokens(item: unknown, model: string, tally: TokenTally): number {
  if (!isRecord(item)) return tally.count(stringifyJson(item));
  const type = item.type ?? (item.role !== undefined ? "message" : undefined);
  switch (type) {
    case "message":
      return TOKENS_PER_MESSAGE + (typeof item.role === "string" ? tally.count(item.role) : 0) + partsTokens(item.content, model, tally);
    case "function_call":
    case "custom_tool_call":
      return textOf(item.name, tally) + textOf(item.arguments, tally) + textOf(item.input, tally);
    case "function_call_output":
    case "custom_tool_call_output":
    case "local_shell_call_output":
    case "shell_call_output":
      return partsTokens(item.output, model, tally);
    case "reasoning":
      return partsTokens(item.summary, model, tally) + partsTokens(item.content, model, tally);
    case "item_reference":
      // Refused by parseResponsesRequest (see checkInput); kept at 0 for requests built elsewhere.
      return 0;
    case "computer_call_output":
      // A screenshot is an image: by OpenAI's vision rules (the largest figure for a remote URL), not as URL text.
      return isRecord(item.output) ? imageTokens({ url: typeof item.output.image_url === "string" ? item.output.image_url : "", detail: item.output.detail }, model) : 0;
    default:
      return tally.count(stringifyJson(item));
  }
}

/**
 * The param path of the first part of `request.input` whose size the tokenizer cannot know, or undefined: an
 * `input_file` by `file_url` (without `file_data`), which OpenAI fetches itself (a 300-page PDF counts as one page
 * here). Other inputs are counted or bounded: inline files and audio by their size, images by OpenAI's vision rules
 * (the largest figure for a remote URL); `file_id`, `item_reference` and `prompt` are refused by
 * `parseResponsesRequest`. The core refuses what this names on prepaid plans, whose reservation must cover the request.
 */
export function unknowableInput(request: ResponsesRequest): string | undefined {
  const input = request.input;
  if (!Array.isArray(input)) return undefined;
  for (let index = 0; index < input.length; index++) {
    const item = input[index];
    if (!isRecord(item)) continue;
    for (const field of ["content", "output"]) {
      const parts = item[field];
      if (!Array.isArray(parts)) continue;
      for (let j = 0; j < parts.length; j++) {
        const part = parts[j];
        if (isRecord(part) && part.type === "input_file" && typeof part.file_data !== "string" && part.file_url !== undefined && part.file_url !== null) {
          return `input[${index}].${field}[${j}].file_url`;
        }
      }
    }
  }
  return undefined;
}

/** A string as text; anything else (arguments sent as an object) as its JSON; absent as nothing. */
function textOf(value: unknown, tally: TokenTally): number {
  if (value === undefined || value === null) return 0;
  return tally.count(typeof value === "string" ? value : stringifyJson(value));
}

/** Text, or content parts: text-bearing parts as their text, images, files and audio by their own rules. */
function partsTokens(content: unknown, model: string, tally: TokenTally): number {
  if (content === undefined || content === null) return 0;
  if (typeof content === "string") return tally.count(content);
  if (!Array.isArray(content)) return tally.count(stringifyJson(content));
  let tokens = 0;
  for (const part of content) {
    if (!isRecord(part)) {
      tokens += tally.count(stringifyJson(part));
      continue;
    }
    // The part's type decides, so a `"text": ""` added to an image part cannot make it count as nothing.
    if (part.type === "input_image") tokens += imageTokens({ url: typeof part.image_url === "string" ? part.image_url : "", detail: part.detail }, model);
    else if (part.type === "input_file") tokens += fileTokens(part, model);
    else if (part.type === "input_audio") tokens += audioTokens(part.input_audio);
    else if (typeof part.text === "string") tokens += tally.count(part.text);
    else if (typeof part.refusal === "string") tokens += tally.count(part.refusal);
    else tokens += tally.count(stringifyJson(part));
  }
  return tokens;
}

/**
 * Usage of a Responses API answer: `input_tokens` → prompt, `output_tokens` → completion, `input_tokens_details.
 * cached_tokens` → cached, `output_tokens_details.reasoning_tokens` → reasoning, validated as `extractUsage`
 * validates chat's (integers 0…1e9, total recomputed). Undefined when absent or unusable.
 */
export function extractResponsesUsage(body: unknown): TokenUsage | undefined {
  if (!isRecord(body) || !isRecord(body.usage)) return undefined;
  return readUsageCounts(body.usage, USAGE_FIELDS_RESPONSES);
}

/**
 * Calls `visit` with each piece of generated text in a response's `output`: message text and refusals, function
 * and custom tool calls (name, arguments, input), reasoning summaries and reasoning text, and the code or query of
 * other tool calls. Images and other binary results are not text and are skipped.
 */
function forEachOutputText(body: unknown, visit: (text: string) => void): void {
  if (!isRecord(body) || !Array.isArray(body.output)) return;
  const visitParts = (parts: unknown) => {
    if (!Array.isArray(parts)) return;
    for (const part of parts) {
      if (!isRecord(part)) continue;
      if (typeof part.text === "string") visit(part.text);
      else if (typeof part.refusal === "string") visit(part.refusal);
    }
  };
  for (const item of body.output) {
    if (!isRecord(item)) continue;
    if (item.type === "message") visitParts(item.content);
    else if (item.type === "reasoning") {
      visitParts(item.summary);
      visitParts(item.content);
    } else {
      for (const field of ["name", "arguments", "input", "code"]) {
        const value = item[field];
        if (typeof value === "string") visit(value);
        else if (field === "arguments" && isRecord(value)) visit(stringifyJson(value));
      }
      if (isRecord(item.action) && typeof item.action.query === "string") visit(item.action.query);
    }
  }
}

/** UTF-8 bytes of a response's generated text (see `forEachOutputText`): for `isPlausibleUsage`. */
export function responsesOutputTextBytes(body: unknown): number {
  let bytes = 0;
  forEachOutputText(body, (text) => (bytes += Buffer.byteLength(text, "utf8")));
  return bytes;
}

/** Output tokens of a response's generated text, by the tokenizer. */
export function estimateResponsesOutputTokens(body: unknown, model: string, tally: TokenTally = new TokenTally(encodingForModel(model))): number {
  let tokens = 0;
  forEachOutputText(body, (text) => (tokens += tally.count(text)));
  return tokens;
}

/**
 * Usage of a request and its answer when the upstream did not report a usable one: input by
 * `estimateResponsesInputTokens`, output by the answer's generated text, one byte budget for both.
 */
export function estimateResponsesUsage(request: ResponsesRequest, body: unknown, model: string): TokenUsage {
  const tally = new TokenTally(encodingForModel(model));
  const prompt = estimateResponsesInputTokens(request, model, tally);
  const completion = estimateResponsesOutputTokens(body, model, tally);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}
