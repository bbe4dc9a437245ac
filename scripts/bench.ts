/**
 * `npm run bench`: the figures the README quotes, measured in one run on this machine (under ~2 minutes).
 *
 * Serving: the built bundle (what `pulumi up` deploys) runs in its own Node process behind a minimal node:http
 * server that turns each request into the API Gateway proxy event and calls `handler`, as Lambda would; the load
 * comes from this process over loopback. The same requests also go straight to the model server, and through a
 * minimal node:http pass-through proxy in its own process (the practical floor: one more process and HTTP hop, no
 * work). For each: latency p50/p99, requests/s, and CPU time per request of the serving process (`process.cpuUsage`
 * deltas reported over IPC), at concurrency 1 and 32, interleaved in rounds so machine noise hits all alike.
 * The model server and the collector run in a child process of their own.
 *
 * Streaming: time to first byte, time to the first word and the time per chunk of a streamed answer (200 words
 * unpaced; 50 words 10 ms apart), from the model server directly and through the metered function, same run.
 *
 * Metering on the request path, before and after the usage ledger, same run: the serving table has a row for the
 * bundle writing the ledger (`LEDGER_TABLE`, against dynalite in its own process) beside the row sending to Moesif;
 * and a metering table times what the handler awaits per request, `MoesifMeter.record` (the awaited send to the
 * collector) versus `LedgerMeter.record` (the conditional put to dynalite), called from this process at
 * concurrency 1 and 32 (p50/p95 ms, records/s), interleaved in rounds.
 *
 * Customers table and prepaid credits, same run: two more rows in the serving rounds serve the same bundle with the
 * ledger and the customers table (`CUSTOMERS_TABLE`, on the same dynalite; key items written with `keyItem`, as
 * `pulumi up` writes them): a priced postpaid plan (cached key lookup, usage counters ADDed after the answer) and the
 * same prices on a prepaid plan (tokenizer estimate and conditional reservation before the upstream call, settlement
 * after the answer). The account is topped up first, through the store's `credit`, with enough for every request of
 * the run to hold its whole reservation. Their table prints p50/p95/p99 (the answer), the invocation's p50 (the
 * handler's whole run, settlement and ledger write included: what Lambda bills), req/s, the function's and dynalite's
 * CPU per request, and the prepaid − postpaid difference; then a check that the prepaid balance is exactly the credit minus
 * the ledger items' `charged_micros` with nothing left reserved (the bench exits non-zero when it does not hold).
 *
 * Then: the token estimator on 1 KB / 100 KB / 1 MB single-word prompts (each in a fresh process with a time limit),
 * the model server's answer time for a 1 MB single-word prompt, the time one `MoesifMeter.record` takes for a
 * normal event and for one whose body nests 20,000 arrays, the whole local stack, and the bundle's size, cold
 * import time and peak RSS.
 */
import { CreateTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { DynamoDBDocumentClient, GetCommand, PutCommand, ScanCommand, type ScanCommandOutput } from "@aws-sdk/lib-dynamodb";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import readline from "node:readline";
import { createLedgerWriter, LedgerMeter } from "../functions/ai-chat/ledger";
import { createLogger } from "../functions/ai-chat/logger";
import { transactionIdFor, type UsageMeter, type UsageRecord } from "../functions/ai-chat/metering";
import { MoesifMeter } from "../functions/ai-chat/moesif";
import { DEFAULT_MAX_OUTPUT_TOKENS } from "../functions/ai-chat/config";
import { estimateRequestTokens } from "../functions/ai-chat/usage";
import { CUSTOMERS_TABLE_SCHEMA, keyItem, LOCAL_CUSTOMERS_TABLE } from "../functions/shared/customer-schema";
import { createCustomerStoreFromEnv, type DynamoCustomerStore } from "../functions/shared/customer-store";
import { LEDGER_TABLE_SCHEMA, LOCAL_LEDGER_TABLE } from "../functions/shared/ledger-schema";
import { formatMicros, maxCostOf, type ModelPrice } from "../functions/shared/pricing";
import { measureBundle } from "./build-function";
import { startLocalStack } from "./local/stack";

const ROOT = path.resolve(__dirname, "..");
const TS_NODE = path.join(ROOT, "node_modules/ts-node/dist/bin.js");
const UPSTREAM_KEY = "bench-upstream-key";
const APP_ID = "bench-app";
const REQUESTS = Number(process.env.BENCH_REQUESTS ?? 3000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const ESTIMATE_LIMIT_MS = Number(process.env.BENCH_ESTIMATE_LIMIT_MS ?? 20_000);
/** Streams per path for the unpaced streaming row (the paced row runs a fifth as many). */
const STREAM_RUNS = Number(process.env.BENCH_STREAM_RUNS ?? 100);
/**
 * Another build of the function (e.g. an older commit's `npm run build` output, `.build/ai-chat/index.js`) to serve
 * beside this one in the same rounds, for a before/after comparison under the same machine noise.
 */
const BASELINE_BUNDLE = process.env.BENCH_BASELINE_BUNDLE;
/** Records per meter, concurrency and round in the metering table. */
const METER_RECORDS = Number(process.env.BENCH_METER_RECORDS ?? 1500);
const BODY = JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "system", content: "You are terse." }, { role: "user", content: "Hello!" }] });
const CUSTOMERS = JSON.stringify({ "bench-key-id": { customerId: "bench", plan: "pro", stripeCustomerId: "cus_bench" } });
const PLANS = JSON.stringify({ pro: {} });
/**
 * The customers-table rows' plans: the same prices (gpt-4o-mini's list price, micro-units of USD per 1M tokens),
 * billed afterwards or from a balance. The prepaid plan keeps the default output cap (4096 tokens per choice).
 */
