// Regressions for an adversarial review of billing and metering (each failed on the code before its fix).
import { expect } from "chai";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { gunzipSync } from "node:zlib";
import { handleRequest, servedCost } from "../../functions/ai-chat/core";
import { createLogger } from "../../functions/ai-chat/logger";
import { transactionIdFor, type UsageRecord } from "../../functions/ai-chat/metering";
import { MoesifMeter } from "../../functions/ai-chat/moesif";
import { audioTokens, estimatePromptTokens } from "../../functions/ai-chat/usage";
import { SecretRedactor } from "../../functions/shared/secret-redactor";
import { FakeUpstream, RecordingMeter, fakeDeps, jsonResponse, proxyRequest } from "../helpers/fakes";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const KEY = "sk-review-upstream-secret-0123456789";
registerSecret(KEY);

/** A RIFF/WAVE header with a `fmt ` chunk: PCM, `channels`, `sampleRate`, the claimed byte rate, block size. */
function wavHeader(options: { sampleRate: number; blockAlign: number; claimedByteRate: number; dataBytes: number; truncateTo?: number }): string {
  const header = Buffer.alloc(44);
  header.write("RIFF", 0, "latin1");
  header.writeUInt32LE(36 + options.dataBytes, 4);
  header.write("WAVE", 8, "latin1");
  header.write("fmt ", 12, "latin1");
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(1, 20);
  header.writeUInt16LE(1, 22);
  header.writeUInt32LE(options.sampleRate, 24);
  header.writeUInt32LE(options.claimedByteRate, 28);
  header.writeUInt16LE(options.blockAlign, 32);
  header.writeUInt16LE(16, 34);
  header.write("data", 36, "latin1");
  header.writeUInt32LE(options.dataBytes, 40);
  const bytes = Buffer.concat([header, Buffer.alloc(options.dataBytes)]);
  return bytes.subarray(0, options.truncateTo ?? bytes.length).toString("base64");
}

describe("review regressions: estimation", () => {
  it("estimates a WAV cut inside its fmt chunk without crashing", () => {
    for (const size of [28, 29, 30, 31, 35]) {
      const data = wavHeader({ sampleRate: 16_000, blockAlign: 2, claimedByteRate: 32_000, dataBytes: 0, truncateTo: size });
      expect(() => audioTokens({ data, format: "wav" }), `${size} bytes`).to.not.throw();
    }
  });

  it("counts a WAV's duration from its sample rate, not from a byte rate the header claims", () => {
    const honest = audioTokens({ data: wavHeader({ sampleRate: 16_000, blockAlign: 2, claimedByteRate: 32_000, dataBytes: 320_000 }), format: "wav" });
    const lying = audioTokens({ data: wavHeader({ sampleRate: 16_000, blockAlign: 2, claimedByteRate: 0xffffffff, dataBytes: 320_000 }), format: "wav" });
    expect(honest).to.equal(101); // 320,044 bytes (header included) at 32,000 B/s, 10 tokens per second, rounded up
    expect(lying).to.equal(honest);
  });

  it("counts an image part as an image even when it also carries an empty text field", () => {
    const image = { type: "image_url", image_url: { url: "https://example.test/cat.png", detail: "high" } };
    const plain = estimatePromptTokens([{ role: "user", content: [image] }], "gpt-4o");
    const disguised = estimatePromptTokens([{ role: "user", content: [{ ...image, text: "" }] }], "gpt-4o");
    expect(plain).to.be.greaterThan(500);
    expect(disguised).to.equal(plain);
  });
});

describe("review regressions: money and secrets", () => {
  const pricing = { currency: "usd", prices: { "gpt-4o-mini": { input: 150_000, output: 600_000 }, "o1-pro": { input: 150_000_000, output: 600_000_000 } } };
  const usage = { prompt_tokens: 1000, completion_tokens: 1000, total_tokens: 2000 };

  it("bills a request the upstream answered with a dearer priced model at that model's price", () => {
    expect(servedCost(usage, pricing, "gpt-4o-mini", "gpt-4o-mini").micros).to.equal(750);
    expect(servedCost(usage, pricing, "gpt-4o-mini", "gpt-4o-mini-2024-07-18").micros).to.equal(750);
    expect(servedCost(usage, pricing, "gpt-4o-mini", "o1-pro").micros).to.equal(750_000);
    expect(servedCost(usage, pricing, "o1-pro", "gpt-4o-mini").micros).to.equal(750_000);
  });

  it("never returns an upstream body whose duplicate JSON key hides the upstream key", () => {
    const redactor = new SecretRedactor([KEY]);
    for (const text of [`{"id":"${KEY}","id":"chatcmpl-1","choices":[]}`, `{"error":{"message":"bad key ${KEY}","message":"bad"}}`]) {
      const { text: out, changed } = redactor.redactBody(text);
      recordForScan("review redactor", [out]);
      expect(changed).to.equal(true);
      expect(out).to.not.include(KEY);
    }
  });

  it("finds the upstream key in hex and in line-wrapped base64", () => {
    const redactor = new SecretRedactor([KEY]);
    const hex = Buffer.from(KEY).toString("hex");
    const wrapped = Buffer.from(`prefix ${KEY} suffix`).toString("base64").replace(/(.{12})/g, "$1\r\n");
    for (const text of [hex, hex.toUpperCase(), wrapped]) {
      expect(redactor.containsSecret(text), text).to.equal(true);
      expect(redactor.redactBody(JSON.stringify({ note: text })).text).to.not.include(text);
    }
  });
});

