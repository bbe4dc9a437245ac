/**
 * The local stack: gateway emulator + the real ai-chat handler + a built-in model server + a Moesif-compatible
 * collector backed by SQLite, configured from the same stack file `pulumi up` reads.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";
import { createDeps, createHandler } from "../../functions/ai-chat/index";
import { customersByKeyId, functionPlans, ROUTES } from "../../infra/function-env";
import { parseStackConfig, PROJECT, StackConfigError, type StackConfig } from "../../infra/stack-config";
import { GatewayEmulator, type GatewayKey } from "./gateway";
import { MoesifCollector } from "./moesif-collector";
import { SqliteStore } from "./sqlite-store";
import { UpstreamServer } from "./upstream-server";

/** A problem the user can fix, reported as one line without a stack trace. */
export class LocalStackError extends Error {}

export interface LocalStackOptions {
  /** Stack name: reads `Pulumi.<stack>.yaml`. @default "dev" */
  stack?: string;
  /** Project directory holding the stack file. @default the repository root */
  projectDir?: string;
  /** Where keys, events and quota counters live. @default <projectDir>/.local */
  dataDir?: string;
  /** @default 3000; 0 picks a free port */
  port?: number;
  /** Environment: UPSTREAM_BASE_URL, UPSTREAM_API_KEY, MOESIF_APPLICATION_ID, MOESIF_BASE_URI, FORWARD_MOCK_DIRECTIVES, LOG_LEVEL… */
  env?: NodeJS.ProcessEnv;
  /** Where the function's log lines go. @default stdout */
  write?: (line: string) => void;
  /** How many raw payloads the built-in collector keeps in memory; tests that scan every payload pass "all". */
  keepRawPayloads?: "all" | { count: number; chars: number };
  /** The gateway's idle timeout between two streamed chunks. @default 300000 (API Gateway's, Regional endpoints) */
  streamIdleTimeoutMs?: number;
}

export interface LocalStack {
  config: StackConfig;
  stackFile: string;
  /** `http://127.0.0.1:<port>/<stage>` */
  baseUrl: string;
  /** Customer id → local API key. */
  apiKeys: Record<string, string>;
  upstream?: UpstreamServer;
  upstreamUrl: string;
  collector?: MoesifCollector;
  store?: SqliteStore;
  gateway: GatewayEmulator;
  stop(): Promise<void>;
}

const ROOT = path.resolve(__dirname, "..", "..");
const LOCAL_UPSTREAM_KEY = "local-upstream-key";
const LOCAL_MOESIF_APP_ID = "local-collector";

