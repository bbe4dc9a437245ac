import { expect } from "chai";
import { createDeps, createHandler } from "../../functions/ai-chat/index";
import { invokeStreaming } from "../helpers/invoke-streaming";
import { MoesifCollector, type StoredEvent } from "../../scripts/local/moesif-collector";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { CUSTOMERS, PLANS, UPSTREAM_KEY } from "../helpers/fakes";
import { recordForScan, registerSecret } from "../helpers/secret-scan";

const APP_ID = "moesif-app-id-for-wire-tests";
const CREDENTIALS = {
  "X-Auth": "x-auth-credential-value-0001",
  "X-OpenAI-Key": "sk-openai-credential-value-0002",
  Authentication: "authentication-credential-0003",
  "X-Access-Key": "x-access-key-credential-0004",
};
registerSecret(APP_ID, ...Object.values(CREDENTIALS));

/** What a Moesif meter on the README's fields sums for one event. */
function meteredFields(event: StoredEvent) {
  const metadata = event.metadata as Record<string, unknown>;
  const usage = (event.response as { body?: { usage?: Record<string, unknown> } }).body?.usage;
  return { metadata, usage };
}

describe("What Moesif receives from the handler (loopback upstream + collector)", () => {
  let upstream: UpstreamServer;
  let collector: MoesifCollector;
  let logs: string[];

  const invoke = async (options: Parameters<typeof createApiGatewayEvent>[0] = {}, env: Record<string, string> = {}) => {
    const handler = createHandler(() =>
      createDeps(
        {
          UPSTREAM_BASE_URL: upstream.url,
          UPSTREAM_API_KEY: UPSTREAM_KEY,
          CUSTOMERS: JSON.stringify(CUSTOMERS),
          PLANS: JSON.stringify(PLANS),
          MOESIF_APPLICATION_ID: APP_ID,
          MOESIF_BASE_URI: collector.url,
          ...env,
        },
        { write: (line) => logs.push(line) },
      ),
    );
    const result = await invokeStreaming(handler, createApiGatewayEvent({ body: chatBody(), ...options }), createContext());
    recordForScan("wire test response", [result.body]);
    return result;
  };

  /** The upstream answers a completion with `usage` exactly as given (or none), with `status`. */
  const answerWith = (usage: unknown, status = 200) => {
    upstream.override = (_req, res) => {
      const body = {
        id: "chatcmpl-raw",
        object: "chat.completion",
        model: "gpt-4o-mini",
        choices: [{ index: 0, message: { role: "assistant", content: "Hello there, friend." }, finish_reason: "stop" }],
        ...(usage === undefined ? {} : { usage }),
      };
      res.writeHead(status, { "Content-Type": "application/json" });
      res.end(JSON.stringify(body));
    };
  };

  beforeEach(async () => {
    logs = [];
    upstream = await new UpstreamServer({ apiKey: UPSTREAM_KEY }).start();
    collector = await new MoesifCollector({ applicationId: APP_ID, keepRawPayloads: "all" }).start();
  });
  afterEach(async () => {
    recordForScan("wire test logs", logs);
    recordForScan("wire test collector", collector.rawPayloads);
    await upstream.stop();
    await collector.stop();
  });

  const rawUsages: Array<[string, unknown]> = [
    ["omits usage", undefined],
    ["reports negative numbers", { prompt_tokens: -40, completion_tokens: -2, total_tokens: -42 }],
    ["reports strings", { prompt_tokens: "40", completion_tokens: "2", total_tokens: "42" }],
    ["reports total_tokens 0 with non-zero parts", { prompt_tokens: 40, completion_tokens: 2, total_tokens: 0 }],
  ];
  for (const [name, raw] of rawUsages) {
    for (const logBodies of ["false", "true"]) {
      it(`meters positive, consistent counts when the upstream ${name} (MOESIF_LOG_BODIES=${logBodies})`, async () => {
        answerWith(raw);

        const result = await invoke({}, { MOESIF_LOG_BODIES: logBodies });

        expect(result.statusCode).to.equal(200);
        const [event] = collector.events();
        const { metadata, usage } = meteredFields(event);
        const prompt = metadata.prompt_tokens as number;
        const completion = metadata.completion_tokens as number;
        expect(prompt).to.be.greaterThan(0);
        expect(completion).to.be.greaterThan(0);
        expect(metadata.total_tokens).to.equal(prompt + completion);
        expect(metadata.billed).to.equal(true);
        expect(usage).to.deep.include({ prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion });
      });
    }
  }

  for (const status of [201, 203]) {
    it(`bills a ${status} answer like a 200 (metadata.billed)`, async () => {
      answerWith({ prompt_tokens: 40, completion_tokens: 2, total_tokens: 42 }, status);

      const result = await invoke();

      expect(result.statusCode).to.equal(status);
      const { metadata } = meteredFields(collector.events()[0]);
      expect(metadata).to.include({ billed: true, total_tokens: 42 });
    });
  }

  it("marks error answers as not billed, with zero tokens", async () => {
    upstream.override = (_req, res) => {
      res.writeHead(503, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ error: { message: "overloaded", type: "server_error", param: null, code: null } }));
    };
    const result = await invoke();
    expect(result.statusCode).to.equal(502);
    expect(meteredFields(collector.events()[0]).metadata).to.include({ billed: false, total_tokens: 0 });
  });

  it("never sends credential headers, whatever they are called", async () => {
    await invoke({ headers: { ...CREDENTIALS, "User-Agent": "OpenAI/JS 6.49.0", "X-Stainless-Lang": "js" } });

    const payloads = collector.rawPayloads.join("\n");
    for (const value of Object.values(CREDENTIALS)) expect(payloads).to.not.include(value);
    const headers = (collector.events()[0].request as { headers: Record<string, string> }).headers;
    expect(Object.keys(headers).map((h) => h.toLowerCase())).to.include.members(["content-type", "user-agent", "x-stainless-lang"]);
  });
});