describe("review regressions: a refused event never blocks metering", () => {
  let server: http.Server;
  let url: string;
  const accepted = new Set<string>();
  let poison = "";
  let outage = false;

  before(async () => {
    server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        if (outage) {
          res.writeHead(500).end();
          return;
        }
        const text = gunzipSync(Buffer.concat(chunks)).toString("utf8");
        const parsed = JSON.parse(text) as { transaction_id: string } | Array<{ transaction_id: string }>;
        const events = Array.isArray(parsed) ? parsed : [parsed];
        // Moesif-like validation: the whole payload is refused when one event is unacceptable.
        if (events.some((e) => e.transaction_id === poison)) {
          res.writeHead(400, { "content-type": "application/json" }).end('{"message":"invalid event"}');
          return;
        }
        for (const e of events) accepted.add(e.transaction_id);
        res.writeHead(201).end();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => new Promise<void>((resolve) => server.close(() => resolve())));

  it("delivers every later event although the collector keeps refusing one", async () => {
    const logs: string[] = [];
    const meter = new MoesifMeter({ applicationId: "review-app-id", baseUri: url, logBodies: false, timeoutMs: 2000, backoffMs: 1, maxBackoffMs: 1, log: createLogger({ level: "debug", write: (l) => logs.push(l) }) });
    const record = (i: number): UsageRecord => ({
      transactionId: transactionIdFor(`review-${process.pid}-${i}`),
      requestId: `review-${i}`,
      method: "POST",
      route: "/v1/chat/completions",
      uri: "https://abc.execute-api.us-east-1.amazonaws.com/beta/v1/chat/completions",
      startedAt: Date.now(),
      finishedAt: Date.now(),
      usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
      usageEstimated: false,
      status: 200,
      requestHeaders: {},
      responseHeaders: {},
    });
    // A refused event sent alone is given up at once (with its log line).
    const alone = record(0);
    poison = alone.transactionId;
    await meter.record(alone);
    // One deferred during an outage, then refused in every batch that carries it: it must not ride along for ever.
    outage = true;
    const carried = record(1);
    await meter.record(carried);
    outage = false;
    poison = carried.transactionId;
    await new Promise((resolve) => setTimeout(resolve, 2));
    const later = Array.from({ length: 30 }, (_, i) => record(i + 2));
    for (const r of later) await meter.record(r);
    // Deferred events ride along with later sends: a few more requests carry the last ones.
    for (let i = 0; i < 5; i++) await meter.record(record(100 + i));
    recordForScan("review meter logs", logs);
    const missing = later.filter((r) => !accepted.has(r.transactionId));
    expect(missing.length, "later events never delivered").to.equal(0);
    for (const refused of [alone, carried]) {
      expect(logs.some((l) => l.includes("metering_event_refused") && l.includes(refused.transactionId)), refused.requestId).to.equal(true);
    }
  });
});

describe("review regressions: implausible usage on a buffered answer", () => {
  it("estimates instead of billing 0 completion tokens for a long answer, or 0 prompt tokens", async () => {
    const content = Array.from({ length: 300 }, (_, i) => `word${i}`).join(" ");
    for (const usage of [{ prompt_tokens: 12, completion_tokens: 0, total_tokens: 12 }, { prompt_tokens: 0, completion_tokens: 900, total_tokens: 900 }]) {
      const upstream = new FakeUpstream(() => jsonResponse(200, { id: "c1", object: "chat.completion", model: "gpt-4o-mini", choices: [{ index: 0, message: { role: "assistant", content }, finish_reason: "stop" }], usage }));
      const meter = new RecordingMeter();
      await handleRequest(proxyRequest({ json: { model: "gpt-4o-mini", messages: [{ role: "user", content: "Hello!" }] } }), fakeDeps({ upstream, meter }));
      const [record] = meter.records;
      expect(record.usageEstimated, JSON.stringify(usage)).to.equal(true);
      expect(record.usage.completion_tokens).to.be.greaterThan(300);
      expect(record.usage.prompt_tokens).to.be.greaterThan(0);
    }
  });
});