const BENCH_PRICE: ModelPrice = { input: 150_000, output: 600_000 };
const CREDIT_PLANS = JSON.stringify({
  metered: { pricing: { currency: "usd", prices: { "gpt-4o-mini": BENCH_PRICE } } },
  prepaid: { billing: "prepaid", pricing: { currency: "usd", prices: { "gpt-4o-mini": BENCH_PRICE } } },
});
/** The customers of the customers-table rows: one key each, written as `pulumi up` writes key items. */
const POSTPAID = { apiKeyId: "bench-postpaid-key-id", customerId: "bench-postpaid", plan: "metered", stripeCustomerId: "cus_bench_postpaid" };
const PREPAID = { apiKeyId: "bench-prepaid-key-id", customerId: "bench-prepaid", plan: "prepaid", stripeCustomerId: "cus_bench_prepaid" };

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/** Runs `total` calls of `fn` with `concurrency` in flight; returns per-call latencies (ms) and wall time. */
async function load(fn: () => Promise<void>, total: number, concurrency: number): Promise<{ latencies: number[]; wallMs: number }> {
  const latencies: number[] = [];
  let next = 0;
  const started = process.hrtime.bigint();
  const worker = async () => {
    while (next < total) {
      next += 1;
      const t = process.hrtime.bigint();
      await fn();
      latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { latencies, wallMs: Number(process.hrtime.bigint() - started) / 1e6 };
}

/** A POST of BODY to `url` over a keep-alive agent; the answer is read and parsed as a client would. */
function caller(url: string, headers: Record<string, string> = {}): () => Promise<void> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const target = new URL(url);
  const requestHeaders = { "content-type": "application/json", "content-length": String(Buffer.byteLength(BODY)), ...headers };
  return () =>
    new Promise((resolve, reject) => {
      const req = http.request(target, { method: "POST", agent, headers: requestHeaders }, (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          if (res.statusCode !== 200) return reject(new Error(`${url} answered ${res.statusCode}: ${text.slice(0, 300)}`));
          JSON.parse(text);
          resolve();
        });
        res.on("error", reject);
      });
      req.on("error", reject);
      req.end(BODY);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Child processes. The two servers below are plain JavaScript once transpiled and import nothing from this file:
// each runs as `node -e "(<its source>)()"`, so no ts-node hook or benchmark code shares its process.

/**
 * Serves the bundled handler over node:http, as API Gateway + Lambda would call it (REST proxy event, base64 body).
 * A streaming handler (tagged by `awslambda.streamifyResponse`) gets a response stream that writes the prelude's
 * status and headers on the first write and every chunk to the socket as it comes, as API Gateway's STREAM
 * integration does; the `awslambda` global it finds is this stand-in, installed before the bundle loads, as the
 * Lambda runtime installs its own.
 */
function functionServer(): void {
  const nodeHttp = require("node:http") as typeof import("node:http");
  const { EventEmitter } = require("node:events") as typeof import("node:events");
  const STREAMING = Symbol.for("aws.lambda.runtime.handler.streaming");
  type Prelude = { statusCode?: number; headers?: Record<string, string>; multiValueHeaders?: Record<string, string[]> };
  class BenchResponseStream extends EventEmitter {
    prelude?: Prelude;
    writableEnded = false;
    private wrote = false;
    constructor(private readonly res: import("node:http").ServerResponse) {
      super();
      res.on("drain", () => this.emit("drain"));
    }
    setContentType(): void {}
    write(chunk: string | Uint8Array): boolean {
      if (!this.wrote) {
        this.wrote = true;
        this.res.writeHead(this.prelude?.statusCode ?? 200, { ...this.prelude?.headers, ...this.prelude?.multiValueHeaders });
        this.res.flushHeaders();
      }
      return typeof chunk === "string" && chunk.length === 0 ? true : this.res.write(chunk);
    }
    end(): void {
      if (this.writableEnded) return;
      this.writableEnded = true;
      if (!this.wrote) this.res.writeHead(500); // no prelude: API Gateway's 500
      this.res.end();
      this.emit("close");
    }
  }
  (globalThis as Record<string, unknown>).awslambda = {
    streamifyResponse(fn: Record<symbol, string>) {
      fn[STREAMING] = "response";
      return fn;
    },
    HttpResponseStream: {
      from(stream: BenchResponseStream, prelude: Prelude) {
        stream.prelude = prelude;
        return stream;
      },
    },
  };
  const { handler } = require(process.env.BENCH_BUNDLE as string) as {
    handler: ((event: unknown, context: unknown) => Promise<{ statusCode: number; headers?: Record<string, string>; body: string; isBase64Encoded?: boolean }>) &
      ((event: unknown, stream: BenchResponseStream, context: unknown) => Promise<void>) & { [STREAMING]?: string };
  };
  const streaming = handler[STREAMING] === "response";
  let served = 0;
  /** Invocation times (ms from the event to the handler's promise settling: what Lambda bills), since the last report. */
  let invocations: number[] = [];
  const server = nodeHttp.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      served += 1;
      const headers: Record<string, string> = {};
      for (const [name, value] of Object.entries(req.headers)) if (typeof value === "string") headers[name] = value;
      const event = {
        resource: "/v1/chat/completions",
        path: "/v1/chat/completions",
        httpMethod: req.method,
        headers,
        multiValueHeaders: null,
        queryStringParameters: null,
        body: Buffer.concat(chunks).toString("base64"),
        isBase64Encoded: true,
        requestContext: { requestId: `bench-${process.pid}-${served}`, stage: "beta", identity: { apiKeyId: process.env.BENCH_API_KEY_ID || "bench-key-id", sourceIp: "127.0.0.1" } },
      };
      const context = { awsRequestId: `aws-${served}`, getRemainingTimeInMillis: () => 29_000, callbackWaitsForEmptyEventLoop: true };
      const invoked = process.hrtime.bigint();
      const finished = (): void => void invocations.push(Number(process.hrtime.bigint() - invoked) / 1e6);
      const failed = (): void => {
        finished();
        if (res.headersSent) {
          res.destroy();
          return;
        }
        res.writeHead(500);
        res.end();
      };
      if (streaming) {
        handler(event, new BenchResponseStream(res), context).then(finished, failed);
        return;
      }
      handler(event, context).then((result) => {
        finished();
        const body = result.isBase64Encoded ? Buffer.from(result.body, "base64") : Buffer.from(result.body);
        res.writeHead(result.statusCode, { ...result.headers, "content-length": String(body.length) });
        res.end(body);
      }, failed);
    });
  });
  server.keepAliveTimeout = 65_000;
  server.listen(0, "127.0.0.1", () => process.send!({ port: (server.address() as import("node:net").AddressInfo).port }));
  process.on("message", () => {
    process.send!({ cpu: process.cpuUsage(), maxRss: process.resourceUsage().maxRSS, invocations });
    invocations = [];
  });
  process.on("disconnect", () => process.exit(0));
}

/** The floor: reads the request, forwards it to the model server with the service key, returns the answer. */
function passThroughServer(): void {
  const nodeHttp = require("node:http") as typeof import("node:http");
  const target = new URL(`${process.env.BENCH_UPSTREAM}/chat/completions`);
  const agent = new nodeHttp.Agent({ keepAlive: true, maxSockets: 64 });
  const server = nodeHttp.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const headers = { "content-type": "application/json", "content-length": String(body.length), authorization: `Bearer ${process.env.BENCH_UPSTREAM_KEY}` };
      const upstream = nodeHttp.request(target, { method: "POST", agent, headers }, (answer) => {
        const parts: Buffer[] = [];
        answer.on("data", (c: Buffer) => parts.push(c));
        answer.on("end", () => {
          const out = Buffer.concat(parts);
          res.writeHead(answer.statusCode ?? 502, { "content-type": "application/json", "content-length": String(out.length) });
          res.end(out);
        });
      });
      upstream.on("error", () => {
        res.writeHead(502);
        res.end();
      });
      upstream.end(body);
    });
  });
  server.keepAliveTimeout = 65_000;
  server.listen(0, "127.0.0.1", () => process.send!({ port: (server.address() as import("node:net").AddressInfo).port }));
  process.on("message", () => process.send!({ cpu: process.cpuUsage(), maxRss: process.resourceUsage().maxRSS }));
  process.on("disconnect", () => process.exit(0));
}

