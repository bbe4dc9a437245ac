import { expect } from "chai";
import type { APIGatewayProxyEvent, APIGatewayProxyResult, Context } from "aws-lambda";
import { authorize } from "../../functions/authorizer/index";
import { gatewayResponse, renderGatewayBody } from "../../infra/gateway-responses";
import { GatewayEmulator, isProxyResult, type GatewayOptions, type LambdaHandler } from "../../scripts/local/gateway";
import { rawRequest, type RawResponse } from "../helpers/local-project";

const KEY = "k".repeat(40);
const OTHER_KEY = "o".repeat(40);
const DISABLED_KEY = "d".repeat(40);

/**
 * Names that are properties of every plain object, or that change one when assigned: as a header or query
 * parameter they must stay data.
 */
const HOSTILE_NAMES = [
  "__proto__",
  "constructor",
  "prototype",
  "toString",
  "valueOf",
  "hasOwnProperty",
  "isPrototypeOf",
  "propertyIsEnumerable",
  "toLocaleString",
  "__defineGetter__",
  "__defineSetter__",
  "__lookupGetter__",
  "__lookupSetter__",
];

/** An emulator on a free port around a handler that records every event it is given. */
function useGateway(overrides: Partial<GatewayOptions> = {}) {
  const events: APIGatewayProxyEvent[] = [];
  const quotaCalls: string[] = [];
  let reply: LambdaHandler = async () => ({ statusCode: 200, headers: { "Content-Type": "application/json" }, body: '{"ok":true}' });
  let gateway: GatewayEmulator;
  before(async () => {
    gateway = await new GatewayEmulator({
      stage: "beta",
      routes: [
        { path: "/v1/chat/completions", method: "POST" },
        { path: "/v1/models", method: "GET" },
        { path: "/v1/usage", method: "GET", apiKeyRequired: true },
        { path: "/stripe/webhook", method: "POST", apiKeyRequired: false },
      ],
      keys: [
        { id: "key-a", value: KEY, customerId: "a", plan: { rateLimit: 100_000, burstLimit: 100_000 } },
        { id: "key-q", value: OTHER_KEY, customerId: "q", plan: { rateLimit: 100_000, burstLimit: 100_000, quota: { limit: 1, period: "DAY", offset: 0 } } },
        { id: "key-d", value: DISABLED_KEY, customerId: "d", plan: { rateLimit: 100_000, burstLimit: 100_000 }, enabled: false },
      ],
      handler: (event: APIGatewayProxyEvent, context: Context) => {
        events.push(event);
        return reply(event, context);
      },
      quota: {
        takeQuota: (keyId, period, limit) => {
          quotaCalls.push(keyId);
          return quotaCalls.filter((k) => k === keyId).length <= limit;
        },
      },
      port: 0,
      ...overrides,
    }).start();
  });
  after(() => gateway.stop());
  beforeEach(() => {
    events.length = 0;
    quotaCalls.length = 0;
    reply = async () => ({ statusCode: 200, headers: { "Content-Type": "application/json" }, body: '{"ok":true}' });
  });
  return {
    events,
    quotaCalls,
    get gateway() {
      return gateway;
    },
    setReply(handler: LambdaHandler) {
      reply = handler;
    },
    send(path: string, options: { method?: string; headers?: Record<string, string | string[]>; body?: Buffer } = {}): Promise<RawResponse> {
      return rawRequest(`${gateway.baseUrl}${path}`, { method: options.method ?? "POST", headers: options.headers, body: options.body ?? Buffer.from("{}") });
    },
  };
}

function expectGatewayBody(response: RawResponse, type: string, request: { method: string; path: string }, status = gatewayResponse(type).statusCode): void {
  expect(response.status, `${type}: ${response.body}`).to.equal(status);
  expect(response.body).to.equal(renderGatewayBody(gatewayResponse(type), request));
  expect(response.headers["content-type"]).to.equal("application/json");
  expect(response.headers["x-amzn-errortype"]).to.be.a("string");
  expect(response.headers["x-amzn-requestid"]).to.be.a("string");
}

