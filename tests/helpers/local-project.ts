import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";

/** A stack file for evidence tests: one tightly scoped plan, one roomy plan. */
export const EVIDENCE_STACK_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    starter:
      rateLimit: 100000
      burstLimit: 100000
      models: [gpt-4o-mini]
    pro:
      rateLimit: 100000
      burstLimit: 100000
      prices: { inputPer1k: 0.25, outputPer1k: 1.0 }
  metered-ai-api:customers:
    starter: { plan: starter, stripeCustomerId: cus_starter }
    pro: { plan: pro, stripeCustomerId: cus_pro }
    pro2: { plan: pro, stripeCustomerId: cus_pro2 }
`;

/** A throwaway project directory holding `Pulumi.test.yaml`. */
export function tempProject(yaml = EVIDENCE_STACK_YAML): { dir: string; dataDir: string; remove(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "metered-evidence-"));
  fs.writeFileSync(path.join(dir, "Pulumi.test.yaml"), yaml);
  return { dir, dataDir: path.join(dir, ".local"), remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

export interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** Sends exact bytes and header lines (arrays become repeated headers), as curl would. */
export function rawRequest(url: string, options: { method?: string; headers?: Record<string, string | string[]>; body?: Buffer }): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: options.method ?? "POST", headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(options.body);
  });
}