/** The ledger: dynalite (in memory) in its own process, so that its work is not billed to what is measured. */
function dynaliteServer(): void {
  type Dynalite = { listen(port: number, host: string, done: () => void): void; address(): import("node:net").AddressInfo };
  const dynalite = (require(process.env.BENCH_DYNALITE as string) as (options: object) => Dynalite)({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
  dynalite.listen(0, "127.0.0.1", () => process.send!({ port: dynalite.address().port }));
  process.on("message", () => process.send!({ cpu: process.cpuUsage(), maxRss: process.resourceUsage().maxRSS }));
  process.on("disconnect", () => process.exit(0));
}

interface ServingChild {
  url: string;
  child: ChildProcess;
  /**
   * CPU microseconds (user + system) used so far, peak RSS in kB, and (function servers) the invocation times in ms
   * since the previous call.
   */
  usage(): Promise<{ cpuUs: number; maxRssKb: number; invocationsMs: number[] }>;
}

/**
 * Starts a serving child. Its stdout (the function's log lines) goes to `logFile` when given, else nowhere; a file
 * rather than a pipe, so that reading it costs the measured process nothing more than /dev/null would.
 */
function startServingChild(main: () => void, env: NodeJS.ProcessEnv, logFile?: string): Promise<ServingChild> {
  const out = logFile ? fs.openSync(logFile, "w") : "ignore";
  const child = spawn(process.execPath, ["-e", `(${main.toString()})()`], { env: { ...process.env, ...env }, stdio: ["ignore", out, "inherit", "ipc"] });
  if (typeof out === "number") fs.closeSync(out);
  return new Promise((resolve, reject) => {
    child.once("exit", (code) => reject(new Error(`serving child exited with ${code}`)));
    child.once("message", (message) => {
      const { port } = message as { port: number };
      resolve({
        url: `http://127.0.0.1:${port}`,
        child,
        usage: () =>
          new Promise((done) => {
            child.once("message", (m) => {
              const { cpu, maxRss, invocations } = m as { cpu: NodeJS.CpuUsage; maxRss: number; invocations?: number[] };
              done({ cpuUs: cpu.user + cpu.system, maxRssKb: maxRss, invocationsMs: invocations ?? [] });
            });
            child.send("usage");
          }),
      });
    });
  });
}

/** Environment that points the function (and `createLedgerWriter`) at the bench's dynalite. */
function ledgerEnv(endpoint: string): NodeJS.ProcessEnv {
  // dynalite checks no signature, but the SDK signs every request: dummy credentials keep it off the provider chain.
  return { LEDGER_TABLE: LOCAL_LEDGER_TABLE, AWS_ENDPOINT_URL_DYNAMODB: endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "bench", AWS_SECRET_ACCESS_KEY: "bench" };
}

/** Starts dynalite in a child process and creates the ledger table on it (from the shared schema, on demand). */
async function startLedger(): Promise<ServingChild> {
  const ledger = await startServingChild(dynaliteServer, { BENCH_DYNALITE: require.resolve("dynalite") });
  const client = new DynamoDBClient({ region: "us-east-1", endpoint: ledger.url, credentials: { accessKeyId: "bench", secretAccessKey: "bench" } });
  await client.send(
    new CreateTableCommand({
      TableName: LOCAL_LEDGER_TABLE,
      AttributeDefinitions: LEDGER_TABLE_SCHEMA.attributeDefinitions.map((d) => ({ ...d })),
      KeySchema: LEDGER_TABLE_SCHEMA.keySchema.map((k) => ({ ...k })),
      GlobalSecondaryIndexes: LEDGER_TABLE_SCHEMA.globalSecondaryIndexes.map((i) => ({ IndexName: i.IndexName, KeySchema: i.KeySchema.map((k) => ({ ...k })), Projection: { ...i.Projection } })),
      BillingMode: "PAY_PER_REQUEST",
    }),
  );
  client.destroy();
  return ledger;
}

/** What the ledger holds for one customer: items, and the sums the prepaid check compares with the balance. */
interface LedgerTotals {
  items: number;
  costMicros: number;
  chargedMicros: number;
  shortfallMicros: number;
  /** Prepaid items whose settlement was not confirmed (`settlement` other than `settled`). */
  unsettled: number;
  /** The distinct `reserved_micros` of the items (every request of a row holds the same). */
  reservations: Set<number>;
}

function documentClient(endpoint: string): DynamoDBDocumentClient {
  return DynamoDBDocumentClient.from(new DynamoDBClient({ region: "us-east-1", endpoint, credentials: { accessKeyId: "bench", secretAccessKey: "bench" } }));
}

/** Per customer id, the ledger's items and sums (one scan, page by page, projecting only the fields summed). */
async function ledgerTotals(endpoint: string): Promise<Map<string, LedgerTotals>> {
  const doc = documentClient(endpoint);
  const totals = new Map<string, LedgerTotals>();
  const names = { "#cid": "customer_id", "#cost": "cost_micros", "#chg": "charged_micros", "#short": "shortfall_micros", "#res": "reserved_micros", "#set": "settlement", "#mode": "billing_mode" };
  let start: Record<string, unknown> | undefined;
  try {
    do {
      const page: ScanCommandOutput = await doc.send(new ScanCommand({ TableName: LOCAL_LEDGER_TABLE, ProjectionExpression: Object.keys(names).join(", "), ExpressionAttributeNames: names, ExclusiveStartKey: start }));
      for (const item of page.Items ?? []) {
        const customer = String(item.customer_id ?? "");
        let t = totals.get(customer);
        if (!t) totals.set(customer, (t = { items: 0, costMicros: 0, chargedMicros: 0, shortfallMicros: 0, unsettled: 0, reservations: new Set() }));
        const micros = (value: unknown) => (typeof value === "number" ? value : 0);
        t.items += 1;
        t.costMicros += micros(item.cost_micros);
        t.chargedMicros += micros(item.charged_micros);
        t.shortfallMicros += micros(item.shortfall_micros);
        if (item.billing_mode === "prepaid" && item.settlement !== "settled") t.unsettled += 1;
        if (typeof item.reserved_micros === "number") t.reservations.add(item.reserved_micros);
      }
      start = page.LastEvaluatedKey;
    } while (start);
  } finally {
    doc.destroy();
  }
  return totals;
}

/**
 * Creates the customers table on the bench's dynalite (from the shared schema), writes the two key items exactly as
 * `pulumi up` does (`keyItem`), and credits the prepaid account through the store's own `credit`, with enough for
 * every request of the run to hold its whole reservation at once (so none can be refused, even were no hold ever
 * released). The reservation is the function's: its tokenizer's count of the prompt and the plan's output cap.
 */
async function prepareCustomers(endpoint: string, runRequests: number): Promise<{ store: DynamoCustomerStore; creditMicros: number; reservationMicros: number }> {
  const client = new DynamoDBClient({ region: "us-east-1", endpoint, credentials: { accessKeyId: "bench", secretAccessKey: "bench" } });
  await client.send(
    new CreateTableCommand({
      TableName: LOCAL_CUSTOMERS_TABLE,
      AttributeDefinitions: CUSTOMERS_TABLE_SCHEMA.attributeDefinitions.map((d) => ({ ...d })),
      KeySchema: CUSTOMERS_TABLE_SCHEMA.keySchema.map((k) => ({ ...k })),
      GlobalSecondaryIndexes: CUSTOMERS_TABLE_SCHEMA.globalSecondaryIndexes.map((i) => ({ IndexName: i.IndexName, KeySchema: i.KeySchema.map((k) => ({ ...k })), Projection: { ...i.Projection } })),
      BillingMode: "PAY_PER_REQUEST",
    }),
  );
  const doc = DynamoDBDocumentClient.from(client);
  for (const c of [POSTPAID, PREPAID]) {
    await doc.send(new PutCommand({ TableName: LOCAL_CUSTOMERS_TABLE, Item: { ...keyItem(c.apiKeyId, c.customerId, { plan: c.plan, stripeCustomerId: c.stripeCustomerId }) } }));
  }
  doc.destroy();
  const reservationMicros = maxCostOf(estimateRequestTokens(JSON.parse(BODY) as Parameters<typeof estimateRequestTokens>[0], "gpt-4o-mini"), DEFAULT_MAX_OUTPUT_TOKENS, BENCH_PRICE);
  const store = createCustomerStoreFromEnv({ ...process.env, ...ledgerEnv(endpoint), CUSTOMERS_TABLE: LOCAL_CUSTOMERS_TABLE }, { timeoutMs: 10_000 });
  const credited = await store.credit({ customerId: PREPAID.customerId, currency: "usd", creditId: `bench:${process.pid}:${Date.now()}`, micros: runRequests * reservationMicros, source: "bench", now: Date.now() });
  if (!credited.applied) throw new Error(`the prepaid account's top-up was refused: ${credited.reason}`);
  return { store, creditMicros: credited.balanceMicros, reservationMicros };
}

/** The postpaid account's counters, summed over periods (`requests@…`, `cost_micros@…`). */
async function postpaidCounters(endpoint: string): Promise<{ requests: number; costMicros: number }> {
  const doc = documentClient(endpoint);
  try {
    const { Item } = await doc.send(new GetCommand({ TableName: LOCAL_CUSTOMERS_TABLE, Key: { pk: `account#${POSTPAID.customerId}` }, ConsistentRead: true }));
    let requests = 0;
    let costMicros = 0;
    for (const [name, value] of Object.entries(Item ?? {})) {
      if (name.startsWith("requests@")) requests += Number(value);
      if (name.startsWith("cost_micros@")) costMicros += Number(value);
    }
    return { requests, costMicros };
  } finally {
    doc.destroy();
  }
}

/** Warning and error lines of a function's log, counted by message (`"none"` when there are none). */
function problemLines(logFile: string): string {
  const counts = new Map<string, number>();
  for (const line of fs.readFileSync(logFile, "utf8").split("\n")) {
    if (!line.startsWith("{")) continue;
    const { level, message } = JSON.parse(line) as { level?: string; message?: string };
    if (level === "warn" || level === "error") counts.set(String(message), (counts.get(String(message)) ?? 0) + 1);
  }
  return [...counts].map(([message, n]) => `${n} ${message}`).join(", ") || "no warnings or errors";
}

function startServers(): Promise<{ child: ChildProcess; upstream: string; collector: string }> {
  const child = spawn(process.execPath, [TS_NODE, "--transpile-only", path.join(ROOT, "scripts/local/serve.ts")], {
    env: { ...process.env, UPSTREAM_API_KEY: UPSTREAM_KEY, MOESIF_APPLICATION_ID: APP_ID },
    // The IPC channel is only there so that serve.ts exits (on "disconnect") if this process dies.
    stdio: ["ignore", "pipe", "inherit", "ipc"],
  });
  return new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stdout! }).once("line", (line) => resolve({ child, ...(JSON.parse(line) as { upstream: string; collector: string }) }));
    child.once("exit", (code) => reject(new Error(`servers exited with ${code}`)));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Serving table

interface Scenario {
  label: string;
  call: () => Promise<void>;
  serving?: ServingChild;
  /** The row's requests write to dynalite: its CPU over the row's runs is measured too. */
  store?: boolean;
  /** A customers-table row: printed in that table, not the serving table. */
  credits?: boolean;
  latencies: number[];
  /** Invocation times of the row's runs (ms), as the serving function measured them. */
  invocations: number[];
  wallMs: number;
  requests: number;
  cpuUs: number;
  dynaliteUs: number;
}

/** One row's figures, kept for the customers-table table. */
interface RowFigures {
  p50: number;
  p95: number;
  p99: number;
  /** p50 of the invocation time (the handler's whole run, settlement and ledger write included). */
  invocationP50?: number;
  reqPerS: number;
  cpuMs?: number;
  dynaliteMs?: number;
}

const LEDGER_ROW = "function bundle + ledger write";
const POSTPAID_ROW = "+ customers table, postpaid";
const PREPAID_ROW = "+ customers table, prepaid";

async function servingTable(
  servers: { upstream: string; collector: string; ledger: string; dynalite: ServingChild },
  bundleEntry: string,
): Promise<{ lines: string[]; credits: string[]; creditsHold: boolean; maxRssKb: number }> {
  const functionEnv = { BENCH_BUNDLE: bundleEntry, UPSTREAM_BASE_URL: servers.upstream, UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS, PLANS, LOG_LEVEL: "info" };
  const floor = await startServingChild(passThroughServer, { BENCH_UPSTREAM: servers.upstream, BENCH_UPSTREAM_KEY: UPSTREAM_KEY });
  const unmetered = await startServingChild(functionServer, functionEnv);
  const metered = await startServingChild(functionServer, { ...functionEnv, MOESIF_APPLICATION_ID: APP_ID, MOESIF_BASE_URI: servers.collector });
  // The ledger's function keeps the direct Moesif send as its fallback, as deployed (NODE_NO_WARNINGS: the SDK's
  // Node 20 support notice on stderr). Its log is kept, to count ledger_* lines: a write that failed went to the
  // fallback, and the row would partly measure that.
  const ledgerLog = path.join(ROOT, ".build", "bench-ledger-function.log");
  fs.mkdirSync(path.dirname(ledgerLog), { recursive: true });
  const ledgered = await startServingChild(
    functionServer,
    { ...functionEnv, MOESIF_APPLICATION_ID: APP_ID, MOESIF_BASE_URI: servers.collector, ...ledgerEnv(servers.ledger), NODE_NO_WARNINGS: "1" },
    ledgerLog,
  );
  // The customers-table rows: the ledger row's setup plus CUSTOMERS_TABLE (which replaces CUSTOMERS) and priced
  // plans; each child serves one customer's key, as API Gateway would name it in the event.
  const warmUp = 300;
  const perConcurrency = warmUp + ROUNDS * Math.round(REQUESTS / ROUNDS);
  const customers = await prepareCustomers(servers.ledger, 2 * perConcurrency);
  const { CUSTOMERS: _staticCustomers, ...tableEnv } = functionEnv;
  const creditEnv = { ...tableEnv, PLANS: CREDIT_PLANS, CUSTOMERS_TABLE: LOCAL_CUSTOMERS_TABLE, MOESIF_APPLICATION_ID: APP_ID, MOESIF_BASE_URI: servers.collector, ...ledgerEnv(servers.ledger), NODE_NO_WARNINGS: "1" };
  const postpaidLog = path.join(ROOT, ".build", "bench-postpaid-function.log");
  const prepaidLog = path.join(ROOT, ".build", "bench-prepaid-function.log");
  const postpaid = await startServingChild(functionServer, { ...creditEnv, BENCH_API_KEY_ID: POSTPAID.apiKeyId }, postpaidLog);
  const prepaid = await startServingChild(functionServer, { ...creditEnv, BENCH_API_KEY_ID: PREPAID.apiKeyId }, prepaidLog);
  const baselineEnv = BASELINE_BUNDLE ? { ...functionEnv, BENCH_BUNDLE: path.resolve(BASELINE_BUNDLE) } : undefined;
  const baseline = baselineEnv
    ? [await startServingChild(functionServer, baselineEnv), await startServingChild(functionServer, { ...baselineEnv, MOESIF_APPLICATION_ID: APP_ID, MOESIF_BASE_URI: servers.collector })]
    : [];
  const children = [floor, unmetered, metered, ledgered, postpaid, prepaid, ...baseline];
  const calls = new Map<string, number>();
  const counted = (customerId: string, call: () => Promise<void>) => () => {
    calls.set(customerId, (calls.get(customerId) ?? 0) + 1);
    return call();
  };
  const ledgerCall = counted("bench", caller(ledgered.url));
  const postpaidCall = counted(POSTPAID.customerId, caller(postpaid.url));
  const prepaidCall = counted(PREPAID.customerId, caller(prepaid.url));
  try {
    const lines: string[] = [];
    const header = ["path", "c", "p50 ms", "p99 ms", "req/s", "CPU ms/req", "CPU over floor"];
    const rows: string[][] = [];
    const figures = new Map<string, RowFigures>();
    for (const concurrency of [1, 32]) {
      const scenarios: Scenario[] = [
        { label: "model server directly", call: caller(`${servers.upstream}/chat/completions`, { authorization: `Bearer ${UPSTREAM_KEY}` }) },
        { label: "node:http pass-through (floor)", call: caller(floor.url), serving: floor },
        { label: "function bundle, metering off", call: caller(unmetered.url), serving: unmetered },
        { label: "function bundle + Moesif send", call: caller(metered.url), serving: metered },
        { label: LEDGER_ROW, call: ledgerCall, serving: ledgered, store: true },
        ...(baseline.length === 2
          ? [
              { label: "baseline bundle, metering off", call: caller(baseline[0].url), serving: baseline[0] },
              { label: "baseline bundle + Moesif send", call: caller(baseline[1].url), serving: baseline[1] },
            ]
          : []),
        { label: POSTPAID_ROW, call: postpaidCall, serving: postpaid, store: true, credits: true },
        { label: PREPAID_ROW, call: prepaidCall, serving: prepaid, store: true, credits: true },
      ].map((s) => ({ ...s, latencies: [], invocations: [], wallMs: 0, requests: 0, cpuUs: 0, dynaliteUs: 0 }));
      for (const s of scenarios) await load(s.call, warmUp, Math.min(concurrency, 8)); // warm-up: JIT, sockets
      for (let round = 0; round < ROUNDS; round++) {
        // The two customers-table rows swap places every round, so neither always runs right after the other.
        const order = round % 2 === 0 ? scenarios : [...scenarios.filter((s) => !s.credits), ...scenarios.filter((s) => s.credits).reverse()];
        for (const s of order) {
          const before = s.serving ? (await s.serving.usage()).cpuUs : 0;
          const dynaliteBefore = s.store ? (await servers.dynalite.usage()).cpuUs : 0;
          const run = await load(s.call, Math.round(REQUESTS / ROUNDS), concurrency);
          if (s.serving) {
            const after = await s.serving.usage();
            s.cpuUs += after.cpuUs - before;
            s.invocations.push(...after.invocationsMs);
          }
          if (s.store) s.dynaliteUs += (await servers.dynalite.usage()).cpuUs - dynaliteBefore;
          s.latencies.push(...run.latencies);
          s.wallMs += run.wallMs;
          s.requests += run.latencies.length;
        }
      }
      const floorCpu = scenarios[1].cpuUs / scenarios[1].requests / 1000;
      for (const s of scenarios) {
        s.latencies.sort((a, b) => a - b);
        const cpu = s.serving ? s.cpuUs / s.requests / 1000 : undefined;
        const reqPerS = Math.round((s.requests / s.wallMs) * 1000);
        figures.set(`${s.label}@${concurrency}`, {
          p50: percentile(s.latencies, 50),
          p95: percentile(s.latencies, 95),
          p99: percentile(s.latencies, 99),
          invocationP50: s.invocations.length > 0 ? percentile(s.invocations.sort((a, b) => a - b), 50) : undefined,
          reqPerS,
          cpuMs: cpu,
          dynaliteMs: s.store ? s.dynaliteUs / s.requests / 1000 : undefined,
        });
        if (s.credits) continue;
        rows.push([
          s.label,
          String(concurrency),
          percentile(s.latencies, 50).toFixed(3),
          percentile(s.latencies, 99).toFixed(3),
          String(reqPerS),
          cpu === undefined ? "-" : cpu.toFixed(3),
          cpu === undefined || s.serving === floor ? "-" : `+${(cpu - floorCpu).toFixed(3)}`,
        ]);
      }
    }
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
    lines.push(line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line));
    // Every request of the ledger rows must have its item, or some fell back to the Moesif send and the row
    // measured the fallback instead. The handler settles and meters after its answer is out, so the last
    // requests' settlements and writes may still be under way: wait for them.
    const expected = (customerId: string) => calls.get(customerId) ?? 0;
    let totals = await ledgerTotals(servers.ledger);
    let balance = await customers.store.getBalance(PREPAID.customerId);
    const items = (customerId: string) => totals.get(customerId)?.items ?? 0;
    for (let i = 0; i < 30 && ([["bench"], [POSTPAID.customerId], [PREPAID.customerId]].some(([c]) => items(c) < expected(c)) || balance.reservedMicros > 0); i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      totals = await ledgerTotals(servers.ledger);
      balance = await customers.store.getBalance(PREPAID.customerId);
    }
    const ledgerLines = new Map<string, number>();
    const ledgerReasons = new Set<string>();
    for (const line of fs.readFileSync(ledgerLog, "utf8").split("\n")) {
      if (!line.includes('"message":"ledger_')) continue;
      const { message, reason } = JSON.parse(line) as { message: string; reason?: string };
      ledgerLines.set(message, (ledgerLines.get(message) ?? 0) + 1);
      if (message === "ledger_write_failed" && reason) ledgerReasons.add(reason);
    }
    const logged = [...ledgerLines].map(([message, n]) => `${n} ${message}`).join(", ") || "no ledger_* log lines";
    lines.push("", `ledger row: ${items("bench")} ledger items for ${expected("bench")} requests; ${logged}${ledgerReasons.size > 0 ? ` (${[...ledgerReasons].slice(0, 3).join("; ")})` : ""}`);
    const { maxRssKb } = await metered.usage();
    if (baseline.length === 2) lines.push("", `baseline: ${BASELINE_BUNDLE}; peak RSS of its metered process ${((await baseline[1].usage()).maxRssKb / 1024).toFixed(1)} MB`);

    const check = await creditsCheck({ figures, totals, balance, creditMicros: customers.creditMicros, reservationMicros: customers.reservationMicros, expected, ledger: servers.ledger, logs: { postpaid: postpaidLog, prepaid: prepaidLog } });
    customers.store.destroy();
    return { lines, credits: check.lines, creditsHold: check.holds, maxRssKb };
  } finally {
    for (const c of children) c.child.kill("SIGTERM");
  }
}

