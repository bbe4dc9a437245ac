import { expect } from "chai";
import http from "node:http";
import type { APIGatewayProxyEvent, APIGatewayRequestAuthorizerEvent } from "aws-lambda";
import { authorize } from "../../functions/authorizer/index";
import { gatewayResponse, renderGatewayBody } from "../../infra/gateway-responses";
import { ROUTES } from "../../infra/function-env";
import { GatewayEmulator, matchRoute, type GatewayOptions, type GatewayRoute } from "../../scripts/local/gateway";
import type { RawResponse } from "../helpers/local-project";

const KEY = "t".repeat(40);

/** Routes where a literal resource and a template resource both match some paths (listed template first). */
const OVERLAPPING: GatewayRoute[] = [
  { path: "/v1/items/{id}", method: "GET" },
  { path: "/v1/items/{id}/parts/{part}", method: "GET" },
  { path: "/v1/items/special", method: "GET" },
  { path: "/v1/items/special/parts/{part}", method: "GET" },
];

function useGateway(routes: ReadonlyArray<GatewayRoute>, overrides: Partial<GatewayOptions> = {}) {
  const events: APIGatewayProxyEvent[] = [];
  const authorizerEvents: APIGatewayRequestAuthorizerEvent[] = [];
  let gateway: GatewayEmulator;
  before(async () => {
    gateway = await new GatewayEmulator({
      stage: "beta",
      routes,
      keys: [{ id: "key-t", value: KEY, customerId: "t", plan: { rateLimit: 100_000, burstLimit: 100_000 } }],
      handler: async (event: APIGatewayProxyEvent) => {
        events.push(event);
        return { statusCode: 200, headers: { "Content-Type": "application/json" }, body: '{"ok":true}' };
      },
      authorizer: (event) => {
        authorizerEvents.push(event);
        return authorize(event);
      },
      quota: { takeQuota: () => true },
      port: 0,
      ...overrides,
    }).start();
  });
  after(() => gateway.stop());
  beforeEach(() => {
    events.length = 0;
    authorizerEvents.length = 0;
  });
  return {
    events,
    authorizerEvents,
    get gateway() {
      return gateway;
    },
    /** `path` below the origin, sent exactly as given (no URL normalisation by the client, which `fetch` would do). */
    send(path: string, method = "GET", headers: Record<string, string> = { "x-api-key": KEY }): Promise<RawResponse> {
      const origin = new URL(gateway.baseUrl);
      return new Promise((resolve, reject) => {
        const req = http.request({ host: origin.hostname, port: origin.port, path, method, headers, agent: false }, (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }));
          res.on("error", reject);
        });
        req.on("error", reject);
        req.end(method === "POST" ? "{}" : undefined);
      });
    },
  };
}

function expectMissingToken(response: RawResponse, method: string, path: string): void {
  expect(response.status, response.body).to.equal(403);
  expect(response.body).to.equal(renderGatewayBody(gatewayResponse("MISSING_AUTHENTICATION_TOKEN"), { method, path }));
  expect(response.headers["x-amzn-errortype"]).to.equal("MissingAuthenticationTokenException");
}

