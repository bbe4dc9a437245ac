/**
 * What the forwarder suites share: dynalite in-process with the ledger table (from `LEDGER_TABLE_SCHEMA`), ledger
 * items written straight to it, and the environment that points the forwarder at it.
 */
import { CreateTableCommand, DeleteTableCommand, DescribeTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { BatchWriteCommand, DynamoDBDocumentClient, GetCommand, PutCommand, ScanCommand } from "@aws-sdk/lib-dynamodb";
import { randomUUID } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { LEDGER_TABLE_SCHEMA, undeliveredShard, type LedgerItem } from "../../functions/shared/ledger-schema";
import { LedgerStore } from "../../functions/shared/ledger-store";

interface DynaliteServer {
  listen(port: number, host: string, cb: () => void): void;
  close(cb: () => void): void;
  address(): AddressInfo;
}

export class LedgerFixture {
  endpoint = "";
  doc!: DynamoDBDocumentClient;
  private client!: DynamoDBClient;
  private server?: DynaliteServer;
  private tables = 0;
  /** The current test's table (a fresh one per `newTable`). */
  table = "";

  async start(): Promise<void> {
    this.server = (require("dynalite") as (options: object) => DynaliteServer)({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    this.endpoint = `http://127.0.0.1:${this.server.address().port}`;
    this.client = new DynamoDBClient({ region: "us-east-1", endpoint: this.endpoint, credentials: { accessKeyId: "local", secretAccessKey: "local" } });
    this.doc = DynamoDBDocumentClient.from(this.client, { marshallOptions: { removeUndefinedValues: true } });
  }

  async stop(): Promise<void> {
    this.doc?.destroy();
    if (this.server) await new Promise<void>((resolve) => this.server!.close(() => resolve()));
  }

  /** A new empty ledger table (so tests do not see each other's items). */
  async newTable(): Promise<string> {
    if (this.table) await this.client.send(new DeleteTableCommand({ TableName: this.table })).catch(() => undefined);
    this.table = `usage-ledger-${++this.tables}`;
    await this.client.send(
      new CreateTableCommand({
        TableName: this.table,
        AttributeDefinitions: LEDGER_TABLE_SCHEMA.attributeDefinitions.map((d) => ({ ...d })),
        KeySchema: LEDGER_TABLE_SCHEMA.keySchema.map((k) => ({ ...k })),
        GlobalSecondaryIndexes: LEDGER_TABLE_SCHEMA.globalSecondaryIndexes.map((i) => ({ IndexName: i.IndexName, KeySchema: i.KeySchema.map((k) => ({ ...k })), Projection: { ...i.Projection } })),
        BillingMode: "PAY_PER_REQUEST",
      }),
    );
    // dynalite answers CreateTable with CREATING and turns the table ACTIVE on a later tick, even with createTableMs 0.
    for (;;) {
      const { Table } = await this.client.send(new DescribeTableCommand({ TableName: this.table }));
      if (Table?.TableStatus === "ACTIVE" && Table.GlobalSecondaryIndexes?.every((i) => i.IndexStatus === "ACTIVE")) break;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    return this.table;
  }

  store(): LedgerStore {
    return new LedgerStore(this.doc, this.table);
  }

  async put(...items: LedgerItem[]): Promise<void> {
    for (const item of items) await this.doc.send(new PutCommand({ TableName: this.table, Item: item }));
  }

  /** Puts many items quickly (BatchWriteItem, 25 a call, a few calls at once); re-sends what DynamoDB left unprocessed. */
  async putMany(items: LedgerItem[]): Promise<void> {
    const chunks: LedgerItem[][] = [];
    for (let i = 0; i < items.length; i += 25) chunks.push(items.slice(i, i + 25));
    let next = 0;
    const worker = async () => {
      while (next < chunks.length) {
        let requests = chunks[next++].map((Item) => ({ PutRequest: { Item } }));
        while (requests.length > 0) {
          const out = await this.doc.send(new BatchWriteCommand({ RequestItems: { [this.table]: requests } }));
          requests = (out.UnprocessedItems?.[this.table] ?? []) as typeof requests;
        }
      }
    };
    await Promise.all(Array.from({ length: 4 }, worker));
  }

  async get(id: string): Promise<LedgerItem | undefined> {
    return (await this.doc.send(new GetCommand({ TableName: this.table, Key: { transaction_id: id }, ConsistentRead: true }))).Item as LedgerItem | undefined;
  }

  async all(): Promise<LedgerItem[]> {
    return ((await this.doc.send(new ScanCommand({ TableName: this.table }))).Items ?? []) as LedgerItem[];
  }

  /** The forwarder's environment for this table (plus `extra`). */
  env(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
    return { LEDGER_TABLE: this.table, AWS_ENDPOINT_URL_DYNAMODB: this.endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local", FORWARDER_SWEEP_GRACE_MS: "0", ...extra };
  }
}

let counter = 0;

/**
 * The backlog index's sort key for an item in the given states, as the writer and the store set it: its creation
 * time while any sink is pending, else the earliest next attempt of its failed sinks; an item that owes nothing but
 * is still in the index (an interrupted mark) keeps the creation time it had.
 * (Kept here rather than imported, so the fixture states the contract independently of the code under test.)
 */
function dueAtFor(item: LedgerItem): number {
  const states = (["moesif", "stripe"] as const).map((sink) => ({ state: item[`${sink}_state`], next: item[`${sink}_next_at`] }));
  if (states.some((s) => s.state === "pending")) return item.created_at;
  const failed = states.filter((s) => s.state === "failed").map((s) => (typeof s.next === "number" ? s.next : item.created_at));
  return failed.length > 0 ? Math.min(...failed) : item.created_at;
}

/**
 * A ledger item as the request path writes it: owed to Moesif, and to Stripe when `stripe` (a billed request with a
 * cost under `STRIPE_BILLING=meters`). `due_at` follows the states given unless given itself.
 */
export function ledgerItem(options: { customer?: string; cost?: number; stripe?: boolean; createdAt?: number; startedAt?: number } & Partial<LedgerItem> = {}): LedgerItem {
  const { customer = "cus_alice", cost = 1234, stripe = true, createdAt, startedAt, ...overrides } = options;
  const id = overrides.transaction_id ?? randomUUID();
  const finished = createdAt ?? Date.now() - 1000 + (counter++ % 1000);
  const started = startedAt ?? finished - 500;
  const event = {
    request: { time: new Date(started).toISOString(), uri: "https://api.example.com/v1/chat/completions", verb: "POST", headers: {} },
    response: { time: new Date(finished).toISOString(), status: 200, headers: {} },
    transaction_id: id,
    user_id: customer.replace(/^cus_/, ""),
    company_id: customer,
    direction: "Incoming",
    weight: 1,
    metadata: { cost_micros: cost, currency: "USD", billed: true },
  };
  const item: LedgerItem = {
    transaction_id: id,
    created_at: finished,
    request_id: `req-${id.slice(0, 8)}`,
    method: "POST",
    route: "/v1/chat/completions",
    status: 200,
    started_at: started,
    finished_at: finished,
    customer_id: customer.replace(/^cus_/, ""),
    stripe_customer_id: customer,
    plan: "starter",
    model: "gpt-4o-mini",
    prompt_tokens: 10,
    completion_tokens: 5,
    total_tokens: 15,
    cached_tokens: 0,
    reasoning_tokens: 0,
    usage_estimated: false,
    billed: true,
    cost_micros: cost,
    currency: "USD",
    streamed: false,
    client_disconnected: false,
    moesif_event: JSON.stringify(event),
    moesif_state: "pending",
    ...(stripe ? { stripe_state: "pending" as const } : {}),
    undelivered: undeliveredShard(id),
    ...overrides,
  };
  if (!("due_at" in overrides) && item.undelivered !== undefined) item.due_at = dueAtFor(item);
  return item;
}

/** Polls `condition` until true or `attempts` run out (no timing assertion: only whether it ever holds). */
export async function eventually(condition: () => Promise<boolean> | boolean, attempts = 200, pauseMs = 25): Promise<boolean> {
  for (let i = 0; i < attempts; i++) {
    if (await condition()) return true;
    await new Promise((resolve) => setTimeout(resolve, pauseMs));
  }
  return false;
}

/**
 * An HTTP proxy in front of a local server that can answer 429 with `Retry-After` itself (the Moesif collector has
 * no such mode); otherwise it passes requests through untouched.
 */
export class RateLimitingProxy {
  rateLimited = false;
  retryAfterSeconds = 1;
  private server?: http.Server;

  constructor(private readonly target: string) {}

  get url(): string {
    return `http://127.0.0.1:${(this.server!.address() as AddressInfo).port}`;
  }

  async start(): Promise<this> {
    const target = new URL(this.target);
    this.server = http.createServer((req, res) => {
      if (this.rateLimited) {
        req.resume();
        res.writeHead(429, { "Retry-After": String(this.retryAfterSeconds), "Content-Type": "application/json" });
        res.end('{"message":"Too many requests"}');
        return;
      }
      const upstream = http.request({ hostname: target.hostname, port: target.port, path: req.url, method: req.method, headers: req.headers }, (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      });
      upstream.on("error", () => res.destroy());
      res.on("close", () => upstream.destroy());
      req.pipe(upstream);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    return this;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