describe("GatewayEmulator", () => {
  describe("keys and the authorizer", () => {
    const gw = useGateway();

    it("hands the function the key's id, the key and the authorizer's principal, as API Gateway does", async () => {
      const response = await gw.send("/v1/chat/completions", { headers: { authorization: `Bearer ${KEY}` } });
      expect(response.status).to.equal(200);
      const [event] = gw.events;
      expect(event.requestContext.identity.apiKeyId).to.equal("key-a");
      expect(event.requestContext.identity.apiKey).to.equal(KEY);
      expect(event.requestContext.authorizer).to.deep.equal({ principalId: "api-key" });
      expect(event.requestContext.requestId).to.equal(response.headers["x-amzn-requestid"]);
    });

    it("lets x-api-key win over Authorization", async () => {
      const response = await gw.send("/v1/chat/completions", { headers: { "x-api-key": OTHER_KEY, authorization: `Bearer ${KEY}` } });
      expect(response.status).to.equal(200);
      expect(gw.events[0].requestContext.identity.apiKeyId).to.equal("key-q");
    });

    it("answers ACCESS_DENIED without a key or with a header that cannot hold one", async () => {
      const denied: Array<Record<string, string>> = [{}, { authorization: "Basic dXNlcjpwYXNz" }, { authorization: "Bearer" }, { "x-api-key": "short" }];
      for (const headers of denied) {
        expectGatewayBody(await gw.send("/v1/chat/completions", { headers }), "ACCESS_DENIED", { method: "POST", path: "/beta/v1/chat/completions" });
      }
      expect(gw.events).to.have.length(0);
    });

    it("answers INVALID_API_KEY for an unknown or disabled key", async () => {
      for (const key of ["u".repeat(40), DISABLED_KEY]) {
        const response = await gw.send("/v1/chat/completions", { headers: { authorization: `Bearer ${key}` } });
        expectGatewayBody(response, "INVALID_API_KEY", { method: "POST", path: "/beta/v1/chat/completions" });
        expect(response.headers["x-amzn-errortype"]).to.equal("ForbiddenException");
      }
      expect(gw.events).to.have.length(0);
    });

    it("takes quota only for requests that pass the authorizer and the key check", async () => {
      await gw.send("/v1/chat/completions", { headers: { "x-api-key": "u".repeat(40) } });
      await gw.send("/v1/chat/completions", {});
      await gw.send("/v1/embeddings", { headers: { "x-api-key": OTHER_KEY } });
      expect(gw.quotaCalls).to.deep.equal([]);
      expect((await gw.send("/v1/chat/completions", { headers: { "x-api-key": OTHER_KEY } })).status).to.equal(200);
      const spent = await gw.send("/v1/chat/completions", { headers: { "x-api-key": OTHER_KEY } });
      expectGatewayBody(spent, "QUOTA_EXCEEDED", { method: "POST", path: "/beta/v1/chat/completions" });
      expect(spent.headers["x-should-retry"]).to.equal("false");
      expect(gw.quotaCalls).to.deep.equal(["key-q", "key-q"]);
    });
  });

  describe("a route without an API key (authorization NONE, apiKeyRequired false)", () => {
    let authorizerCalls = 0;
    const gw = useGateway({
      authorizer: (event) => {
        authorizerCalls += 1;
        return authorize(event);
      },
    });
    beforeEach(() => (authorizerCalls = 0));

    it("serves POST /stripe/webhook with no key: no authorizer, no key in the event, no usage plan quota", async () => {
      const body = Buffer.from('{"id":"evt_1","type":"checkout.session.completed"}');
      const response = await gw.send("/stripe/webhook", { headers: { "content-type": "application/json", "stripe-signature": "t=1,v1=abc" }, body });
      expect(response.status, response.body).to.equal(200);
      const [event] = gw.events;
      expect(event.resource).to.equal("/stripe/webhook");
      expect(event.headers["stripe-signature"]).to.equal("t=1,v1=abc");
      expect(Buffer.from(event.body!, "base64").equals(body)).to.equal(true);
      expect(event.requestContext.identity.apiKey).to.equal(null);
      expect(event.requestContext.identity.apiKeyId).to.equal(null);
      expect(event.requestContext.authorizer).to.equal(undefined);
      expect(authorizerCalls).to.equal(0);
      expect(gw.quotaCalls).to.deep.equal([]);
    });

    it("ignores a key sent to the no-key route: neither checked nor counted against its quota", async () => {
      for (const headers of [{ "x-api-key": "u".repeat(40) }, { "x-api-key": OTHER_KEY }, { "x-api-key": OTHER_KEY }]) {
        expect((await gw.send("/stripe/webhook", { headers })).status).to.equal(200);
      }
      expect(gw.events.map((e) => e.requestContext.identity.apiKeyId)).to.deep.equal([null, null, null]);
      expect(authorizerCalls).to.equal(0);
      expect(gw.quotaCalls).to.deep.equal([]);
    });

    it("still requires a key on GET /v1/usage, and only POST is routed on the webhook", async () => {
      expectGatewayBody(await gw.send("/v1/usage", { method: "GET", body: Buffer.alloc(0) }), "ACCESS_DENIED", { method: "GET", path: "/beta/v1/usage" });
      expectGatewayBody(await gw.send("/v1/usage", { method: "GET", headers: { "x-api-key": "u".repeat(40) }, body: Buffer.alloc(0) }), "INVALID_API_KEY", { method: "GET", path: "/beta/v1/usage" });
      expectGatewayBody(await gw.send("/stripe/webhook", { method: "GET", body: Buffer.alloc(0) }), "MISSING_AUTHENTICATION_TOKEN", { method: "GET", path: "/beta/stripe/webhook" });
      expect(gw.events).to.have.length(0);
      const ok = await gw.send("/v1/usage", { method: "GET", headers: { "x-api-key": KEY }, body: Buffer.alloc(0) });
      expect(ok.status).to.equal(200);
      expect(gw.events[0].requestContext.identity.apiKeyId).to.equal("key-a");
    });
  });

  describe("a no-key route under the stage's throttle", () => {
    const gw = useGateway({ stageThrottle: { rateLimit: 1, burstLimit: 1 } });

    it("throttles the webhook with every other caller: the stage's bucket is shared", async () => {
      expect((await gw.send("/stripe/webhook", {})).status).to.equal(200);
      expectGatewayBody(await gw.send("/stripe/webhook", {}), "THROTTLED", { method: "POST", path: "/beta/stripe/webhook" });
      expectGatewayBody(await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } }), "THROTTLED", { method: "POST", path: "/beta/v1/chat/completions" });
    });
  });

  describe("hostile header and query names", () => {
    const gw = useGateway();

    for (const name of HOSTILE_NAMES) {
      it(`passes a header named ${name} to the function as data`, async () => {
        const response = await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY, [name]: "v1" } });
        expect(response.status, response.body).to.equal(200);
        const [event] = gw.events;
        expect(Object.getOwnPropertyDescriptor(event.headers, name)?.value).to.equal("v1");
        expect(Object.getOwnPropertyDescriptor(event.multiValueHeaders, name)?.value).to.deep.equal(["v1"]);
        expect(Object.getPrototypeOf(event.headers)).to.equal(Object.prototype);
      });

      it(`passes a query parameter named ${name} (twice) to the function as data`, async () => {
        const response = await gw.send(`/v1/chat/completions?${encodeURIComponent(name)}=a&${encodeURIComponent(name)}=b`, { headers: { "x-api-key": KEY } });
        expect(response.status, response.body).to.equal(200);
        const [event] = gw.events;
        expect(Object.getOwnPropertyDescriptor(event.queryStringParameters, name)?.value).to.equal("b");
        expect(Object.getOwnPropertyDescriptor(event.multiValueQueryStringParameters, name)?.value).to.deep.equal(["a", "b"]);
      });
    }

    it("does not take quota for a hostile request without a valid key", async () => {
      const response = await gw.send("/v1/chat/completions?__proto__=x", { headers: { ["__proto__"]: "x", constructor: "y", "x-api-key": "u".repeat(40) } });
      expectGatewayBody(response, "INVALID_API_KEY", { method: "POST", path: "/beta/v1/chat/completions" });
      expect(gw.quotaCalls).to.deep.equal([]);
    });

    it("keeps repeated headers: the last in headers, all in multiValueHeaders", async () => {
      await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY, "x-trace": ["a", "b"] } });
      expect(gw.events[0].headers["x-trace"]).to.equal("b");
      expect(gw.events[0].multiValueHeaders["x-trace"]).to.deep.equal(["a", "b"]);
    });
  });

  describe("bodies", () => {
    const gw = useGateway();

    it("hands over every body base64-encoded and byte-exact, whatever its Content-Type", async () => {
      const bytes = Buffer.from([0x7b, 0x22, 0x61, 0x22, 0x3a, 0x22, 0xc3, 0x28, 0x22, 0x7d, 0x00, 0xff]);
      for (const contentType of ["application/json", "text/plain", "application/octet-stream", undefined]) {
        gw.events.length = 0;
        const headers: Record<string, string> = { "x-api-key": KEY, ...(contentType ? { "content-type": contentType } : {}) };
        expect((await gw.send("/v1/chat/completions", { headers, body: bytes })).status).to.equal(200);
        const [event] = gw.events;
        expect(event.isBase64Encoded, contentType).to.equal(true);
        expect(Buffer.from(event.body!, "base64").equals(bytes), contentType).to.equal(true);
      }
    });

    it("sends a request without a body as body null", async () => {
      const response = await gw.send("/v1/models", { method: "GET", headers: { "x-api-key": KEY }, body: Buffer.alloc(0) });
      expect(response.status).to.equal(200);
      expect(gw.events[0].body).to.equal(null);
      expect(gw.events[0].isBase64Encoded).to.equal(false);
    });

    it("decodes a base64 result from the function", async () => {
      gw.setReply(async () => ({ statusCode: 200, headers: { "Content-Type": "text/plain" }, body: Buffer.from("héllo").toString("base64"), isBase64Encoded: true }));
      const response = await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } });
      expect(response.body).to.equal("héllo");
      expect(response.headers["content-length"]).to.equal(String(Buffer.byteLength("héllo")));
    });
  });

  describe("function failures", () => {
    const gw = useGateway({ integrationTimeoutMs: 200 });
    const path = "/beta/v1/chat/completions";

    it("answers INTEGRATION_FAILURE with API Gateway's 502 when the function throws", async () => {
      gw.setReply(async () => {
        throw new Error("boom with a secret sk-live-123");
      });
      const response = await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } });
      expectGatewayBody(response, "INTEGRATION_FAILURE", { method: "POST", path }, 502);
      expect(response.body).to.not.include("sk-live");
    });

    it("answers DEFAULT_5XX with 502 for a result that is not a proxy result", async () => {
      const bad: unknown[] = [undefined, null, "text", { body: "no status" }, { statusCode: "200" }, { statusCode: 200, body: { json: true } }, { statusCode: 200, headers: { a: { b: 1 } } }, { statusCode: 200, headers: { "bad\nname": "x" } }];
      for (const result of bad) {
        gw.setReply(async () => result as APIGatewayProxyResult);
        expectGatewayBody(await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } }), "DEFAULT_5XX", { method: "POST", path }, 502);
      }
    });

    it("answers INTEGRATION_TIMEOUT when the function outlives the integration timeout", async () => {
      gw.setReply(() => new Promise((resolve) => setTimeout(() => resolve({ statusCode: 200, body: "late" }), 1_000)));
      expectGatewayBody(await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } }), "INTEGRATION_TIMEOUT", { method: "POST", path });
    });
  });

  describe("the stage's throttle", () => {
    const gw = useGateway({ stageThrottle: { rateLimit: 1, burstLimit: 1 } });

    it("throttles all callers together once the stage's bucket is empty, with Retry-After", async () => {
      expect((await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } })).status).to.equal(200);
      const throttled = await gw.send("/v1/chat/completions", { headers: { "x-api-key": OTHER_KEY } });
      expectGatewayBody(throttled, "THROTTLED", { method: "POST", path: "/beta/v1/chat/completions" });
      expect(throttled.headers["retry-after"]).to.equal("1");
      expect(gw.quotaCalls).to.deep.equal([]);
    });
  });

  describe("authorizer failure", () => {
    const gw = useGateway({
      authorizer: () => {
        throw new Error("authorizer crashed");
      },
    });

    it("answers AUTHORIZER_FAILURE and never calls the function", async () => {
      expectGatewayBody(await gw.send("/v1/chat/completions", { headers: { "x-api-key": KEY } }), "AUTHORIZER_FAILURE", { method: "POST", path: "/beta/v1/chat/completions" });
      expect(gw.events).to.have.length(0);
    });
  });

  describe("isProxyResult", () => {
    it("accepts the shapes Lambda proxy integrations return", () => {
      expect(isProxyResult({ statusCode: 204 })).to.equal(true);
      expect(isProxyResult({ statusCode: 200, body: "", headers: { a: "b", n: 1 }, multiValueHeaders: { c: ["d", true] }, isBase64Encoded: false })).to.equal(true);
    });
  });
});
