/**
 * `npm start [-- --stack <name>]`: the whole metered API on this machine, no cloud account needed.
 * Prints the URLs, each customer's key and plan, the Stripe webhook and its signing secret, prepaid balances, a curl
 * line and an OpenAI SDK snippet.
 */
import path from "node:path";
import type { CustomerAccount } from "../functions/shared/customer-port";
import { formatMicros } from "../functions/shared/pricing";
import type { PlanConfig } from "../infra/stack-config";
import { LOCAL_STRIPE_WEBHOOK_SECRET, LocalStackError, startLocalStack, type LocalStack } from "./local/stack";

function argValue(flag: string): string | undefined {
  const index = process.argv.indexOf(flag);
  return index >= 0 ? process.argv[index + 1] : undefined;
}

/** The models a plan serves: its list, else its priced models (a billing plan serves only those), else all. */
function planModels(plan: PlanConfig | undefined): string[] | undefined {
  return plan?.models ?? (plan?.prices ? Object.keys(plan.prices) : undefined);
}

/** A path as short as it reads unambiguously: relative to the working directory when inside it. */
function shortPath(file: string): string {
  const relative = path.relative(process.cwd(), file);
  return relative && !relative.startsWith("..") && !path.isAbsolute(relative) ? relative : file;
}

/** The sinks the forwarder delivers to, one line each. Keys are never printed (a local key only by its prefix). */
function sinkLines(stack: LocalStack): string[] {
  const data = (file: string) => shortPath(path.join(stack.dataDir, file));
  const moesif = stack.collector ? `${stack.collector.url} (built-in Moesif collector -> ${data("usage.db")})` : "Moesif (MOESIF_APPLICATION_ID is set)";
  let stripe: string;
  if (stack.stripeBilling === "moesif") stripe = "off (STRIPE_BILLING=moesif: Moesif's billing meter reports to Stripe)";
  else if (stack.stripe) stripe = `${stack.stripe.url} (built-in Stripe meter event endpoint -> ${data("stripe.db")}, test key sk_test_…)`;
  else stripe = `${stack.stripeApiBase} (STRIPE_API_BASE, key from STRIPE_API_KEY)`;
  return [`  Moesif sink       ${moesif}`, `  Stripe sink       ${stripe}`];
}

/**
 * The webhook's signing secret as the banner shows it: the local default in full (it is in the source; a test signs
 * with it), one from STRIPE_WEBHOOK_SECRET (what `stripe listen` printed) only by its end.
 */
function secretLine(secret: string): string {
  if (secret === LOCAL_STRIPE_WEBHOOK_SECRET) return `${secret} (the local default; set STRIPE_WEBHOOK_SECRET to the one stripe listen prints)`;
  return `whsec_…${secret.slice(-4)} (from STRIPE_WEBHOOK_SECRET)`;
}

/** One line per customer on a prepaid plan: balance and reservations, or why they could not be read. */
function balanceLines(stack: LocalStack, accounts: CustomerAccount[] | Error): string[] {
  const { config } = stack;
  const prepaid = Object.entries(config.customers).filter(([, c]) => config.plans[c.plan].billing === "prepaid");
  if (prepaid.length === 0) return ["  prepaid balances  none (no customer is on a prepaid plan)"];
  if (accounts instanceof Error) return [`  prepaid balances  unreadable: ${accounts.message}`];
  return prepaid.map(([id, c], i) => {
    const account = accounts.find((a) => a.customer.customerId === id)?.balance;
    const currency = account?.currency ?? config.plans[c.plan].currency ?? "";
    const balance = formatMicros(account?.balanceMicros ?? 0);
    const reserved = account?.reservedMicros ? `, ${formatMicros(account.reservedMicros)} reserved` : "";
    return `  ${i === 0 ? "prepaid balances" : "                "}  ${id.padEnd(12)} ${balance} ${currency}${reserved}`;
  });
}

function banner(stack: LocalStack, stackName: string, accounts: CustomerAccount[] | Error): string {
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
    `    GET  ${baseUrl}/v1/models        (and /v1/models/{model})`,
    `    POST ${baseUrl}/v1/responses     (and GET/DELETE /v1/responses/{id}, /input_items, /cancel: the creator's only)`,
    `    POST ${baseUrl}/v1/embeddings`,
    `    GET  ${baseUrl}/v1/usage      (the caller's plan, balance and this period's usage)`,
    `  Stripe webhook    POST ${stack.stripeWebhook.url}  (no API key: Stripe's signature; stripe listen --forward-to it)`,
    `    signing secret  ${secretLine(stack.stripeWebhook.secret)}`,
    `  upstream          ${stack.upstream ? `${stack.upstreamUrl} (built-in model server)` : stack.upstreamUrl}`,
    `  usage ledger      ${stack.ledger.endpoint} (dynalite, table ${stack.ledger.table}, ${shortPath(path.join(stack.dataDir, "ledger"))}; npm run usage)`,
    `  forwarder         every ${stack.forwarderIntervalMs} ms, ledger -> ${stack.stripeBilling === "meters" ? "Moesif + Stripe meter events" : "Moesif"}`,
    ...sinkLines(stack),
    "  reconcile         npm run reconcile  (ledger totals vs what each sink acknowledged; -- --json)",
    // Served by the gateway itself (a local page: no API key), so it shares the API's port, on loopback only.
    `  dashboard         ${new URL(baseUrl).origin}/_dashboard/  (tokens and cost per customer, quota, balances, delivery health; JSON at /_dashboard/api/summary)`,
    `  customers table   ${stack.customers.table} (same dynalite: keys, balances, usage counters)`,
    ...balanceLines(stack, accounts),
    // The credits command reads Pulumi.<STACK or dev>.yaml for the plans' currencies, as npm start does.
    `  top up            ${stackName === "dev" ? "" : `STACK=${stackName} `}npm run credits -- add <customer> <amount>  (npm run credits lists balances; -- --json)`,
    "",
    `  customers (keys kept in ${shortPath(path.join(stack.dataDir, "api-keys.json"))}):`,
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
  // The AWS SDK (the ledger's client) warns on Node 20 about its future Node 22 floor: noise for a local run.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  const stackName = argValue("--stack") ?? process.env.STACK ?? "dev";
  const port = process.env.PORT ? Number(process.env.PORT) : 3000;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new LocalStackError(`PORT must be a port number, got "${process.env.PORT}"`);
  const stack = await startLocalStack({
    stack: stackName,
    port,
    projectDir: argValue("--project-dir"),
    dataDir: argValue("--data-dir") ?? process.env.LOCAL_DATA_DIR,
  });
  const accounts = await stack.customers.store.listAccounts().catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
  process.stdout.write(banner(stack, stackName, accounts) + "\n");
  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    process.stdout.write(`\n${signal}: stopping the local stack\n`);
    try {
      await stack.stop();
    } catch (err) {
      process.stderr.write(`npm start: stopping failed: ${(err as Error)?.message ?? String(err)}\n`);
      process.exit(1);
    }
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
