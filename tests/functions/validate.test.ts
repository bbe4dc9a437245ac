import { expect } from "chai";
import { BadRequestError, PayloadTooLargeError } from "../../functions/ai-chat/errors";
import { parseChatCompletionRequest, type RequestFacts } from "../../functions/ai-chat/validate";

const parse = (body: string | Buffer, max = 1024 * 1024) => parseChatCompletionRequest(typeof body === "string" ? Buffer.from(body) : body, max).request;

function expectBadRequest(body: string | Buffer, param: string | null): void {
  try {
    parse(body);
  } catch (err) {
    expect(err).to.be.instanceOf(BadRequestError);
    expect((err as BadRequestError).param).to.equal(param);
    return;
  }
  expect.fail(`accepted ${String(body)}`);
}

describe("parseChatCompletionRequest", () => {
  it("accepts a minimal request and keeps unknown fields", () => {
    const parsed = parse('{"model":"m","messages":[{"role":"user","content":"hi"}],"x_custom":1}');
    expect(parsed.x_custom).to.equal(1);
  });

  it("rejects bodies that are not a JSON object", () => {
    for (const body of ["", "{", "[]", "null", "42", '"s"', "\u0000"]) expectBadRequest(body, null);
  });

  it("rejects invalid UTF-8", () => {
    expectBadRequest(Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), null);
  });

  it("names `model` when it is missing, empty or not a string", () => {
    for (const model of [undefined, "", "  ", 3, null, ["m"]]) {
      expectBadRequest(JSON.stringify({ model, messages: [{ role: "user", content: "x" }] }), "model");
    }
  });

  it("names `messages` when it is missing, empty or not an array", () => {
    for (const messages of [undefined, [], "hi", {}, null]) expectBadRequest(JSON.stringify({ model: "m", messages }), "messages");
  });

  it("names the message or role that is wrong", () => {
    expectBadRequest(JSON.stringify({ model: "m", messages: ["hi"] }), "messages[0]");
    expectBadRequest(JSON.stringify({ model: "m", messages: [{ role: "user", content: "a" }, { role: "wizard" }] }), "messages[1].role");
    expectBadRequest(JSON.stringify({ model: "m", messages: [{ content: "no role" }] }), "messages[0].role");
  });

  it("accepts stream: true with stream_options, and refuses a non-boolean stream", () => {
    const messages = [{ role: "user", content: "a" }];
    const parsed = parse(JSON.stringify({ model: "m", messages, stream: true, stream_options: { include_usage: true } }));
    expect(parsed.stream).to.equal(true);
    expectBadRequest(JSON.stringify({ model: "m", messages, stream: "yes" }), "stream");
  });

  it("refuses stream_options without stream: true, as OpenAI does", () => {
    const messages = [{ role: "user", content: "a" }];
    expectBadRequest(JSON.stringify({ model: "m", messages, stream_options: { include_usage: true } }), "stream_options");
    expectBadRequest(JSON.stringify({ model: "m", messages, stream: false, stream_options: { include_usage: true } }), "stream_options");
    expectBadRequest(JSON.stringify({ model: "m", messages, stream: true, stream_options: { include_usage: "yes" } }), "stream_options.include_usage");
    expect(parse(JSON.stringify({ model: "m", messages, stream: false, stream_options: null })).stream).to.equal(false);
  });

  it("answers 413 above the byte limit", () => {
    expect(() => parse(JSON.stringify({ model: "m", messages: [{ role: "user", content: "x".repeat(200) }] }), 100)).to.throw(PayloadTooLargeError);
  });

  it("reports the model as soon as the body parses, even when a later check fails", () => {
    const facts: RequestFacts = {};
    expect(() => parseChatCompletionRequest(Buffer.from(JSON.stringify({ model: "gpt-4o", messages: [] })), 1024, undefined, facts)).to.throw(BadRequestError);
    expect(facts.model).to.equal("gpt-4o");
  });

  it("reports only string model names, cut to 256 characters", () => {
    const factsOf = (model: unknown) => {
      const facts: RequestFacts = {};
      try {
        parseChatCompletionRequest(Buffer.from(JSON.stringify({ model, messages: "x" })), 1024 * 1024, undefined, facts);
      } catch {
        // the request is invalid on purpose
      }
      return facts.model;
    };
    expect(factsOf("m".repeat(10_000))).to.equal("m".repeat(256));
    expect(factsOf(42)).to.equal(undefined);
    expect(factsOf({ name: "gpt-4o" })).to.equal(undefined);
    expect(factsOf("")).to.equal(undefined);
  });
});
