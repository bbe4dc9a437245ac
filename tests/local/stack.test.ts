import { expect } from "chai";
import { execFile } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import OpenAI from "openai";
import Stripe from "stripe";
import { GetCommand } from "@aws-sdk/lib-dynamodb";
import { keyItem } from "../../functions/shared/customer-schema";
import { createLedgerDocumentClient } from "../../functions/shared/ledger-store";
import { gatewayResponse, renderGatewayBody } from "../../infra/gateway-responses";
import { quotaPeriodStart, TokenBucket } from "../../scripts/local/gateway";
import { MoesifCollector } from "../../scripts/local/moesif-collector";
import { customersEnv } from "../../scripts/local/ledger-db";
import { LOCAL_STRIPE_WEBHOOK_SECRET, localKeyId, LocalStackError, startLocalStack, type LocalStack } from "../../scripts/local/stack";
import { LOCAL_STRIPE_API_KEY, StripeServer } from "../../scripts/local/stripe-server";
import { ledgerItems, tempProject, waitUntil } from "../helpers/local-project";
import { recordForScan, registerSecret } from "../helpers/secret-scan";
import { eventsFor, waitFor } from "./streaming-helpers";

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];

/** Asserts that `response` is the deployed API's gateway response `type` for this request, byte for byte. */
async function expectGatewayResponse(response: Response, type: string, request: { method: string; path: string }, errorType: string): Promise<void> {
  const spec = gatewayResponse(type);
  expect(response.status, type).to.equal(spec.statusCode);
  expect(await response.text()).to.equal(renderGatewayBody(spec, request));
  expect(response.headers.get("content-type")).to.equal("application/json");
  expect(response.headers.get("x-amzn-errortype")).to.equal(errorType);
  for (const [name, value] of Object.entries(spec.headers)) expect(response.headers.get(name), name).to.equal(value);
}

const STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    starter:
      rateLimit: 1
      burstLimit: 3
      quota: { limit: 5, period: DAY }
      models: [gpt-4o-mini]
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.5, output: 1.5 }
    pro:
      rateLimit: 1000
      burstLimit: 1000
  metered-ai-api:customers:
    acme: { plan: starter, stripeCustomerId: cus_acme }
    globex: { plan: pro, stripeCustomerId: cus_globex }
