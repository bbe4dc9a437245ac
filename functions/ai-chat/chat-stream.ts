/**
 * Relays a streamed chat completion (OpenAI's SSE format) from the upstream to the caller, event by event as it
 * arrives, and works out what to bill for it.
 *
 * - Every upstream event's data is forwarded as `data: <data>\n\n`, redacted of the service's secrets (an SSE event's
 *   data is complete once parsed, so a secret cannot straddle two pieces of one redaction).
 * - The upstream is always asked for `stream_options.include_usage` (by the core); its usage-only chunk reaches the
 *   caller only if the caller asked for it. Otherwise chunks keep the `"usage": null` OpenAI puts on every chunk
 *   once usage is requested: harmless to clients, and forwarding the upstream's bytes costs no re-serialisation.
 * - Usage is the upstream's final usage chunk, validated as a buffered answer's is (`extractUsage`). Without a valid
 *   one (some OpenAI-compatible servers send none; or the stream failed or the caller left first) it is estimated:
 *   the prompt, plus the text received so far (content, refusal, reasoning, tool-call names and arguments),
 *   tokenized once at the end.
 * - A failure once the caller's stream has started (reset, an event that is not JSON, no chunk within the idle
 *   timeout, the invocation's deadline) ends the stream with one `data: {"error": …}` event and no `[DONE]`. Before
 *   the first event nothing has been sent, so the failure is returned for the core to answer as a JSON error.
 */
import type { Readable } from "node:stream";
import { createParser, type EventSourceMessage } from "eventsource-parser";
import { isRecord } from "./config";
import { ApiError, DeadlineExceededError, StreamFailedError, UpstreamError, UpstreamTimeoutError, streamErrorEvent } from "./errors";
import type { StreamWriter } from "./responder";
import { NO_USAGE, TokenTally, extractUsage, isPlausibleUsage, type TokenUsage } from "./usage";
import type { SecretRedactor } from "../shared/secret-redactor";

/** The most SSE text buffered for one event; a larger one is an upstream gone wrong. */
export const MAX_EVENT_CHARS = 4 * 1024 * 1024;
/** How long the upstream may take to end its response after `[DONE]` before it is cut. */
export const DONE_GRACE_MS = 1000;
/** Characters of completion text kept for a metering record that logs bodies. */
export const MAX_LOGGED_CONTENT_CHARS = 32 * 1024;
/**
 * Text kept for the estimate, in characters: past it, text is counted at 1 token per 4 bytes (the estimator's floor)
 * instead of kept, so millions of tiny deltas cannot exhaust the function's memory.
 */
export const MAX_TALLIED_CHARS = 8 * 1024 * 1024;
/** Small parts are joined every this many, so each tiny delta does not keep its own string and array slot. */
const COMPACT_EVERY = 256;

/** An SSE event carrying `data` (each line its own `data:` field, so a multi-line payload stays one event). */
export function sseEvent(data: string): string {
  return data.includes("\n") ? `${data.split("\n").map((line) => `data: ${line}`).join("\n")}\n\n` : `data: ${data}\n\n`;
}

export interface RelayOptions {
  /** The upstream's response body (a 2xx), as it arrives. Destroying it aborts the upstream request. */
  upstream: Readable;
  redactor: SecretRedactor;
  /** Starts the caller's response (status 200, SSE headers). Called once, at the first event. */
  start: () => StreamWriter;
  /** Aborted when the caller goes away. */
  clientGone: AbortSignal;
  /** Longest silence allowed between two upstream chunks. */
  idleTimeoutMs: number;
  /** When the whole stream must be over (clock time), so that metering still fits in the invocation. */
  deadline?: number;
  clock: () => number;
  /** The caller sent `stream_options.include_usage: true`. */
  callerWantsUsage: boolean;
  /** Prompt tokens, by the tokenizer (only called when the usage must be estimated). */
  estimatePrompt: (tally: TokenTally) => number;
  /** A new tally for the model's encoding. */
  newTally: () => TokenTally;
  /** Called when an upstream event held a secret (it was redacted). */
  onEchoedSecret?: () => void;
}

export interface RelayOutcome {
  /** The caller's stream started: the caller got a 200 and events, so what was received is billed. */
  started: boolean;
  /** Why nothing was sent (only when `started` is false): the core answers it as a JSON error. */
  failure?: ApiError;
  usage: TokenUsage;
  usageEstimated: boolean;
  /** Code of the error event that ended the stream early. */
  streamError?: string;
  clientDisconnected: boolean;
  /** The upstream ended its stream with `[DONE]`. */
  done: boolean;
  /** `id`, `model` and `created` of the last chunk: for the metering record and a synthesised usage chunk. */
  id?: string;
  model?: string;
  created?: number;
  /** Completion text received (bounded by MAX_LOGGED_CONTENT_CHARS), for records that log bodies. */
  content: string;
}

