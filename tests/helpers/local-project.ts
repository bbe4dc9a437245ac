import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { startLocalStack, type LocalStack, type LocalStackOptions } from "../../scripts/local/stack";
import { LOCAL_STRIPE_API_KEY } from "../../scripts/local/stripe-server";
import type { LedgerItem } from "../../functions/shared/ledger-schema";
import { recordForScan, registerSecret } from "./secret-scan";

/** A stack file for evidence tests: one tightly scoped plan, one roomy plan. */
export const EVIDENCE_STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    starter:
      rateLimit: 10000
      burstLimit: 5000
      models: [gpt-4o-mini]
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    pro:
      rateLimit: 10000
      burstLimit: 5000
      currency: usd
      prices:
        gpt-4o: { input: 2.5, output: 10 }
        gpt-4o-mini: { input: 0.25, output: 1.0, cachedInput: 0.125 }
        gpt-3.5-turbo: { input: 0.5, output: 1.5 }
  metered-ai-api:customers:
    starter: { plan: starter, stripeCustomerId: cus_starter }
    pro: { plan: pro, stripeCustomerId: cus_pro }
    pro2: { plan: pro, stripeCustomerId: cus_pro2 }
`;

/** A throwaway project directory holding `Pulumi.test.yaml`. */
export function tempProject(yaml = EVIDENCE_STACK_YAML): { dir: string; dataDir: string; remove(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "metered-evidence-"));
  fs.writeFileSync(path.join(dir, "Pulumi.test.yaml"), yaml);
  return { dir, dataDir: path.join(dir, ".local"), remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

export interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** Sends exact bytes and header lines (arrays become repeated headers), as curl would. */
export function rawRequest(url: string, options: { method?: string; headers?: Record<string, string | string[]>; body?: Buffer }): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: options.method ?? "POST", headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(options.body);
  });
}

/**
 * A local stack on a throwaway project for one `describe` block: started before its tests, stopped after. Its keys
 * (and the local Stripe key and webhook signing secret) join the suite's secret scan, and its log lines and metering payloads are scanned.
 * The forwarder sweeps every 100 ms unless `env` says otherwise (events reach the sinks soon after each request).
 */
export function useLocalStack(
  name: string,
  env: NodeJS.ProcessEnv = {},
  yaml = EVIDENCE_STACK_YAML,
  options: Pick<LocalStackOptions, "forwarder"> = {},
): { readonly stack: LocalStack; readonly projectDir: string; readonly dataDir: string; readonly logs: string[] } {
  const project = tempProject(yaml);
  const logs: string[] = [];
  let stack: LocalStack | undefined;
  before(async () => {
    stack = await startLocalStack({
      stack: "test",
      projectDir: project.dir,
      dataDir: project.dataDir,
      port: 0,
      env: { FORWARDER_INTERVAL_MS: "100", ...env },
      write: (l) => logs.push(l),
      keepRawPayloads: "all",
      ...options,
    });
    registerSecret(...Object.values(stack.apiKeys), LOCAL_STRIPE_API_KEY, stack.stripeWebhook.secret);
  });
  after(async () => {
    recordForScan(`${name} logs`, logs);
    recordForScan(`${name} collector`, stack?.collector?.rawPayloads ?? []);
    await stack?.stop();
    project.remove();
  });
  return {
    get stack() {
      if (!stack) throw new Error("the local stack starts in a before() hook");
      return stack;
    },
    projectDir: project.dir,
    dataDir: project.dataDir,
    logs,
  };
}

/** Every item of a local stack's ledger. */
export async function ledgerItems(stack: LocalStack): Promise<LedgerItem[]> {
  const items: LedgerItem[] = [];
  for await (const item of stack.ledger.store.scanAll()) items.push(item);
  return items;
}

/** Polls an async `probe` every 25 ms until it returns a value, or throws after `ms` saying what it waited for. */
export async function waitUntil<T>(what: string, probe: () => Promise<T | undefined> | T | undefined, ms = 30_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}
