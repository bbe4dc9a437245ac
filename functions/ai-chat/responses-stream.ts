/**
 * Relays a streamed Responses API answer (`POST /v1/responses` with `stream: true`) from the upstream to the caller,
 * event by event as it arrives, and works out what to bill for it. Built like `chat-stream.ts` and from its parts
 * (`StreamText`, `SplitSecretGuard`, `RelayStopper`, `MAX_EVENT_CHARS`).
 *
 * - The Responses API streams typed events: `event: <type>` plus `data: <JSON with the same type>` (openai SDK
 *   `ResponseStreamEvent`, node_modules/openai/resources/responses/responses.d.ts). Each is forwarded as
 *   `event: <type>\ndata: <data redacted of the service's secrets>\n\n`. There is no `[DONE]`: the stream ends after
 *   `response.completed`, `response.incomplete` or `response.failed` (the terminal events).
 * - Usage is the terminal event's `response.usage` (`extractResponsesUsage`, validated like chat's). Without a valid
 *   one (the stream was cut, the caller left, the upstream sent none, or it cannot be true of the text relayed) it
 *   is estimated: the input (`estimateInput`) plus the text of every `*.delta` event seen (output text, refusals,
 *   function-call arguments, reasoning summaries and text, tool inputs) and function-call names.
 * - The first event carrying `response.id` is held until `onResponseId(id)` resolves (the core records the
 *   response's owner): the caller never learns an id that is not recorded as theirs.
 * - A failure once the caller's stream has started (reset, an event that is not JSON, the idle timeout, the deadline,
 *   the owner record failing) ends the stream with ONE event `event: error` whose data is OpenAI's error event,
 *   `{"type":"error","code","message","param":null,"sequence_number"}`. That shape parses in both clients: the
 *   `openai` SDK's `ResponseErrorEvent` (responses.d.ts, `code: string | null; message; param; sequence_number;
 *   type: 'error'`; its `Stream` yields it as an event, core/streaming.js `iterator`), and `@ai-sdk/openai` 3.x's
 *   `openaiResponsesErrorChunkSchema` (node_modules/@ai-sdk/openai/dist/index.js: `type: "error"`,
 *   `sequence_number: number`, `code: string.nullish`, `message: string`, `param: string.nullish`), which its
 *   `isErrorChunk` turns into an error part. Before the first event nothing has been sent, so the failure is
 *   returned for the core to answer as a JSON error.
 */
import type { Readable } from "node:stream";
import { createParser, type EventSourceMessage } from "eventsource-parser";
import { isRecord } from "./config";
import { ApiError, ResponseStoreUnavailableError, StreamFailedError, UpstreamError } from "./errors";
import type { StreamWriter } from "./responder";
import { DONE_GRACE_MS, MAX_EVENT_CHARS, RelayStopper, SplitSecretGuard, StreamText, beforeStart, sseEvent, stopFailure } from "./chat-stream";
import { extractResponsesUsage } from "./responses";
import { NO_USAGE, TokenTally, isPlausibleUsage, type TokenUsage } from "./usage";
import type { SecretRedactor } from "../shared/secret-redactor";

export interface ResponsesRelayOptions {
  /** The upstream's response body (a 2xx), as it arrives. Destroying it aborts the upstream request. */
  upstream: Readable;
  redactor: SecretRedactor;
  /** Starts the caller's response (status 200, SSE headers). Called once, at the first event forwarded. */
  start: () => StreamWriter;
  /** Aborted when the caller goes away. */
  clientGone: AbortSignal;
  /** Longest silence allowed between two upstream chunks (and the longest `onResponseId` may take). */
  idleTimeoutMs: number;
  /** When the whole stream must be over (clock time), so that metering still fits in the invocation. */
  deadline?: number;
  clock: () => number;
  /** Input tokens, by the tokenizer (only called when the usage must be estimated). */
  estimateInput: (tally: TokenTally) => number;
  /** A new tally for the model's encoding. */
  newTally: () => TokenTally;
  /** Awaited before the first event carrying `response.id` is forwarded; a rejection (an ApiError) before the
   *  stream started becomes `failure`; after it started, the stream ends with the error event. */
  onResponseId?: (id: string) => Promise<void>;
  /** Called when an upstream event held a secret (it was redacted). */
  onEchoedSecret?: () => void;
}

