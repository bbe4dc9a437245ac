import { expect } from "chai";
import fs from "node:fs";
import path from "node:path";
import { rawRequest, useLocalStack } from "../helpers/local-project";
import { recordForScan } from "../helpers/secret-scan";
import { waitFor } from "../local/streaming-helpers";

interface CorpusEntry {
  name: string;
  body?: string;
  bodyBase64?: string;
  generate?: { kind: string; count?: number; bytes?: number; depth?: number };
  headers?: Record<string, string | string[] | null>;
  customer?: string;
  expect?: number;
}

const corpus = JSON.parse(fs.readFileSync(path.join(__dirname, "../data/bad-requests.json"), "utf8")) as CorpusEntry[];

function bodyOf(entry: CorpusEntry): Buffer {
  if (entry.bodyBase64 !== undefined) return Buffer.from(entry.bodyBase64, "base64");
  if (entry.body !== undefined) return Buffer.from(entry.body, "utf8");
  const g = entry.generate!;
  const prefix = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":';
  switch (g.kind) {
    case "messages":
      return Buffer.from(JSON.stringify({ model: "gpt-4o-mini", messages: Array.from({ length: g.count! }, (_, i) => ({ role: "user", content: `message ${i}` })) }));
    case "content":
      return Buffer.from(JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "x".repeat(g.bytes!) }] }));
    case "padding":
      return Buffer.from(" ".repeat(g.bytes!) + '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}');
    case "nested-arrays":
      return Buffer.from("[".repeat(g.depth!) + "]".repeat(g.depth!));
    case "nested-objects":
      return Buffer.from('{"a":'.repeat(g.depth!) + "1" + "}".repeat(g.depth!));
    case "nested-content":
      return Buffer.from(prefix + "[".repeat(g.depth!) + "1" + "]".repeat(g.depth!) + "}]}");
    case "nested-model":
      return Buffer.from('{"messages":[{"role":"user","content":"x"}],"model":' + '{"m":'.repeat(g.depth!) + '"x"' + "}".repeat(g.depth!) + "}");
    default:
      throw new Error(`unknown generator ${g.kind}`);
  }
}

/** Property names of every plain object, and the ones that change an object when assigned. */
const HOSTILE_NAMES = ["__proto__", "constructor", "prototype", "toString", "valueOf", "hasOwnProperty", "isPrototypeOf", "propertyIsEnumerable", "toLocaleString", "__defineGetter__", "__lookupGetter__"];

describe("bad input corpus (tests/data/bad-requests.json) through the local stack", () => {
  const local = useLocalStack("bad-input");

  it("holds at least 100 requests", () => {
    expect(corpus.length).to.be.at.least(100);
  });

  it("answers every one with a 4xx in the OpenAI error shape, never calls the upstream, and bills nothing", async () => {
    const failures: string[] = [];
    const sent: Array<[string, unknown]> = [];
    for (const entry of corpus) {
      const headers: Record<string, string | string[]> = { "x-api-key": local.stack.apiKeys[entry.customer ?? "pro"], "content-type": "application/json" };
      for (const [name, value] of Object.entries(entry.headers ?? {})) {
        if (value === null) delete headers[name];
        else headers[name] = value;
      }
      const route = entry.name.startsWith("/ai-chat") ? "/ai-chat" : "/v1/chat/completions";
      const response = await rawRequest(`${local.stack.baseUrl}${route}`, { headers, body: bodyOf(entry) });
      recordForScan(`bad-input response ${entry.name}`, [response.body]);
      sent.push([entry.name, response.headers["x-amzn-requestid"]]);
      let error: Record<string, unknown> | undefined;
      try {
        error = (JSON.parse(response.body) as { error?: Record<string, unknown> }).error;
      } catch {
        error = undefined;
      }
      const shaped = !!error && ["message", "type", "param", "code"].every((k) => k in error!) && typeof error.message === "string";
      if (response.status < 400 || response.status >= 500 || !shaped || (entry.expect && response.status !== entry.expect)) {
        failures.push(`${entry.name}: ${response.status} ${response.body.slice(0, 160)}`);
      }
    }
    expect(failures, failures.join("\n")).to.deep.equal([]);
    expect(local.stack.upstream!.received.map((r) => r.body.slice(0, 200))).to.deep.equal([]);

    // The function meters after the answer went out (a streamed answer ends first): wait for the last events.
    await waitFor("every metering event", () => (local.stack.store!.all().length >= corpus.length ? true : undefined), 5000).catch(() => undefined);
    const events = local.stack.store!.all();
    const metered = new Set(events.map((e) => e.metadata?.request_id));
    expect(sent.filter(([, id]) => !metered.has(id)).map(([name]) => name), "requests without a metering event").to.deep.equal([]);
    expect(events).to.have.length(corpus.length);
    for (const event of events) {
      expect(event.metadata).to.include({ prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
      expect((event.response as { status: number }).status).to.be.within(400, 499);
    }
  });

  it("hands invalid UTF-8 inside a JSON string to the function byte for byte, which answers 400 (not valid UTF-8)", async () => {
    const body = Buffer.concat([Buffer.from('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'), Buffer.from([0xc3, 0x28]), Buffer.from('"}]}')]);
    const response = await rawRequest(`${local.stack.baseUrl}/v1/chat/completions`, { headers: { "x-api-key": local.stack.apiKeys.pro, "content-type": "application/json" }, body });
    expect(response.status, response.body).to.equal(400);
    expect((JSON.parse(response.body) as { error: { message: string } }).error.message).to.match(/not valid UTF-8/);
  });

  it("answers a valid request carrying hostile header and query names as usual (200, never a 500)", async () => {
    const failures: string[] = [];
    const body = Buffer.from(JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hostile" }] }));
    for (const name of HOSTILE_NAMES) {
      const asHeader = await rawRequest(`${local.stack.baseUrl}/v1/chat/completions`, {
        headers: { "x-api-key": local.stack.apiKeys.pro, "content-type": "application/json", [name]: "1", [name.toUpperCase()]: "2" },
        body,
      });
      const asQuery = await rawRequest(`${local.stack.baseUrl}/v1/chat/completions?${name}=1&${name}=2&${name}[x]=3`, {
        headers: { "x-api-key": local.stack.apiKeys.pro, "content-type": "application/json" },
        body,
      });
      for (const [how, response] of [["header", asHeader], ["query", asQuery]] as const) {
        if (response.status !== 200) failures.push(`${how} ${name}: ${response.status} ${response.body.slice(0, 160)}`);
      }
    }
    expect(failures, failures.join("\n")).to.deep.equal([]);
  });

  it("denies a hostile request without a key in OpenAI's shape", async () => {
    const response = await rawRequest(`${local.stack.baseUrl}/v1/chat/completions?__proto__=1&constructor=2`, {
      headers: { "content-type": "application/json", ["__proto__"]: "1", constructor: "2", toString: "3" },
      body: Buffer.from("{}"),
    });
    expect(response.status).to.equal(403);
    expect((JSON.parse(response.body) as { error: { code: string } }).error.code).to.equal("invalid_api_key");
  });
});
