import { CreateTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { DynamoDBDocumentClient, GetCommand, ScanCommand, UpdateCommand } from "@aws-sdk/lib-dynamodb";
import { expect } from "chai";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { createDeps, createHandler } from "../../functions/ai-chat/index";
import { createLedgerWriter, LedgerMeter, toLedgerItem, type LedgerWriter } from "../../functions/ai-chat/ledger";
import { createLogger } from "../../functions/ai-chat/logger";
import { NO_METER, transactionIdFor, type UsageRecord } from "../../functions/ai-chat/metering";
import { meteredUsage, MoesifMeter, prepareEvent, toMoesifEvent } from "../../functions/ai-chat/moesif";
import { DeferredMeter } from "../../functions/ai-chat/secrets";
import { LEDGER_TABLE_SCHEMA, undeliveredShard, type LedgerItem } from "../../functions/shared/ledger-schema";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { RecordingMeter, UPSTREAM_KEY } from "../helpers/fakes";
import { invokeStreaming } from "../helpers/invoke-streaming";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const APP_ID = "moesif-app-id-ledger-tests-0042";
const CALLER_KEY = "caller-api-key-ledger-ABC123456789";
registerSecret(UPSTREAM_KEY, APP_ID, CALLER_KEY);

const TABLE = "usage-ledger-test";
const PROMPT = "Please summarise the quarterly figures for Contoso";
const COMPLETION = "Contoso's quarterly revenue rose by four percent";

interface Dynalite {
  listen(port: number, host: string, done: () => void): void;
  close(done: () => void): void;
  address(): AddressInfo;
}

let recordCounter = 0;
/** A record as the core builds one for a priced, billed, non-streamed completion; overrides change the scenario. */
function usageRecord(overrides: Partial<UsageRecord> = {}): UsageRecord {
  recordCounter += 1;
  const requestId = `ledger-req-${process.pid}-${recordCounter}-${Date.now()}`;
  const startedAt = 1_760_000_000_000 + recordCounter * 1000;
  return {
    transactionId: transactionIdFor(requestId),
    requestId,
    method: "POST",
    route: "/v1/chat/completions",
    uri: "https://abc123.execute-api.us-east-1.amazonaws.com/beta/v1/chat/completions",
    startedAt,
    finishedAt: startedAt + 840,
    apiKeyId: "key-id-alice",
    customer: { customerId: "alice", plan: "starter", stripeCustomerId: "cus_alice" },
    sourceIp: "203.0.113.7",
    stage: "beta",
    model: "gpt-4o-mini",
    usage: { prompt_tokens: 21, completion_tokens: 9, total_tokens: 30, cached_tokens: 4, reasoning_tokens: 0 },
    usageEstimated: false,
    cost: { currency: "usd", micros: 8550 },
    billed: true,
    upstreamStatus: 200,
    upstreamMs: 812,
    status: 200,
    requestHeaders: { "content-type": "application/json", "user-agent": "openai-node/6.1", authorization: `Bearer ${CALLER_KEY}`, "x-api-key": CALLER_KEY },
    responseHeaders: { "Content-Type": "application/json" },
    requestBody: { model: "gpt-4o-mini", temperature: 0.2, messages: [{ role: "user", content: PROMPT }] },
    responseBody: {
      id: "chatcmpl-ledger-1",
      object: "chat.completion",
      model: "gpt-4o-mini-2024-07-18",
      choices: [{ index: 0, message: { role: "assistant", content: COMPLETION }, finish_reason: "stop" }],
      usage: { prompt_tokens: 21, completion_tokens: 9, total_tokens: 30 },
    },
    ...overrides,
  };
}

/** What the unbilled answer to a failed upstream call looks like: zero usage, no cost, an OpenAI error body. */
const unbilledError = (): Partial<UsageRecord> => ({
  status: 502,
  upstreamStatus: 500,
  usage: { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 },
  cost: undefined,
  billed: false,
  responseBody: { error: { message: "The upstream model service failed.", type: "api_error", param: null, code: "upstream_failed" } },
});

/**
 * An HTTP endpoint in front of dynalite that can fail on demand: forward (`ok`), answer 500 as DynamoDB's
 * InternalServerError, hang without answering, or refuse connections (it stops listening, and listens again on the
 * same port once set back to `ok`).
 */
class FlakyEndpoint {
  mode: "ok" | "error" | "hang" = "ok";
  requests = 0;
  private server?: http.Server;
  private port = 0;
  private readonly hung = new Set<http.ServerResponse>();
  constructor(private readonly target: string) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    const server = http.createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve) => server.listen(this.port, "127.0.0.1", () => resolve()));
    this.port = (server.address() as AddressInfo).port;
    this.server = server;
    return this;
  }

  async refuse(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  async restore(): Promise<void> {
    this.mode = "ok";
    if (!this.server) await this.start();
  }

  async stop(): Promise<void> {
    for (const res of this.hung) res.destroy();
    await this.refuse();
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.requests += 1;
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      if (this.mode === "hang") {
        this.hung.add(res);
        return;
      }
      if (this.mode === "error") {
        const body = JSON.stringify({ __type: "com.amazonaws.dynamodb.v20120810#InternalServerError", message: "Internal server error" });
        res.writeHead(500, { "Content-Type": "application/x-amz-json-1.0", "Content-Length": String(Buffer.byteLength(body)) });
        res.end(body);
        return;
      }
      const headers = { ...req.headers };
      delete headers.host;
      const forward = http.request(`${this.target}${req.url ?? "/"}`, { method: req.method, headers }, (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      });
      forward.on("error", () => res.destroy());
      forward.end(Buffer.concat(chunks));
    });
  }
}

