import { expect } from "chai";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { createDeps, createHandler, handler as lambdaHandler } from "../../functions/ai-chat/index";
import { invokeStreaming } from "../helpers/invoke-streaming";
import { isStreamingHandler } from "../../functions/ai-chat/lambda-stream";
import { transactionIdFor } from "../../functions/ai-chat/metering";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { CUSTOMERS, PLANS, UPSTREAM_KEY } from "../helpers/fakes";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const CALLER_KEY = "caller-api-key-value-XYZ987654321";
const APP_ID = "moesif-app-id-for-tests";
const WRONG_UPSTREAM_KEY = "sk-wrong-key-value-1234";
registerSecret(CALLER_KEY, UPSTREAM_KEY, APP_ID, WRONG_UPSTREAM_KEY);

describe("ai-chat handler over the wire (loopback upstream + collector)", () => {
  let upstream: UpstreamServer;
  let collector: MoesifCollector;
  let logs: string[];

  const makeHandler = (env: Record<string, string | undefined> = {}) =>
    createHandler(() =>
      createDeps(
        {
          UPSTREAM_BASE_URL: upstream.url,
          UPSTREAM_API_KEY: UPSTREAM_KEY,
          UPSTREAM_TIMEOUT_MS: "1500",
          CUSTOMERS: JSON.stringify(CUSTOMERS),
          PLANS: JSON.stringify(PLANS),
          MOESIF_APPLICATION_ID: APP_ID,
          MOESIF_BASE_URI: collector.url,
          METERING_TIMEOUT_MS: "300",
          // The loopback upstream is the built-in model server, which takes its faults from `mock`.
          FORWARD_MOCK_DIRECTIVES: "true",
          ...env,
        },
        { write: (line) => logs.push(line) },
      ),
    );

  const invoke = async (handler: ReturnType<typeof createHandler>, options: Parameters<typeof createApiGatewayEvent>[0] = {}) => {
    const event = createApiGatewayEvent({ apiKey: CALLER_KEY, body: chatBody(), ...options });
    const started = Date.now();
    const result = await invokeStreaming(handler, event, createContext());
    recordForScan("handler response", [result.body, JSON.stringify(result.headers ?? {})]);
    return { event, result, ms: Date.now() - started, json: JSON.parse(result.body) };
  };

  /** Everything that left the function: responses, log lines, metering payloads. */
  const assertNoSecrets = (...extra: string[]) => {
    const everything = [...logs, ...collector.rawPayloads, ...extra].join("\n");
    expect(everything).to.not.include(CALLER_KEY);
    expect(everything).to.not.include(UPSTREAM_KEY);
    expect(collector.rawPayloads.join("\n")).to.not.include(APP_ID);
  };

  beforeEach(async () => {
    logs = [];
    upstream = await new UpstreamServer({ apiKey: UPSTREAM_KEY }).start();
    collector = await new MoesifCollector({ applicationId: APP_ID }).start();
  });
  afterEach(async () => {
    recordForScan("handler logs", logs);
    recordForScan("collector payloads", collector.rawPayloads);
    await upstream.stop();
    await collector.stop();
  });

  it("exports a streaming handler (tagged by streamifyResponse) that declares (event, responseStream, context)", () => {
    expect(isStreamingHandler(lambdaHandler)).to.equal(true);
    expect(lambdaHandler.length).to.equal(3);
  });

  it("round-trips a completion and sends one Moesif event with the customer, company, transaction id and tokens", async () => {
    const handler = makeHandler();
    const { event, result, json } = await invoke(handler);

    expect(result.statusCode).to.equal(200);
    expect(json.object).to.equal("chat.completion");
    expect(json.choices[0].message.content).to.equal("Hello! You said: Hello!");
    expect(upstream.received[0].headers.authorization).to.equal(`Bearer ${UPSTREAM_KEY}`);
    expect(upstream.received[0].headers["x-api-key"]).to.equal(undefined);

    const events = collector.events();
    expect(events).to.have.length(1);
    const sent = events[0];
    expect(sent.user_id).to.equal("alice");
    expect(sent.company_id).to.equal("cus_alice");
    expect(sent.session_token).to.equal("key-id-alice");
    expect(sent.transaction_id).to.equal(transactionIdFor(event.requestContext.requestId));
    expect(sent.metadata).to.include({
      model: "gpt-4o-mini",
      prompt_tokens: json.usage.prompt_tokens,
      completion_tokens: json.usage.completion_tokens,
      total_tokens: json.usage.total_tokens,
      plan: "starter",
      upstream_status: 200,
      usage_estimated: false,
    });
    const response = sent.response as { body: { usage: unknown; id: string; choices?: unknown } };
    expect(response.body.usage).to.deep.equal(json.usage);
    expect(response.body.id).to.equal(json.id);
    expect(response.body.choices).to.equal(undefined);
    expect(JSON.stringify(sent.request)).to.not.include("Hello!");
    expect(collector.requests[0].headers["content-encoding"]).to.equal("gzip");
    assertNoSecrets(result.body);
  });

  it("logs prompt and completion text to Moesif only with MOESIF_LOG_BODIES=true", async () => {
    const { json } = await invoke(makeHandler({ MOESIF_LOG_BODIES: "true" }));
    const sent = collector.events()[0] as { request: { body: unknown }; response: { body: unknown } };
    expect(JSON.stringify(sent.request.body)).to.include("Hello!");
    expect(sent.response.body).to.deep.equal(json);
  });

  it("accepts base64-encoded bodies", async () => {
    const { result } = await invoke(makeHandler(), { base64: true });
    expect(result.statusCode).to.equal(200);
  });

  it("answers /ai-chat with the seed's request_payload envelope when asked", async () => {
    const { json } = await invoke(makeHandler({ RESPONSE_ENVELOPE: "request_payload" }), { resource: "/ai-chat" });
    expect(json.request_payload.object).to.equal("chat.completion");
  });

  it("estimates usage when the upstream omits it, matching the upstream's own count", async () => {
    const handler = makeHandler();
    const reported = await invoke(handler);
    const estimated = await invoke(handler, { body: chatBody({ mock: { omit_usage: true } }) });
    expect(estimated.json.usage).to.equal(undefined);
    const [, second] = collector.events();
    expect(second.metadata).to.include({ usage_estimated: true, prompt_tokens: reported.json.usage.prompt_tokens, completion_tokens: reported.json.usage.completion_tokens });
  });

  it("lists the plan's models on GET /v1/models", async () => {
    const { json } = await invoke(makeHandler(), { resource: "/v1/models", method: "GET", body: undefined });
    expect(json.data.map((m: { id: string }) => m.id)).to.deep.equal(["gpt-4o-mini"]);
  });

  describe("upstream faults on the wire", () => {
    /** Every fault: OpenAI-shaped error, bounded time, one metering event billing nothing, no secret anywhere. */
    const expectUnbilledFault = (outcome: Awaited<ReturnType<typeof invoke>>, status: number, maxMs = 1500 + 1000) => {
      expect(outcome.result.statusCode).to.equal(status);
      expect(outcome.json.error).to.have.keys("message", "type", "param", "code");
      expect(outcome.ms).to.be.lessThan(maxMs);
      const events = collector.events();
      expect(events).to.have.length(1);
      expect((events[0].response as { status: number }).status).to.equal(status);
      expect(events[0].metadata).to.include({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
      assertNoSecrets(outcome.result.body);
    };

    const rows: Array<[string, Record<string, unknown> | undefined, number, string]> = [
      ["500", { status: 500 }, 502, "upstream_failed"],
      ["503", { status: 503 }, 502, "upstream_failed"],
      ["429 with Retry-After", { status: 429, retry_after: "11" }, 429, "rate_limit_exceeded"],
      ["a non-JSON body", { raw: "<html>bad gateway</html>" }, 502, "upstream_bad_response"],
      ["a timeout", { latency_ms: 3000 }, 504, "upstream_timeout"],
    ];
    for (const [name, mock, status, code] of rows) {
      it(`maps ${name} to ${status} ${code}, never billing completion tokens`, async () => {
        const { result, json, ms } = await invoke(makeHandler(), { body: chatBody({ mock }) });
        expect(result.statusCode).to.equal(status);
        expect(json.error.code).to.equal(code);
        if (status === 429) expect(result.headers?.["Retry-After"]).to.equal("11");
        if (status === 504) expect(ms).to.be.lessThan(1500 + 1000);
        const [sent] = collector.events();
        expect(sent.metadata).to.include({ prompt_tokens: 0, completion_tokens: 0 });
        expect((sent.response as { status: number }).status).to.equal(status);
        assertNoSecrets(result.body);
      });
    }

    it("maps an upstream 401 (bad service key) to 502 without leaking the key", async () => {
      const outcome = await invoke(makeHandler({ UPSTREAM_API_KEY: WRONG_UPSTREAM_KEY }));
      const { result, json } = outcome;
      expect(result.statusCode).to.equal(502);
      expect(json.error.code).to.equal("upstream_auth_failed");
      expect([result.body, ...logs, ...collector.rawPayloads].join("\n")).to.not.include(WRONG_UPSTREAM_KEY);
      expectUnbilledFault(outcome, 502);
    });

    it("maps a 502 from the upstream to 502", async () => {
      const outcome = await invoke(makeHandler(), { body: chatBody({ mock: { status: 502 } }) });
      const { result, json } = outcome;
      expect(result.statusCode).to.equal(502);
      expect(json.error.code).to.equal("upstream_failed");
      expectUnbilledFault(outcome, 502);
    });

    it("refuses a huge upstream answer (over 5 MiB) with 502 and bills nothing", async () => {
      upstream.override = (_req, res) => {
        const huge = JSON.stringify({ id: "x", object: "chat.completion", choices: [{ message: { role: "assistant", content: "y".repeat(6 * 1024 * 1024) } }], usage: { prompt_tokens: 1, completion_tokens: 9, total_tokens: 10 } });
        res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(huge) });
        res.end(huge);
      };
      const { result, json, ms } = await invoke(makeHandler());
      expect(result.statusCode).to.equal(502);
      expect(json.error.code).to.equal("upstream_response_too_large");
      expect(ms).to.be.lessThan(1500);
      expect(collector.events()[0].metadata).to.include({ prompt_tokens: 0, completion_tokens: 0 });
    });

    it("passes an upstream 400 through", async () => {
      upstream.override = (_req, res) => {
        res.writeHead(400, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ error: { message: "temperature too high", type: "invalid_request_error", param: "temperature", code: null } }));
      };
      const outcome = await invoke(makeHandler());
      const { result, json } = outcome;
      expect(result.statusCode).to.equal(400);
      expect(json.error.param).to.equal("temperature");
      expectUnbilledFault(outcome, 400);
    });

    it("maps a connection reset mid-body to 502", async () => {
      upstream.override = (_req, res) => {
        res.writeHead(200, { "Content-Type": "application/json", "Content-Length": "1000" });
        res.write('{"id":"chatcmpl-partial","choices":[');
        setTimeout(() => res.socket?.destroy(), 20);
      };
      const outcome = await invoke(makeHandler());
      const { result, json } = outcome;
      expect(result.statusCode).to.equal(502);
      expect(json.error.code).to.equal("upstream_unreachable");
      expectUnbilledFault(outcome, 502);
    });

    it("maps a refused connection to 502", async () => {
      const closed = http.createServer();
      await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", () => resolve()));
      const port = (closed.address() as AddressInfo).port;
      await new Promise<void>((resolve) => closed.close(() => resolve()));
      const outcome = await invoke(makeHandler({ UPSTREAM_BASE_URL: `http://127.0.0.1:${port}/v1` }));
      const { result, json } = outcome;
      expect(result.statusCode).to.equal(502);
      expect(json.error.code).to.equal("upstream_unreachable");
      expectUnbilledFault(outcome, 502);
    });

    it("times out a slow trickle that never finishes", async () => {
      upstream.override = (_req, res) => {
        res.writeHead(200, { "Content-Type": "application/json" });
        const timer = setInterval(() => res.write(" "), 100);
        res.on("close", () => clearInterval(timer));
      };
      const outcome = await invoke(makeHandler({ UPSTREAM_TIMEOUT_MS: "600" }));
      const { result, ms } = outcome;
      expect(result.statusCode).to.equal(504);
      expect(ms).to.be.lessThan(600 + 700);
      expectUnbilledFault(outcome, 504, 600 + 700);
    });
  });

  describe("Moesif faults never change the caller's answer", () => {
    const described = { refuse: "refuses connections", hang: "hangs", error: "answers 500", garbage: "answers garbage" } as const;
    for (const mode of ["refuse", "hang", "error", "garbage"] as const) {
      it(`answers 200 within METERING_TIMEOUT_MS when the collector ${described[mode]}`, async () => {
        collector.mode = mode;
        const handler = makeHandler();
        const { result, ms } = await invoke(handler);
        expect(result.statusCode).to.equal(200);
        expect(ms).to.be.lessThan(300 + 700);
        if (mode !== "garbage") {
          expect(logs.some((l) => l.includes('"metering_deferred"'))).to.equal(true);
          expect(collector.events()).to.have.length(0);
        }
        assertNoSecrets(result.body);
      });
    }

    it("re-sends deferred events once the collector recovers, each counted once", async () => {
      collector.mode = "error";
      const handler = makeHandler();
      const first = await invoke(handler);
      collector.mode = "ok";
      await new Promise((resolve) => setTimeout(resolve, 2100)); // the first back-off is 2 s
      const second = await invoke(handler);
      const ids = collector.events().map((e) => e.transaction_id);
      expect(ids).to.have.members([
        transactionIdFor(first.event.requestContext.requestId),
        transactionIdFor(second.event.requestContext.requestId),
      ]);
      expect(collector.requests.at(-1)?.url).to.equal("/v1/events/batch");
    });

    it("keeps metering every later request after one whose body nests 20,000 arrays (MOESIF_LOG_BODIES=true)", async () => {
      const nested = `${"[".repeat(20_000)}${"]".repeat(20_000)}`; // JSON.stringify itself overflows on this
      const handler = makeHandler({ MOESIF_LOG_BODIES: "true" });
      // Whatever the function answers to such a body, it is one metered request like any other.
      const deep = await invoke(handler, { body: `${JSON.stringify(chatBody()).slice(0, -1)},"extra":${nested}}` });
      const later = [await invoke(handler), await invoke(handler)];
      const ids = collector.events().map((e) => e.transaction_id);
      expect(ids).to.have.members([deep, ...later].map((o) => transactionIdFor(o.event.requestContext.requestId)));
      for (const { result } of later) expect(result.statusCode).to.equal(200);
    });

    it("meters a request with 3,600 long top-level fields in one event of at most 64 KB, and the next one too", async () => {
      const handler = makeHandler();
      // ~970 KB, under MAX_REQUEST_BYTES: every field is a short scalar, which is what events kept without bodies.
      const fields = Object.fromEntries(Array.from({ length: 3600 }, (_, i) => [`field_${i}`, "x".repeat(256)]));
      const wide = await invoke(handler, { body: { ...chatBody(), ...fields } });
      const next = await invoke(handler);
      expect(collector.events().map((e) => e.transaction_id)).to.have.members(
        [wide, next].map((o) => transactionIdFor(o.event.requestContext.requestId)),
      );
      for (const payload of collector.rawPayloads) expect(Buffer.byteLength(payload)).to.be.at.most(64 * 1024);
    });
  });

  it("serves without metering when MOESIF_APPLICATION_ID is unset", async () => {
    const { result } = await invoke(makeHandler({ MOESIF_APPLICATION_ID: undefined }));
    expect(result.statusCode).to.equal(200);
    expect(collector.requests).to.have.length(0);
  });

  it("answers 403 for a key id with no customer, and 500 when the upstream key is missing", async () => {
    const forbidden = await invoke(makeHandler(), { apiKeyId: "key-id-nobody" });
    expect(forbidden.result.statusCode).to.equal(403);
    const misconfigured = await invoke(makeHandler({ UPSTREAM_API_KEY: undefined }));
    expect(misconfigured.result.statusCode).to.equal(500);
    expect(misconfigured.json.error.message).to.match(/upstream API key/);
  });

  it("uses the seed's Authorization=Bearer variable when UPSTREAM_API_KEY is absent", async () => {
    const { result } = await invoke(makeHandler({ UPSTREAM_API_KEY: undefined, Authorization: `Bearer ${UPSTREAM_KEY}` }));
    expect(result.statusCode).to.equal(200);
  });

  it("meters the URI API Gateway asserts (domain, stage, route), never the client's Host or X-Forwarded-Proto", async () => {
    const event = createApiGatewayEvent({ apiKey: CALLER_KEY, body: chatBody(), stage: "prod", headers: { Host: "free.example/ai-chat?", "X-Forwarded-Proto": "gopher" } });
    event.requestContext.domainName = "abc123.execute-api.us-east-1.amazonaws.com";
    const result = await invokeStreaming(makeHandler(), event, createContext());
    expect(result.statusCode).to.equal(200);
    const [sent] = collector.events();
    expect((sent.request as { uri: string }).uri).to.equal("https://abc123.execute-api.us-east-1.amazonaws.com/prod/v1/chat/completions");
    expect(JSON.stringify(sent)).to.not.include("free.example");
  });

  it("bounds the upstream call by the Lambda's remaining time, and the event says the 504 the caller got", async () => {
    const handler = makeHandler({ UPSTREAM_TIMEOUT_MS: "20000" });
    const event = createApiGatewayEvent({ apiKey: CALLER_KEY, body: chatBody({ mock: { latency_ms: 5000 } }) });
    // 3.5 s left: 300 ms are kept for metering and 2 s in reserve, so the upstream gets 1.2 s.
    const result = await invokeStreaming(handler, event, createContext({ getRemainingTimeInMillis: () => 3500 }));
    expect(result.statusCode).to.equal(504);
    expect(JSON.parse(result.body).error.code).to.equal("upstream_timeout");
    const [sent] = collector.events();
    expect((sent.response as { status: number }).status).to.equal(504);
    expect(sent.metadata).to.include({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
  });

  it("answers 502 response_too_large for a completion that fits the upstream limit but not Lambda's, billing nothing", async () => {
    upstream.override = (_req, res) => {
      // 2.5 MB of quotes: 5 MB as the upstream's JSON, 10 MB once the proxy result escapes it again.
      const text = JSON.stringify({ id: "chatcmpl-big", object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: '"'.repeat(2_500_000) } }], usage: { prompt_tokens: 3, completion_tokens: 700_000, total_tokens: 700_003 } });
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
      res.end(text);
    };
    const { result, json } = await invoke(makeHandler());
    expect(result.statusCode).to.equal(502);
    expect(json.error.code).to.equal("response_too_large");
    const [sent] = collector.events();
    expect((sent.response as { status: number }).status).to.equal(502);
    expect(sent.metadata).to.include({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, upstream_status: 200 });
  });

  it("estimates a 24,000-letter single-word prompt to an upstream that omits usage, and meters the 200 it answers", async () => {
    const { result } = await invoke(makeHandler(), { body: chatBody({ messages: [{ role: "user", content: "z".repeat(24_000) }], mock: { omit_usage: true } }) });
    expect(result.statusCode).to.equal(200);
    const [sent] = collector.events();
    expect((sent.response as { status: number }).status).to.equal(200);
    expect(sent.metadata).to.include({ usage_estimated: true });
    expect(sent.metadata?.prompt_tokens).to.be.greaterThan(2000);
  });

  it("keeps a JSON-escaped upstream key out of the caller's answer, the logs and the Moesif event", async () => {
    upstream.override = (_req, res) => {
      const escaped = UPSTREAM_KEY.replace(/-/g, "\\u002d");
      const text = `{"error":{"message":"Incorrect API key provided: ${escaped}","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}`;
      res.writeHead(400, { "Content-Type": "application/json", "Retry-After": UPSTREAM_KEY });
      res.end(text);
    };
    const { result } = await invoke(makeHandler({ MOESIF_LOG_BODIES: "true" }));
    expect(result.statusCode).to.equal(400);
    expect(collector.events()).to.have.length(1);
    assertNoSecrets(result.body, JSON.stringify(result.headers));
  });

  it("bills the API Gateway source IP, not a client-sent X-Forwarded-For", async () => {
    await invoke(makeHandler(), { headers: { "X-Forwarded-For": "6.6.6.6", "x-client-ip": "6.6.6.6" }, sourceIp: "198.51.100.9" });
    const [sent] = collector.events();
    expect((sent.request as { ip_address: string }).ip_address).to.equal("198.51.100.9");
    expect(sent.user_id).to.equal("alice");
  });
});
