/**
 * The Embeddings API (`POST /v1/embeddings`): request validation, the input's token estimate and reading the
 * usage of an answer. Pure: no I/O. Shapes: node_modules/openai/resources/embeddings.d.ts (`EmbeddingCreateParams`,
 * `CreateEmbeddingResponse.Usage`).
 */
import { isRecord } from "./config";
import { BadRequestError } from "./errors";
import { MAX_MODEL_NAME_CHARS, checkFieldTypes, checkModel, isPositiveInteger, isString, parseJsonBody, type FieldTypes, type RequestFacts } from "./validate";
import { MAX_TOKEN_BYTES, TokenTally, encodingForModel, isCount, type TokenUsage } from "./usage";

/** A validated embeddings request. Unknown fields pass through to the upstream untouched. */
export interface EmbeddingsRequest {
  model: string;
  input: string | string[] | number[] | number[][];
  [key: string]: unknown;
}

/** Most inputs in one request: OpenAI's bound ("The array must be 2048 dimensions or less", API reference). */
export const MAX_EMBEDDING_INPUTS = 2048;

const ENCODING_FORMATS = new Set(["float", "base64"]);

const EMBEDDINGS_FIELD_TYPES: FieldTypes = {
  dimensions: [isPositiveInteger, "an integer of at least 1"],
  user: [isString, "a string"],
};

/**
 * Parses and checks a `POST /v1/embeddings` body with chat's body rules (415, 413, 400 `invalid_json`; see
 * `parseJsonBody`), then: `model` a non-empty string of at most 256 characters; `input` a non-empty string, or a
 * non-empty array of at most 2048 items that are all non-empty strings, all token ids (non-negative integers), or
 * all non-empty arrays of token ids; `encoding_format` "float" or "base64"; `dimensions` an integer of at least 1.
 * Each failure is a 400 naming the field in `param`.
 */
export function parseEmbeddingsRequest(raw: Buffer, maxBytes: number, contentType: string | undefined, facts: RequestFacts = {}): { request: EmbeddingsRequest; text: string } {
  const { body, text } = parseJsonBody(raw, maxBytes, contentType, facts, "a JSON embeddings request");
  checkModel(body, MAX_MODEL_NAME_CHARS);
  checkEmbeddingsInput(body.input);
  checkFieldTypes(body, EMBEDDINGS_FIELD_TYPES);
  const format = body.encoding_format;
  if (format !== undefined && format !== null && !(typeof format === "string" && ENCODING_FORMATS.has(format))) {
    throw new BadRequestError("`encoding_format` must be \"float\" or \"base64\".", "encoding_format", "invalid_value");
  }
  return { request: body as EmbeddingsRequest, text };
}

const INPUT_FORMS = "a non-empty string, or a non-empty array of strings, of token ids, or of arrays of token ids";

const isTokenId = (v: unknown): boolean => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

function checkEmbeddingsInput(input: unknown): void {
  if (input === undefined || input === null) throw new BadRequestError("`input` is required.", "input", "missing_required_parameter");
  if (typeof input === "string") {
    if (input === "") throw new BadRequestError("`input` must not be an empty string.", "input", "invalid_value");
    return;
  }
  if (!Array.isArray(input) || input.length === 0) throw new BadRequestError(`\`input\` must be ${INPUT_FORMS}.`, "input", "invalid_type");
  if (input.length > MAX_EMBEDDING_INPUTS) {
    throw new BadRequestError(`\`input\` must have at most ${MAX_EMBEDDING_INPUTS} items; it has ${input.length}.`, "input", "invalid_value");
  }
  // The first item decides the form; every item must have it. Loops only, two levels deep at most: a deeply
  // nested array fails at its first item.
  const first = input[0];
  if (typeof first === "string") {
    input.forEach((item, index) => {
      if (typeof item !== "string" || item === "") throw new BadRequestError(`\`input[${index}]\` must be a non-empty string.`, `input[${index}]`, "invalid_value");
    });
  } else if (typeof first === "number") {
    input.forEach((item, index) => {
      if (!isTokenId(item)) throw new BadRequestError(`\`input[${index}]\` must be a token id (a non-negative integer).`, `input[${index}]`, "invalid_value");
    });
  } else if (Array.isArray(first)) {
    input.forEach((item, index) => {
      if (!Array.isArray(item) || item.length === 0 || !item.every(isTokenId)) {
        throw new BadRequestError(`\`input[${index}]\` must be a non-empty array of token ids (non-negative integers).`, `input[${index}]`, "invalid_value");
      }
    });
  } else {
    throw new BadRequestError(`\`input\` must be ${INPUT_FORMS}.`, "input", "invalid_type");
  }
}

/** Input tokens of an embeddings request: strings by the model's tokenizer; token-id arrays count their length. */
export function estimateEmbeddingsInputTokens(request: EmbeddingsRequest, model: string): number {
  const tally = new TokenTally(encodingForModel(model));
  const count = (item: unknown): number => (typeof item === "string" ? tally.count(item) : Array.isArray(item) ? item.length : typeof item === "number" ? 1 : 0);
  const input: unknown = request.input;
  if (typeof input === "string") return tally.count(input);
  if (!Array.isArray(input)) return 0;
  let tokens = 0;
  for (const item of input) tokens += count(item);
  return tokens;
}

/**
 * Usage of an embeddings answer: `usage.prompt_tokens` (validated as `extractUsage` validates counts), completion 0,
 * total recomputed. Undefined when absent or unusable (the core then estimates).
 */
export function extractEmbeddingsUsage(body: unknown): TokenUsage | undefined {
  if (!isRecord(body) || !isRecord(body.usage)) return undefined;
  const prompt = body.usage.prompt_tokens;
  if (!isCount(prompt)) return undefined;
  return { prompt_tokens: prompt, completion_tokens: 0, total_tokens: prompt };
}

/**
 * Whether an upstream's reported embeddings usage can be true of `request`: every input is at least one token, and
 * no token is longer than MAX_TOKEN_BYTES (the loose bound `isPlausibleUsage` uses for chat), so `prompt_tokens` is
 * at least the number of inputs and at least ceil(input bytes / MAX_TOKEN_BYTES) for text; for token ids it is at
 * least their number. An implausible usage is estimated instead of believed (an upstream reporting 1 token for 2048
 * long inputs would otherwise bill 1 token).
 */
export function isPlausibleEmbeddingsUsage(usage: TokenUsage, request: EmbeddingsRequest): boolean {
  const input: unknown = request.input;
  const items: unknown[] = Array.isArray(input) ? input : [input];
  let textBytes = 0;
  let ids = 0;
  for (const item of items) {
    if (typeof item === "string") textBytes += Buffer.byteLength(item, "utf8");
    else if (Array.isArray(item)) ids += item.length;
    else if (typeof item === "number") ids += 1;
  }
  const floor = Math.max(items.length, ids + Math.ceil(textBytes / MAX_TOKEN_BYTES));
  return usage.prompt_tokens >= floor;
}
