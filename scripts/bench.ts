/**
 * `npm run bench`: the figures the README quotes, measured in one run on this machine.
 *
 *  - the function's added latency over calling the upstream directly (p50, p99) at concurrency 1 and 32: the same
 *    requests go to the built-in model server directly and through the handler (in-process, as Lambda calls it),
 *    interleaved in rounds so machine noise hits both alike; with metering off and with metering to a collector;
 *  - requests/s and latency through the whole local stack (gateway emulator + handler + metering);
 *  - the bundle's size, zipped size and cold import time; peak RSS of a process serving through the bundle.
 *
 * The model server and collector run in a child process so they do not share the measured event loop.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import readline from "node:readline";
import type { APIGatewayProxyResult } from "aws-lambda";
import { createDeps, createHandler } from "../functions/ai-chat/index";
import { createApiGatewayEvent, createContext } from "../tests/helpers/events";
import { measureBundle } from "./build-function";
import { startLocalStack } from "./local/stack";

const ROOT = path.resolve(__dirname, "..");
const UPSTREAM_KEY = "bench-upstream-key";
const APP_ID = "bench-app";
const REQUESTS = Number(process.env.BENCH_REQUESTS ?? 2000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const BODY = JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "system", content: "You are terse." }, { role: "user", content: "Hello!" }] });
const CUSTOMERS = JSON.stringify({ "bench-key-id": { customerId: "bench", plan: "pro", stripeCustomerId: "cus_bench" } });

type Sample = number[];

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/** Runs `total` calls of `fn` with `concurrency` in flight; returns per-call latencies (ms) and wall time. */
async function load(fn: () => Promise<void>, total: number, concurrency: number): Promise<{ latencies: Sample; wallMs: number }> {
  const latencies: number[] = [];
  let next = 0;
  const started = process.hrtime.bigint();
  const worker = async () => {
    while (next < total) {
      next += 1;
      const t = process.hrtime.bigint();
      await fn();
      latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { latencies, wallMs: Number(process.hrtime.bigint() - started) / 1e6 };
}

function startServers(): Promise<{ child: ChildProcess; upstream: string; collector: string }> {
  const child = spawn(process.execPath, [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only", path.join(ROOT, "scripts/local/serve.ts")], {
    env: { ...process.env, UPSTREAM_API_KEY: UPSTREAM_KEY, MOESIF_APPLICATION_ID: APP_ID },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stdout! }).once("line", (line) => resolve({ child, ...(JSON.parse(line) as { upstream: string; collector: string }) }));
    child.once("exit", (code) => reject(new Error(`servers exited with ${code}`)));
  });
}

function directCaller(upstreamUrl: string): () => Promise<void> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const url = new URL(`${upstreamUrl}/chat/completions`);
  return () =>
    new Promise((resolve, reject) => {
      const req = http.request(url, { method: "POST", agent, headers: { "content-type": "application/json", authorization: `Bearer ${UPSTREAM_KEY}` } }, (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          // Parse as a client would, so both paths pay for one JSON.parse of the answer.
          JSON.parse(Buffer.concat(chunks).toString("utf8"));
          if (res.statusCode !== 200) reject(new Error(`direct ${res.statusCode}`));
          else resolve();
        });
      });
      req.on("error", reject);
      req.end(BODY);
    });
}

function handlerCaller(upstreamUrl: string, collectorUrl?: string): () => Promise<void> {
  const handler = createHandler(() =>
    createDeps(
      {
        UPSTREAM_BASE_URL: upstreamUrl,
        UPSTREAM_API_KEY: UPSTREAM_KEY,
        CUSTOMERS,
        PLANS: JSON.stringify({ pro: {} }),
        LOG_LEVEL: "error",
        ...(collectorUrl ? { MOESIF_APPLICATION_ID: APP_ID, MOESIF_BASE_URI: collectorUrl } : {}),
      },
      { write: () => undefined },
    ),
  );
  const context = createContext();
  return async () => {
    const event = createApiGatewayEvent({ body: BODY, apiKeyId: "bench-key-id" });
    const result: APIGatewayProxyResult = await handler(event, context);
    JSON.parse(result.body);
    if (result.statusCode !== 200) throw new Error(`handler ${result.statusCode}: ${result.body}`);
  };
}

