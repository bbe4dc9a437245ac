/**
 * The service's secrets (the upstream key, the Moesif application id): given directly in the environment (the local
 * stack, tests), or read from SSM Parameter Store SecureStrings named by `*_PARAMETER` variables (deployed stacks),
 * so that no secret sits in the function's configuration in plain text.
 *
 * Parameters are read on the first request, not at cold start, so that a missing permission or parameter answers a
 * clear 500 (and a log line) instead of failing the initialisation; they are cached for the container's life. A
 * failed read is retried by a later request, at most once per `retryAfterMs`, so an SSM outage costs one call per
 * few seconds rather than one per request.
 */
import { ConfigurationError } from "./errors";
import type { SecretParameters } from "./config";
import { describeError, type Logger } from "./logger";
import type { UsageMeter, UsageRecord } from "./metering";

export interface ServiceSecrets {
  upstreamApiKey?: string;
  moesifApplicationId?: string;
  /** Signing secret of the Stripe webhook endpoint that credits prepaid balances (`whsec_…`). */
  stripeWebhookSecret?: string;
}

/** Every secret the service knows of: the logger, the redactors and the parameter reader go through this list. */
export const SECRET_NAMES = ["upstreamApiKey", "moesifApplicationId", "stripeWebhookSecret"] as const satisfies ReadonlyArray<keyof ServiceSecrets>;

/** Narrow port: the core resolves secrets before it calls the upstream; clients read the resolved values. */
export interface SecretsPort {
  /** The secrets, read once and cached. Rejects with `ConfigurationError` when they cannot be read right now. */
  resolve(): Promise<ServiceSecrets>;
  /** What is known so far: direct values at once, parameter values after a successful `resolve`. */
  current(): ServiceSecrets;
}

/** Secrets given directly. */
export class StaticSecrets implements SecretsPort {
  constructor(private readonly secrets: ServiceSecrets) {}
  async resolve(): Promise<ServiceSecrets> {
    return this.secrets;
  }
  current(): ServiceSecrets {
    return this.secrets;
  }
}

/** Reads parameter values by name. Throws, with a reason that holds no value, when any cannot be read. */
export interface ParameterReader {
  read(names: string[]): Promise<Record<string, string>>;
}

export interface ParameterStoreSecretsOptions {
  direct: ServiceSecrets;
  parameters: SecretParameters;
  reader: ParameterReader;
  log: Logger;
  /** @default 5000 */
  retryAfterMs?: number;
  clock?: () => number;
}

/** Secrets from SSM Parameter Store (a parameter, when named, wins over the direct value). */
export class ParameterStoreSecrets implements SecretsPort {
  private resolved?: ServiceSecrets;
  private inflight?: Promise<ServiceSecrets>;
  private nextAttemptAt = 0;
  private readonly clock: () => number;

  constructor(private readonly options: ParameterStoreSecretsOptions) {
    this.clock = options.clock ?? Date.now;
  }

  current(): ServiceSecrets {
    if (this.resolved) return this.resolved;
    const { direct, parameters } = this.options;
    const known: ServiceSecrets = {};
    for (const name of SECRET_NAMES) known[name] = parameters[name] ? undefined : direct[name];
    return known;
  }

  async resolve(): Promise<ServiceSecrets> {
    if (this.resolved) return this.resolved;
    if (this.inflight) return this.inflight;
    if (this.clock() < this.nextAttemptAt) throw unavailable();
    this.inflight = this.load().finally(() => {
      this.inflight = undefined;
    });
    return this.inflight;
  }

  private async load(): Promise<ServiceSecrets> {
    const { parameters, reader, log } = this.options;
    const names = SECRET_NAMES.map((name) => parameters[name]).filter((n): n is string => !!n);
    let values: Record<string, string>;
    try {
      values = await reader.read([...new Set(names)]);
    } catch (err) {
      const retryAfterMs = this.options.retryAfterMs ?? 5000;
      this.nextAttemptAt = this.clock() + retryAfterMs;
      log.error("secrets_unavailable", { parameters: names, error: describeError(err), retry_after_ms: retryAfterMs });
      throw unavailable();
    }
    const current = this.current();
    const resolved: ServiceSecrets = {};
    for (const name of SECRET_NAMES) {
      const parameter = parameters[name];
      resolved[name] = parameter ? values[parameter] : current[name];
    }
    this.resolved = resolved;
    log.info("secrets_loaded", { parameters: names });
    return this.resolved;
  }
}

function unavailable(): ConfigurationError {
  return new ConfigurationError("The service cannot read its credentials right now; its operator can see why in the function's logs.");
}

export interface SsmReaderOptions {
  region?: string;
  /** e.g. a local SSM-compatible server; default: the regional endpoint. */
  endpoint?: string;
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Bound on one read, retries included. @default 3000 */
  timeoutMs?: number;
}

type SsmModule = typeof import("@aws-sdk/client-ssm");

/**
 * `GetParameters` with decryption, through the AWS SDK. The SDK is required on first use, so cold starts of a
 * function configured without parameters never load it.
 */
export class SsmParameterReader implements ParameterReader {
  private client?: InstanceType<SsmModule["SSMClient"]>;

  constructor(private readonly options: SsmReaderOptions = {}) {}

  async read(names: string[]): Promise<Record<string, string>> {
    const { SSMClient, GetParametersCommand } = require("@aws-sdk/client-ssm") as SsmModule;
    const timeoutMs = this.options.timeoutMs ?? 3000;
    this.client ??= new SSMClient({
      region: this.options.region,
      ...(this.options.endpoint ? { endpoint: this.options.endpoint } : {}),
      ...(this.options.credentials ? { credentials: this.options.credentials } : {}),
      maxAttempts: 2,
      requestHandler: { connectionTimeout: Math.min(1000, timeoutMs), requestTimeout: timeoutMs },
    });
    const output = await this.client.send(new GetParametersCommand({ Names: names, WithDecryption: true }), {
      abortSignal: AbortSignal.timeout(timeoutMs),
    });
    const invalid = output.InvalidParameters ?? [];
    if (invalid.length > 0) throw new Error(`SSM has no parameter named ${invalid.join(", ")} (or this function may not read it)`);
    const values: Record<string, string> = {};
    for (const parameter of output.Parameters ?? []) if (parameter.Name && typeof parameter.Value === "string") values[parameter.Name] = parameter.Value;
    const missing = names.filter((name) => !values[name]);
    if (missing.length > 0) throw new Error(`SSM returned no value for ${missing.join(", ")}`);
    return values;
  }
}

/**
 * A meter built once the Moesif application id is known (it may come from SSM). A record that arrives first (a 403
 * answered before the core needed any secret) resolves the secrets itself; a record that still finds no id (SSM is
 * failing) is logged and dropped — it belongs to a request that produced no completion and bills nothing.
 */
export class DeferredMeter implements UsageMeter {
  private meter?: UsageMeter;

  constructor(
    private readonly secrets: SecretsPort,
    private readonly build: (applicationId: string) => UsageMeter,
    private readonly log: Logger,
  ) {}

  async record(record: UsageRecord): Promise<void> {
    let applicationId = this.secrets.current().moesifApplicationId;
    if (!applicationId) {
      try {
        applicationId = (await this.secrets.resolve()).moesifApplicationId;
      } catch {
        // The secrets port has logged why; the record is skipped below.
      }
    }
    if (!applicationId) {
      this.log.warn("metering_skipped", { request_id: record.requestId, status: record.status, reason: "the Moesif application id could not be read" });
      return;
    }
    this.meter ??= this.build(applicationId);
    return this.meter.record(record);
  }
}
