/**
 * The forwarder's configuration, read from the environment once per cold start (see the environment contract in
 * the README). Unlike the request path, a broken configuration here throws `ForwarderConfigError`: the forwarder
 * serves no caller, every item it would deliver is durable in the table, and a failing invocation is what makes a
 * misconfiguration visible (the stream trigger retries, the sweep's errors show in the function's metrics).
 */
import type { StripeBilling } from "../shared/ledger-schema";

export const DEFAULT_MOESIF_BASE_URI = "https://api.moesif.net";

/** Which Stripe API carries meter events (see stripe-sink.ts for why v2 is the default). */
export type StripeMeterApi = "v2" | "v1";

export interface ForwarderConfig {
  /** `LEDGER_TABLE`: the ledger's DynamoDB table. */
  ledgerTable: string;
  moesif: {
    /** `MOESIF_BASE_URI`. @default https://api.moesif.net */
    baseUri: string;
    /** `MOESIF_APPLICATION_ID`; a secret. */
    applicationId?: string;
    /** `MOESIF_APPLICATION_ID_PARAMETER`: SSM SecureString holding it (wins over the direct value). */
    applicationIdParameter?: string;
  };
  /** `STRIPE_BILLING`: `meters` makes the forwarder send Stripe meter events. @default moesif */
  stripeBilling: StripeBilling;
  stripe: {
    /** `STRIPE_API_KEY`; a secret. */
    apiKey?: string;
    /** `STRIPE_API_KEY_PARAMETER`: SSM SecureString holding it (wins over the direct value). */
    apiKeyParameter?: string;
    /** `STRIPE_API_BASE`, e.g. `http://127.0.0.1:12111`: a Stripe-compatible server instead of Stripe. */
    apiBase?: string;
    /** `STRIPE_METER_API`. @default v2 */
    api: StripeMeterApi;
  };
  /** `FORWARDER_SWEEP_GRACE_MS`: the sweep leaves younger items to the stream trigger. @default 60000 */
  sweepGraceMs: number;
  /** `FORWARDER_BATCH_SIZE`: most events per sink call (both sinks take at most 100). @default 100 */
  batchSize: number;
  /** `SINK_TIMEOUT_MS`: bound on one sink call. @default 10000 */
  sinkTimeoutMs: number;
  /** `LOG_LEVEL`. @default info */
  logLevel?: string;
  /** `CUSTOMERS_TABLE`: when set, the scheduled sweep also settles stale prepaid holds on it. */
  customersTable?: string;
  /** `CUSTOMERS_TIMEOUT_MS`: bound on one customers-table call. @default 1000 */
  customersTimeoutMs: number;
  /**
   * `HOLD_STALE_AFTER_MS`: a hold older than this belongs to a request that can no longer be running (infra sets
   * the function's timeout + 60 s). @default 360000
   */
  holdStaleAfterMs: number;
}

export class ForwarderConfigError extends Error {
  override name = "ForwarderConfigError";
}

export function loadForwarderConfig(env: NodeJS.ProcessEnv): ForwarderConfig {
  const problems: string[] = [];
  const integer = (name: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number => {
    const raw = env[name]?.trim();
    if (!raw) return fallback;
    const value = Number(raw);
    if (!Number.isInteger(value) || value < min || value > max) {
      problems.push(`${name} must be an integer from ${min} to ${max}, got "${raw}"`);
      return fallback;
    }
    return value;
  };
  const url = (name: string): string | undefined => {
    const raw = env[name]?.trim();
    if (!raw) return undefined;
    try {
      const parsed = new URL(raw);
      if (parsed.protocol !== "http:" && parsed.protocol !== "https:") throw new Error("not http(s)");
      return raw.replace(/\/+$/, "");
    } catch {
      problems.push(`${name} must be an http(s) URL, got "${raw}"`);
      return undefined;
    }
  };

  const ledgerTable = env.LEDGER_TABLE?.trim();
  if (!ledgerTable) problems.push("LEDGER_TABLE is not set");
  const stripeBilling = env.STRIPE_BILLING?.trim() || "moesif";
  if (stripeBilling !== "moesif" && stripeBilling !== "meters") problems.push(`STRIPE_BILLING must be "moesif" or "meters", got "${stripeBilling}"`);
  const api = env.STRIPE_METER_API?.trim() || "v2";
  if (api !== "v2" && api !== "v1") problems.push(`STRIPE_METER_API must be "v2" or "v1", got "${api}"`);

  const config: ForwarderConfig = {
    ledgerTable: ledgerTable ?? "",
    moesif: {
      baseUri: url("MOESIF_BASE_URI") ?? DEFAULT_MOESIF_BASE_URI,
      applicationId: env.MOESIF_APPLICATION_ID || undefined,
      applicationIdParameter: env.MOESIF_APPLICATION_ID_PARAMETER?.trim() || undefined,
    },
    stripeBilling: stripeBilling === "meters" ? "meters" : "moesif",
    stripe: {
      apiKey: env.STRIPE_API_KEY || undefined,
      apiKeyParameter: env.STRIPE_API_KEY_PARAMETER?.trim() || undefined,
      apiBase: url("STRIPE_API_BASE"),
      api: api === "v1" ? "v1" : "v2",
    },
    sweepGraceMs: integer("FORWARDER_SWEEP_GRACE_MS", 60_000, 0),
    // Moesif's batch endpoint and Stripe's meter event stream both take at most 100 events per call.
    batchSize: integer("FORWARDER_BATCH_SIZE", 100, 1, 100),
    sinkTimeoutMs: integer("SINK_TIMEOUT_MS", 10_000, 1),
    logLevel: env.LOG_LEVEL || undefined,
    customersTable: env.CUSTOMERS_TABLE?.trim() || undefined,
    customersTimeoutMs: integer("CUSTOMERS_TIMEOUT_MS", 1000, 1),
    holdStaleAfterMs: integer("HOLD_STALE_AFTER_MS", 360_000, 0),
  };
  // Problems name variables and the values of non-secret ones only.
  if (problems.length > 0) throw new ForwarderConfigError(`The usage forwarder is misconfigured: ${problems.join("; ")}`);
  return config;
}
