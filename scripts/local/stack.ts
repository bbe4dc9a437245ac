/**
 * The local stack: gateway emulator + the real ai-chat handler + a built-in model server + the usage ledger, the
 * customers table and the stored responses' owners table (one dynalite) + the usage forwarder's sweep + a Moesif-compatible collector and a Stripe-compatible
 * meter event endpoint, both backed by SQLite, configured from the same stack file `pulumi up` reads.
 *
 * The request path writes each request's usage to the ledger (as on AWS); the forwarder, run here on an interval
 * instead of the DynamoDB stream and EventBridge schedule, delivers it to both sinks and settles reservations a dead
 * process left behind. The customers table holds the stack file's key items (written at every start, as `pulumi up`
 * writes the deployed table's) and each customer's account (prepaid balance, open reservations, usage counters),
 * which outlives restarts and is topped up with `npm run credits` or a signed Stripe event on `/stripe/webhook`.
 * What lives under the data dir (default `.local/`): `api-keys.json`, `ledger/` (LevelDB: all three tables) +
 * `ledger.json` while running, `usage.db` (collector events, quota counters), `stripe.db` (meter events).
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";
import { createDeps, createHandler } from "../../functions/ai-chat/index";
import { streamifyResponse } from "../../functions/ai-chat/lambda-stream";
import type { CustomerStore } from "../../functions/shared/customer-port";
import { keyItem } from "../../functions/shared/customer-schema";
import { createCustomerStoreFromEnv } from "../../functions/shared/customer-store";
import type { StripeBilling } from "../../functions/shared/ledger-schema";
import { createLedgerDocumentClient, LedgerStore } from "../../functions/shared/ledger-store";
import { createForwarderFromEnv, type CreateForwarderOptions, type UsageForwarder } from "../../functions/usage-forwarder/forwarder";
import { functionPlans, holdStaleAfterMs, ROUTES } from "../../infra/function-env";
import { parseStackConfig, PROJECT, StackConfigError, type StackConfig } from "../../infra/stack-config";
import { dashboardPage } from "./dashboard/server";
import { GatewayEmulator, type GatewayKey } from "./gateway";
import { LedgerDb, LocalLedgerError, syncKeyItems, type KeySync } from "./ledger-db";
import { MoesifCollector } from "./moesif-collector";
import { SqliteStore } from "./sqlite-store";
import { LOCAL_STRIPE_API_KEY, StripeServer } from "./stripe-server";
import { UpstreamServer } from "./upstream-server";

/** A problem the user can fix, reported as one line without a stack trace. */
export class LocalStackError extends Error {}

export interface LocalStackOptions {
  /** Stack name: reads `Pulumi.<stack>.yaml`. @default "dev" */
  stack?: string;
  /** Project directory holding the stack file. @default the repository root */
  projectDir?: string;
  /** Where keys, events and quota counters live. @default <projectDir>/.local */
  dataDir?: string;
  /** @default 3000; 0 picks a free port */
  port?: number;
  /**
   * Environment: UPSTREAM_BASE_URL, UPSTREAM_API_KEY, MOESIF_APPLICATION_ID, MOESIF_BASE_URI, STRIPE_API_BASE,
   * STRIPE_API_KEY, STRIPE_BILLING (default `meters`), FORWARDER_INTERVAL_MS (default 1000), SINK_TIMEOUT_MS,
   * FORWARDER_BATCH_SIZE, STRIPE_METER_API, LEDGER_TIMEOUT_MS, LOCAL_SINK_DELAY_MS, FORWARD_MOCK_DIRECTIVES,
   * STRIPE_WEBHOOK_SECRET (default `LOCAL_STRIPE_WEBHOOK_SECRET`), CUSTOMERS_TIMEOUT_MS, CUSTOMER_CACHE_TTL_MS,
   * HOLD_STALE_AFTER_MS, RESPONSES_TIMEOUT_MS, LOG_LEVEL…
   */
  env?: NodeJS.ProcessEnv;
  /** Where the function's log lines go. @default stdout */
  write?: (line: string) => void;
  /** How many raw payloads the built-in collector keeps in memory; tests that scan every payload pass "all". */
  keepRawPayloads?: "all" | { count: number; chars: number };
  /** The gateway's idle timeout between two streamed chunks. @default 300000 (API Gateway's, Regional endpoints) */
  streamIdleTimeoutMs?: number;
  /** Test seams of the forwarder (tighter back-off or retry schedules). @default the deployed forwarder's */
  forwarder?: Pick<CreateForwarderOptions, "backoff" | "failedRetryBaseMs" | "sweepLimit">;
}

