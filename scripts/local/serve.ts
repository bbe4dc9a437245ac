/**
 * Runs the built-in model server and an in-memory Moesif collector in their own process (for `npm run bench`,
 * so that they do not share an event loop with what is measured). Prints one JSON line with their URLs.
 */
import { MoesifCollector } from "./moesif-collector";
import { UpstreamServer } from "./upstream-server";

async function main(): Promise<void> {
  const upstream = await new UpstreamServer({ apiKey: process.env.UPSTREAM_API_KEY }).start();
  const collector = await new MoesifCollector({ applicationId: process.env.MOESIF_APPLICATION_ID }).start();
  process.stdout.write(JSON.stringify({ upstream: upstream.url, collector: collector.url }) + "\n");
  const stop = async () => {
    await upstream.stop();
    await collector.stop();
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop());
  process.on("SIGINT", () => void stop());
  process.on("disconnect", () => void stop());
}

void main();
