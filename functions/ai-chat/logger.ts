/**
 * Structured JSON log lines (one per call), the shape CloudWatch Logs Insights queries best.
 *
 * Every line passes through a `SecretRedactor`, which replaces any configured secret value (the upstream key, the
 * Moesif application id) in any spelling wherever it appears: a last line of defence, not the only one. Secrets
 * read from SSM are only known after the first request, so `secrets` may be a function, asked on every line.
 */
import { SecretRedactor } from "../shared/secret-redactor";

export type LogLevel = "debug" | "info" | "warn" | "error";

export interface Logger {
  debug(message: string, fields?: Record<string, unknown>): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export function createLogger(options: {
  level?: string;
  secrets?: ReadonlyArray<string | undefined> | (() => ReadonlyArray<string | undefined>);
  write?: (line: string) => void;
}): Logger {
  const threshold = LEVELS[(options.level as LogLevel) ?? "info"] ?? LEVELS.info;
  const source = options.secrets ?? [];
  let redactor = new SecretRedactor(typeof source === "function" ? source() : source);
  let known = "";
  const currentRedactor = (): SecretRedactor => {
    if (typeof source !== "function") return redactor;
    const secrets = source();
    const key = secrets.join("\u0000");
    if (key !== known) {
      redactor = new SecretRedactor(secrets);
      known = key;
    }
    return redactor;
  };
  const write = options.write ?? ((line: string) => process.stdout.write(line + "\n"));
  const emit = (level: LogLevel, message: string, fields?: Record<string, unknown>) => {
    if (LEVELS[level] < threshold) return;
    let line: string;
    try {
      line = JSON.stringify({ time: new Date().toISOString(), level, message, ...fields });
    } catch {
      line = JSON.stringify({ time: new Date().toISOString(), level, message, note: "fields were not serialisable" });
    }
    write(currentRedactor().redactText(line));
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
  };
}

/** Describes an unknown thrown value for a log line without its stack (stacks can carry request data). */
export function describeError(err: unknown): { name: string; message: string; code?: string } {
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    return { name: err.name, message: err.message, ...(typeof code === "string" ? { code } : {}) };
  }
  return { name: "NonError", message: String(err) };
}