/**
 * The customers-table table (the ledger row again for reference, then postpaid and prepaid with the table), the
 * prepaid − postpaid difference at each concurrency, and the check that the prepaid account's balance is exactly
 * its credit minus what the ledger says was charged, with nothing left reserved.
 */
async function creditsCheck(run: {
  figures: Map<string, RowFigures>;
  totals: Map<string, LedgerTotals>;
  balance: Awaited<ReturnType<DynamoCustomerStore["getBalance"]>>;
  creditMicros: number;
  reservationMicros: number;
  expected: (customerId: string) => number;
  ledger: string;
  logs: { postpaid: string; prepaid: string };
}): Promise<{ lines: string[]; holds: boolean }> {
  const { figures, balance } = run;
  const header = ["path (all with the ledger write)", "c", "p50 ms", "p95 ms", "p99 ms", "invocation p50 ms", "req/s", "CPU ms/req", "dynalite CPU ms/req"];
  const rows: string[][] = [];
  const differences: string[] = [];
  const ms = (n: number | undefined, digits = 3) => (n === undefined ? "-" : n.toFixed(digits));
  const signed = (n: number) => `${n >= 0 ? "+" : ""}${n.toFixed(3)}`;
  for (const c of [1, 32]) {
    for (const label of [LEDGER_ROW, POSTPAID_ROW, PREPAID_ROW]) {
      const f = figures.get(`${label}@${c}`)!;
      rows.push([label === LEDGER_ROW ? `${label} (CUSTOMERS variable, no prices)` : label, String(c), ms(f.p50), ms(f.p95), ms(f.p99), ms(f.invocationP50), String(f.reqPerS), ms(f.cpuMs), ms(f.dynaliteMs)]);
    }
    const post = figures.get(`${POSTPAID_ROW}@${c}`)!;
    const pre = figures.get(`${PREPAID_ROW}@${c}`)!;
    differences.push(
      `prepaid − postpaid, c=${c}: p50 ${signed(pre.p50 - post.p50)} ms (${(pre.p50 / post.p50).toFixed(2)}×), p95 ${signed(pre.p95 - post.p95)} ms (${(pre.p95 / post.p95).toFixed(2)}×), ` +
        `invocation p50 ${signed(pre.invocationP50! - post.invocationP50!)} ms, function CPU ${signed(pre.cpuMs! - post.cpuMs!)} ms/req, dynalite CPU ${signed(pre.dynaliteMs! - post.dynaliteMs!)} ms/req`,
    );
  }
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  const lines = [
    line(header),
    widths.map((w) => "-".repeat(w)).join("  "),
    ...rows.map(line),
    "(p50/p95/p99: what the caller waits for, the answer; invocation: the handler's whole run, which Lambda bills: the settlement or usage count and the ledger write come after the answer)",
    ...differences,
  ];

  const none: LedgerTotals = { items: 0, costMicros: 0, chargedMicros: 0, shortfallMicros: 0, unsettled: 0, reservations: new Set() };
  const pre = run.totals.get(PREPAID.customerId) ?? none;
  const post = run.totals.get(POSTPAID.customerId) ?? none;
  const calls = run.expected(PREPAID.customerId);
  const expectedBalance = run.creditMicros - pre.chargedMicros;
  const openHolds = Object.keys(balance.holds).length;
  const failures = [
    pre.items !== calls && `${pre.items} ledger items for ${calls} requests`,
    balance.balanceMicros !== expectedBalance && `balance_micros ${balance.balanceMicros} ≠ ${expectedBalance}`,
    balance.reservedMicros !== 0 && `reserved_micros ${balance.reservedMicros} ≠ 0`,
    openHolds !== 0 && `${openHolds} holds still open`,
    pre.chargedMicros !== pre.costMicros && `Σ charged_micros ${pre.chargedMicros} ≠ Σ cost_micros ${pre.costMicros}`,
    pre.shortfallMicros !== 0 && `Σ shortfall_micros ${pre.shortfallMicros}`,
    pre.unsettled !== 0 && `${pre.unsettled} items not settled`,
  ].filter((f): f is string => typeof f === "string");
  const n = (v: number) => v.toLocaleString("en");
  lines.push(
    "",
    `prepaid check: credit ${n(run.creditMicros)} − Σ charged_micros ${n(pre.chargedMicros)} of ${n(pre.items)} ledger items for ${n(calls)} requests ` +
      `(Σ cost_micros ${n(pre.costMicros)}) = ${n(expectedBalance)}; balance_micros ${n(balance.balanceMicros)}, reserved_micros ${n(balance.reservedMicros)}, ` +
      `${openHolds} open holds: ${failures.length === 0 ? "holds" : `FAILED (${failures.join("; ")})`}`,
    `  (credited ${formatMicros(run.creditMicros)} USD: ${n(run.creditMicros / run.reservationMicros)} requests of the run × the ${n(run.reservationMicros)} micro-units each holds; ` +
      `held per the ledger: ${[...pre.reservations].map(n).join(", ") || "-"}; charged ${formatMicros(pre.chargedMicros)} USD)`,
  );
  const counters = await postpaidCounters(run.ledger);
  const postCalls = run.expected(POSTPAID.customerId);
  lines.push(
    `postpaid counters: requests ${n(counters.requests)} for ${n(postCalls)} requests, cost_micros ${n(counters.costMicros)} (Σ ledger cost_micros ${n(post.costMicros)} of ${n(post.items)} items)`,
    `function logs: postpaid ${problemLines(run.logs.postpaid)}; prepaid ${problemLines(run.logs.prepaid)}`,
  );
  return { lines, holds: failures.length === 0 };
}

