import { expect } from "chai";
import http from "node:http";
import { once } from "node:events";
import type { APIGatewayProxyEvent, Context } from "aws-lambda";
import { httpResponseStream, streamifyResponse, type LambdaResponseStream } from "../../functions/ai-chat/lambda-stream";
import { gatewayResponse, renderGatewayBody } from "../../infra/gateway-responses";
import { GatewayEmulator, type GatewayOptions, type StreamingLambdaHandler } from "../../scripts/local/gateway";

const KEY = "s".repeat(40);

type Body = (event: APIGatewayProxyEvent, stream: LambdaResponseStream, context: Context) => Promise<void>;

/** An emulator whose one route runs `setBody`'s streaming handler (tagged as the runtime's `streamifyResponse` does). */
function useStreamingGateway(overrides: Partial<GatewayOptions> = {}) {
  let body: Body = async () => undefined;
  let gateway: GatewayEmulator;
  const handler: StreamingLambdaHandler = streamifyResponse((event, stream, context) => body(event, stream, context));
  before(async () => {
    gateway = await new GatewayEmulator({
      stage: "beta",
      routes: [{ path: "/v1/chat/completions", method: "POST" }],
      keys: [{ id: "key-s", value: KEY, customerId: "s", plan: { rateLimit: 100_000, burstLimit: 100_000 } }],
      handler,
      quota: { takeQuota: () => true },
      port: 0,
      ...overrides,
    }).start();
  });
  after(() => gateway.stop());
  return {
    setBody(next: Body) {
      body = next;
    },
    /** Sends a request; resolves with the response as soon as its head arrives (the body is still streaming). */
    request(): Promise<{ res: http.IncomingMessage; req: http.ClientRequest }> {
      return new Promise((resolve, reject) => {
        const req = http.request(`${gateway.baseUrl}/v1/chat/completions`, { method: "POST", headers: { "x-api-key": KEY, "content-type": "application/json" }, agent: false }, (res) =>
          resolve({ res, req }),
        );
        req.on("error", reject);
        req.end("{}");
      });
    },
  };
}

/** Reads a response to its end: the body, and whether it ended cleanly or was cut. */
function readAll(res: http.IncomingMessage): Promise<{ body: string; complete: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    res.on("data", (c: Buffer) => chunks.push(c));
    res.on("end", () => resolve({ body: Buffer.concat(chunks).toString("utf8"), complete: res.complete }));
    res.on("error", () => resolve({ body: Buffer.concat(chunks).toString("utf8"), complete: false }));
    res.on("aborted", () => resolve({ body: Buffer.concat(chunks).toString("utf8"), complete: false }));
  });
}

/** Resolves with the first body chunk. */
async function firstChunk(res: http.IncomingMessage): Promise<string> {
  const [chunk] = (await once(res, "data")) as [Buffer];
  return chunk.toString("utf8");
}

function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

const sse = { statusCode: 200, headers: { "content-type": "text/event-stream", "cache-control": "no-cache" } };