/** Why a relay stopped reading before the upstream ended: the caller left, the idle timer or the deadline fired. */
export type StopReason = "client" | "idle" | "deadline";

/**
 * The generated text a relay has seen, kept per key (choice and field) for the estimate and the logged content:
 * bounded by MAX_TALLIED_CHARS (beyond it, bytes are only counted), tiny parts joined every COMPACT_EVERY.
 * `eventText` is the current event's new text, in order (what a secret split across events would hide in).
 */
export class StreamText {
  readonly texts = new Map<string, string[]>();
  private talliedChars = 0;
  private overflowBytes = 0;
  /** Bytes of all text seen: for `isPlausibleUsage`. */
  relayedBytes = 0;
  eventText = "";
  /** The current event's new text per key: what a client concatenates per item or choice (see SplitSecretGuard). */
  readonly eventTexts = new Map<string, string>();

  /** Starts a new event's `eventText` and `eventTexts`. */
  beginEvent(): void {
    this.eventText = "";
    this.eventTexts.clear();
  }

  append(key: string, value: unknown): void {
    if (typeof value !== "string" || value === "") return;
    this.eventText += value;
    this.eventTexts.set(key, (this.eventTexts.get(key) ?? "") + value);
    const bytes = Buffer.byteLength(value, "utf8");
    this.relayedBytes += bytes;
    if (this.talliedChars + value.length > MAX_TALLIED_CHARS) {
      this.overflowBytes += bytes;
      return;
    }
    this.talliedChars += value.length;
    const list = this.texts.get(key);
    if (!list) this.texts.set(key, [value]);
    else {
      list.push(value);
      if (list.length >= COMPACT_EVERY) this.texts.set(key, [list.join("")]);
    }
  }

  /** Tokens of everything seen: each key's text tokenized once; text past the bound at 1 token per 4 bytes. */
  countTokens(tally: TokenTally): number {
    let tokens = 0;
    for (const parts of this.texts.values()) tokens += tally.count(parts.join(""));
    return tokens + Math.ceil(this.overflowBytes / 4);
  }

  /** The text of the keys `keep` selects, clipped to MAX_LOGGED_CONTENT_CHARS and redacted, for logged bodies. */
  logged(keep: (key: string) => boolean, redactor: SecretRedactor): string {
    let content = "";
    for (const [key, parts] of this.texts) {
      if (!keep(key)) continue;
      content += parts.join("");
      if (content.length > MAX_LOGGED_CONTENT_CHARS) break;
    }
    content = content.slice(0, MAX_LOGGED_CONTENT_CHARS);
    // The relayed text joined: a secret split across events (never sent) must not reach a metering event either.
    return redactor.redactString(content);
  }
}

/** Most text keys whose recent text a SplitSecretGuard keeps; the least recently written are forgotten first. */
export const MAX_GUARDED_KEYS = 1024;
/** Most characters a SplitSecretGuard holds back; past it the hold is released (a prefix is not the secret). */
export const MAX_HELD_CHARS = 256 * 1024;

/**
 * Holds back what could be part of a secret split across events (each event is redacted on its own). The last few
 * characters are kept for the stream as a whole and per text key (one output item's part in responses, one choice's
 * field in chat: what a client concatenates), since a secret can be split across deltas of one item with another
 * item's delta between them. The new text is checked against each window; while any window ends like the start of a
 * secret, events are held until the next text shows whether it completes (bounded by MAX_HELD_CHARS).
 */
export class SplitSecretGuard {
  private readonly windowLength: number;
  private recentText = "";
  private readonly recentByKey = new Map<string, string>();
  private readonly pendingKeys = new Set<string>();
  private held = "";

  constructor(private readonly redactor: SecretRedactor) {
    this.windowLength = Math.max(0, redactor.longestSecret - 1);
  }