export interface LocalStack {
  config: StackConfig;
  stackFile: string;
  /** `http://127.0.0.1:<port>/<stage>` */
  baseUrl: string;
  /** Customer id → local API key. */
  apiKeys: Record<string, string>;
  upstream?: UpstreamServer;
  upstreamUrl: string;
  collector?: MoesifCollector;
  store?: SqliteStore;
  gateway: GatewayEmulator;
  dataDir: string;
  /** The usage ledger (dynalite): its endpoint and table, and the store the forwarder uses. */
  ledger: { endpoint: string; table: string; store: LedgerStore };
  /**
   * The customers table (same dynalite): its name, a store on it (what the function, the webhook and `npm run
   * credits` use), and what this start changed among its key items.
   */
  customers: { table: string; store: CustomerStore; keys: KeySync };
  /** The stored responses' owners table (same dynalite): the function's `RESPONSES_TABLE`. */
  responses: { table: string };
  /** `POST <baseUrl>/stripe/webhook` and the signing secret it verifies Stripe's signatures with. */
  stripeWebhook: { url: string; secret: string };
  /** `meters`: the forwarder sends Stripe meter events; `moesif`: Moesif alone (its billing meter bills). */
  stripeBilling: StripeBilling;
  /** The built-in Stripe-compatible endpoint (absent with STRIPE_API_BASE or STRIPE_BILLING=moesif). */
  stripe?: StripeServer;
  /** Where meter events go (the built-in endpoint's URL, or STRIPE_API_BASE); absent with STRIPE_BILLING=moesif. */
  stripeApiBase?: string;
  /** The usage forwarder, swept every `forwarderIntervalMs` (FORWARDER_INTERVAL_MS). */
  forwarder: UsageForwarder;
  forwarderIntervalMs: number;
  /**
   * Sweeps until nothing in the ledger is due for delivery (pending, or failed and due), for tests; throws after
   * `timeoutMs` naming an item still owed. Items written after it returns are the next sweep's.
   */
  drain(options?: { timeoutMs?: number }): Promise<void>;
  stop(): Promise<void>;
}

const ROOT = path.resolve(__dirname, "..", "..");
const LOCAL_UPSTREAM_KEY = "local-upstream-key";
const LOCAL_MOESIF_APP_ID = "local-collector";
export const DEFAULT_FORWARDER_INTERVAL_MS = 1000;

/**
 * The webhook signing secret `npm start` verifies `/stripe/webhook` with when STRIPE_WEBHOOK_SECRET is unset. Not a
 * secret (it is in the source and the banner): it lets a local test sign its own events. To receive Stripe's test
 * events, set STRIPE_WEBHOOK_SECRET to the one `stripe listen` prints.
 */
export const LOCAL_STRIPE_WEBHOOK_SECRET = "whsec_local_metered_ai_api";

/** The local API key id of a customer: fixed, so the key items `npm start` writes are found again on the next start. */
export function localKeyId(customerId: string): string {
  return `local-key-${customerId}`;
}


/** A non-negative integer variable of the local stack's environment, or `fallback` when unset. */
function integerEnv(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number): number {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) throw new LocalStackError(`${name} must be an integer of at least ${min}, got "${raw}"`);
  return value;
}

/**
 * Runs `sweep` every `intervalMs` after the previous one ended, so sweeps never overlap (a slow sink makes the loop
 * slower, never piles sweeps up); `stop` waits for the sweep in flight.
 */
class SweepLoop {
  private timer?: NodeJS.Timeout;
  private current?: Promise<void>;
  private stopped = false;

  constructor(
    private readonly sweep: () => Promise<unknown>,
    private readonly intervalMs: number,
  ) {}

