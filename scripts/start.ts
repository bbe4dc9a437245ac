/**
 * `npm start [-- --stack <name>]`: the whole metered API on this machine, no cloud account needed.
 * Prints the URLs, each customer's key and plan, a curl line and an OpenAI SDK snippet.
 */
import type { PlanConfig } from "../infra/stack-config";
import { LocalStackError, startLocalStack, type LocalStack } from "./local/stack";

function argValue(flag: string): string | undefined {
  const index = process.argv.indexOf(flag);
  return index >= 0 ? process.argv[index + 1] : undefined;
}

/** The models a plan serves: its list, else its priced models (a billing plan serves only those), else all. */
function planModels(plan: PlanConfig | undefined): string[] | undefined {
  return plan?.models ?? (plan?.prices ? Object.keys(plan.prices) : undefined);
}

function banner(stack: LocalStack, stackName: string): string {
  const { config, baseUrl, apiKeys } = stack;
  const [firstCustomer] = Object.keys(config.customers);
  const key = firstCustomer ? apiKeys[firstCustomer] : "<key>";
  const firstPlan = firstCustomer ? config.plans[config.customers[firstCustomer].plan] : undefined;
  const model = planModels(firstPlan)?.[0] ?? "gpt-4o-mini";
  const lines = [
    "",
    `metered-ai-api local stack (stack "${stackName}", ${stack.stackFile})`,
    "",
    `  API (stage ${config.stageName})  ${baseUrl}`,
    `    POST ${baseUrl}/ai-chat`,
    `    POST ${baseUrl}/v1/chat/completions`,
    `    GET  ${baseUrl}/v1/models`,
    `  upstream          ${stack.upstream ? `${stack.upstreamUrl} (built-in model server)` : stack.upstreamUrl}`,
    `  metering          ${stack.collector ? `${stack.collector.url} (built-in Moesif collector -> .local/usage.db; npm run usage)` : "Moesif (MOESIF_APPLICATION_ID is set)"}`,
    "",
    "  customers (keys kept in .local/api-keys.json):",
    ...Object.entries(config.customers).map(([id, c]) => {
      const plan = config.plans[c.plan];
      const quota = plan.quota ? `, quota ${plan.quota.limit}/${plan.quota.period}` : "";
      return `    ${id.padEnd(12)} ${apiKeys[id]}  plan ${c.plan} (${plan.rateLimit} req/s, burst ${plan.burstLimit}${quota}; models ${planModels(plan)?.join(", ") ?? "all"})`;
    }),
    "",
    "  try it:",
    `    curl -s ${baseUrl}/v1/chat/completions -H 'Authorization: Bearer ${key}' -H 'content-type: application/json' \\`,
    `      -d '{"model":"${model}","messages":[{"role":"user","content":"Hello!"}]}'`,
    "",
    "  streamed (add -N; the built-in model server paces words with a mock directive):",
    `    curl -sN ${baseUrl}/v1/chat/completions -H 'Authorization: Bearer ${key}' -H 'content-type: application/json' \\`,
    `      -d '{"model":"${model}","messages":[{"role":"user","content":"Hello!"}],"stream":true,"mock":{"words":20,"chunk_delay_ms":100}}'`,
    "",
    "  with the official OpenAI SDK (npm i openai):",
    `    const client = new OpenAI({ baseURL: "${baseUrl}/v1", apiKey: "${key}" });`,
    `    await client.chat.completions.create({ model: "${model}", messages: [{ role: "user", content: "Hello!" }] });`,
    "",
    "  Ctrl-C stops.",
    "",
  ];
  return lines.join("\n");
}

async function main(): Promise<void> {
  const stackName = argValue("--stack") ?? process.env.STACK ?? "dev";
  const port = process.env.PORT ? Number(process.env.PORT) : 3000;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new LocalStackError(`PORT must be a port number, got "${process.env.PORT}"`);
  const stack = await startLocalStack({
    stack: stackName,
    port,
    projectDir: argValue("--project-dir"),
    dataDir: argValue("--data-dir") ?? process.env.LOCAL_DATA_DIR,
  });
  process.stdout.write(banner(stack, stackName) + "\n");
  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    process.stdout.write(`\n${signal}: stopping the local stack\n`);
    await stack.stop();
    process.exit(0);
  };
  process.on("SIGINT", () => void shutdown("SIGINT"));
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
}

main().catch((err: unknown) => {
  const message = err instanceof LocalStackError ? err.message : `unexpected failure: ${(err as Error)?.message ?? String(err)}`;
  process.stderr.write(`npm start: ${message}\n`);
  process.exit(1);
});