  /**
   * What may go out now of one event's forwarded `text` whose new generated text is `eventText` (per key:
   * `eventTexts`); undefined when a window holds a secret (nothing of it may go out: the stream must fail).
   */
  pass(text: string, eventText: string, eventTexts?: ReadonlyMap<string, string>): string | undefined {
    if (this.windowLength === 0) return this.release(text);
    let hold = false;
    if (eventText !== "") {
      const window = this.recentText + eventText;
      this.recentText = window.slice(-this.windowLength);
      if (this.redactor.containsSecret(window)) return this.fail();
      hold = this.redactor.endsWithSecretPrefix(window);
    }
    for (const [key, added] of eventTexts ?? []) {
      if (added === "") continue;
      const window = (this.recentByKey.get(key) ?? "") + added;
      // Re-inserted so the Map's order is least recently written first.
      this.recentByKey.delete(key);
      this.recentByKey.set(key, window.slice(-this.windowLength));
      if (this.redactor.containsSecret(window)) return this.fail();
      if (this.redactor.endsWithSecretPrefix(window)) this.pendingKeys.add(key);
      else this.pendingKeys.delete(key);
    }
    for (const key of this.recentByKey.keys()) {
      if (this.recentByKey.size <= MAX_GUARDED_KEYS) break;
      this.recentByKey.delete(key);
      this.pendingKeys.delete(key);
    }
    if (hold || this.pendingKeys.size > 0) {
      if (this.held.length + text.length <= MAX_HELD_CHARS) {
        this.held += text;
        return "";
      }
      // An item that ended on a secret's first characters must not stall the rest of the stream for ever.
      this.pendingKeys.clear();
    }
    return this.release(text);
  }

  private fail(): undefined {
    this.held = "";
    return undefined;
  }

  /** Held-back text plus `text`, releasing the hold. */
  release(text = ""): string {
    const out = this.held + text;
    this.held = "";
    return out;
  }
}

/**
 * The three ways a relay stops reading early (the caller leaves, no chunk within the idle timeout, the deadline)
 * as one `stopped` promise to race reads and writes against. Stopping destroys the upstream (which ends its request).
 */
export class RelayStopper {
  reason?: StopReason;
  readonly stopped: Promise<void>;
  private resolveStopped!: () => void;
  private idleTimer?: NodeJS.Timeout;
  private readonly deadlineTimer?: NodeJS.Timeout;
  private readonly onGone = () => this.stop("client");

  constructor(
    private readonly upstream: Readable,
    private readonly clientGone: AbortSignal,
    private readonly idleTimeoutMs: number,
    deadline: number | undefined,
    clock: () => number,
  ) {
    this.stopped = new Promise<void>((resolve) => (this.resolveStopped = resolve));
    if (clientGone.aborted) this.onGone();
    else clientGone.addEventListener("abort", this.onGone, { once: true });
    this.deadlineTimer = deadline !== undefined ? setTimeout(() => this.stop("deadline"), Math.max(0, deadline - clock())) : undefined;
  }

  stop(reason: StopReason): void {
    if (this.reason) return;
    this.reason = reason;
    this.upstream.destroy();
    this.resolveStopped();
  }

  /** (Re)starts the idle timer: the relay stops unless the upstream sends something within `ms`. */
  armIdle(ms = this.idleTimeoutMs): void {
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.stop("idle"), ms);
  }

  clearIdle(): void {
    clearTimeout(this.idleTimer);
  }

  /** Clears the timers and the caller listener. */
  dispose(): void {
    clearTimeout(this.idleTimer);
    clearTimeout(this.deadlineTimer);
    this.clientGone.removeEventListener("abort", this.onGone);
  }
}

/** The failure of a stream that stopped reading early or could not be read, once the upstream did not end it. */
export function stopFailure(stopReason: StopReason | undefined, readError: boolean, idleTimeoutMs: number): ApiError | undefined {
  if (!stopReason && readError) return new StreamFailedError("The upstream model server's stream was cut off.", "upstream_stream_failed", "api_error");
  if (stopReason === "idle") return new StreamFailedError(`The upstream model server sent nothing for ${idleTimeoutMs} ms.`, "upstream_idle_timeout", "api_error");
  if (stopReason === "deadline") return new StreamFailedError("The answer could not be completed in time.", "deadline_exceeded", "api_error");
  return undefined;
}