  start(): this {
    this.schedule();
    return this;
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      // The forwarder's sweep never rejects; should it, the loop goes on (the next sweep retries everything).
      this.current = this.sweep().then(
        () => undefined,
        () => undefined,
      );
      void this.current.then(() => {
        this.current = undefined;
        this.schedule();
      });
    }, this.intervalMs);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.current;
  }
}

/** Reads and validates `Pulumi.<stack>.yaml` with the program's own rules. */
export function readStackFile(file: string): StackConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new LocalStackError(`cannot read the stack config ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = YAML.parse(text);
  } catch (err) {
    throw new LocalStackError(`${file} is not valid YAML: ${(err as Error).message.split("\n")[0]}`);
  }
  const config = (doc as { config?: Record<string, unknown> } | null)?.config ?? {};
  const values: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(config)) {
    if (key.startsWith(`${PROJECT}:`)) values[key.slice(PROJECT.length + 1)] = value;
  }
  try {
    return parseStackConfig(values, { forDeploy: false });
  } catch (err) {
    if (err instanceof StackConfigError) throw new LocalStackError(`${path.basename(file)}: ${err.message}`);
    throw err;
  }
}

/** Loads `.local/api-keys.json`, adding a key for every customer that has none. */
export function ensureApiKeys(file: string, customers: string[]): Record<string, string> {
  let keys: Record<string, string> = {};
  if (fs.existsSync(file)) {
    try {
      keys = JSON.parse(fs.readFileSync(file, "utf8")) as Record<string, string>;
    } catch {
      throw new LocalStackError(`${file} is not valid JSON; delete it to generate new local keys`);
    }
  }
  let changed = false;
  for (const customer of customers) {
    if (typeof keys[customer] !== "string" || keys[customer].length < 20) {
      // API Gateway generates 40-character alphanumeric keys; so do we.
      keys[customer] = randomBytes(30).toString("base64url").replace(/[-_]/g, "x").slice(0, 40);
      changed = true;
    }
  }
  if (changed) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, JSON.stringify(keys, null, 2) + "\n", { mode: 0o600 });
  }
  return keys;
}

export async function startLocalStack(options: LocalStackOptions = {}): Promise<LocalStack> {
  const env = options.env ?? process.env;
  const projectDir = options.projectDir ?? ROOT;
  const stackFile = path.join(projectDir, `Pulumi.${options.stack ?? "dev"}.yaml`);
  const dataDir = options.dataDir ?? path.join(projectDir, ".local");
  const config = readStackFile(stackFile);
  const apiKeys = ensureApiKeys(path.join(dataDir, "api-keys.json"), Object.keys(config.customers));

  const started: Array<{ stop(): Promise<void> | void }> = [];
  const stopAll = async () => {
    for (const part of started.reverse()) await part.stop();
  };
  const stripeBilling = env.STRIPE_BILLING?.trim() || "meters";
  if (stripeBilling !== "meters" && stripeBilling !== "moesif") throw new LocalStackError(`STRIPE_BILLING must be "meters" or "moesif", got "${stripeBilling}"`);
  const intervalMs = integerEnv(env, "FORWARDER_INTERVAL_MS", DEFAULT_FORWARDER_INTERVAL_MS, 10);
  const sinkDelayMs = integerEnv(env, "LOCAL_SINK_DELAY_MS", 0, 0);
  const externalStripe = stripeBilling === "meters" && Boolean(env.STRIPE_API_BASE?.trim());
  if (externalStripe && !env.STRIPE_API_KEY) throw new LocalStackError("STRIPE_API_BASE is set but STRIPE_API_KEY is not: give the key of that Stripe-compatible server");
  try {
    const store = new SqliteStore(path.join(dataDir, "usage.db"));
    started.push({ stop: () => store.close() });

    let ledgerDb: LedgerDb;
    try {
      ledgerDb = await LedgerDb.start(dataDir, { publish: true });
    } catch (err) {
      if (err instanceof LocalLedgerError) throw new LocalStackError(err.message);
      throw err;
    }
    started.push(ledgerDb);
    // Any reservation on the customers table older than this belongs to a process that is gone: LevelDB's lock
    // (taken above) makes this process dynalite's only server, so no other live process can have made it.
    const startedAt = Date.now();
    const repaired = ledgerDb.repaired;
    if (repaired && (repaired.restored.length > 0 || repaired.unindexed.length > 0)) {
      // The last run was killed mid-write (kill -9): say what the start-up repair of dynalite's index did.
      const line = JSON.stringify({ time: new Date().toISOString(), level: "warn", message: "ledger_index_repaired", restored: repaired.restored, unindexed: repaired.unindexed, reindexed: repaired.reindexed });
      (options.write ?? ((l: string) => process.stdout.write(l + "\n")))(line);
    }

    let upstream: UpstreamServer | undefined;
    let upstreamUrl = env.UPSTREAM_BASE_URL;
    let upstreamKey = env.UPSTREAM_API_KEY;
    if (!upstreamUrl) {
      upstream = await new UpstreamServer({ apiKey: LOCAL_UPSTREAM_KEY }).start();
      started.push(upstream);
      upstreamUrl = upstream.url;
      upstreamKey = LOCAL_UPSTREAM_KEY;
    } else if (!upstreamKey) {
      // Ollama and vLLM ignore the key; OpenAI needs one.
      upstreamKey = "none";
    }

    let collector: MoesifCollector | undefined;
    let moesifBase = env.MOESIF_BASE_URI ?? config.moesifBaseUri;
    let moesifAppId = env.MOESIF_APPLICATION_ID;
    if (!moesifAppId) {
      collector = await new MoesifCollector({ applicationId: LOCAL_MOESIF_APP_ID, store, keepRawPayloads: options.keepRawPayloads, answerDelayMs: sinkDelayMs }).start();
      started.push(collector);
      moesifBase = collector.url;
      moesifAppId = LOCAL_MOESIF_APP_ID;
    }

    let stripe: StripeServer | undefined;
    let stripeApiBase: string | undefined;
    let stripeApiKey: string | undefined;
    if (externalStripe) {
      stripeApiBase = env.STRIPE_API_BASE!.trim();
      stripeApiKey = env.STRIPE_API_KEY;
    } else if (stripeBilling === "meters") {
      stripe = await new StripeServer({ apiKey: LOCAL_STRIPE_API_KEY, dbFile: path.join(dataDir, "stripe.db") }).start();
      started.push(stripe);
      stripeApiBase = stripe.url;
      stripeApiKey = LOCAL_STRIPE_API_KEY;
    }

    const keys: GatewayKey[] = Object.entries(config.customers).map(([customerId, customer]) => ({
      id: localKeyId(customerId),
      value: apiKeys[customerId],
      customerId,
      plan: config.plans[customer.plan],
    }));
    // The key items `pulumi up` writes (one per customer, exactly `keyItem(...)`), with the local key ids; key items
    // of customers gone from the stack file are deleted. The function reads customers from here, not CUSTOMERS.
    const keySync = await syncKeyItems(
      ledgerDb.endpoint,
      keys.map((k) => keyItem(k.id, k.customerId, config.customers[k.customerId])),
      ledgerDb.customersTable,
    );
    const customerStore = createCustomerStoreFromEnv(ledgerDb.customersEnv, { timeoutMs: 10_000 });
    started.push({ stop: () => customerStore.destroy() });
    const webhookSecret = env.STRIPE_WEBHOOK_SECRET?.trim() || LOCAL_STRIPE_WEBHOOK_SECRET;
    const staleAfterMs = integerEnv(env, "HOLD_STALE_AFTER_MS", holdStaleAfterMs(config), 1000);
    // The same variables the Pulumi program gives the Lambda, built by the same helpers.
    const functionEnv: NodeJS.ProcessEnv = {
      UPSTREAM_BASE_URL: upstreamUrl,
      UPSTREAM_API_KEY: upstreamKey,
      UPSTREAM_TIMEOUT_MS: String(config.upstreamTimeoutMs),
      // The longest silence allowed between two streamed chunks from the upstream.
      UPSTREAM_IDLE_TIMEOUT_MS: String(config.upstreamIdleTimeoutMs),
      MAX_REQUEST_BYTES: String(config.maxRequestBytes),
      RESPONSE_ENVELOPE: config.responseEnvelope,
      MOESIF_APPLICATION_ID: moesifAppId,
      MOESIF_BASE_URI: moesifBase,
      MOESIF_LOG_BODIES: String(config.logBodies),
      METERING_TIMEOUT_MS: String(config.meteringTimeoutMs),
      PLANS: JSON.stringify(functionPlans(config.plans)),
      // The function strips a top-level `mock` field before forwarding to a real upstream; the built-in model server
      // reads it to misbehave on request. (A test pointing UPSTREAM_BASE_URL at its own mock server sets it itself.)
      FORWARD_MOCK_DIRECTIVES: upstream || env.FORWARD_MOCK_DIRECTIVES === "true" ? "true" : "false",
      LOG_LEVEL: env.LOG_LEVEL ?? "info",
      // The ledger: the request path writes each request's usage there; the Moesif settings above are its fallback.
      ...ledgerDb.env,
      LEDGER_TIMEOUT_MS: env.LEDGER_TIMEOUT_MS?.trim() || String(config.ledgerTimeoutMs),
      STRIPE_BILLING: stripeBilling,
      // The customers table (key items, balances, usage counters) on the same dynalite.
      CUSTOMERS_TABLE: ledgerDb.customersTable,
      CUSTOMERS_TIMEOUT_MS: env.CUSTOMERS_TIMEOUT_MS?.trim() || String(config.customersTimeoutMs),
      CUSTOMER_CACHE_TTL_MS: env.CUSTOMER_CACHE_TTL_MS?.trim() || String(config.customerCacheTtlMs),
      // Who created each stored Responses API response (same dynalite); its timeout defaults to CUSTOMERS_TIMEOUT_MS'.
      RESPONSES_TABLE: ledgerDb.responsesTable,
      ...(env.RESPONSES_TIMEOUT_MS?.trim() ? { RESPONSES_TIMEOUT_MS: env.RESPONSES_TIMEOUT_MS.trim() } : {}),
      // Given directly (on AWS: STRIPE_WEBHOOK_SECRET_PARAMETER names an SSM SecureString).
      STRIPE_WEBHOOK_SECRET: webhookSecret,
    };
    const lambda = createHandler(() => createDeps(functionEnv, { write: options.write }));
    // An invocation outlives its answer (the function meters once the answer is out): stop() waits for those in
    // flight before stopping the ledger, so a request answered just before Ctrl-C still has its ledger item.
    const invocations = new Set<Promise<void>>();
    const handler = streamifyResponse(async (...args: Parameters<typeof lambda>) => {
      const invocation = lambda(...args);
      invocations.add(invocation);
      try {
        await invocation;
      } finally {
        invocations.delete(invocation);
      }
    });
    started.push({ stop: async () => void (await Promise.allSettled([...invocations])) });

    // The usage dashboard (/_dashboard, loopback, no key) reads the ledger with its own client, so its Scans never
    // share connections with the request path's writes.
    const dashboardDoc = createLedgerDocumentClient(ledgerDb.env, { timeoutMs: 10_000 });
    started.push({ stop: () => dashboardDoc.destroy() });
    const gateway = new GatewayEmulator({
      localPages: [
        dashboardPage({
          ledger: { doc: dashboardDoc, table: ledgerDb.table },
          customers: customerStore,
          plans: config.plans,
          description: `local stack "${options.stack ?? "dev"}": ${path.join(dataDir, "ledger")}`,
        }),
      ],
      stage: config.stageName,
      stageThrottle: { rateLimit: config.stageThrottleRateLimit, burstLimit: config.stageThrottleBurstLimit },
      routes: ROUTES,
      keys,
      handler,
      quota: store,
      port: options.port ?? 3000,
      // The function's own timeout bounds the invocation, hence the stream (the integration allows up to 900 s).
      integrationTimeoutMs: config.lambdaTimeoutSeconds * 1000,
      streamIdleTimeoutMs: options.streamIdleTimeoutMs,
    });
    try {
      await gateway.start();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "EADDRINUSE") throw new LocalStackError(`port ${options.port ?? 3000} is in use: stop the other process or set PORT=<free port>`);
      if (code === "EACCES") throw new LocalStackError(`port ${options.port ?? 3000} needs privileges: set PORT to a number above 1024`);
      throw err;
    }
    started.push(gateway);

    // The forwarder's environment as on AWS (infra/function-env.ts forwarderEnvironment), but with secrets given
    // directly and no sweep grace: locally the sweep is the only trigger (dynalite has no streams).
    const forwarderEnv: NodeJS.ProcessEnv = {
      ...ledgerDb.env,
      CUSTOMERS_TABLE: ledgerDb.customersTable,
      CUSTOMERS_TIMEOUT_MS: functionEnv.CUSTOMERS_TIMEOUT_MS,
      HOLD_STALE_AFTER_MS: String(staleAfterMs),
      MOESIF_BASE_URI: moesifBase,
      MOESIF_APPLICATION_ID: moesifAppId,
      STRIPE_BILLING: stripeBilling,
      ...(stripeApiBase ? { STRIPE_API_BASE: stripeApiBase, STRIPE_API_KEY: stripeApiKey } : {}),
      FORWARDER_SWEEP_GRACE_MS: "0",
      ...(env.SINK_TIMEOUT_MS ? { SINK_TIMEOUT_MS: env.SINK_TIMEOUT_MS } : {}),
      ...(env.FORWARDER_BATCH_SIZE ? { FORWARDER_BATCH_SIZE: env.FORWARDER_BATCH_SIZE } : {}),
      ...(env.STRIPE_METER_API ? { STRIPE_METER_API: env.STRIPE_METER_API } : {}),
      LOG_LEVEL: env.LOG_LEVEL ?? "info",
    };
    let forwarder: UsageForwarder;
    try {
      // orphanHoldsBefore: holds made before this start are settled at the first sweep, not after HOLD_STALE_AFTER_MS.
      forwarder = createForwarderFromEnv(forwarderEnv, { write: options.write, ...options.forwarder, orphanHoldsBefore: startedAt });
    } catch (err) {
      // ForwarderConfigError: a bad SINK_TIMEOUT_MS, FORWARDER_BATCH_SIZE, STRIPE_METER_API or URL (no secret in it).
      throw new LocalStackError((err as Error).message);
    }
    const loop = new SweepLoop(() => forwarder.sweep(), intervalMs).start();
    started.push(loop);

    const ledgerDoc = createLedgerDocumentClient(ledgerDb.env);
    started.push({ stop: () => ledgerDoc.destroy() });
    const ledgerStore = new LedgerStore(ledgerDoc, ledgerDb.table);
    const drain = async ({ timeoutMs = 30_000 }: { timeoutMs?: number } = {}): Promise<void> => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        await forwarder.sweep();
        const [owed] = await ledgerStore.backlog({ now: Date.now(), graceMs: 0, limit: 1 });
        if (!owed) return;
        if (Date.now() > deadline) {
          throw new Error(`the ledger still owes deliveries after ${timeoutMs} ms, e.g. ${owed.transaction_id} (moesif ${owed.moesif_state ?? "-"}, stripe ${owed.stripe_state ?? "-"})`);
        }
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    };

    return {
      config,
      stackFile,
      baseUrl: gateway.baseUrl,
      apiKeys,
      upstream,
      upstreamUrl,
      collector,
      store,
      gateway,
      dataDir,
      ledger: { endpoint: ledgerDb.endpoint, table: ledgerDb.table, store: ledgerStore },
      customers: { table: ledgerDb.customersTable, store: customerStore, keys: keySync },
      responses: { table: ledgerDb.responsesTable },
      stripeWebhook: { url: `${gateway.baseUrl}/stripe/webhook`, secret: webhookSecret },
      stripeBilling,
      stripe,
      stripeApiBase,
      forwarder,
      forwarderIntervalMs: intervalMs,
      drain,
      stop: stopAll,
    };
  } catch (err) {
    await stopAll();
    throw err;
  }
}