// ---------------------------------------------------------------------------------------------------------------
// Streaming: time to first byte and per-chunk overhead, through the function versus from the model server directly

interface StreamTiming {
  /** Request sent → first body byte (the role chunk). */
  ttfbMs: number;
  /** Request sent → first word. */
  firstWordMs: number;
  /** First word → last byte, divided by the words after the first. */
  perChunkMs: number;
  totalMs: number;
}

/** One streamed request: reads the SSE body as it arrives and times it. */
function streamOnce(url: string, body: string, headers: Record<string, string>, agent: http.Agent): Promise<StreamTiming> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const req = http.request(url, { method: "POST", agent, headers: { "content-type": "application/json", "content-length": String(Buffer.byteLength(body)), ...headers } }, (res) => {
      let ttfb: number | undefined;
      let firstWord: number | undefined;
      let words = 0;
      let text = "";
      res.on("data", (c: Buffer) => {
        const now = performance.now();
        ttfb ??= now - started;
        text += c.toString("utf8");
        const found = text.split('"delta":{"content":"').length - 1;
        if (found > 0 && firstWord === undefined) firstWord = now - started;
        words = found;
      });
      res.on("end", () => {
        const total = performance.now() - started;
        if (res.statusCode !== 200 || !text.includes("data: [DONE]") || firstWord === undefined) return reject(new Error(`${url} answered ${res.statusCode}: ${text.slice(0, 300)}`));
        resolve({ ttfbMs: ttfb ?? total, firstWordMs: firstWord, perChunkMs: words > 1 ? (total - firstWord) / (words - 1) : 0, totalMs: total });
      });
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

/**
 * Streams the same answers from the model server directly and through the function (metered), one at a time,
 * interleaved, for an unpaced 200-word answer and a paced 50-word one (10 ms between chunks).
 */
async function streamingTable(servers: { upstream: string; collector: string }, bundleEntry: string): Promise<string[]> {
  const metered = await startServingChild(functionServer, {
    BENCH_BUNDLE: bundleEntry,
    UPSTREAM_BASE_URL: servers.upstream,
    UPSTREAM_API_KEY: UPSTREAM_KEY,
    CUSTOMERS,
    PLANS,
    LOG_LEVEL: "info",
    MOESIF_APPLICATION_ID: APP_ID,
    MOESIF_BASE_URI: servers.collector,
    // The model server's pacing directives must reach it.
    FORWARD_MOCK_DIRECTIVES: "true",
  });
  const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  try {
    const header = ["stream", "path", "TTFB p50 ms", "first word p50 ms", "per chunk p50 ms", "total p50 ms"];
    const rows: string[][] = [];
    for (const [label, mock, runs] of [
      ["200 words, unpaced", { words: 200, chunk_delay_ms: 0 }, STREAM_RUNS],
      ["50 words, 10 ms apart", { words: 50, chunk_delay_ms: 10 }, Math.max(5, Math.round(STREAM_RUNS / 5))],
    ] as const) {
      const body = JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "Stream to me" }], stream: true, stream_options: { include_usage: true }, mock });
      const paths = [
        { name: "model server directly", call: () => streamOnce(`${servers.upstream}/chat/completions`, body, { authorization: `Bearer ${UPSTREAM_KEY}` }, agent) },
        { name: "function bundle + Moesif", call: () => streamOnce(metered.url, body, {}, agent) },
      ];
      for (const p of paths) for (let i = 0; i < (mock.chunk_delay_ms > 0 ? 2 : 10); i++) await p.call(); // warm-up
      const timings: StreamTiming[][] = paths.map(() => []);
      for (let i = 0; i < runs; i++) for (const [j, p] of paths.entries()) timings[j].push(await p.call());
      const medians = timings.map((list) => {
        const p50 = (pick: (t: StreamTiming) => number) => percentile(list.map(pick).sort((a, b) => a - b), 50);
        return { ttfb: p50((t) => t.ttfbMs), word: p50((t) => t.firstWordMs), chunk: p50((t) => t.perChunkMs), total: p50((t) => t.totalMs) };
      });
      for (const [j, p] of paths.entries()) {
        const m = medians[j];
        const d = j === 0 ? undefined : { ttfb: m.ttfb - medians[0].ttfb, chunk: m.chunk - medians[0].chunk };
        rows.push([
          j === 0 ? label : "",
          p.name,
          `${m.ttfb.toFixed(2)}${d ? ` (+${d.ttfb.toFixed(2)})` : ""}`,
          m.word.toFixed(2),
          `${m.chunk.toFixed(3)}${d ? ` (${d.chunk >= 0 ? "+" : ""}${d.chunk.toFixed(3)})` : ""}`,
          m.total.toFixed(1),
        ]);
      }
    }
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const line = (cells: string[]) => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
    return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line), "(in brackets: the function's overhead over the model server, same run; c=1, interleaved)"];
  } finally {
    agent.destroy();
    metered.child.kill("SIGTERM");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Estimator, model server, meter

/** Times the function's estimator on one single-word prompt of `bytes`, in a fresh process killed after the limit. */
function timeEstimate(bytes: number): Promise<string> {
  const script = `
    const { estimateUsage } = require(${JSON.stringify(path.join(ROOT, "functions/ai-chat/usage.ts"))});
    const request = (text) => ({ model: "gpt-4o-mini", messages: [{ role: "user", content: text }] });
    estimateUsage(request("warm up the ranks"), { choices: [] }, "gpt-4o-mini");
    const text = "a".repeat(${bytes});
    const t = process.hrtime.bigint();
    const usage = estimateUsage(request(text), { choices: [] }, "gpt-4o-mini");
    console.log(JSON.stringify({ ms: Number(process.hrtime.bigint() - t) / 1e6, tokens: usage.prompt_tokens }));`;
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["-r", "ts-node/register/transpile-only", "-e", script], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout!.on("data", (c: Buffer) => (out += c.toString()));
    const timer = setTimeout(() => child.kill("SIGKILL"), ESTIMATE_LIMIT_MS);
    child.on("exit", () => {
      clearTimeout(timer);
      try {
        const { ms, tokens } = JSON.parse(out.trim().split("\n").pop() ?? "") as { ms: number; tokens: number };
        resolve(`${ms.toFixed(1)} ms (${tokens} tokens)`);
      } catch {
        resolve(`over ${ESTIMATE_LIMIT_MS / 1000} s: still quadratic`);
      }
    });
  });
}