describe("the gateway emulator's resource templates", () => {
  describe("matchRoute", () => {
    it("matches a {name} segment to exactly one non-empty segment and decodes its value", () => {
      expect(matchRoute(ROUTES, "GET", "/v1/responses/resp_1")).to.deep.include({ pathParameters: { id: "resp_1" } });
      expect(matchRoute(ROUTES, "GET", "/v1/responses/resp_1")!.route.path).to.equal("/v1/responses/{id}");
      expect(matchRoute(ROUTES, "GET", "/v1/responses/a%2Fb%20c")!.pathParameters).to.deep.equal({ id: "a/b c" });
      expect(matchRoute(ROUTES, "GET", "/v1/responses/r/input_items")!.route.path).to.equal("/v1/responses/{id}/input_items");
      expect(matchRoute(ROUTES, "POST", "/v1/responses/r/cancel")!.route.path).to.equal("/v1/responses/{id}/cancel");
      expect(matchRoute(ROUTES, "DELETE", "/v1/responses/r")!.route).to.deep.equal({ path: "/v1/responses/{id}", method: "DELETE", apiKeyRequired: true });
      for (const path of ["/v1/responses/", "/v1/responses//input_items", "/v1/responses/a/b", "/v1/responses/a/input_items/x", "/v1/models/", "v1/models"]) {
        expect(matchRoute(ROUTES, "GET", path), path).to.equal(undefined);
      }
    });

    it("selects the method on the matched resource only", () => {
      expect(matchRoute(ROUTES, "POST", "/v1/responses/r")).to.equal(undefined);
      expect(matchRoute(ROUTES, "PUT", "/v1/models/gpt-4o")).to.equal(undefined);
      expect(matchRoute(ROUTES, "GET", "/v1/models/gpt-4o")!.route.path).to.equal("/v1/models/{model}");
    });

    it("gives literal resources null path parameters and keeps a malformed escape as sent", () => {
      expect(matchRoute(ROUTES, "GET", "/v1/models")).to.deep.equal({ route: { path: "/v1/models", method: "GET", apiKeyRequired: true }, pathParameters: null });
      expect(matchRoute(ROUTES, "GET", "/v1/models/%E0%A4%A")!.pathParameters).to.deep.equal({ model: "%E0%A4%A" });
    });

    it("prefers a literal segment over a template one, whatever the order of the routes", () => {
      for (const routes of [OVERLAPPING, [...OVERLAPPING].reverse()]) {
        expect(matchRoute(routes, "GET", "/v1/items/special")).to.deep.equal({ route: { path: "/v1/items/special", method: "GET" }, pathParameters: null });
        expect(matchRoute(routes, "GET", "/v1/items/other")).to.deep.equal({ route: { path: "/v1/items/{id}", method: "GET" }, pathParameters: { id: "other" } });
        expect(matchRoute(routes, "GET", "/v1/items/special/parts/p1")).to.deep.equal({ route: { path: "/v1/items/special/parts/{part}", method: "GET" }, pathParameters: { part: "p1" } });
        expect(matchRoute(routes, "GET", "/v1/items/x/parts/p1")).to.deep.equal({ route: { path: "/v1/items/{id}/parts/{part}", method: "GET" }, pathParameters: { id: "x", part: "p1" } });
        // An encoded literal is not the literal: it is a value of the template.
        expect(matchRoute(routes, "GET", "/v1/items/%73pecial")).to.deep.equal({ route: { path: "/v1/items/{id}", method: "GET" }, pathParameters: { id: "special" } });
      }
    });
  });

  describe("the proxy event of a templated route", () => {
    const gw = useGateway(ROUTES);

    it("carries the template as resource, the path as sent, the decoded parameters, and null query maps without a query", async () => {
      const response = await gw.send("/beta/v1/responses/resp%2F1%20x");
      expect(response.status, response.body).to.equal(200);
      const [event] = gw.events;
      expect(event.resource).to.equal("/v1/responses/{id}");
      expect(event.path).to.equal("/v1/responses/resp%2F1%20x");
      expect(event.httpMethod).to.equal("GET");
      expect(event.pathParameters).to.deep.equal({ id: "resp/1 x" });
      expect(event.queryStringParameters).to.equal(null);
      expect(event.multiValueQueryStringParameters).to.equal(null);
      expect(event.requestContext.resourcePath).to.equal("/v1/responses/{id}");
      expect(event.requestContext.path).to.equal("/beta/v1/responses/resp%2F1%20x");
      expect(event.requestContext.httpMethod).to.equal("GET");
    });

    it("passes single and repeated query parameters as API Gateway does", async () => {
      await gw.send("/beta/v1/responses/resp_1/input_items?limit=2&include%5B%5D=a&include%5B%5D=b&order=asc");
      const [event] = gw.events;
      expect(event.resource).to.equal("/v1/responses/{id}/input_items");
      expect(event.pathParameters).to.deep.equal({ id: "resp_1" });
      expect({ ...event.queryStringParameters }).to.deep.equal({ limit: "2", "include[]": "b", order: "asc" });
      expect({ ...event.multiValueQueryStringParameters }).to.deep.equal({ limit: ["2"], "include[]": ["a", "b"], order: ["asc"] });
    });

    it("routes DELETE, cancel and the model by id to their own resources, and literal routes with null pathParameters", async () => {
      await gw.send("/beta/v1/responses/resp_9", "DELETE");
      await gw.send("/beta/v1/responses/resp_9/cancel", "POST");
      await gw.send("/beta/v1/models/ft%3Agpt-4o-mini%3Aorg");
      await gw.send("/beta/v1/models");
      expect(gw.events.map((e) => [e.httpMethod, e.resource, e.pathParameters])).to.deep.equal([
        ["DELETE", "/v1/responses/{id}", { id: "resp_9" }],
        ["POST", "/v1/responses/{id}/cancel", { id: "resp_9" }],
        ["GET", "/v1/models/{model}", { model: "ft:gpt-4o-mini:org" }],
        ["GET", "/v1/models", null],
      ]);
      expect(gw.events[3].path).to.equal("/v1/models");
    });

    it("gives the authorizer the path parameters and a method ARN naming the path requested", async () => {
      await gw.send("/beta/v1/responses/resp_7/input_items");
      const [event] = gw.authorizerEvents;
      expect(event.methodArn).to.equal("arn:aws:execute-api:local:000000000000:local/beta/GET/v1/responses/resp_7/input_items");
      expect(event.resource).to.equal("/v1/responses/{id}/input_items");
      expect(event.pathParameters).to.deep.equal({ id: "resp_7" });
    });

    it("answers 403 Missing Authentication Token for an empty or extra segment, a method the resource lacks, or dot segments", async () => {
      const refused: Array<[string, string]> = [
        ["GET", "/beta/v1/responses/"],
        ["GET", "/beta/v1/responses//input_items"],
        ["GET", "/beta/v1/responses/a/b"],
        ["POST", "/beta/v1/responses/resp_1"],
        ["PUT", "/beta/v1/models/gpt-4o"],
        ["DELETE", "/beta/v1/responses/resp_1/input_items"],
        // Not resolved to /v1/models, as URL parsing would (`..` and its escaped form).
        ["GET", "/beta/v1/x/../models"],
        ["GET", "/beta/v1/x/%2E%2E/models"],
      ];
      for (const [method, path] of refused) expectMissingToken(await gw.send(path, method), method, path);
      expect(gw.events).to.deep.equal([]);
      expect(gw.authorizerEvents).to.deep.equal([]);
    });

    it("still requires the API key on templated routes", async () => {
      const response = await gw.send("/beta/v1/responses/resp_1", "GET", {});
      expect(response.status).to.equal(403);
      expect(response.body).to.equal(renderGatewayBody(gatewayResponse("ACCESS_DENIED"), { method: "GET", path: "/beta/v1/responses/resp_1" }));
      expect(gw.events).to.deep.equal([]);
    });
  });

  describe("local pages", () => {
    const seen: string[] = [];
    const gw = useGateway(ROUTES, {
      localPages: [
        {
          prefix: "/_local/dashboard",
          handler: (req, res) => {
            seen.push(`${req.method} ${req.url}`);
            res.writeHead(200, { "Content-Type": "text/plain" });
            res.end("dashboard");
          },
        },
        {
          prefix: "/_local/broken",
          handler: async () => {
            throw new Error("page failed");
          },
        },
      ],
    });
    beforeEach(() => {
      seen.length = 0;
    });

    it("serves a page and every path below it without an API key, before route matching", async () => {
      for (const path of ["/_local/dashboard", "/_local/dashboard/", "/_local/dashboard/usage.json?x=1"]) {
        const response = await gw.send(path, "GET", {});
        expect(response.status, path).to.equal(200);
        expect(response.body).to.equal("dashboard");
      }
      expect(seen).to.deep.equal(["GET /_local/dashboard", "GET /_local/dashboard/", "GET /_local/dashboard/usage.json?x=1"]);
      expect(gw.events).to.deep.equal([]);
      expect(gw.authorizerEvents).to.deep.equal([]);
    });

    it("does not serve a path that merely starts with the prefix, and leaves the API routes to the key check", async () => {
      expectMissingToken(await gw.send("/_local/dashboardx", "GET", {}), "GET", "/_local/dashboardx");
      expect((await gw.send("/beta/v1/models", "GET", {})).status).to.equal(403);
      expect((await gw.send("/beta/v1/models")).status).to.equal(200);
      expect(seen).to.deep.equal([]);
    });

    it("answers the gateway's 500 when a page fails before answering", async () => {
      const response = await gw.send("/_local/broken", "GET", {});
      expect(response.status).to.equal(500);
      expect(response.body).to.equal(renderGatewayBody(gatewayResponse("DEFAULT_5XX"), { method: "GET", path: "/_local/broken" }));
    });
  });
});