/** Relays one stream. Never throws: every failure is in the outcome. */
export async function relayChatStream(options: RelayOptions): Promise<RelayOutcome> {
  const { upstream, redactor, clock } = options;
  const seen = new StreamText();
  const append = (key: string, value: unknown) => seen.append(key, value);
  const secretGuard = new SplitSecretGuard(redactor);
  /** Whether any choice ended with a finish_reason: an upstream that closes without one was cut off. */
  let finished = false;

  let writer: StreamWriter | undefined;
  let failure: ApiError | undefined;
  /** An upstream error event, forwarded as the stream's last event. */
  let upstreamErrorEvent: string | undefined;
  let reported: TokenUsage | undefined;
  let sawEvent = false;
  let done = false;
  let id: string | undefined;
  let model: string | undefined;
  let created: number | undefined;

  const stopper = new RelayStopper(upstream, options.clientGone, options.idleTimeoutMs, options.deadline, clock);
  const { stopped } = stopper;

  let pending: EventSourceMessage[] = [];
  const parser = createParser({ onEvent: (event) => pending.push(event), maxBufferSize: MAX_EVENT_CHARS });
  const decoder = new TextDecoder("utf-8");

  /** The text to forward for one event ("" for none); sets `failure`/`done` as it finds them. */
  const handle = (event: EventSourceMessage): string => {
    seen.beginEvent();
    const data = event.data;
    if (data.trim() === "") return "";
    sawEvent = true;
    if (data.trim() === "[DONE]") {
      done = true;
      return "";
    }
    const redacted = redactor.redactBody(data);
    if (redacted.changed) options.onEchoedSecret?.();
    const chunk = redacted.json;
    if (!isRecord(chunk)) {
      failure = new StreamFailedError(
        "The upstream model server sent an event that is not a JSON object.",
        "upstream_stream_failed",
        "api_error",
        new UpstreamError("The upstream model server returned a response that is not a chat completion.", "upstream_bad_response"),
      );
      return "";
    }
    if (chunk.error !== undefined && chunk.error !== null) {
      upstreamErrorEvent = sseEvent(redacted.text);
      failure = new UpstreamError("The upstream model server reported an error in its stream.", "upstream_failed");
      return "";
    }
    if (typeof chunk.id === "string") id = chunk.id;
    if (typeof chunk.model === "string") model = chunk.model;
    if (typeof chunk.created === "number") created = chunk.created;
    let validUsage = false;
    if (isRecord(chunk.usage)) {
      const usage = extractUsage(chunk);
      if (usage) {
        reported = usage;
        validUsage = true;
      }
    }
    if (Array.isArray(chunk.choices)) {
      chunk.choices.forEach((choice, i) => {
        if (!isRecord(choice) || !isRecord(choice.delta)) return;
        const at = typeof choice.index === "number" ? choice.index : i;
        if (typeof choice.finish_reason === "string" && choice.finish_reason !== "") finished = true;
        const delta = choice.delta;
        for (const field of ["content", "refusal", "reasoning_content", "reasoning"]) append(`${at}:${field}`, delta[field]);
        if (Array.isArray(delta.tool_calls)) {
          delta.tool_calls.forEach((call, j) => {
            if (!isRecord(call) || !isRecord(call.function)) return;
            const tool = typeof call.index === "number" ? call.index : j;
            append(`${at}:tool:${tool}:name`, call.function.name);
            append(`${at}:tool:${tool}:arguments`, call.function.arguments);
          });
        }
        if (isRecord(delta.function_call)) {
          append(`${at}:function:name`, delta.function_call.name);
          append(`${at}:function:arguments`, delta.function_call.arguments);
        }
      });
    }
    const usageOnly = Array.isArray(chunk.choices) && chunk.choices.length === 0 && isRecord(chunk.usage);
    // The caller who did not ask sees what OpenAI sends without include_usage; an invalid usage chunk is replaced
    // by an estimated one at the end.
    if (usageOnly && (!options.callerWantsUsage || !validUsage)) return "";
    return sseEvent(redacted.text);
  };

  /** What may go out now of one event's text, holding back (or refusing) what could be part of a split secret. */
  const guard = (text: string): string => {
    const out = secretGuard.pass(text, seen.eventText, seen.eventTexts);
    if (out !== undefined) return out;
    options.onEchoedSecret?.();
    failure = new StreamFailedError("The upstream model server's answer contained a secret of this service; it was not sent.", "upstream_echoed_secret", "api_error");
    return "";
  };

  const writeOut = async (text: string) => {
    writer ??= options.start();
    await Promise.race([writer.write(text), stopped]);
  };

  let readError = false;
  let graceArmed = false;
  const iterator = upstream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  stopper.armIdle();
  try {
    for (;;) {
      // Raced with `stopped`: a read pending on a silent upstream must end when the idle timer, the deadline or the
      // caller's disconnect stops the relay, whatever the stream implementation does on destroy.
      const next = await Promise.race([iterator.next(), stopped.then(() => undefined)]);
      // After [DONE] the grace period runs from [DONE], not from the upstream's last byte.
      if (!done) stopper.clearIdle();
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
        if (failure || done) break;
        const text = handle(event);
        out += failure ? "" : guard(text);
      }
      if (out && !stopper.reason) await writeOut(out);
      if (failure || stopper.reason) break;
      // After [DONE] the upstream ends its response at once; reading to that end keeps its keep-alive socket
      // reusable (a destroyed one costs the next invocation a TLS handshake). One that lingers is cut after a grace.
      if (!done) stopper.armIdle();
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
  // Stop reading (after [DONE], or a failure): ends the upstream request if it is still open.
  if (!upstream.destroyed) upstream.destroy();

  if (!failure && !done) failure = stopFailure(stopReason, readError, options.idleTimeoutMs);
  // A clean end without [DONE] is complete only if the answer said it was (a finish_reason); otherwise it was cut.
  if (!failure && !done && !stopReason && sawEvent && !finished) {
    failure = new StreamFailedError("The upstream model server's stream ended before the answer did.", "upstream_stream_failed", "api_error");
  }
  // Held back for a secret that never completed: the text was harmless after all.
  const held = secretGuard.release();
  if (held && !failure && !stopReason) await writeOut(held).catch(() => undefined);

  const clientDisconnected = stopReason === "client";
  // A usage chunk that cannot be true of the text relayed (0 tokens for a long answer) is not believed.
  if (reported && !isPlausibleUsage(reported, seen.relayedBytes)) reported = undefined;
  const outcome = (): RelayOutcome => {
    const usage = reported ?? estimate();
    return {
      started: writer !== undefined,
      usage,
      usageEstimated: reported === undefined,
      clientDisconnected,
      done,
      id,
      model,
      created,
      content: seen.logged((key) => key.endsWith(":content"), redactor),
    };
  };
  const estimate = (): TokenUsage => {
    const tally = options.newTally();
    const prompt = options.estimatePrompt(tally);
    const completion = seen.countTokens(tally);
    return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
  };

  if (!writer) {
    // Nothing reached the caller: an ordinary JSON error, nothing billed (so nothing is estimated either).
    const unsent = { started: false, usage: NO_USAGE, usageEstimated: false, clientDisconnected, done, content: "" };
    if (clientDisconnected) return { ...unsent, failure: new UpstreamError("The caller went away before the upstream model server answered.", "client_disconnected") };
    if (failure) return { ...unsent, failure: beforeStart(failure, options.idleTimeoutMs) };
    // An upstream that ignored `stream: true` (a JSON answer): the SDKs would retry a 502 twice, each one an unbilled
    // generation, so tell them not to.
    if (!sawEvent) {
      return { ...unsent, failure: new ApiError(502, "The upstream model server returned a response that is not an event stream.", "api_error", "upstream_bad_response", null, { "x-should-retry": "false" }) };
    }
  }

  const result = outcome();
  if (clientDisconnected) {
    await writer?.end();
    return result;
  }
  try {
    if (failure) {
      await writeOut(upstreamErrorEvent ?? streamErrorEvent(failure));
      result.streamError = failure.code ?? "upstream_stream_failed";
    } else {
      if (options.callerWantsUsage && result.usageEstimated) {
        const usageChunk = { id: id ?? "", object: "chat.completion.chunk", created: created ?? Math.floor(clock() / 1000), model: model ?? "", choices: [], usage: result.usage };
        await writeOut(sseEvent(JSON.stringify(usageChunk)));
      }
      await writeOut("data: [DONE]\n\n");
    }
  } finally {
    await writer?.end();
  }
  // A stream whose only event was [DONE] (or a usage chunk the caller did not ask for) starts here.
  result.started = writer !== undefined;
  if (options.clientGone.aborted) result.clientDisconnected = true;
  return result;
}

/** The JSON error for a stream that failed before its first event (the caller has had nothing yet). */
export function beforeStart(failure: ApiError, idleTimeoutMs: number): ApiError {
  if (!(failure instanceof StreamFailedError)) return failure;
  if (failure.beforeStart) return failure.beforeStart;
  switch (failure.code) {
    case "upstream_idle_timeout":
      return new UpstreamTimeoutError(idleTimeoutMs);
    case "deadline_exceeded":
      return new DeadlineExceededError();
    default:
      return new UpstreamError("The upstream model server's answer was cut off.", "upstream_unreachable");
  }
}