/** Wall time of one model-server answer to a single-word prompt of `bytes` (everyone else waits that long). */
async function modelServerAnswer(upstream: string, bytes: number): Promise<string> {
  const body = JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "a".repeat(bytes) }] });
  const started = performance.now();
  try {
    const response = await fetch(`${upstream}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${UPSTREAM_KEY}` },
      body,
      signal: AbortSignal.timeout(ESTIMATE_LIMIT_MS),
    });
    await response.json();
    return `${(performance.now() - started).toFixed(1)} ms (the time other callers wait)`;
  } catch {
    return `over ${ESTIMATE_LIMIT_MS / 1000} s (every other caller waits as long)`;
  }
}

/** A usage record as the core builds one for a short completion; each call a new transaction id. */
function benchRecord(i: number, requestBody: unknown): UsageRecord {
  return {
    transactionId: transactionIdFor(`meter-bench-${process.pid}-${i}-${Math.random()}`),
    requestId: `meter-bench-${i}`,
    method: "POST",
    route: "/v1/chat/completions",
    uri: "https://example.test/beta/v1/chat/completions",
    startedAt: Date.now(),
    finishedAt: Date.now(),
    apiKeyId: "bench-key-id",
    customer: { customerId: "bench", plan: "pro", stripeCustomerId: "cus_bench" },
    model: "gpt-4o-mini",
    usage: { prompt_tokens: 20, completion_tokens: 9, total_tokens: 29 },
    usageEstimated: false,
    status: 200,
    requestHeaders: { "content-type": "application/json", "user-agent": "bench" },
    responseHeaders: { "Content-Type": "application/json" },
    requestBody,
    responseBody: { id: "chatcmpl-1", object: "chat.completion", model: "gpt-4o-mini", choices: [{ index: 0, message: { role: "assistant", content: "Hello! You said: Hello!" } }], usage: { prompt_tokens: 20, completion_tokens: 9, total_tokens: 29 } },
  };
}