export interface ResponsesRelayOutcome {
  /** The caller's stream started: the caller got a 200 and events, so what was received is billed. */
  started: boolean;
  /** Why nothing was sent (only when `started` is false): the core answers it as a JSON error. */
  failure?: ApiError;
  usage: TokenUsage;
  usageEstimated: boolean;
  /** Code of the error event that ended the stream early. */
  streamError?: string;
  clientDisconnected: boolean;
  /** The upstream sent a terminal event (`response.completed`, `.incomplete` or `.failed`; `status` tells which). */
  completed: boolean;
  /** `id`, `model` and `status` of the last `response` object seen. */
  id?: string;
  model?: string;
  status?: string;
  /** Output text received (bounded by MAX_LOGGED_CONTENT_CHARS), for records that log bodies. */
  content: string;
}

/** The events that end a response; each carries the final `response` with its `usage`. */
const TERMINAL_EVENTS: ReadonlySet<string> = new Set(["response.completed", "response.incomplete", "response.failed"]);
/** `*.delta` events whose `delta` is not generated text (base64 audio) and so not counted as text. */
const NON_TEXT_DELTAS: ReadonlySet<string> = new Set(["response.audio.delta"]);
/** What an event name may be: the Responses API's types are dotted words; anything else is not forwarded as a name. */
const EVENT_NAME = /^[A-Za-z0-9_.:-]{1,128}$/;

/**
 * OpenAI's in-band error event for the Responses API (see the file comment for where both clients define it).
 * `sequence_number` follows the last event forwarded.
 */
export function responsesErrorEvent(failure: ApiError, sequenceNumber: number): string {
  const data = { type: "error", code: failure.code ?? "upstream_stream_failed", message: failure.message, param: null, sequence_number: sequenceNumber };
  return `event: error\ndata: ${JSON.stringify(data)}\n\n`;
}

