/**
 * Shared pieces of the prepaid evidence tests (prepaid-concurrency, prepaid-kill9): a stack file with a prepaid
 * plan whose output cap keeps a reservation close to the built-in model server's answer, requests that record what
 * the caller saw, a balance poller, and ledger sums.
 *
 * Nothing here hard-codes a price or a token count: the tests learn the reservation (`reserved_micros`) and the cost
 * (`cost_micros`) of "one answer" from the ledger item of a calibration request made by another customer of the same
 * plan, and derive every expected figure from those.
 */
import { randomUUID } from "node:crypto";
import type { CustomerStore } from "../../functions/shared/customer-port";
import type { LedgerItem } from "../../functions/shared/ledger-schema";

/**
 * One prepaid plan (gpt-4o's list prices, so one answer costs a few hundred micro-units rather than a fraction of one)
 * with `maxOutputTokens: 16`: the built-in model server's answer to the tests' short prompts ("Hello! You said: …") is
 * about ten tokens, so a reservation (prompt + 16 output tokens) is between one and two answers' cost. The model
 * server ignores `max_completion_tokens`, so the prompts are kept short enough that the answer stays under the cap
 * (the tests check it from the ledger: no shortfall).
 */
export const PREPAID_STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    credits:
      rateLimit: 10000
      burstLimit: 5000
      billing: prepaid
      currency: usd
      maxOutputTokens: 16
      prices:
        gpt-4o-mini: { input: 2.5, output: 10 }
  metered-ai-api:customers:
    calibration: { plan: credits }
    buyer: { plan: credits }
    streamer: { plan: credits }
    leaver: { plan: credits }
    sdk: { plan: credits }
`;

export const MODEL = "gpt-4o-mini";

/** What one caller saw. */
export interface Outcome {
  status: number;
  requestId?: string;
  shouldRetry?: string | null;
  error?: { type?: string; code?: string | null; message?: string };
  /** Streamed answers: the assistant text received before the end (or the disconnect). */
  content?: string;
  /** The caller hung up mid-stream. */
  disconnected?: boolean;
}

/** The chat completions body the tests send; `mock` directives go to the built-in model server. */
export function chatBody(said: string, extra: Record<string, unknown> = {}): string {
  return JSON.stringify({ model: MODEL, messages: [{ role: "user", content: said }], ...extra });
}

/**
 * POSTs one chat completion and reads the whole answer. With `disconnectAfterContent`, a streamed answer is read
 * until its first content delta and then the connection is aborted (the caller leaves mid-stream); `onContent` hears
 * of each content delta as it arrives.
 */
export async function chat(baseUrl: string, apiKey: string, body: string, options: { disconnectAfterContent?: boolean; onContent?: (piece: string) => void } = {}): Promise<Outcome> {
  const controller = new AbortController();
  const response = await fetch(`${baseUrl}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-api-key": apiKey },
    body,
    signal: controller.signal,
  });
  const outcome: Outcome = { status: response.status, requestId: response.headers.get("x-request-id") ?? undefined, shouldRetry: response.headers.get("x-should-retry") };
  const type = response.headers.get("content-type") ?? "";
  if (!type.startsWith("text/event-stream")) {
    const text = await response.text();
    try {
      const json = JSON.parse(text) as { error?: Outcome["error"] };
      if (json.error) outcome.error = json.error;
    } catch {
      outcome.error = { message: `not JSON: ${text.slice(0, 200)}` };
    }
    return outcome;
  }
  // An SSE answer: collect the content deltas.
  outcome.content = "";
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let end: number;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        const data = event.startsWith("data: ") ? event.slice(6) : "";
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data) as { choices?: Array<{ delta?: { content?: string } }> };
        const piece = chunk.choices?.[0]?.delta?.content ?? "";
        outcome.content += piece;
        if (piece) options.onContent?.(piece);
        if (piece && options.disconnectAfterContent) {
          outcome.disconnected = true;
          controller.abort();
          return outcome;
        }
      }
    }
  } catch (err) {
    if (!outcome.disconnected) throw err;
  }
  return outcome;
}

/** Adds `micros` to a customer's balance through the store's idempotent `credit` (a fresh credit id). */
export async function topUp(store: CustomerStore, customerId: string, micros: number): Promise<number> {
  const result = await store.credit({ customerId, currency: "usd", creditId: `test:${randomUUID()}`, micros, source: "cli", now: Date.now() });
  if (!result.applied) throw new Error(`top-up of ${customerId} not applied: ${result.reason}`);
  return result.balanceMicros;
}

/** Reads a customer's account in a loop while a run goes on; `stop()` returns what it saw. */
export function pollAccount(store: CustomerStore, customerId: string): { stop(): Promise<{ reads: number; minBalance: number; minReserved: number; maxHolds: number }> } {
  let running = true;
  const seen = { reads: 0, minBalance: Number.POSITIVE_INFINITY, minReserved: Number.POSITIVE_INFINITY, maxHolds: 0 };
  const loop = (async () => {
    while (running) {
      const account = await store.getBalance(customerId);
      seen.reads += 1;
      seen.minBalance = Math.min(seen.minBalance, account.balanceMicros);
      seen.minReserved = Math.min(seen.minReserved, account.reservedMicros);
      seen.maxHolds = Math.max(seen.maxHolds, Object.keys(account.holds).length);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return seen;
    },
  };
}

/** Σ of a numeric ledger field (absent counts as 0). */
export function sum(items: LedgerItem[], field: "charged_micros" | "cost_micros" | "reserved_micros" | "shortfall_micros"): number {
  return items.reduce((total, item) => total + (item[field] ?? 0), 0);
}

/** The one ledger item of a request id, or an error naming it. */
export function itemOf(items: LedgerItem[], requestId: string | undefined): LedgerItem {
  const found = items.filter((item) => item.request_id === requestId);
  if (found.length !== 1) throw new Error(`expected one ledger item for request ${requestId}, found ${found.length}`);
  return found[0];
}