/** Mean wall time of `MoesifMeter.record` (build, serialise, gzip, send) over `runs` records. */
async function meterRecordMs(collector: string, requestBody: unknown, runs: number): Promise<number> {
  const meter = new MoesifMeter({ applicationId: APP_ID, baseUri: collector, logBodies: true, timeoutMs: 1000, log: createLogger({ level: "error", write: () => undefined }) });
  for (let i = 0; i < 5; i++) await meter.record(benchRecord(i, requestBody));
  const started = performance.now();
  for (let i = 0; i < runs; i++) await meter.record(benchRecord(i, requestBody));
  return (performance.now() - started) / runs;
}

/**
 * What the handler awaits per request to meter it, before and after the ledger, same run: `MoesifMeter.record`
 * (build the event, gzip, POST to the collector, read the answer) versus `LedgerMeter.record` (build the item and
 * its event, conditional PutItem to dynalite through the AWS SDK, read the answer), both with the defaults the
 * function uses (1000 ms budgets, no bodies). Called from this process (the collector and dynalite run in their
 * own), at concurrency 1 and 32, interleaved in rounds. A ledger write that failed would have gone to the fallback
 * and polluted the figure, so fallbacks and warnings are counted and printed.
 */
async function meteringTable(collector: string, ledgerServer: ServingChild): Promise<string[]> {
  const ledger = ledgerServer.url;
  let dynaliteCpuUs = 0;
  let ledgerWrites = 0;
  let warnings = 0;
  const log = createLogger({ level: "warn", write: () => void (warnings += 1) });
  let fallbacks = 0;
  const fallback: UsageMeter = { record: async () => void (fallbacks += 1) };
  const body = JSON.parse(BODY) as unknown;
  const meters: Array<{ label: string; meter: UsageMeter }> = [
    { label: "MoesifMeter.record: awaited send (before)", meter: new MoesifMeter({ applicationId: APP_ID, baseUri: collector, logBodies: false, timeoutMs: 1000, log }) },
    {
      label: "LedgerMeter.record: ledger write (after)",
      meter: new LedgerMeter({ writer: createLedgerWriter(ledgerEnv(ledger), LOCAL_LEDGER_TABLE, 1000), timeoutMs: 1000, logBodies: false, stripeBilling: "meters", fallback, log }),
    },
  ];
  let n = 0;
  const header = ["meter", "c", "p50 ms", "p95 ms", "p99 ms", "records/s"];
  const rows: string[][] = [];
  for (const concurrency of [1, 32]) {
    const runs = meters.map(() => ({ latencies: [] as number[], wallMs: 0 }));
    for (const { meter } of meters) await load(() => meter.record(benchRecord(n++, body)), 200, Math.min(concurrency, 8)); // warm-up
    for (let round = 0; round < ROUNDS; round++) {
      for (const [i, { meter }] of meters.entries()) {
        const isLedger = meter instanceof LedgerMeter;
        const before = isLedger ? (await ledgerServer.usage()).cpuUs : 0;
        const run = await load(() => meter.record(benchRecord(n++, body)), Math.round(METER_RECORDS / ROUNDS), concurrency);
        if (isLedger) {
          dynaliteCpuUs += (await ledgerServer.usage()).cpuUs - before;
          ledgerWrites += run.latencies.length;
        }
        runs[i].latencies.push(...run.latencies);
        runs[i].wallMs += run.wallMs;
      }
    }
    for (const [i, { label }] of meters.entries()) {
      const sorted = runs[i].latencies.sort((a, b) => a - b);
      rows.push([label, String(concurrency), ...[50, 95, 99].map((p) => percentile(sorted, p).toFixed(3)), String(Math.round((sorted.length / runs[i].wallMs) * 1000))]);
    }
  }
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [
    line(header),
    widths.map((w) => "-".repeat(w)).join("  "),
    ...rows.map(line),
    `(per-request metering time as the handler awaits it; collector and dynalite in their own processes; dynalite used ${(dynaliteCpuUs / ledgerWrites / 1000).toFixed(3)} ms CPU per write; ${fallbacks} ledger writes fell back to Moesif, ${warnings} warnings)`,
  ];
}