/** Relays one stream. Never throws: every failure is in the outcome. */
export async function relayResponsesStream(options: ResponsesRelayOptions): Promise<ResponsesRelayOutcome> {
  const { upstream, redactor, clock } = options;
  const seen = new StreamText();
  const secretGuard = new SplitSecretGuard(redactor);

  let writer: StreamWriter | undefined;
  let failure: ApiError | undefined;
  /** An upstream error event, forwarded as the stream's last event. */
  let upstreamErrorEvent: string | undefined;
  let reported: TokenUsage | undefined;
  let sawEvent = false;
  let completed = false;
  let id: string | undefined;
  let model: string | undefined;
  let status: string | undefined;
  /** The response id `onResponseId` last accepted: an event carrying any other id waits for it again. */
  let recordedId: string | undefined;
  /** Highest `sequence_number` forwarded (-1: none), and how many events were forwarded. */
  let lastSequence = -1;
  let forwarded = 0;

  const stopper = new RelayStopper(upstream, options.clientGone, options.idleTimeoutMs, options.deadline, clock);
  const { stopped } = stopper;

  let pending: EventSourceMessage[] = [];
  const parser = createParser({ onEvent: (event) => pending.push(event), maxBufferSize: MAX_EVENT_CHARS });
  const decoder = new TextDecoder("utf-8");

  /** One event's text to forward ("" for none) and the response id it carries; sets `failure`/`completed`. */
  const handle = (event: EventSourceMessage): { text: string; responseId?: string; sequence?: number } => {
    seen.beginEvent();
    const data = event.data;
    if (data.trim() === "") return { text: "" };
    // Some OpenAI-compatible servers end with chat's `[DONE]`; it is not part of the Responses API, so not forwarded.
    if (data.trim() === "[DONE]") return { text: "" };
    sawEvent = true;
    const redacted = redactor.redactBody(data);
    if (redacted.changed) options.onEchoedSecret?.();
    const chunk = redacted.json;
    if (!isRecord(chunk)) {
      failure = new StreamFailedError(
        "The upstream model server sent an event that is not a JSON object.",
        "upstream_stream_failed",
        "api_error",
        new UpstreamError("The upstream model server returned a response that is not a Responses API response.", "upstream_bad_response"),
      );
      return { text: "" };
    }
    const type = typeof chunk.type === "string" ? chunk.type : "";
    const name = eventName(event.event, type, redactor);
    const text = `${name ? `event: ${name}\n` : ""}${sseEvent(redacted.text)}`;
    if (type === "error" || event.event === "error") {
      upstreamErrorEvent = text;
      failure = new UpstreamError("The upstream model server reported an error in its stream.", "upstream_failed");
      return { text: "" };
    }

    let responseId: string | undefined;
    const response = chunk.response;
    if (isRecord(response)) {
      if (typeof response.id === "string" && response.id !== "") responseId = id = response.id;
      if (typeof response.model === "string") model = response.model;
      if (typeof response.status === "string") status = response.status;
      if (TERMINAL_EVENTS.has(type)) {
        completed = true;
        reported = extractResponsesUsage(response);
      }
    }
    const at = `${String(chunk.output_index ?? "")}:${String(chunk.content_index ?? chunk.summary_index ?? "")}`;
    if (type.endsWith(".delta") && !NON_TEXT_DELTAS.has(type)) seen.append(`${type}:${at}`, chunk.delta);
    // A function call's name arrives with its item, not in a delta.
    if (type === "response.output_item.added" && isRecord(chunk.item) && chunk.item.type === "function_call") seen.append(`name:${at}`, chunk.item.name);
    const sequence = typeof chunk.sequence_number === "number" && Number.isSafeInteger(chunk.sequence_number) ? chunk.sequence_number : undefined;
    return { text, responseId, sequence };
  };

  const writeOut = async (text: string) => {
    writer ??= options.start();
    await Promise.race([writer.write(text), stopped]);
  };

  /** Waits for `onResponseId`; its rejection (or the relay stopping first) leaves the event unsent. */
  const record = async (responseId: string): Promise<void> => {
    if (!options.onResponseId || responseId === recordedId) return;
    const recording = options.onResponseId(responseId).then(
      () => undefined,
      (err: unknown) => (err instanceof ApiError ? err : new ResponseStoreUnavailableError()),
    );
    const result = await Promise.race([recording, stopped.then(() => "stopped" as const)]);
    if (result === "stopped") return;
    if (result) failure = result;
    else recordedId = responseId;
  };

  let readError = false;
  let graceArmed = false;
  const iterator = upstream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  stopper.armIdle();
  try {
    for (;;) {
      // Raced with `stopped`: a read pending on a silent upstream must end when the idle timer, the deadline or the
      // caller's disconnect stops the relay (see chat-stream.ts).
      const next = await Promise.race([iterator.next(), stopped.then(() => undefined)]);
      // After the terminal event the grace period runs from that event, not from the upstream's last byte.
      if (!completed) stopper.clearIdle();
      if (!next || next.done || stopper.reason) break;
      try {
        parser.feed(decoder.decode(next.value, { stream: true }));
      } catch {
        failure = new StreamFailedError("The upstream model server sent an event larger than this service accepts.", "upstream_stream_failed", "api_error");
      }
      let out = "";
      const events = pending;
      pending = [];
      for (const event of events) {
        if (failure || completed || stopper.reason) break;
        const { text, responseId, sequence } = handle(event);
        if (failure) break;
        if (responseId !== undefined && options.onResponseId && responseId !== recordedId) {
          // What came before goes out first; this event (and what follows) only once the id is recorded.
          if (out) await writeOut(out);
          out = "";
          // Bounded by the store's own timeout and by the deadline; the caller leaving stops the wait.
          await record(responseId);
          if (failure || stopper.reason) break;
        }
        const passed = secretGuard.pass(text, seen.eventText, seen.eventTexts);
        if (passed === undefined) {
          options.onEchoedSecret?.();
          failure = new StreamFailedError("The upstream model server's answer contained a secret of this service; it was not sent.", "upstream_echoed_secret", "api_error");
          break;
        }
        out += passed;
        forwarded += 1;
        if (sequence !== undefined && sequence > lastSequence) lastSequence = sequence;
      }
      if (out && !stopper.reason) await writeOut(out);
      if (failure || stopper.reason) break;
      // After the terminal event the upstream ends its response at once; reading to that end keeps its keep-alive
      // socket reusable. One that lingers is cut after a grace.
      if (!completed) stopper.armIdle();
      else if (!graceArmed) {
        graceArmed = true;
        stopper.armIdle(DONE_GRACE_MS);
      }
    }
  } catch {
    readError = true;
  } finally {
    stopper.dispose();
    iterator.return?.().catch(() => undefined);
  }
  const stopReason = stopper.reason;
  if (!upstream.destroyed) upstream.destroy();

  if (!failure && !completed) failure = stopFailure(stopReason, readError, options.idleTimeoutMs);
  // A clean end without a terminal event was cut off.
  if (!failure && !completed && !stopReason && sawEvent) {
    failure = new StreamFailedError("The upstream model server's stream ended before the response did.", "upstream_stream_failed", "api_error");
  }
  // Held back for a secret that never completed: the text was harmless after all.
  const held = secretGuard.release();
  if (held && !failure && !stopReason) await writeOut(held).catch(() => undefined);

  const clientDisconnected = stopReason === "client";
  // A usage that cannot be true of the text relayed (0 tokens for a long answer) is not believed.
  if (reported && !isPlausibleUsage(reported, seen.relayedBytes)) reported = undefined;

  if (!writer) {
    // Nothing reached the caller: an ordinary JSON error, nothing billed (so nothing is estimated either).
    const unsent = { started: false, usage: NO_USAGE, usageEstimated: false, clientDisconnected, completed, id, model, status, content: "" };
    if (clientDisconnected) return { ...unsent, failure: new UpstreamError("The caller went away before the upstream model server answered.", "client_disconnected") };
    if (failure) return { ...unsent, failure: beforeStart(failure, options.idleTimeoutMs) };
    if (!sawEvent) {
      // An upstream that ignored `stream: true` (a JSON answer): the SDKs would retry a 502, each retry an unbilled
      // generation, so tell them not to.
      return { ...unsent, failure: new ApiError(502, "The upstream model server returned a response that is not an event stream.", "api_error", "upstream_bad_response", null, { "x-should-retry": "false" }) };
    }
  }

  const estimate = (): TokenUsage => {
    const tally = options.newTally();
    const prompt = options.estimateInput(tally);
    const completion = seen.countTokens(tally);
    return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
  };
  const result: ResponsesRelayOutcome = {
    started: writer !== undefined,
    usage: reported ?? estimate(),
    usageEstimated: reported === undefined,
    clientDisconnected,
    completed,
    id,
    model,
    status,
    content: seen.logged((key) => key.startsWith("response.output_text.delta:"), redactor),
  };
  if (clientDisconnected) {
    await writer?.end();
    return result;
  }
  try {
    if (failure) {
      await writeOut(upstreamErrorEvent ?? responsesErrorEvent(failure, Math.max(lastSequence, forwarded - 1) + 1));
      result.streamError = failure.code ?? "upstream_stream_failed";
    }
  } finally {
    await writer?.end();
  }
  result.started = writer !== undefined;
  if (options.clientGone.aborted) result.clientDisconnected = true;
  return result;
}

/** The name to forward: the upstream's `event:` if it is a plain event type without a secret, else the data's type. */
function eventName(upstreamName: string | undefined, type: string, redactor: SecretRedactor): string | undefined {
  for (const name of [upstreamName, type]) {
    if (name !== undefined && EVENT_NAME.test(name) && !redactor.containsSecret(name)) return name;
  }
  return undefined;
}