/** Reads and validates `Pulumi.<stack>.yaml` with the program's own rules. */
export function readStackFile(file: string): StackConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new LocalStackError(`cannot read the stack config ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = YAML.parse(text);
  } catch (err) {
    throw new LocalStackError(`${file} is not valid YAML: ${(err as Error).message.split("\n")[0]}`);
  }
  const config = (doc as { config?: Record<string, unknown> } | null)?.config ?? {};
  const values: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(config)) {
    if (key.startsWith(`${PROJECT}:`)) values[key.slice(PROJECT.length + 1)] = value;
  }
  try {
    return parseStackConfig(values, { forDeploy: false });
  } catch (err) {
    if (err instanceof StackConfigError) throw new LocalStackError(`${path.basename(file)}: ${err.message}`);
    throw err;
  }
}

/** Loads `.local/api-keys.json`, adding a key for every customer that has none. */
export function ensureApiKeys(file: string, customers: string[]): Record<string, string> {
  let keys: Record<string, string> = {};
  if (fs.existsSync(file)) {
    try {
      keys = JSON.parse(fs.readFileSync(file, "utf8")) as Record<string, string>;
    } catch {
      throw new LocalStackError(`${file} is not valid JSON; delete it to generate new local keys`);
    }
  }
  let changed = false;
  for (const customer of customers) {
    if (typeof keys[customer] !== "string" || keys[customer].length < 20) {
      // API Gateway generates 40-character alphanumeric keys; so do we.
      keys[customer] = randomBytes(30).toString("base64url").replace(/[-_]/g, "x").slice(0, 40);
      changed = true;
    }
  }
  if (changed) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, JSON.stringify(keys, null, 2) + "\n", { mode: 0o600 });
  }
  return keys;
}

export async function startLocalStack(options: LocalStackOptions = {}): Promise<LocalStack> {
  const env = options.env ?? process.env;
  const projectDir = options.projectDir ?? ROOT;
  const stackFile = path.join(projectDir, `Pulumi.${options.stack ?? "dev"}.yaml`);
  const dataDir = options.dataDir ?? path.join(projectDir, ".local");
  const config = readStackFile(stackFile);
  const apiKeys = ensureApiKeys(path.join(dataDir, "api-keys.json"), Object.keys(config.customers));

  const started: Array<{ stop(): Promise<void> | void }> = [];
  const stopAll = async () => {
    for (const part of started.reverse()) await part.stop();
  };
  try {
    const store = new SqliteStore(path.join(dataDir, "usage.db"));
    started.push({ stop: () => store.close() });

    let upstream: UpstreamServer | undefined;
    let upstreamUrl = env.UPSTREAM_BASE_URL;
    let upstreamKey = env.UPSTREAM_API_KEY;
    if (!upstreamUrl) {
      upstream = await new UpstreamServer({ apiKey: LOCAL_UPSTREAM_KEY }).start();
      started.push(upstream);
      upstreamUrl = upstream.url;
      upstreamKey = LOCAL_UPSTREAM_KEY;
    } else if (!upstreamKey) {
      // Ollama and vLLM ignore the key; OpenAI needs one.
      upstreamKey = "none";
    }

    let collector: MoesifCollector | undefined;
    let moesifBase = env.MOESIF_BASE_URI ?? config.moesifBaseUri;
    let moesifAppId = env.MOESIF_APPLICATION_ID;
    if (!moesifAppId) {
      collector = await new MoesifCollector({ applicationId: LOCAL_MOESIF_APP_ID, store, keepRawPayloads: options.keepRawPayloads }).start();
      started.push(collector);
      moesifBase = collector.url;
      moesifAppId = LOCAL_MOESIF_APP_ID;
    }

    const keys: GatewayKey[] = Object.entries(config.customers).map(([customerId, customer]) => ({
      id: `local-key-${customerId}`,
      value: apiKeys[customerId],
      customerId,
      plan: config.plans[customer.plan],
    }));
    // The same variables the Pulumi program gives the Lambda, built by the same helpers.
    const functionEnv: NodeJS.ProcessEnv = {
      UPSTREAM_BASE_URL: upstreamUrl,
      UPSTREAM_API_KEY: upstreamKey,
      UPSTREAM_TIMEOUT_MS: String(config.upstreamTimeoutMs),
      // The longest silence allowed between two streamed chunks from the upstream.
      UPSTREAM_IDLE_TIMEOUT_MS: String(config.upstreamIdleTimeoutMs),
      MAX_REQUEST_BYTES: String(config.maxRequestBytes),
      RESPONSE_ENVELOPE: config.responseEnvelope,
      MOESIF_APPLICATION_ID: moesifAppId,
      MOESIF_BASE_URI: moesifBase,
      MOESIF_LOG_BODIES: String(config.logBodies),
      METERING_TIMEOUT_MS: String(config.meteringTimeoutMs),
      CUSTOMERS: JSON.stringify(customersByKeyId(keys.map((k) => ({ keyId: k.id, customerId: k.customerId, customer: config.customers[k.customerId] })))),
      PLANS: JSON.stringify(functionPlans(config.plans)),
      // The function strips a top-level `mock` field before forwarding to a real upstream; the built-in model server
      // reads it to misbehave on request. (A test pointing UPSTREAM_BASE_URL at its own mock server sets it itself.)
      FORWARD_MOCK_DIRECTIVES: upstream || env.FORWARD_MOCK_DIRECTIVES === "true" ? "true" : "false",
      LOG_LEVEL: env.LOG_LEVEL ?? "info",
    };
    const handler = createHandler(() => createDeps(functionEnv, { write: options.write }));

    const gateway = new GatewayEmulator({
      stage: config.stageName,
      stageThrottle: { rateLimit: config.stageThrottleRateLimit, burstLimit: config.stageThrottleBurstLimit },
      routes: ROUTES,
      keys,
      handler,
      quota: store,
      port: options.port ?? 3000,
      // The function's own timeout bounds the invocation, hence the stream (the integration allows up to 900 s).
      integrationTimeoutMs: config.lambdaTimeoutSeconds * 1000,
      streamIdleTimeoutMs: options.streamIdleTimeoutMs,
    });
    try {
      await gateway.start();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "EADDRINUSE") throw new LocalStackError(`port ${options.port ?? 3000} is in use: stop the other process or set PORT=<free port>`);
      if (code === "EACCES") throw new LocalStackError(`port ${options.port ?? 3000} needs privileges: set PORT to a number above 1024`);
      throw err;
    }
    started.push(gateway);

    return { config, stackFile, baseUrl: gateway.baseUrl, apiKeys, upstream, upstreamUrl, collector, store, gateway, stop: stopAll };
  } catch (err) {
    await stopAll();
    throw err;
  }
}
