/**
 * A suite-wide record of everything the system under test emitted (responses, log lines, metering payloads,
 * stack outputs) and of every secret the tests used. `tests/security-scan.last.ts`, which mocha runs after every
 * other file, scans the one against the other.
 */
const outputs: Array<{ source: string; text: string }> = [];
const secrets = new Set<string>();

export function recordForScan(source: string, texts: Iterable<string>): void {
  for (const text of texts) outputs.push({ source, text });
}

export function registerSecret(...values: Array<string | undefined>): void {
  for (const value of values) if (value && value.length >= 8) secrets.add(value);
}

export function scanForSecrets(): { outputs: number; secrets: number; hits: string[] } {
  const hits: string[] = [];
  for (const { source, text } of outputs) {
    for (const secret of secrets) if (text.includes(secret)) hits.push(`${source} contains ${secret.slice(0, 6)}…`);
  }
  return { outputs: outputs.length, secrets: secrets.size, hits };
}