`;


describe("local stack (gateway emulator + handler + model server + collector)", () => {
  let project: ReturnType<typeof tempProject>;
  let stack: LocalStack;
  const logs: string[] = [];

  const start = () => startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env: {}, write: (l) => logs.push(l), keepRawPayloads: "all" });
  const post = (route: string, body: unknown, key?: string, headers: Record<string, string> = {}) =>
    fetch(`${stack.baseUrl}${route}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...(key ? { "x-api-key": key } : {}), ...headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  const chatPath = "/beta/v1/chat/completions";

  before(async () => {
    project = tempProject(STACK_YAML);
    stack = await start();
    registerSecret(...Object.values(stack.apiKeys));
  });
  after(async () => {
    recordForScan("local stack logs", logs);
    recordForScan("local stack collector", stack.collector?.rawPayloads ?? []);
    await stack?.stop();
    project.remove();
  });

  it("keeps one generated key per customer in .local/api-keys.json", () => {
    const saved = JSON.parse(fs.readFileSync(path.join(project.dataDir, "api-keys.json"), "utf8"));
    expect(saved).to.deep.equal(stack.apiKeys);
    expect(Object.keys(saved)).to.deep.equal(["acme", "globex"]);
    expect(saved.acme).to.match(/^[A-Za-z0-9]{40}$/);
  });

  it("serves the official OpenAI client unchanged (baseURL = …/beta/v1, x-api-key header)", async () => {
    const client = new OpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: "unused", defaultHeaders: { "x-api-key": stack.apiKeys.globex }, maxRetries: 0 });
    const completion = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hello from the SDK" }] });
    expect(completion.choices[0].message.content).to.equal("Hello! You said: Hello from the SDK");
    expect(completion.usage?.total_tokens).to.be.greaterThan(0);
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).to.include("gpt-4o");
  });

  it("surfaces function errors to the OpenAI client as typed API errors", async () => {
    const client = new OpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: "unused", defaultHeaders: { "x-api-key": stack.apiKeys.globex }, maxRetries: 0 });
    try {
      await client.chat.completions.create({ model: "gpt-4o", messages: [] });
      expect.fail("accepted empty messages");
    } catch (err) {
      expect(err).to.be.instanceOf(OpenAI.BadRequestError);
      expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).to.equal("messages");
    }
  });

  it("answers /ai-chat to raw HTTP, as curl would send it", async () => {
    const response = await post("/ai-chat", { model: "gpt-4o-mini", messages: [{ role: "user", content: "curl" }] }, stack.apiKeys.globex);
    expect(response.status).to.equal(200);
    expect(response.headers.get("content-type")).to.equal("application/json");
    expect(((await response.json()) as { object: string }).object).to.equal("chat.completion");
  });

  it("forwards mock directives to its built-in model server (FORWARD_MOCK_DIRECTIVES)", async () => {
    const response = await post("/v1/chat/completions", { model: "gpt-4o-mini", messages: [{ role: "user", content: "mock" }], mock: { latency_ms: 1 } }, stack.apiKeys.globex);
    expect(response.status).to.equal(200);
    const forwarded = JSON.parse(stack.upstream!.received[stack.upstream!.received.length - 1].body) as { mock?: unknown };
    expect(forwarded.mock).to.deep.equal({ latency_ms: 1 });
  });

  it("takes the key from Authorization: Bearer, as curl and the SDKs' apiKey send it", async () => {
    const body = { model: "gpt-4o-mini", messages: [{ role: "user", content: "bearer" }] };
    const response = await post("/v1/chat/completions", body, undefined, { authorization: `Bearer ${stack.apiKeys.globex}` });
    expect(response.status).to.equal(200);
    expect(((await response.json()) as { object: string }).object).to.equal("chat.completion");
  });

  it("prefers x-api-key over Authorization, as the authorizer does", async () => {
    const body = { model: "gpt-4o-mini", messages: [{ role: "user", content: "both" }] };
    const good = await post("/v1/chat/completions", body, stack.apiKeys.globex, { authorization: "Bearer placeholder-key-000000000000000" });
    expect(good.status).to.equal(200);
    const bad = await post("/v1/chat/completions", body, "not-a-real-key-0000000000000000000000000", { authorization: `Bearer ${stack.apiKeys.globex}` });
    await expectGatewayResponse(bad, "INVALID_API_KEY", { method: "POST", path: chatPath }, "ForbiddenException");
  });

  it("answers 403 in OpenAI's shape without a key (the authorizer denies) and with an unknown key", async () => {
    const body = { model: "gpt-4o", messages: [{ role: "user", content: "x" }] };
    await expectGatewayResponse(await post("/v1/chat/completions", body), "ACCESS_DENIED", { method: "POST", path: chatPath }, "AccessDeniedException");
    await expectGatewayResponse(await post("/v1/chat/completions", body, undefined, { authorization: "Bearer short" }), "ACCESS_DENIED", { method: "POST", path: chatPath }, "AccessDeniedException");
    const unknown = await post("/v1/chat/completions", body, "not-a-real-key-0000000000000000000000000");
    await expectGatewayResponse(unknown, "INVALID_API_KEY", { method: "POST", path: chatPath }, "ForbiddenException");
  });

  it("answers 413 for bodies over API Gateway's 10 MB limit, before the function runs", async () => {
    const eventsBefore = stack.store!.all().length;
    const response = await post("/v1/chat/completions", "x".repeat(10 * 1024 * 1024 + 1), stack.apiKeys.globex);
    await expectGatewayResponse(response, "REQUEST_TOO_LARGE", { method: "POST", path: chatPath }, "BadRequestException");
    expect(stack.store!.all().length).to.equal(eventsBefore);
  });

  it("answers 413 for bodies whose base64 event passes Lambda's 6 MB invoke limit, before the function runs", async () => {
    const eventsBefore = stack.store!.all().length;
    const response = await post("/v1/chat/completions", "x".repeat(5 * 1024 * 1024), stack.apiKeys.globex);
    await expectGatewayResponse(response, "REQUEST_TOO_LARGE", { method: "POST", path: chatPath }, "BadRequestException");
    expect(stack.store!.all().length).to.equal(eventsBefore);
  });

  it("answers unknown routes and methods in OpenAI's shape, naming the method and path as sent", async () => {
    await expectGatewayResponse(await post("/v1/images/generations", {}, stack.apiKeys.globex), "MISSING_AUTHENTICATION_TOKEN", { method: "POST", path: "/beta/v1/images/generations" }, "MissingAuthenticationTokenException");
    const wrongMethod = await fetch(`${stack.baseUrl}/v1/chat/completions?x=1`, { headers: { "x-api-key": stack.apiKeys.globex } });
    await expectGatewayResponse(wrongMethod, "MISSING_AUTHENTICATION_TOKEN", { method: "GET", path: chatPath }, "MissingAuthenticationTokenException");
    const noStage = await fetch(`${stack.baseUrl.replace(/\/beta$/, "")}/v1/models`);
    await expectGatewayResponse(noStage, "MISSING_AUTHENTICATION_TOKEN", { method: "GET", path: "/v1/models" }, "MissingAuthenticationTokenException");
  });

  it("throttles past the burst with 429 rate_limit_exceeded and Retry-After, then enforces the daily quota with 429 insufficient_quota", async () => {
    const body = { model: "gpt-4o-mini", messages: [{ role: "user", content: "burst" }] };
    const burst = await Promise.all([1, 2, 3, 4].map(() => post("/v1/chat/completions", body, stack.apiKeys.acme)));
    const statuses = burst.map((r) => r.status).sort();
    expect(statuses).to.deep.equal([200, 200, 200, 429]);
    const throttled = burst.find((r) => r.status === 429)!;
    await expectGatewayResponse(throttled, "THROTTLED", { method: "POST", path: chatPath }, "TooManyRequestsException");
    expect(throttled.headers.get("retry-after")).to.equal("1");

    // 3 of 5 used; refill (1 req/s) and use the remaining 2, then the quota is gone.
    for (let i = 0; i < 2; i++) {
      await new Promise((resolve) => setTimeout(resolve, 1050));
      expect((await post("/v1/chat/completions", body, stack.apiKeys.acme)).status).to.equal(200);
    }
    await new Promise((resolve) => setTimeout(resolve, 1050));
    const exhausted = await post("/v1/chat/completions", body, stack.apiKeys.acme);
    await expectGatewayResponse(exhausted, "QUOTA_EXCEEDED", { method: "POST", path: chatPath }, "LimitExceededException");
    expect(exhausted.headers.get("x-should-retry")).to.equal("false");
  });

  it("keeps quota counters across a restart", async () => {
    await stack.stop();
    stack = await start();
    const response = await post("/v1/chat/completions", { model: "gpt-4o-mini", messages: [{ role: "user", content: "again" }] }, stack.apiKeys.acme);
    await expectGatewayResponse(response, "QUOTA_EXCEEDED", { method: "POST", path: chatPath }, "LimitExceededException");
  });

  it("stores exactly one event per request with the customer and token counts, and npm run usage agrees", async () => {
    const fresh = tempProject(STACK_YAML);
    const own = await startLocalStack({ stack: "test", projectDir: fresh.dir, dataDir: fresh.dataDir, port: 0, env: {}, write: () => undefined });
    try {
      const sums: Record<string, { prompt: number; completion: number; requests: number }> = {};
      const requests = [
        ["globex", "gpt-4o", "one"],
        ["globex", "gpt-4o", "two two"],
        ["globex", "gpt-4o-mini", "three three three"],
        ["acme", "gpt-4o-mini", "four"],
      ];
      for (const [customer, model, text] of requests) {
        const response = await fetch(`${own.baseUrl}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", "x-api-key": own.apiKeys[customer] },
          body: JSON.stringify({ model, messages: [{ role: "user", content: text }] }),
        });
        const json = (await response.json()) as { usage: { prompt_tokens: number; completion_tokens: number } };
        const key = `${customer}/${model}`;
        sums[key] ??= { prompt: 0, completion: 0, requests: 0 };
        sums[key].prompt += json.usage.prompt_tokens;
        sums[key].completion += json.usage.completion_tokens;
        sums[key].requests += 1;
      }
      // The function meters once its answer is out: wait for the last event rather than race it.
      await waitFor("every metering event", () => (own.store!.all().length >= requests.length ? true : undefined));
      const events = own.store!.all();
      expect(events).to.have.length(requests.length);
      expect(new Set(events.map((e) => e.transaction_id)).size).to.equal(requests.length);
      expect(events.map((e) => e.user_id)).to.deep.equal(["globex", "globex", "globex", "acme"]);
      expect(events[3].company_id).to.equal("cus_acme");

      const { stdout } = await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/usage.ts"), "--json", "--stack", "test", "--project-dir", fresh.dir], { cwd: ROOT });
      const report = JSON.parse(stdout) as Array<{ customer: string; model: string; requests: number; prompt_tokens: number; completion_tokens: number; total_tokens: number; cost: number | null }>;
      const fromReport = Object.fromEntries(report.map((r) => [`${r.customer}/${r.model}`, { prompt: r.prompt_tokens, completion: r.completion_tokens, requests: r.requests }]));
      expect(fromReport).to.deep.equal(sums);
      const acme = report.find((r) => r.customer === "acme")!;
      expect(acme.cost).to.be.closeTo((sums["acme/gpt-4o-mini"].prompt / 1_000_000) * 0.5 + (sums["acme/gpt-4o-mini"].completion / 1_000_000) * 1.5, 1e-6);
      expect(report.find((r) => r.customer === "globex")!.cost).to.equal(null);
    } finally {
      await own.stop();
      fresh.remove();
    }
  });

  it("writes each request to the usage ledger, and its forwarder delivers it to the collector and the Stripe endpoint", async () => {
    const response = await post("/v1/chat/completions", { model: "gpt-4o", messages: [{ role: "user", content: "ledger" }] }, stack.apiKeys.globex);
    expect(response.status).to.equal(200);
    const requestId = response.headers.get("x-amzn-requestid")!;
    const mine = await waitUntil("the request's ledger item", async () => (await ledgerItems(stack)).find((i) => i.request_id === requestId));
    // globex's plan has no prices: Moesif gets it (analytics), Stripe owes nothing.
    expect(mine.moesif_state).to.be.oneOf(["pending", "delivered"]);
    expect(mine.stripe_state).to.equal(undefined);
    await stack.drain();
    expect(eventsFor(stack, requestId)).to.have.length(1);

    // acme's billed requests (above) went to the Stripe endpoint too: its total is their cost.
    const acme = (await ledgerItems(stack)).filter((i) => i.customer_id === "acme" && i.billed);
    expect(acme.length).to.be.greaterThan(0);
    expect(acme.every((i) => i.moesif_state === "delivered" && i.stripe_state === "delivered" && i.undelivered === undefined)).to.equal(true);
    expect(stack.stripe!.totals()).to.deep.equal({ cus_acme: acme.reduce((n, i) => n + i.cost_micros!, 0) });
  });

  it("never writes a caller's key to the function log or the metering store", () => {
    const everything = [...logs, ...stack.store!.all().map((e) => JSON.stringify(e))].join("\n");
    for (const key of Object.values(stack.apiKeys)) expect(everything).to.not.include(key);
  });
});

describe("local stack sinks from the environment", () => {
  const body = { model: "gpt-4o-mini", messages: [{ role: "user", content: "elsewhere" }] };
  const send = (stack: LocalStack) =>
    fetch(`${stack.baseUrl}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json", "x-api-key": stack.apiKeys.acme }, body: JSON.stringify(body) });

  async function withStack(env: NodeJS.ProcessEnv, test: (stack: LocalStack) => Promise<void>): Promise<void> {
    const project = tempProject(STACK_YAML);
    const logs: string[] = [];
    const stack = await startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env: { FORWARDER_INTERVAL_MS: "50", ...env }, write: (l) => logs.push(l) });
    try {
      await test(stack);
    } finally {
      recordForScan("local stack sinks logs", logs);
      await stack.stop();
      project.remove();
    }
  }

  it("sends meter events to STRIPE_API_BASE with STRIPE_API_KEY instead of the built-in endpoint", async () => {
    const key = "sk_test_elsewhere_000000000001";
    registerSecret(key);
    const elsewhere = await new StripeServer({ apiKey: key }).start();
    try {
      await withStack({ STRIPE_API_BASE: elsewhere.url, STRIPE_API_KEY: key }, async (stack) => {
        expect(stack.stripe).to.equal(undefined);
        expect(stack.stripeApiBase).to.equal(elsewhere.url);
        expect((await send(stack)).status).to.equal(200);
        await waitUntil("the ledger item", async () => ((await ledgerItems(stack)).length > 0 ? true : undefined));
        await stack.drain();
        const [item] = await ledgerItems(stack);
        expect(elsewhere.totals()).to.deep.equal({ cus_acme: item.cost_micros });
        expect(fs.existsSync(path.join(stack.dataDir, "stripe.db"))).to.equal(false);
      });
    } finally {
      await elsewhere.stop();
    }
  });

  it("sends Moesif events to MOESIF_BASE_URI with MOESIF_APPLICATION_ID instead of the built-in collector", async () => {
    const appId = "moesif-app-id-elsewhere-0001";
    registerSecret(appId);
    const elsewhere = await new MoesifCollector({ applicationId: appId }).start();
    try {
      await withStack({ MOESIF_BASE_URI: elsewhere.url, MOESIF_APPLICATION_ID: appId }, async (stack) => {
        expect(stack.collector).to.equal(undefined);
        expect((await send(stack)).status).to.equal(200);
        await waitUntil("the ledger item", async () => ((await ledgerItems(stack)).length > 0 ? true : undefined));
        await stack.drain();
        const [item] = await ledgerItems(stack);
        expect(elsewhere.events().map((e) => e.transaction_id)).to.deep.equal([item.transaction_id]);
        // The request path wrote the ledger; it did not send to Moesif itself (one batch, from the forwarder).
        expect(elsewhere.requests.map((r) => r.url)).to.deep.equal(["/v1/events/batch"]);
      });
    } finally {
      await elsewhere.stop();
    }
  });

  it("bills through Moesif alone with STRIPE_BILLING=moesif: no Stripe endpoint, no Stripe state on items", async () => {
    await withStack({ STRIPE_BILLING: "moesif" }, async (stack) => {
      expect(stack.stripe).to.equal(undefined);
      expect(stack.stripeBilling).to.equal("moesif");
      expect((await send(stack)).status).to.equal(200);
      const [item] = await waitUntil("the ledger item", async () => {
        const items = await ledgerItems(stack);
        return items.length > 0 ? items : undefined;
      });
      expect(item.billed && item.cost_micros! > 0).to.equal(true);
      expect(item.stripe_state).to.equal(undefined);
    });
  });

  for (const [env, message] of [
    [{ STRIPE_API_BASE: "http://127.0.0.1:12111" }, "STRIPE_API_BASE is set but STRIPE_API_KEY is not: give the key of that Stripe-compatible server"],
    [{ STRIPE_BILLING: "both" }, 'STRIPE_BILLING must be "meters" or "moesif", got "both"'],
    [{ FORWARDER_INTERVAL_MS: "soon" }, 'FORWARDER_INTERVAL_MS must be an integer of at least 10, got "soon"'],
  ] as const) {
    it(`refuses ${Object.entries(env).map(([k, v]) => `${k}=${v}`).join(" ")} with a message saying what to fix`, async () => {
      const project = tempProject(STACK_YAML);
      try {
        const failure = await startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env, write: () => undefined }).then(
          async (stack) => stack.stop(),
          (err: unknown) => err,
        );
        expect(failure).to.be.instanceOf(LocalStackError);
        expect((failure as Error).message).to.equal(message);
      } finally {
        project.remove();
      }
    });
  }
});

