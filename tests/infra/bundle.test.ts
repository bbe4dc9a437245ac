import { expect } from "chai";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { bundleFunction } from "../../infra/bundle";
import { UpstreamServer } from "../../scripts/local/upstream-server";
import { chatBody, createApiGatewayEvent, createContext } from "../helpers/events";
import { CUSTOMERS, PLANS, UPSTREAM_KEY } from "../helpers/fakes";

describe("bundleFunction (the esbuild bundle pulumi up deploys)", () => {
  const outdir = fs.mkdtempSync(path.join(os.tmpdir(), "ai-chat-bundle-"));
  const saved = { ...process.env };
  let upstream: UpstreamServer;

  before(async () => {
    upstream = await new UpstreamServer({ apiKey: UPSTREAM_KEY }).start();
  });
  after(async () => {
    process.env = saved;
    await upstream.stop();
    fs.rmSync(outdir, { recursive: true, force: true });
  });

  it("builds a minified CommonJS handler with two parameters that serves and estimates usage from its own files", async () => {
    const { entry } = bundleFunction(path.resolve(__dirname, "../../functions/ai-chat/index.ts"), outdir);
    expect(fs.statSync(entry).size).to.be.greaterThan(10_000);
    expect(fs.existsSync(path.join(outdir, "node_modules/js-tiktoken/dist/ranks/o200k_base.cjs"))).to.equal(true);

    Object.assign(process.env, {
      UPSTREAM_BASE_URL: upstream.url,
      UPSTREAM_API_KEY: UPSTREAM_KEY,
      CUSTOMERS: JSON.stringify(CUSTOMERS),
      PLANS: JSON.stringify(PLANS),
      LOG_LEVEL: "error",
    });
    delete process.env.MOESIF_APPLICATION_ID;
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const bundled = require(entry) as { handler: (event: unknown, context: unknown) => Promise<{ statusCode: number; body: string }> };
    expect(bundled.handler.length).to.equal(2);

    const result = await bundled.handler(createApiGatewayEvent({ body: chatBody({ mock: { omit_usage: true } }) }), createContext());
    expect(result.statusCode).to.equal(200);
    const loadedRanks = Object.keys(require.cache).filter((file) => file.includes("o200k_base"));
    expect(loadedRanks.some((file) => file.startsWith(outdir))).to.equal(true);
  });
});