/** A writer that answers as told: a DynamoDB-style error, never (ignoring the abort signal), or through `inner`. */
class ScriptedWriter implements LedgerWriter {
  mode: "ok" | "throttled" | "invalid" | "never" = "ok";
  readonly attempts: string[] = [];
  readonly stored = new Map<string, LedgerItem>();
  async putNew(item: LedgerItem): Promise<"created" | "exists"> {
    this.attempts.push(item.transaction_id);
    if (this.mode === "never") return new Promise(() => undefined);
    if (this.mode === "throttled") throw Object.assign(new Error("Rate of requests exceeds the allowed throughput."), { name: "ProvisionedThroughputExceededException", $metadata: { httpStatusCode: 400 } });
    if (this.mode === "invalid") throw Object.assign(new Error("Item size has exceeded the maximum allowed size"), { name: "ValidationException", $metadata: { httpStatusCode: 400 } });
    if (this.stored.has(item.transaction_id)) return "exists";
    this.stored.set(item.transaction_id, item);
    return "created";
  }
}

describe("usage ledger: the request path's write", () => {
  let dynalite: Dynalite;
  let endpoint: string;
  let doc: DynamoDBDocumentClient;
  let logs: string[];
  const dynamoEnv = (url: string): NodeJS.ProcessEnv => ({ AWS_ENDPOINT_URL_DYNAMODB: url, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local" });
  const log = () => createLogger({ level: "debug", secrets: [UPSTREAM_KEY, APP_ID], write: (line) => logs.push(line) });
  const lines = (message: string) => logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === message);
  const getItem = async (id: string) => (await doc.send(new GetCommand({ TableName: TABLE, Key: { transaction_id: id } }))).Item as LedgerItem | undefined;
  const allItems = async () => ((await doc.send(new ScanCommand({ TableName: TABLE }))).Items ?? []) as LedgerItem[];

  before(async () => {
    dynalite = (require("dynalite") as (options: object) => Dynalite)({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
    await new Promise<void>((resolve) => dynalite.listen(0, "127.0.0.1", resolve));
    endpoint = `http://127.0.0.1:${dynalite.address().port}`;
    const client = new DynamoDBClient({ region: "us-east-1", endpoint, credentials: { accessKeyId: "local", secretAccessKey: "local" } });
    await client.send(
      new CreateTableCommand({
        TableName: TABLE,
        AttributeDefinitions: LEDGER_TABLE_SCHEMA.attributeDefinitions.map((d) => ({ ...d })),
        KeySchema: LEDGER_TABLE_SCHEMA.keySchema.map((k) => ({ ...k })),
        GlobalSecondaryIndexes: LEDGER_TABLE_SCHEMA.globalSecondaryIndexes.map((i) => ({ IndexName: i.IndexName, KeySchema: i.KeySchema.map((k) => ({ ...k })), Projection: { ...i.Projection } })),
        BillingMode: "PAY_PER_REQUEST",
      }),
    );
    doc = DynamoDBDocumentClient.from(client);
  });
  after(async () => {
    doc.destroy();
    await new Promise<void>((resolve) => dynalite.close(() => resolve()));
  });
  beforeEach(() => {
    logs = [];
  });
  afterEach(async () => {
    recordForScan("ledger logs", logs);
    recordForScan("ledger items", (await allItems()).map((item) => JSON.stringify(item)));
  });

  describe("toLedgerItem", () => {
    it("holds every field of a billed, priced completion, with the Moesif event's validated numbers", () => {
      const record = usageRecord();
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "moesif" });
      const event = toMoesifEvent(record, false);
      expect(item).to.deep.equal({
        transaction_id: record.transactionId,
        created_at: record.finishedAt,
        request_id: record.requestId,
        method: "POST",
        route: "/v1/chat/completions",
        status: 200,
        stage: "beta",
        started_at: record.startedAt,
        finished_at: record.finishedAt,
        api_key_id: "key-id-alice",
        customer_id: "alice",
        stripe_customer_id: "cus_alice",
        plan: "starter",
        model: "gpt-4o-mini",
        prompt_tokens: 21,
        completion_tokens: 9,
        total_tokens: 30,
        cached_tokens: 4,
        reasoning_tokens: 0,
        usage_estimated: false,
        billed: true,
        cost_micros: 8550,
        currency: "usd",
        upstream_status: 200,
        upstream_ms: 812,
        streamed: false,
        stream_error: undefined,
        client_disconnected: false,
        moesif_event: prepareEvent(event).json,
        moesif_state: "pending",
        moesif_attempts: 0,
        undelivered: undeliveredShard(record.transactionId),
        due_at: record.finishedAt,
      });
      expect(JSON.parse(item.moesif_event).metadata).to.deep.include({ billed: true, cost_micros: 8550, total_tokens: 30 });
    });

    it("records an unbilled upstream failure with zero tokens, no cost and its error status", () => {
      const record = usageRecord(unbilledError());
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({ status: 502, upstream_status: 500, billed: false, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, moesif_state: "pending" });
      expect(item.cost_micros).to.equal(undefined);
      expect(item.currency).to.equal(undefined);
      expect(item.stripe_state).to.equal(undefined);
      expect(item.undelivered).to.equal(undeliveredShard(record.transactionId));
      expect(JSON.parse(item.moesif_event).response.body.error.code).to.equal("upstream_failed");
    });

    it("records a stream the caller left as streamed, disconnected and estimated, billing what was sent", () => {
      const record = usageRecord({
        streamed: true,
        clientDisconnected: true,
        usageEstimated: true,
        streamError: "client_disconnected_" + "x".repeat(400),
        usage: { prompt_tokens: 21, completion_tokens: 3, total_tokens: 24 },
        cost: { currency: "usd", micros: 4950 },
        responseBody: undefined,
      });
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({ streamed: true, client_disconnected: true, usage_estimated: true, billed: true, completion_tokens: 3, total_tokens: 24, cost_micros: 4950 });
      expect(item.stream_error).to.have.length(256);
      expect(item.stripe_state).to.equal("pending");
    });

    it("never lets a meter sum a negative, fractional or string count, nor store NaN", () => {
      const record = usageRecord({
        usageEstimated: true,
        usage: { prompt_tokens: -5, completion_tokens: 2.5, total_tokens: 99, cached_tokens: 1e6 } as never,
        cost: { currency: "usd", micros: -1 },
        upstreamMs: Number.NaN,
      });
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      const usage = meteredUsage(record.usage);
      expect(item).to.include({ prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens, total_tokens: 0, cached_tokens: 0, usage_estimated: true });
      expect(item.cost_micros).to.equal(undefined);
      expect(item.upstream_ms).to.equal(undefined);
      expect(item.stripe_state).to.equal(undefined);
    });

    it("owes Stripe nothing with stripeBilling moesif, and a pending meter event with meters", () => {
      const record = usageRecord();
      expect(toLedgerItem(record, { logBodies: false, stripeBilling: "moesif" }).stripe_state).to.equal(undefined);
      expect(toLedgerItem(record, { logBodies: false, stripeBilling: "meters" })).to.include({ stripe_state: "pending", stripe_attempts: 0, moesif_state: "pending" });
    });

    it("owes Stripe nothing for a billed request that costs nothing", () => {
      const item = toLedgerItem(usageRecord({ cost: { currency: "usd", micros: 0 } }), { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({ billed: true, cost_micros: 0 });
      expect(item.stripe_state).to.equal(undefined);
      expect(item.undelivered).to.be.a("string"); // Moesif is still owed
    });

    it("keeps a charge for a customer without a Stripe id visible as failed, with the reason", () => {
      const record = usageRecord({ customer: { customerId: "carol", plan: "starter" } });
      const item = toLedgerItem(record, { logBodies: false, stripeBilling: "meters" });
      expect(item).to.include({ stripe_state: "failed", stripe_next_at: record.finishedAt, undelivered: undeliveredShard(record.transactionId), due_at: record.finishedAt });
      expect(item.stripe_customer_id).to.equal(undefined);
      expect(item.stripe_error).to.match(/customer carol has no stripeCustomerId/);
    });

    it("holds no prompt or completion text, and no caller key, unless logBodies", () => {
      const record = usageRecord();
      const lean = JSON.stringify(toLedgerItem(record, { logBodies: false, stripeBilling: "meters" }));
      expect(lean).to.not.include(PROMPT);
      expect(lean).to.not.include(COMPLETION);
      expect(lean).to.not.include(CALLER_KEY);
      const full = JSON.stringify(toLedgerItem(record, { logBodies: true, stripeBilling: "meters" }));
      expect(full).to.include(PROMPT);
      expect(full).to.include(COMPLETION);
      expect(full).to.not.include(CALLER_KEY);
      recordForScan("ledger items (toLedgerItem)", [lean, full]);
    });
  });

  describe("LedgerMeter against dynalite", () => {
    it("puts one item per record, which reads back as built, and sends nothing to the fallback", async () => {
      const fallback = new RecordingMeter();
      const meter = new LedgerMeter({ writer: createLedgerWriter(dynamoEnv(endpoint), TABLE, 1000), timeoutMs: 1000, logBodies: false, stripeBilling: "meters", fallback, log: log() });
      const records = [usageRecord(), usageRecord(unbilledError()), usageRecord({ streamed: true, clientDisconnected: true, usageEstimated: true })];
      for (const record of records) await meter.record(record);
      for (const record of records) expect(await getItem(record.transactionId)).to.deep.equal(JSON.parse(JSON.stringify(toLedgerItem(record, { logBodies: false, stripeBilling: "meters" }))));
      expect(fallback.records).to.have.length(0);
      expect(lines("ledger_write_failed")).to.have.length(0);
    });

    it("does not create a second item nor overwrite the first when the same record is written again", async () => {
      const fallback = new RecordingMeter();
      const meter = new LedgerMeter({ writer: createLedgerWriter(dynamoEnv(endpoint), TABLE, 1000), timeoutMs: 1000, logBodies: false, stripeBilling: "moesif", fallback, log: log() });
      const record = usageRecord();
      await meter.record(record);
      const countBefore = (await allItems()).length;
      // The forwarder delivered it meanwhile.
      await doc.send(
        new UpdateCommand({
          TableName: TABLE,
          Key: { transaction_id: record.transactionId },
          UpdateExpression: "SET moesif_state = :d, moesif_delivered_at = :t REMOVE undelivered",
          ExpressionAttributeValues: { ":d": "delivered", ":t": 1234 },
        }),
      );
      await meter.record({ ...record, usage: { prompt_tokens: 999, completion_tokens: 999, total_tokens: 1998 } });
      const item = await getItem(record.transactionId);
      expect(item).to.include({ moesif_state: "delivered", moesif_delivered_at: 1234, prompt_tokens: 21 });
      expect(item?.undelivered).to.equal(undefined);
      expect((await allItems()).length).to.equal(countBefore);
      expect(fallback.records).to.have.length(0);
    });

    describe("when the ledger endpoint fails, then recovers", () => {
      let flaky: FlakyEndpoint;
      beforeEach(async () => {
        flaky = await new FlakyEndpoint(endpoint).start();
      });
      afterEach(async () => {
        await flaky.stop();
      });

      const failures = {
        refuses: async () => flaky.refuse(),
        hangs: async () => {
          flaky.mode = "hang";
        },
        "answers 500": async () => {
          flaky.mode = "error";
        },
      } as const;
      for (const [name, breakIt] of Object.entries(failures)) {
        it(`hands the record to the fallback when the endpoint ${name}, and puts the item once it is back`, async () => {
          let now = 1_000_000;
          const fallback = new RecordingMeter();
          const meter = new LedgerMeter({ writer: createLedgerWriter(dynamoEnv(flaky.url), TABLE, 300), timeoutMs: 300, logBodies: false, stripeBilling: "meters", fallback, log: log(), clock: () => now });
          const [lost, skipped, later] = [usageRecord(), usageRecord(), usageRecord()];

          await breakIt();
          await meter.record(lost);
          expect(fallback.records.map((r) => r.transactionId)).to.deep.equal([lost.transactionId]);
          expect(lines("ledger_write_failed")).to.have.length(1);
          const deferred = lines("ledger_deferred");
          expect(deferred).to.have.length(1);
          expect(deferred[0].item).to.deep.equal(JSON.parse(JSON.stringify(toLedgerItem(lost, { logBodies: false, stripeBilling: "meters" }))));
          expect(await getItem(lost.transactionId)).to.equal(undefined);

          // Backing off: the next request does not wait for the ledger at all.
          const requestsBefore = flaky.requests;
          await meter.record(skipped);
          expect(flaky.requests).to.equal(requestsBefore);
          expect(fallback.records).to.have.length(2);
          expect(meter.pendingCount).to.equal(2);

          await flaky.restore();
          now += 60_000;
          await meter.record(later);
          for (const record of [lost, skipped, later]) expect(await getItem(record.transactionId), record.requestId).to.include({ transaction_id: record.transactionId, moesif_state: "pending", stripe_state: "pending" });
          expect(fallback.records).to.have.length(2);
          expect(meter.pendingCount).to.equal(0);
          expect(lines("ledger_recovered")).to.have.length(1);
        });
      }

      it("never rejects, whatever the endpoint does", async () => {
        // Each call a minute later than the last, so no back-off spares the meter a write attempt.
        let now = 0;
        const fallback = new RecordingMeter();
        const meter = new LedgerMeter({ writer: createLedgerWriter(dynamoEnv(flaky.url), TABLE, 200), timeoutMs: 200, logBodies: false, stripeBilling: "moesif", fallback, log: log(), clock: () => (now += 60_000) });
        const calls: Array<Promise<void>> = [];
        flaky.mode = "error";
        calls.push(meter.record(usageRecord()));
        await calls[0];
        flaky.mode = "hang";
        calls.push(meter.record(usageRecord()));
        await calls[1];
        await flaky.refuse();
        calls.push(meter.record(usageRecord()), meter.record(usageRecord()));
        const settled = await Promise.allSettled(calls);
        expect(settled.map((s) => s.status)).to.deep.equal(["fulfilled", "fulfilled", "fulfilled", "fulfilled"]);
        expect(fallback.records).to.have.length(4);
        const reasons = lines("ledger_write_failed").map((l) => String(l.reason));
        expect(reasons[0]).to.match(/InternalServerError/);
        expect(reasons[1]).to.match(/no answer within 200 ms/);
        expect(reasons[2]).to.match(/ECONNREFUSED/);
      });
    });
  });

  describe("LedgerMeter's memory buffer", () => {
    const meterWith = (writer: ScriptedWriter, options: Partial<ConstructorParameters<typeof LedgerMeter>[0]> = {}) => {
      const fallback = new RecordingMeter();
      let now = 0;
      const meter = new LedgerMeter({ writer, timeoutMs: 200, logBodies: false, stripeBilling: "moesif", fallback, log: log(), clock: () => now, ...options });
      return { meter, fallback, advance: (ms: number) => (now += ms) };
    };

    it("returns when a write never settles, even if the writer ignores the abort signal", async () => {
      const writer = new ScriptedWriter();
      writer.mode = "never";
      const { meter, fallback } = meterWith(writer);
      const record = usageRecord();
      await meter.record(record);
      expect(fallback.records).to.deep.equal([record]);
      expect(lines("ledger_write_failed")[0].reason).to.match(/no answer within 200 ms/);
    });

    it("does not keep an item the ledger refuses (it could never be put), but the fallback still gets its record", async () => {
      const writer = new ScriptedWriter();
      writer.mode = "invalid";
      const { meter, fallback } = meterWith(writer);
      const record = usageRecord();
      await meter.record(record);
      expect(fallback.records).to.deep.equal([record]);
      expect(meter.pendingCount).to.equal(0);
      const refused = lines("ledger_item_refused");
      expect(refused).to.have.length(1);
      expect((refused[0].item as LedgerItem).transaction_id).to.equal(record.transactionId);
    });

    it("keeps at most maxPending items, dropping the oldest with an error line that names them", async () => {
      const writer = new ScriptedWriter();
      writer.mode = "throttled";
      const { meter } = meterWith(writer, { maxPending: 2 });
      const records = [usageRecord(), usageRecord(), usageRecord()];
      for (const record of records) await meter.record(record);
      expect(meter.pendingCount).to.equal(2);
      expect(lines("ledger_dropped_from_memory")[0].transaction_ids).to.deep.equal([records[0].transactionId]);
    });

    it("keeps at most maxPendingBytes of items", async () => {
      const writer = new ScriptedWriter();
      writer.mode = "throttled";
      const size = Buffer.byteLength(JSON.stringify(toLedgerItem(usageRecord(), { logBodies: false, stripeBilling: "moesif" })));
      const { meter } = meterWith(writer, { maxPendingBytes: Math.floor(size * 2.5) });
      for (let i = 0; i < 4; i++) await meter.record(usageRecord());
      expect(meter.pendingCount).to.equal(2);
      expect(lines("ledger_dropped_from_memory").reduce((n, l) => n + (l.count as number), 0)).to.equal(2);
    });

    it("puts waiting items again at most maxReplay at a time, oldest first, and each only once", async () => {
      const writer = new ScriptedWriter();
      writer.mode = "throttled";
      const { meter, advance } = meterWith(writer, { maxReplay: 2, backoffMs: 10 });
      const waiting = [usageRecord(), usageRecord(), usageRecord()];
      for (const record of waiting) {
        await meter.record(record);
        advance(1000);
      }
      writer.mode = "ok";
      writer.attempts.length = 0;
      const first = usageRecord();
      await meter.record(first);
      expect(writer.attempts).to.deep.equal([first.transactionId, waiting[0].transactionId, waiting[1].transactionId]);
      const second = usageRecord();
      await meter.record(second);
      expect(writer.attempts.slice(3)).to.deep.equal([second.transactionId, waiting[2].transactionId]);
      await meter.record(usageRecord());
      expect(writer.attempts).to.have.length(6);
      expect([...writer.stored.keys()]).to.have.members([...waiting, first, second].map((r) => r.transactionId).concat(writer.attempts[5]));
    });

    it("does not put waiting items again while the ledger still refuses the request's own item", async () => {
      const writer = new ScriptedWriter();
      writer.mode = "throttled";
      const { meter, advance } = meterWith(writer, { backoffMs: 10 });
      const waiting = usageRecord();
      await meter.record(waiting);
      advance(1000);
      writer.attempts.length = 0;
      const next = usageRecord();
      await meter.record(next);
      expect(writer.attempts).to.deep.equal([next.transactionId]);
      expect(meter.pendingCount).to.equal(2);
    });

    it("counts an item already in the ledger as recorded, not as a failure", async () => {
      const writer = new ScriptedWriter();
      const { meter, fallback } = meterWith(writer);
      const record = usageRecord();
      await meter.record(record);
      await meter.record(record);
      expect(writer.attempts).to.have.length(2);
      expect(fallback.records).to.have.length(0);
      expect(lines("ledger_write_failed")).to.have.length(0);
    });
  });

  describe("createDeps", () => {
    const base = { UPSTREAM_API_KEY: UPSTREAM_KEY, MOESIF_BASE_URI: "http://127.0.0.1:9" };
    const build = (env: NodeJS.ProcessEnv) => createDeps({ ...dynamoEnv(endpoint), ...base, ...env }, { write: (line) => logs.push(line) });

    it("keeps today's direct Moesif meter when LEDGER_TABLE is not set", () => {
      expect(build({ MOESIF_APPLICATION_ID: APP_ID }).meter).to.be.an.instanceOf(MoesifMeter);
    });

    it("writes the ledger with LEDGER_TABLE, falling back to the direct Moesif meter", () => {
      const meter = build({ MOESIF_APPLICATION_ID: APP_ID, LEDGER_TABLE: TABLE }).meter;
      expect(meter).to.be.an.instanceOf(LedgerMeter);
      expect((meter as LedgerMeter).fallback).to.be.an.instanceOf(MoesifMeter);
    });

    it("falls back to the meter that waits for the Moesif id from SSM when the id is a parameter", () => {
      const meter = build({ MOESIF_APPLICATION_ID_PARAMETER: "/svc/moesif", LEDGER_TABLE: TABLE }).meter;
      expect((meter as LedgerMeter).fallback).to.be.an.instanceOf(DeferredMeter);
    });

    it("still writes the ledger without any Moesif id, and says there is no fallback", () => {
      const meter = build({ LEDGER_TABLE: TABLE }).meter;
      expect(meter).to.be.an.instanceOf(LedgerMeter);
      expect((meter as LedgerMeter).fallback).to.equal(NO_METER);
      expect(lines("ledger_fallback_disabled")).to.have.length(1);
      expect(lines("metering_disabled")).to.have.length(0);
    });
  });

  describe("the handler with LEDGER_TABLE", () => {
    let upstream: UpstreamServer;
    let collector: MoesifCollector;
    const PRICED_PLANS = { starter: { models: ["gpt-4o-mini"], pricing: { currency: "usd", prices: { "gpt-4o-mini": { input: 150_000, output: 600_000 } } } } };
    const CUSTOMERS = { "key-id-alice": { customerId: "alice", plan: "starter", stripeCustomerId: "cus_alice" } };

    beforeEach(async () => {
      upstream = await new UpstreamServer({ apiKey: UPSTREAM_KEY }).start();
      collector = await new MoesifCollector({ applicationId: APP_ID }).start();
    });
    afterEach(async () => {
      recordForScan("ledger handler collector", collector.rawPayloads);
      await upstream.stop();
      await collector.stop();
    });

    const makeHandler = (ledgerEndpoint: string) =>
      createHandler(() =>
        createDeps(
          {
            ...dynamoEnv(ledgerEndpoint),
            UPSTREAM_BASE_URL: upstream.url,
            UPSTREAM_API_KEY: UPSTREAM_KEY,
            CUSTOMERS: JSON.stringify(CUSTOMERS),
            PLANS: JSON.stringify(PRICED_PLANS),
            MOESIF_APPLICATION_ID: APP_ID,
            MOESIF_BASE_URI: collector.url,
            METERING_TIMEOUT_MS: "500",
            LEDGER_TABLE: TABLE,
            LEDGER_TIMEOUT_MS: "300",
            STRIPE_BILLING: "meters",
            FORWARD_MOCK_DIRECTIVES: "true",
          },
          { write: (line) => logs.push(line) },
        ),
      );
    const invoke = async (handler: ReturnType<typeof createHandler>, body: unknown) => {
      const event = createApiGatewayEvent({ apiKey: CALLER_KEY, body });
      const result = await invokeStreaming(handler, event, createContext());
      recordForScan("ledger handler response", [result.body]);
      return { result, transactionId: transactionIdFor(event.requestContext.requestId) };
    };

    it("writes exactly one item per request and makes no Moesif call while the ledger works", async () => {
      const handler = makeHandler(endpoint);
      const before = (await allItems()).length;
      const plain = await invoke(handler, chatBody());
      const streamed = await invoke(handler, chatBody({ stream: true, stream_options: { include_usage: true } }));
      const failed = await invoke(handler, chatBody({ mock: { status: 500 } }));
      expect([plain, streamed, failed].map((o) => o.result.statusCode)).to.deep.equal([200, 200, 502]);

      expect((await allItems()).length).to.equal(before + 3);
      const answer = JSON.parse(plain.result.body) as { usage: { prompt_tokens: number; completion_tokens: number } };
      const item = await getItem(plain.transactionId);
      expect(item).to.include({ customer_id: "alice", stripe_customer_id: "cus_alice", plan: "starter", billed: true, currency: "usd", stripe_state: "pending", moesif_state: "pending" });
      expect(item).to.include({ prompt_tokens: answer.usage.prompt_tokens, completion_tokens: answer.usage.completion_tokens });
      expect(item?.cost_micros).to.be.greaterThan(0);
      expect(await getItem(streamed.transactionId)).to.include({ streamed: true, billed: true });
      expect(await getItem(failed.transactionId)).to.include({ status: 502, billed: false, total_tokens: 0 });
      expect((await getItem(failed.transactionId))?.stripe_state).to.equal(undefined);
      expect(collector.requests).to.have.length(0);
      expect(JSON.stringify(await allItems())).to.not.include("Hello!");
    });

    it("answers the same and sends the event straight to Moesif when the ledger is down", async () => {
      const flaky = await new FlakyEndpoint(endpoint).start();
      try {
        flaky.mode = "hang";
        const handler = makeHandler(flaky.url);
        const outcome = await invoke(handler, chatBody());
        expect(outcome.result.statusCode).to.equal(200);
        expect(JSON.parse(outcome.result.body).choices[0].message.content).to.equal("Hello! You said: Hello!");
        expect(collector.events().map((e) => e.transaction_id)).to.deep.equal([outcome.transactionId]);
        expect(lines("ledger_deferred")).to.have.length(1);
        expect(await getItem(outcome.transactionId)).to.equal(undefined);
      } finally {
        await flaky.stop();
      }
    });
  });
});