describe("npm start with bad input", () => {
  const startCli = async (yaml: string | null, extraEnv: Record<string, string> = {}) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "metered-cli-"));
    if (yaml !== null) fs.writeFileSync(path.join(dir, "Pulumi.test.yaml"), yaml);
    try {
      await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/start.ts"), "--stack", "test", "--project-dir", dir], {
        cwd: ROOT,
        env: { ...process.env, PORT: "0", ...extraEnv },
        timeout: 20_000,
      });
      return { code: 0, stderr: "" };
    } catch (err) {
      const failure = err as { code: number; stderr: string };
      return { code: failure.code, stderr: failure.stderr };
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  };

  const expectOneLine = (result: { code: number; stderr: string }, pattern: RegExp) => {
    expect(result.code).to.equal(1);
    const lines = result.stderr.trim().split("\n");
    expect(lines, result.stderr).to.have.length(1);
    expect(lines[0]).to.match(pattern);
    expect(result.stderr).to.not.match(/\n\s+at /);
  };

  it("names a customer on an unknown plan", async () => {
    expectOneLine(await startCli(STACK_YAML.replace("acme: { plan: starter", "acme: { plan: gold")), /customers\.acme\.plan.*unknown plan "gold"/);
  });

  it("names a bad quota period", async () => {
    expectOneLine(await startCli(STACK_YAML.replace("period: DAY", "period: YEAR")), /plans\.starter\.quota\.period/);
  });

  it("says when the stack file cannot be read", async () => {
    expectOneLine(await startCli(null), /cannot read the stack config .*Pulumi\.test\.yaml: ENOENT/);
  });

  it("says when another npm start serves the same data dir", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "metered-cli-"));
    fs.writeFileSync(path.join(dir, "Pulumi.test.yaml"), STACK_YAML);
    const running = await startLocalStack({ stack: "test", projectDir: dir, port: 0, env: {}, write: () => undefined });
    try {
      const result = await run(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/start.ts"), "--stack", "test", "--project-dir", dir], { cwd: ROOT, env: { ...process.env, PORT: "0" } }).then(
        () => ({ code: 0, stderr: "" }),
        (err: { code: number; stderr: string }) => ({ code: err.code, stderr: err.stderr }),
      );
      expectOneLine(result, new RegExp(`the ledger in .*ledger is already served by process ${process.pid} \\(http://127\\.0\\.0\\.1:\\d+\\): stop that npm start`));
    } finally {
      await running.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("says when the port is in use", async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", () => resolve()));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      expectOneLine(await startCli(STACK_YAML, { PORT: String(port) }), new RegExp(`port ${port} is in use`));
    } finally {
      blocker.close();
    }
  });
});