async function localStackRow(upstream: string): Promise<string> {
  // A plan roomy enough that the emulator's throttle never answers: this measures serving, not 429s.
  const projectDir = path.join(ROOT, ".build", "bench-project");
  fs.rmSync(projectDir, { recursive: true, force: true });
  fs.mkdirSync(projectDir, { recursive: true });
  fs.writeFileSync(
    path.join(projectDir, "Pulumi.bench.yaml"),
    [
      "config:",
      "  metered-ai-api:stageThrottleRateLimit: 1000000",
      "  metered-ai-api:stageThrottleBurstLimit: 1000000",
      "  metered-ai-api:plans:",
      "    bench: { rateLimit: 1000000, burstLimit: 1000000 }",
      "  metered-ai-api:customers:",
      "    bench: { plan: bench, stripeCustomerId: cus_bench }",
      "",
    ].join("\n"),
  );
  const stack = await startLocalStack({ stack: "bench", projectDir, port: 0, env: { UPSTREAM_BASE_URL: upstream, UPSTREAM_API_KEY: UPSTREAM_KEY, LOG_LEVEL: "error" }, write: () => undefined });
  try {
    const call = caller(`${stack.baseUrl}/v1/chat/completions`, { "x-api-key": stack.apiKeys.bench });
    await load(call, 100, 8);
    const { latencies, wallMs } = await load(call, 2000, 32);
    latencies.sort((a, b) => a - b);
    return `${Math.round((2000 / wallMs) * 1000)} req/s, p50 ${percentile(latencies, 50).toFixed(2)} ms, p99 ${percentile(latencies, 99).toFixed(2)} ms (gateway emulator + handler + ledger write + forwarder + SQLite collector and Stripe stand-in in one ts-node process, dynalite in a worker thread, c=32)`;
  } finally {
    await stack.stop();
  }
}

async function main(): Promise<void> {
  const started = Date.now();
  const bundle = measureBundle();
  const servers = await startServers();
  const ledger = await startLedger();
  try {
    process.stdout.write(`\nnpm run bench: ${REQUESTS} requests per path and concurrency in ${ROUNDS} interleaved rounds, loopback, node ${process.version}, ${new Date().toISOString()}\n\n`);
    const serving = await servingTable({ ...servers, ledger: ledger.url, dynalite: ledger }, bundle.entry);
    process.stdout.write(serving.lines.join("\n") + "\n\n");
    process.stdout.write(serving.credits.join("\n") + "\n\n");
    if (!serving.creditsHold) {
      process.stderr.write("npm run bench: the prepaid balance does not equal the credit minus the ledger's charges (see above)\n");
      process.exitCode = 1;
    }
    process.stdout.write((await meteringTable(servers.collector, ledger)).join("\n") + "\n\n");
    process.stdout.write((await streamingTable(servers, bundle.entry)).join("\n") + "\n\n");
    const other: Array<[string, string]> = [];
    for (const [label, bytes] of [["1 KB", 1024], ["100 KB", 100 * 1024], ["1 MB", 1024 * 1024]] as const) {
      other.push([`estimator, ${label} single-word prompt`, await timeEstimate(bytes)]);
    }
    await modelServerAnswer(servers.upstream, 1024);
    other.push(["model server answering a 1 MB single-word prompt", await modelServerAnswer(servers.upstream, 1024 * 1024)]);
    const normalBody = JSON.parse(BODY) as unknown;
    let deep: unknown = [];
    for (let i = 0; i < 20_000; i++) deep = [deep];
    other.push(["MoesifMeter.record, normal event (logBodies)", `${(await meterRecordMs(servers.collector, normalBody, 500)).toFixed(3)} ms mean (loopback collector)`]);
    other.push(["MoesifMeter.record, body nesting 20,000 arrays", `${(await meterRecordMs(servers.collector, { model: "gpt-4o-mini", messages: [], extra: deep }, 20)).toFixed(3)} ms mean (sent with the body truncated)`]);
    other.push(["local stack", await localStackRow(servers.upstream)]);
    other.push(["bundle (minified index.js)", `${(bundle.bytes / 1024).toFixed(1)} kB, ${(bundle.zippedBytes / 1024).toFixed(1)} kB zipped; archive with lazily loaded tokenizer ranks ${(bundle.archiveZippedBytes / 1024).toFixed(0)} kB deflated`]);
    other.push(["cold import of the bundle", `median ${bundle.coldImportMs.toFixed(1)} ms over ${bundle.importRuns} fresh processes`]);
    other.push(["peak RSS of the metered function process", `${(serving.maxRssKb / 1024).toFixed(1)} MB after ${(REQUESTS * 2 + 600).toLocaleString("en")} requests`]);

    const width = Math.max(...other.map(([name]) => name.length));
    for (const [name, figure] of other) process.stdout.write(`${name.padEnd(width)}  ${figure}\n`);
    process.stdout.write(`\n(${((Date.now() - started) / 1000).toFixed(0)} s)\n`);
  } finally {
    // SIGKILL: a model server busy tokenizing would not get to a SIGTERM handler, and it has nothing to flush.
    servers.child.kill("SIGKILL");
    ledger.child.kill("SIGKILL");
  }
}

main().catch((err) => {
  process.stderr.write(`npm run bench: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
