import { execFileSync } from "node:child_process";
import { handler } from "../../functions/ai-chat/index";
import { isStreamingHandler } from "../../functions/ai-chat/lambda-stream";
import { costOf } from "../../functions/shared/pricing";
import type { LocalStack } from "../../scripts/local/stack";
import type { StreamRecord } from "../../scripts/local/upstream-server";
import type { StoredEvent } from "../../scripts/local/moesif-collector";

let pythonSdk: boolean | undefined;
/** Whether `python3` can import the official OpenAI SDK (`pip install openai`); asked once per run. */
export function pythonSdkAvailable(): boolean {
  if (pythonSdk === undefined) {
    try {
      execFileSync("python3", ["-c", "import openai"], { stdio: "ignore" });
      pythonSdk = true;
    } catch {
      pythonSdk = false;
    }
  }
  return pythonSdk;
}

/** Whether the function's handler streams (tagged by `streamifyResponse`): the streaming suites require it. */
export function functionStreams(): boolean {
  return isStreamingHandler(handler);
}

/** The stack files' gpt-4o-mini price (0.15 / 0.6 USD per million tokens), in micro-units per million tokens. */
export const MINI_PRICE = { input: 150_000, output: 600_000 };

export const expectedCost = (usage: { prompt_tokens: number; completion_tokens: number }) => costOf(usage, MINI_PRICE);

/** Polls `probe` every 10 ms until it returns a value, or throws after `ms` saying what it waited for. */
export async function waitFor<T>(what: string, probe: () => T | undefined, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The metering events the collector stored for one request id (API Gateway's, echoed as x-amzn-RequestId). */
export function eventsFor(stack: LocalStack, requestId: string): StoredEvent[] {
  return stack.store!.all().filter((e) => e.metadata?.request_id === requestId);
}

/** Waits until the collector has the request's event, and a little longer for a duplicate to show up if one would. */
export async function meteredEvent(stack: LocalStack, requestId: string): Promise<StoredEvent[]> {
  await waitFor(`the metering event of ${requestId}`, () => (eventsFor(stack, requestId).length > 0 ? true : undefined));
  return eventsFor(stack, requestId);
}

/** The model server's record of the streamed request whose last user message was `said`. */
export function upstreamStream(stack: LocalStack, said: string): StreamRecord {
  const found = stack.upstream!.streams.filter((s) => s.said === said);
  if (found.length !== 1) throw new Error(`expected one upstream stream for ${JSON.stringify(said)}, found ${found.length}`);
  return found[0];
}

/** Waits for the collector to hold more than `before` events; returns those after the first `before`. */
export async function eventsSince(stack: LocalStack, before: number): Promise<StoredEvent[]> {
  await waitFor("a new metering event", () => (stack.store!.all().length > before ? true : undefined));
  return stack.store!.all().slice(before);
}