describe("npm start lifecycle", () => {
  it("prints the banner, serves, and exits 0 on SIGTERM", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "metered-cli-"));
    fs.writeFileSync(path.join(dir, "Pulumi.test.yaml"), STACK_YAML);
    const { spawn } = await import("node:child_process");
    const child = spawn(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/start.ts"), "--stack", "test", "--project-dir", dir], {
      cwd: ROOT,
      env: { ...process.env, PORT: "0", LOG_LEVEL: "warn" },
    });
    let errors = "";
    child.stderr.on("data", (chunk: Buffer) => (errors += chunk.toString()));
    try {
      let output = "";
      const url = await new Promise<string>((resolve, reject) => {
        child.stdout.on("data", (chunk: Buffer) => {
          output += chunk.toString();
          const match = /API \(stage beta\)\s+(\S+)/.exec(output);
          if (match && output.includes("Ctrl-C stops")) resolve(match[1]);
        });
        child.once("exit", (code) => reject(new Error(`exited early with ${code}: ${output}`)));
      });
      const keys = JSON.parse(fs.readFileSync(path.join(dir, ".local/api-keys.json"), "utf8")) as Record<string, string>;
      expect(output).to.include(`curl -s ${url}/v1/chat/completions -H 'Authorization: Bearer ${keys.acme}'`);
      const lock = JSON.parse(fs.readFileSync(path.join(dir, ".local/ledger.json"), "utf8")) as { endpoint: string; pid: number };
      expect(lock.pid).to.equal(child.pid);
      expect(output).to.match(new RegExp(`usage ledger +${lock.endpoint.replace(/\./g, "\\.")} \\(dynalite, table usage-ledger, .*ledger; npm run usage\\)`));
      expect(output).to.match(/forwarder +every 1000 ms, ledger -> Moesif \+ Stripe meter events/);
      expect(output).to.match(/Moesif sink +http:\/\/127\.0\.0\.1:\d+ \(built-in Moesif collector -> .*usage\.db\)/);
      expect(output).to.match(/Stripe sink +http:\/\/127\.0\.0\.1:\d+ \(built-in Stripe meter event endpoint -> .*stripe\.db, test key sk_test_…\)/);
      expect(output).to.include("npm run reconcile");
      expect(output).to.match(new RegExp(`Stripe webhook +POST ${url.replace(/\./g, "\\.")}/stripe/webhook `));
      expect(output).to.match(/signing secret +whsec_local_metered_ai_api \(the local default/);
      expect(output).to.include(`GET  ${url}/v1/usage`);
      expect(output).to.match(/prepaid balances +none \(no customer is on a prepaid plan\)/);
      expect(output).to.include("top up            STACK=test npm run credits -- add <customer> <amount>");
      expect(output).to.not.include(LOCAL_STRIPE_API_KEY);
      expect(output).to.include(`new OpenAI({ baseURL: "${url}/v1", apiKey: "${keys.acme}" })`);
      const response = await fetch(`${url}/v1/models`, { headers: { authorization: `Bearer ${keys.globex}` } });
      expect(response.status).to.equal(200);
      expect(output).to.include(`POST ${url}/v1/responses`);
      expect(output).to.include(`POST ${url}/v1/embeddings`);
      // The dashboard's link, served by the same process with no key; its JSON names the customers, never a key.
      const dashboard = /dashboard +(http:\/\/127\.0\.0\.1:\d+\/_dashboard\/) /.exec(output);
      expect(dashboard, output).to.not.equal(null);
      const page = await fetch(dashboard![1]);
      expect(page.status).to.equal(200);
      expect(page.headers.get("content-type")).to.match(/^text\/html/);
      const summary = await fetch(new URL("api/summary?bucket=day", dashboard![1]));
      expect(summary.status).to.equal(200);
      const summaryText = await summary.text();
      for (const key of Object.values(keys)) expect(summaryText).to.not.include(key);
      const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
      child.kill("SIGTERM");
      expect(await exited, errors).to.equal(0);
      expect(fs.existsSync(path.join(dir, ".local/ledger.json")), "ledger.json removed on a clean stop").to.equal(false);
    } finally {
      child.kill("SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** A stack file with a prepaid customer, for the customers table and the Stripe webhook. */
const CREDITS_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    credits:
      rateLimit: 1000
      burstLimit: 1000
      billing: prepaid
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    pro:
      rateLimit: 1000
      burstLimit: 1000
  metered-ai-api:customers:
    initech: { plan: credits, stripeCustomerId: cus_initech }
    globex: { plan: pro, stripeCustomerId: cus_globex }
`;

describe("local stack customers table", function () {
  this.timeout(60_000);
  let project: ReturnType<typeof tempProject>;
  const logs: string[] = [];
  const start = (env: NodeJS.ProcessEnv = {}) => startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env, write: (l) => logs.push(l) });
  /** The raw item under `pk` in the stack's customers table. */
  async function item(stack: LocalStack, pk: string): Promise<Record<string, unknown> | undefined> {
    const doc = createLedgerDocumentClient(customersEnv(stack.ledger.endpoint, stack.customers.table));
    try {
      return (await doc.send(new GetCommand({ TableName: stack.customers.table, Key: { pk } }))).Item;
    } finally {
      doc.destroy();
    }
  }
  beforeEach(() => (project = tempProject(CREDITS_YAML)));
  afterEach(() => project.remove());
  after(() => recordForScan("local stack customers logs", logs));

  it("writes each customer's key item at start and deletes those of customers gone from the stack file, keeping their balances", async () => {
    let stack = await start();
    try {
      registerSecret(...Object.values(stack.apiKeys));
      expect(stack.customers.keys).to.deep.equal({ written: 2, removed: [], unindexed: [] });
      expect(await item(stack, `key#${localKeyId("initech")}`)).to.deep.equal(keyItem(localKeyId("initech"), "initech", { plan: "credits", stripeCustomerId: "cus_initech" }));
      expect(await item(stack, `key#${localKeyId("globex")}`)).to.deep.equal(keyItem(localKeyId("globex"), "globex", { plan: "pro", stripeCustomerId: "cus_globex" }));
      await stack.customers.store.credit({ customerId: "initech", currency: "usd", creditId: "test:1", micros: 7_000_000, source: "cli", now: Date.now() });
    } finally {
      await stack.stop();
    }

    // initech leaves the stack file; globex is suspended.
    fs.writeFileSync(path.join(project.dir, "Pulumi.test.yaml"), CREDITS_YAML.replace("    initech: { plan: credits, stripeCustomerId: cus_initech }\n", "").replace("globex: { plan: pro, stripeCustomerId: cus_globex }", "globex: { plan: pro, stripeCustomerId: cus_globex, status: suspended }"));
    stack = await start();
    try {
      expect(stack.customers.keys).to.deep.equal({ written: 1, removed: ["initech"], unindexed: [] });
      expect(await item(stack, `key#${localKeyId("initech")}`)).to.equal(undefined);
      expect(await item(stack, `key#${localKeyId("globex")}`)).to.include({ status: "suspended" });
      expect(await stack.customers.store.getBalance("initech")).to.include({ balanceMicros: 7_000_000 });
      expect(await stack.customers.store.findByStripeCustomer("cus_initech")).to.equal(undefined);
    } finally {
      await stack.stop();
    }
  });

  it("serves POST /stripe/webhook without an API key: Stripe's signature decides, and a signed payment credits once", async () => {
    const stack = await start();
    try {
      registerSecret(...Object.values(stack.apiKeys));
      expect(stack.stripeWebhook).to.deep.equal({ url: `${stack.baseUrl}/stripe/webhook`, secret: LOCAL_STRIPE_WEBHOOK_SECRET });
      const payload = JSON.stringify({
        id: "evt_local_1",
        object: "event",
        type: "checkout.session.completed",
        data: { object: { id: "cs_test_local_1", object: "checkout.session", mode: "payment", payment_status: "paid", customer: "cus_initech", amount_total: 500, currency: "usd", metadata: { purpose: "credits" } } },
      });
      const post = (headers: Record<string, string>) => fetch(stack.stripeWebhook.url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: payload });

      // No key and no signature: the function answers (its 400), not the gateway's 403.
      const unsigned = await post({});
      expect(unsigned.status).to.equal(400);
      expect(unsigned.headers.get("x-amzn-errortype")).to.equal(null);
      expect(((await unsigned.json()) as { error: { code: string } }).error.code).to.equal("invalid_signature");
      const forged = await post({ "stripe-signature": Stripe.webhooks.generateTestHeaderString({ payload, secret: "whsec_someone_else" }) });
      expect(forged.status).to.equal(400);
      expect(await stack.customers.store.getBalance("initech")).to.include({ balanceMicros: 0 });

      const signature = Stripe.webhooks.generateTestHeaderString({ payload, secret: stack.stripeWebhook.secret });
      const first = await post({ "stripe-signature": signature });
      expect(first.status).to.equal(200);
      expect(await first.json()).to.include({ received: true, credited: true });
      const replay = await post({ "stripe-signature": signature });
      expect(replay.status).to.equal(200);
      expect(await replay.json()).to.include({ credited: false });
      expect(await stack.customers.store.getBalance("initech")).to.include({ balanceMicros: 5_000_000, currency: "usd" });

      // GET /v1/usage is a keyed route: the gateway's 403 without a key, the caller's own standing with one.
      const anonymous = await fetch(`${stack.baseUrl}/v1/usage`);
      await expectGatewayResponse(anonymous, "ACCESS_DENIED", { method: "GET", path: "/beta/v1/usage" }, "AccessDeniedException");
      const usage = await fetch(`${stack.baseUrl}/v1/usage`, { headers: { authorization: `Bearer ${stack.apiKeys.initech}` } });
      expect(usage.status).to.equal(200);
      expect(await usage.json()).to.include({ customer: "initech", plan: "credits", billing: "prepaid", balance_micros: 5_000_000 });
    } finally {
      await stack.stop();
    }
  });

  it("verifies the webhook with STRIPE_WEBHOOK_SECRET when set (the secret stripe listen prints)", async () => {
    const secret = "whsec_test_from_stripe_listen_0001";
    registerSecret(secret);
    const stack = await start({ STRIPE_WEBHOOK_SECRET: secret });
    try {
      expect(stack.stripeWebhook.secret).to.equal(secret);
      const payload = JSON.stringify({ id: "evt_2", object: "event", type: "customer.created", data: { object: { id: "cus_new", object: "customer" } } });
      const send = (key: string) => fetch(stack.stripeWebhook.url, { method: "POST", headers: { "stripe-signature": Stripe.webhooks.generateTestHeaderString({ payload, secret: key }) }, body: payload });
      expect((await send(LOCAL_STRIPE_WEBHOOK_SECRET)).status).to.equal(400);
      const ignored = await send(secret);
      expect(ignored.status).to.equal(200);
      expect(await ignored.json()).to.include({ credited: false });
    } finally {
      await stack.stop();
    }
  });
});

describe("gateway emulator pieces", () => {
  it("refills a token bucket at its rate up to its burst", () => {
    const bucket = new TokenBucket(2, 3, 0);
    expect([bucket.take(0), bucket.take(0), bucket.take(0), bucket.take(0)]).to.deep.equal([true, true, true, false]);
    expect(bucket.take(499)).to.equal(false);
    expect(bucket.take(500)).to.equal(true);
    expect(bucket.take(10_000)).to.equal(true);
  });

  it("starts quota periods where API Gateway does", () => {
    const wednesday = Date.UTC(2026, 10, 25, 15); // 2026-11-25 is a Wednesday
    expect(quotaPeriodStart("DAY", 0, wednesday)).to.equal("2026-11-25");
    expect(quotaPeriodStart("WEEK", 0, wednesday)).to.equal("2026-11-22");
    expect(quotaPeriodStart("MONTH", 0, wednesday)).to.equal("2026-11-01");
    expect(quotaPeriodStart("MONTH", 27, wednesday)).to.equal("2026-10-28");
  });
});