describe("the gateway emulator's STREAM integration", () => {
  const local = useStreamingGateway();

  it("sends the prelude's status and headers first, then each write as it happens, chunked", async () => {
    const clientGotFirst = deferred();
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, sse);
      stream.write("data: one\n\n");
      // The second write waits until the client has the first: the emulator must not buffer the answer.
      await clientGotFirst.promise;
      stream.write("data: two\n\n");
      stream.end();
    });
    const { res } = await local.request();
    expect(res.statusCode).to.equal(200);
    expect(res.headers["content-type"]).to.equal("text/event-stream");
    expect(res.headers["cache-control"]).to.equal("no-cache");
    expect(res.headers["transfer-encoding"]).to.equal("chunked");
    expect(res.headers["content-length"]).to.equal(undefined);
    expect(res.headers["x-amzn-requestid"]).to.match(/^[0-9a-f-]{36}$/);
    expect(await firstChunk(res)).to.equal("data: one\n\n");
    clientGotFirst.resolve();
    const rest = await readAll(res);
    expect(rest).to.deep.equal({ body: "data: two\n\n", complete: true });
  });

  it("merges multiValueHeaders over headers and sends cookies as Set-Cookie, as API Gateway does", async () => {
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, {
        statusCode: 201,
        headers: { "x-one": "single", "x-both": "from-headers" },
        multiValueHeaders: { "X-Both": ["a", "b"] },
        cookies: ["session=1; Path=/", "theme=dark"],
      });
      stream.write("ok");
      stream.end();
    });
    const { res } = await local.request();
    expect(res.statusCode).to.equal(201);
    expect(res.headers["x-one"]).to.equal("single");
    expect(res.headers["x-both"]).to.equal("a, b");
    expect(res.headers["set-cookie"]).to.deep.equal(["session=1; Path=/", "theme=dark"]);
    expect(await readAll(res)).to.deep.equal({ body: "ok", complete: true });
  });

  it("keeps a Content-Length the prelude declares: a buffered answer reaches the client unchunked and byte-exact", async () => {
    const json = JSON.stringify({ object: "chat.completion", text: "héllo" });
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, { statusCode: 200, headers: { "Content-Type": "application/json", "Content-Length": String(Buffer.byteLength(json)) } });
      stream.write(json);
      stream.end();
    });
    const { res } = await local.request();
    expect(res.headers["content-length"]).to.equal(String(Buffer.byteLength(json)));
    expect(res.headers["transfer-encoding"]).to.equal(undefined);
    expect(await readAll(res)).to.deep.equal({ body: json, complete: true });
  });

  it("cuts the connection when the body falls short of the Content-Length the prelude declared", async () => {
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, { statusCode: 200, headers: { "Content-Length": "100" } });
      stream.write("only ten b");
      stream.end();
    });
    const { res } = await local.request();
    expect(res.headers["content-length"]).to.equal("100");
    expect(await readAll(res)).to.deep.equal({ body: "only ten b", complete: false });
  });

  it("answers API Gateway's 500 INTEGRATION_FAILURE when the handler ends without a prelude (end() with no write)", async () => {
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, sse);
      stream.end(); // the runtime's pitfall (runtime-interface-client #97): no write, no prelude
    });
    const { res } = await local.request();
    const spec = gatewayResponse("INTEGRATION_FAILURE");
    expect(res.statusCode).to.equal(500);
    expect(res.headers["x-amzn-errortype"]).to.equal("InternalServerErrorException");
    expect((await readAll(res)).body).to.equal(renderGatewayBody(spec, { method: "POST", path: "/beta/v1/chat/completions" }));
  });

  it("answers 500 INTEGRATION_FAILURE when the handler writes without a prelude, or rejects before one", async () => {
    local.setBody(async (_event, raw) => {
      raw.write("data: no prelude\n\n".repeat(1000)); // no delimiter within 16 KB
      raw.end();
    });
    expect((await local.request()).res.statusCode).to.equal(500);
    local.setBody(async () => {
      throw new Error("boom");
    });
    const { res } = await local.request();
    expect(res.statusCode).to.equal(500);
    expect(JSON.parse((await readAll(res)).body).error.code).to.equal("integration_failure");
  });

  it("cuts the client's connection (no final chunk) when the handler rejects after the prelude", async () => {
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, sse);
      stream.write("data: partial\n\n");
      await new Promise((resolve) => setTimeout(resolve, 10));
      throw new Error("failed mid-stream");
    });
    const { res } = await local.request();
    expect(res.statusCode).to.equal(200);
    expect(await readAll(res)).to.deep.equal({ body: "data: partial\n\n", complete: false });
  });

  it("tells the handler when the client goes away: `close` fires before the handler ended its stream", async () => {
    const closed = deferred<{ ended: boolean | undefined; writeAfter: boolean }>();
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, sse);
      stream.write("data: first\n\n");
      await new Promise<void>((resolve) => stream.once("close", () => resolve()));
      // Writes after the client left are dropped, not thrown.
      const writeAfter = stream.write("data: nobody listens\n\n");
      closed.resolve({ ended: stream.writableEnded, writeAfter });
      stream.end();
    });
    const { res, req } = await local.request();
    await firstChunk(res);
    req.destroy();
    expect(await closed.promise).to.deep.equal({ ended: false, writeAfter: true });
  });

  it("honours backpressure: write() returns false while the client does not read, and drain follows when it does", async () => {
    const sawFalse = deferred<number>();
    const CHUNK = Buffer.alloc(64 * 1024, "x");
    let written = 0;
    local.setBody(async (_event, raw) => {
      const stream = httpResponseStream(raw, { statusCode: 200, headers: { "content-type": "application/octet-stream" } });
      for (let i = 0; i < 4096; i++) {
        written += CHUNK.length;
        if (!stream.write(CHUNK)) {
          sawFalse.resolve(written);
          await new Promise<void>((resolve) => stream.once("drain", () => resolve()));
          stream.write("end");
          stream.end();
          return;
        }
      }
      sawFalse.resolve(-1);
      stream.end();
    });
    const { res } = await local.request();
    res.pause();
    const at = await sawFalse.promise;
    expect(at).to.be.greaterThan(0);
    let bytes = 0;
    res.on("data", (c: Buffer) => (bytes += c.length));
    res.resume();
    await once(res, "end");
    expect(bytes).to.equal(written + 3);
  });

  describe("timeouts", () => {
    const timed = useStreamingGateway({ streamIdleTimeoutMs: 150, integrationTimeoutMs: 600 });

    it("cuts a stream that goes silent for longer than the idle timeout, after the prelude", async () => {
      const gone = deferred();
      timed.setBody(async (_event, raw) => {
        const stream = httpResponseStream(raw, sse);
        stream.write("data: one\n\n");
        await new Promise<void>((resolve) => stream.once("close", () => resolve()));
        gone.resolve();
        stream.end();
      });
      const { res } = await timed.request();
      expect(await readAll(res)).to.deep.equal({ body: "data: one\n\n", complete: false });
      await gone.promise; // and the function learns the gateway hung up
    });

    it("answers INTEGRATION_TIMEOUT when nothing, not even the prelude, arrives within the idle timeout", async () => {
      timed.setBody(async (_event, raw) => {
        await new Promise<void>((resolve) => raw.once("close", () => resolve()));
        raw.end();
      });
      const { res } = await timed.request();
      expect(res.statusCode).to.equal(504);
      expect(JSON.parse((await readAll(res)).body).error.code).to.equal("timeout");
    });

    it("cuts a stream that keeps talking past the integration timeout", async () => {
      timed.setBody(async (_event, raw) => {
        const stream = httpResponseStream(raw, sse);
        let closed = false;
        stream.once("close", () => (closed = true));
        // Never idle for long, never ending on its own: only the whole-stream limit stops it.
        while (!closed) {
          stream.write("data: tick\n\n");
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        stream.end();
      });
      const { res } = await timed.request();
      const { body, complete } = await readAll(res);
      expect(complete).to.equal(false);
      expect(body.startsWith("data: tick\n\ndata: tick\n\n")).to.equal(true);
    });
  });
});
