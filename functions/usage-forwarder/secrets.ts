/**
 * The forwarder's secrets (the Moesif application id, the Stripe API key): given directly in the environment (the
 * local stack, tests), or read from SSM Parameter Store SecureStrings named by `*_PARAMETER` (deployed stacks).
 *
 * Read on first use and cached for the container's life; a failed read is retried at most once per `retryAfterMs`.
 * A secret that cannot be read makes its sink unavailable (items stay pending), never an item failure.
 */
import { describeError, type Logger } from "../ai-chat/logger";
import type { ParameterReader } from "../ai-chat/secrets";

export type SecretName = "moesifApplicationId" | "stripeApiKey";

export interface SecretSourceOptions {
  direct: Partial<Record<SecretName, string>>;
  /** SSM parameter names; a named parameter wins over the direct value. */
  parameters: Partial<Record<SecretName, string>>;
  reader: ParameterReader;
  log: Logger;
  /** @default 5000 */
  retryAfterMs?: number;
  clock?: () => number;
}

export class SecretSource {
  private resolved?: Partial<Record<SecretName, string>>;
  private inflight?: Promise<void>;
  private nextAttemptAt = 0;
  private lastError?: string;

  constructor(private readonly options: SecretSourceOptions) {}

  /** Every secret value known so far (for the logger's redaction). */
  known(): string[] {
    const values = [...Object.values(this.options.direct), ...Object.values(this.resolved ?? {})];
    return values.filter((v): v is string => typeof v === "string" && v.length > 0);
  }

  /** Whether a secret is configured at all (directly or as a parameter). */
  configured(name: SecretName): boolean {
    return !!(this.options.parameters[name] || this.options.direct[name]);
  }

  /** The secret's value, or why it is not available now. */
  async get(name: SecretName): Promise<{ value: string } | { reason: string }> {
    const parameter = this.options.parameters[name];
    if (!parameter) {
      const value = this.options.direct[name];
      return value ? { value } : { reason: `${name} is not configured` };
    }
    if (!this.resolved) {
      const clock = this.options.clock ?? Date.now;
      if (!this.inflight && clock() >= this.nextAttemptAt) {
        this.inflight = this.load().finally(() => (this.inflight = undefined));
      }
      if (this.inflight) await this.inflight;
    }
    const value = this.resolved?.[name];
    return value ? { value } : { reason: `the SSM parameter ${parameter} could not be read${this.lastError ? ` (${this.lastError})` : ""}` };
  }

  private async load(): Promise<void> {
    const { parameters, reader, log } = this.options;
    const names = [...new Set(Object.values(parameters).filter((n): n is string => !!n))];
    try {
      const values = await reader.read(names);
      this.resolved = Object.fromEntries(Object.entries(parameters).filter(([, n]) => n).map(([secret, n]) => [secret, values[n as string]]));
      this.lastError = undefined;
      log.info("secrets_loaded", { parameters: names });
    } catch (err) {
      const retryAfterMs = this.options.retryAfterMs ?? 5000;
      this.nextAttemptAt = (this.options.clock ?? Date.now)() + retryAfterMs;
      this.lastError = describeError(err).message;
      log.error("secrets_unavailable", { parameters: names, error: describeError(err), retry_after_ms: retryAfterMs });
    }
  }
}