function peakRssOfBundle(entry: string, upstreamUrl: string): number {
  const script = `
    const { handler } = require(${JSON.stringify(entry)});
    const body = ${JSON.stringify(BODY)};
    (async () => {
      for (let i = 0; i < 2000; i++) {
        const r = await handler({ resource: "/v1/chat/completions", path: "/v1/chat/completions", httpMethod: "POST",
          headers: { "content-type": "application/json" }, body, isBase64Encoded: false,
          requestContext: { requestId: "rss-" + i, stage: "beta", identity: { apiKeyId: "bench-key-id", sourceIp: "127.0.0.1" } } }, { awsRequestId: "a" + i });
        if (r.statusCode !== 200) throw new Error(r.body);
      }
      console.log(process.resourceUsage().maxRSS);
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const out = execFileSync(process.execPath, ["-e", script], {
    env: { ...process.env, UPSTREAM_BASE_URL: upstreamUrl, UPSTREAM_API_KEY: UPSTREAM_KEY, CUSTOMERS, PLANS: JSON.stringify({ pro: {} }), LOG_LEVEL: "error" },
  });
  return Number(out.toString().trim()) / 1024;
}

async function main(): Promise<void> {
  const servers = await startServers();
  try {
    const direct = directCaller(servers.upstream);
    const fn = handlerCaller(servers.upstream);
    const fnMetered = handlerCaller(servers.upstream, servers.collector);
    for (const call of [direct, fn, fnMetered]) await load(call, 300, 8); // warm-up: JIT, sockets, tokenizer

    const rows: string[][] = [];
    for (const concurrency of [1, 32]) {
      const samples: Record<string, Sample> = { direct: [], fn: [], fnMetered: [] };
      for (let round = 0; round < ROUNDS; round++) {
        samples.direct.push(...(await load(direct, REQUESTS / ROUNDS, concurrency)).latencies);
        samples.fn.push(...(await load(fn, REQUESTS / ROUNDS, concurrency)).latencies);
        samples.fnMetered.push(...(await load(fnMetered, REQUESTS / ROUNDS, concurrency)).latencies);
      }
      for (const s of Object.values(samples)) s.sort((a, b) => a - b);
      const [d50, d99] = [percentile(samples.direct, 50), percentile(samples.direct, 99)];
      for (const [label, key] of [["handler, metering off", "fn"], ["handler + Moesif send", "fnMetered"]] as const) {
        const [p50, p99] = [percentile(samples[key], 50), percentile(samples[key], 99)];
        rows.push([`added latency, c=${concurrency}, ${label}`, `p50 ${(p50 - d50).toFixed(3)} ms, p99 ${(p99 - d99).toFixed(3)} ms`, `(direct p50 ${d50.toFixed(3)} / p99 ${d99.toFixed(3)}; via handler ${p50.toFixed(3)} / ${p99.toFixed(3)})`]);
      }
    }

    // A plan roomy enough that the emulator's throttle never answers: this measures serving, not 429s.
    const projectDir = path.join(ROOT, ".build", "bench-project");
    fs.rmSync(projectDir, { recursive: true, force: true });
    fs.mkdirSync(projectDir, { recursive: true });
    fs.writeFileSync(
      path.join(projectDir, "Pulumi.bench.yaml"),
      "config:\n  metered-ai-api:plans:\n    bench: { rateLimit: 1000000, burstLimit: 1000000 }\n  metered-ai-api:customers:\n    bench: { plan: bench, stripeCustomerId: cus_bench }\n",
    );
    const stack = await startLocalStack({ stack: "bench", projectDir, port: 0, env: { UPSTREAM_BASE_URL: servers.upstream, UPSTREAM_API_KEY: UPSTREAM_KEY, LOG_LEVEL: "error" }, write: () => undefined });
    try {
      const customer = "bench";
      const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
      const url = new URL(`${stack.baseUrl}/v1/chat/completions`);
      const throughStack = () =>
        new Promise<void>((resolve, reject) => {
          const req = http.request(url, { method: "POST", agent, headers: { "content-type": "application/json", "x-api-key": stack.apiKeys[customer] } }, (res) => {
            res.resume();
            res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`stack ${res.statusCode}`))));
          });
          req.on("error", reject);
          req.end(BODY);
        });
      await load(throughStack, 100, 8);
      const { latencies, wallMs } = await load(throughStack, REQUESTS, 32);
      latencies.sort((a, b) => a - b);
      const directRun = await load(direct, REQUESTS, 32);
      rows.push([
        "local stack, c=32",
        `${Math.round((REQUESTS / wallMs) * 1000)} req/s, p50 ${percentile(latencies, 50).toFixed(2)} ms, p99 ${percentile(latencies, 99).toFixed(2)} ms`,
        `(upstream directly: ${Math.round((REQUESTS / directRun.wallMs) * 1000)} req/s; stack = gateway emulator + handler + metering to the SQLite collector, one process)`,
      ]);
    } finally {
      await stack.stop();
    }

    const bundle = measureBundle();
    rows.push(["bundle (minified index.js)", `${(bundle.bytes / 1024).toFixed(1)} kB, ${(bundle.zippedBytes / 1024).toFixed(1)} kB zipped`, `(deployed archive with lazily loaded tokenizer ranks: ${(bundle.archiveZippedBytes / 1024).toFixed(0)} kB deflated)`]);
    rows.push(["cold import of the bundle", `median ${bundle.coldImportMs.toFixed(1)} ms`, `(${bundle.importRuns} fresh processes, node ${process.version})`]);
    rows.push(["peak RSS serving 2,000 requests via the bundle", `${peakRssOfBundle(bundle.entry, servers.upstream).toFixed(1)} MB`, ""]);
    rows.push(["peak RSS of this benchmark process", `${(process.resourceUsage().maxRSS / 1024).toFixed(1)} MB`, ""]);

    const width = Math.max(...rows.map((r) => r[0].length));
    process.stdout.write(`\nnpm run bench: ${REQUESTS} requests per scenario, ${ROUNDS} interleaved rounds, loopback, ${new Date().toISOString()}\n\n`);
    for (const [name, figure, note] of rows) process.stdout.write(`${name.padEnd(width)}  ${figure}  ${note}\n`);
  } finally {
    servers.child.kill("SIGTERM");
  }
}

main().catch((err) => {
  process.stderr.write(`npm run bench: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
