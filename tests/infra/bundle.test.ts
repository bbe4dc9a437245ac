import { expect } from "chai";
import fs from "node:fs";
import path from "node:path";
import { bundleFunction } from "../../infra/bundle";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { isStreamingHandler, type StreamingHandler } from "../../functions/ai-chat/lambda-stream";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { invokeStreaming } from "../helpers/invoke-streaming";
import { CUSTOMERS, PLANS, UPSTREAM_KEY } from "../helpers/fakes";

// Inside the repository, so that the `@aws-sdk/*` packages the bundle leaves to the Lambda runtime (which ships
// them) resolve from node_modules, as they resolve from /var/runtime on Lambda.
const BUILD = path.resolve(__dirname, "../../.build/test-bundles");

describe("bundleFunction (the esbuild bundles pulumi up deploys)", () => {
  const outdir = path.join(BUILD, `ai-chat-${process.pid}`);
  const authorizerDir = path.join(BUILD, `authorizer-${process.pid}`);
  const saved = { ...process.env };
  let upstream: UpstreamServer;

  before(async () => {
    upstream = await new UpstreamServer({ apiKey: UPSTREAM_KEY }).start();
  });
  after(async () => {
    process.env = saved;
    await upstream.stop();
    fs.rmSync(outdir, { recursive: true, force: true });
    fs.rmSync(authorizerDir, { recursive: true, force: true });
  });

  it("builds a minified CommonJS streaming handler (event, responseStream, context) that serves and estimates usage from its own files", async () => {
    const { entry } = bundleFunction(path.resolve(__dirname, "../../functions/ai-chat/index.ts"), outdir, { files: { "plans.json": JSON.stringify(PLANS) } });
    expect(fs.statSync(entry).size).to.be.greaterThan(10_000);
    expect(fs.existsSync(path.join(outdir, "node_modules/js-tiktoken/dist/ranks/o200k_base.cjs"))).to.equal(true);
    expect(JSON.parse(fs.readFileSync(path.join(outdir, "plans.json"), "utf8"))).to.deep.equal(PLANS);

    Object.assign(process.env, {
      UPSTREAM_BASE_URL: upstream.url,
      UPSTREAM_API_KEY: UPSTREAM_KEY,
      CUSTOMERS: JSON.stringify(CUSTOMERS),
      PLANS: JSON.stringify(PLANS),
      LOG_LEVEL: "error",
      // Lets the built-in model server's `mock` field through, so that it omits usage and the bundle must estimate.
      FORWARD_MOCK_DIRECTIVES: "true",
    });
    delete process.env.MOESIF_APPLICATION_ID;
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const bundled = require(entry) as { handler: StreamingHandler<unknown, unknown> };
    expect(bundled.handler.length).to.equal(3);
    expect(isStreamingHandler(bundled.handler)).to.equal(true);

    const result = await invokeStreaming(bundled.handler, createApiGatewayEvent({ body: chatBody({ mock: { omit_usage: true } }) }), createContext());
    expect(result.statusCode).to.equal(200);
    expect(JSON.parse(result.body).choices[0].message.content).to.be.a("string");
    const loadedRanks = Object.keys(require.cache).filter((file) => file.includes("o200k_base"));
    expect(loadedRanks.some((file) => file.startsWith(outdir)), JSON.stringify(loadedRanks)).to.equal(true);
  });

  it("builds the authorizer alone, without the tokenizer files, and it hands a Bearer key to the usage plan", async () => {
    const { entry } = bundleFunction(path.resolve(__dirname, "../../functions/authorizer/index.ts"), authorizerDir, { tokenizerRanks: false });
    expect(fs.readdirSync(authorizerDir)).to.deep.equal(["index.js"]);
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const authorizer = require(entry) as { handler: (event: unknown) => Promise<{ usageIdentifierKey?: string; policyDocument: { Statement: Array<{ Effect: string }> } }> };
    const key = "A".repeat(40);
    const methodArn = "arn:aws:execute-api:us-east-1:123456789012:abc/beta/POST/v1/chat/completions";
    const allowed = await authorizer.handler({ type: "REQUEST", methodArn, headers: { Authorization: `Bearer ${key}` } });
    expect(allowed.usageIdentifierKey).to.equal(key);
    expect(allowed.policyDocument.Statement[0].Effect).to.equal("Allow");
    const denied = await authorizer.handler({ type: "REQUEST", methodArn, headers: {} });
    expect(denied.policyDocument.Statement[0].Effect).to.equal("Deny");
  });

  it("builds the usage forwarder alone, with the Stripe SDK inside and the AWS SDK left to the runtime, and its handler answers a stream batch", async () => {
    const dir = path.join(BUILD, `usage-forwarder-${process.pid}`);
    try {
      const { entry } = bundleFunction(path.resolve(__dirname, "../../functions/usage-forwarder/index.ts"), dir, { tokenizerRanks: false });
      expect(fs.readdirSync(dir)).to.deep.equal(["index.js"]);
      const code = fs.readFileSync(entry, "utf8");
      expect(code).to.match(/require\("@aws-sdk\/[a-z-]+"\)/);
      // The stripe package is not in the Lambda runtime: it must be inside the bundle.
      expect(code).to.not.match(/require\("stripe"\)/);
      expect(code).to.include("api.stripe.com");
      Object.assign(process.env, { LEDGER_TABLE: "usage-ledger-table-test", AWS_REGION: "us-east-1", LOG_LEVEL: "error" });
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const bundled = require(entry) as { handler: (event: unknown) => Promise<{ batchItemFailures: unknown[] }> };
      // A batch with no INSERT (the forwarder's own marks) needs no sink and no table: nothing to deliver, nothing failed.
      expect(await bundled.handler({ Records: [{ eventName: "MODIFY", eventID: "1", dynamodb: { SequenceNumber: "1" } }] })).to.deep.equal({ batchItemFailures: [] });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("leaves the AWS SDK to the Lambda runtime instead of bundling it", () => {
    const dir = path.join(BUILD, `sdk-${process.pid}`);
    fs.mkdirSync(dir, { recursive: true });
    const source = path.join(dir, "entry.ts");
    fs.writeFileSync(source, 'import { GetParametersCommand, SSMClient } from "@aws-sdk/client-ssm";\nexport const handler = async () => new SSMClient({}).send(new GetParametersCommand({ Names: ["x"] }));\n');
    try {
      const { entry } = bundleFunction(source, path.join(dir, "out"), { tokenizerRanks: false });
      const code = fs.readFileSync(entry, "utf8");
      expect(code).to.include('require("@aws-sdk/client-ssm")');
      expect(code.length).to.be.lessThan(2_000);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses extra file names that would escape the bundle directory", () => {
    expect(() => bundleFunction(path.resolve(__dirname, "../../functions/authorizer/index.ts"), authorizerDir, { tokenizerRanks: false, files: { "../x.json": "{}" } })).to.throw(/plain names/);
  });
});
