/**
 * The usage dashboard over HTTP: everything under `/_dashboard` (the page, its script and style, Chart.js from
 * `node_modules`, and `GET /_dashboard/api/summary`). One handler serves both `npm start` (mounted on the local
 * gateway as a local page, before the API routes and without an API key) and `npm run dashboard` (its own server).
 *
 * Loopback only, no external request: the page loads nothing but these paths (its Content-Security-Policy says
 * `default-src 'self'`, so the browser itself refuses anything else), and requests whose Host header is not a
 * loopback name are refused, so a web page elsewhere cannot read the summary through DNS rebinding.
 */
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { BUCKETS, readSummary, type Bucket, type DashboardLimits, type DashboardSource, type DashboardSummary } from "./data";

/** Where the dashboard lives on whichever server mounts it. */
export const DASHBOARD_PREFIX = "/_dashboard";

/** A request handler for everything under `DASHBOARD_PREFIX`. */
export type DashboardHandler = (req: http.IncomingMessage, res: http.ServerResponse) => Promise<void>;

export interface DashboardHandlerOptions {
  /** Bounds on one refresh's reads. @default DEFAULT_LIMITS (7 days, 10,000 items) */
  limits?: Partial<DashboardLimits>;
  /**
   * A summary younger than this is served again instead of re-reading the tables, so several open tabs (or a page
   * refreshing every 5 s against a large deployed table) cost one read per interval. @default 2000
   */
  minRefreshMs?: number;
  /** How often the page asks for a new summary. @default 5000 */
  pageRefreshMs?: number;
  clock?: () => number;
}

const PAGE_DIR = path.join(__dirname, "page");
/**
 * Chart.js's UMD build from the installed package (chart.js 4 exports neither `package.json` nor `dist/*`, so the
 * file is found next to its CommonJS entry, node_modules/chart.js/dist/chart.cjs).
 */
const CHART_JS = path.join(path.dirname(require.resolve("chart.js")), "chart.umd.min.js");

const STATIC: Record<string, { file: string; type: string }> = {
  "/": { file: path.join(PAGE_DIR, "index.html"), type: "text/html; charset=utf-8" },
  "/app.js": { file: path.join(PAGE_DIR, "app.js"), type: "text/javascript; charset=utf-8" },
  "/app.css": { file: path.join(PAGE_DIR, "app.css"), type: "text/css; charset=utf-8" },
  "/vendor/chart.umd.min.js": { file: CHART_JS, type: "text/javascript; charset=utf-8" },
};

/**
 * Nothing but this origin: scripts, styles, images and fetches. Chart.js sets canvas sizes through the CSSOM, which
 * `style-src` does not govern, so no `'unsafe-inline'` is needed.
 */
const SECURITY_HEADERS = {
  "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "Cache-Control": "no-store",
};

/** Host names a loopback request carries (anything else is a rebinding attempt or a misdirected request). */
const LOOPBACK_HOSTS = new Set(["127.0.0.1", "localhost", "[::1]"]);

function hostOf(header: string | undefined): string | undefined {
  if (!header) return undefined;
  return header.startsWith("[") ? header.slice(0, header.indexOf("]") + 1) : header.split(":")[0];
}

/** Errors in the API's one shape (`{"error":{"message","type","param","code"}}`). */
function sendError(res: http.ServerResponse, status: number, message: string, code: string): void {
  const text = JSON.stringify({ error: { message, type: status >= 500 ? "server_error" : "invalid_request_error", param: null, code } });
  res.writeHead(status, { ...SECURITY_HEADERS, "Content-Type": "application/json", "Content-Length": String(Buffer.byteLength(text)) });
  res.end(text);
}

function send(res: http.ServerResponse, req: http.IncomingMessage, type: string, body: Buffer | string): void {
  res.writeHead(200, { ...SECURITY_HEADERS, "Content-Type": type, "Content-Length": String(Buffer.byteLength(body)) });
  res.end(req.method === "HEAD" ? undefined : body);
}

/** The page's settings, given to it in the HTML (a `data-` attribute: no inline script under this CSP). */
function pageHtml(template: string, options: { refreshMs: number }): string {
  return template.replace("{{REFRESH_MS}}", String(options.refreshMs));
}

/**
 * The dashboard's handler for `source`. It answers every path under `/_dashboard` (404 for unknown ones) and must
 * only be given such requests. Summaries are cached per bucket for `minRefreshMs`, and concurrent requests share one
 * read. A read that fails answers 503 with the reason (table names and AWS error names, never a secret).
 */
export function createDashboardHandler(source: DashboardSource, options: DashboardHandlerOptions = {}): DashboardHandler {
  const clock = options.clock ?? Date.now;
  const minRefreshMs = options.minRefreshMs ?? 2000;
  const refreshMs = options.pageRefreshMs ?? 5000;
  const cache = new Map<Bucket, { at: number; summary: Promise<DashboardSummary> }>();

  const summaryFor = (bucket: Bucket): Promise<DashboardSummary> => {
    const now = clock();
    const hit = cache.get(bucket);
    if (hit && now - hit.at < minRefreshMs) return hit.summary;
    const summary = readSummary(source, bucket, { now, limits: options.limits });
    cache.set(bucket, { at: now, summary });
    // A failed read is not cached: the next request tries again.
    summary.catch(() => {
      if (cache.get(bucket)?.summary === summary) cache.delete(bucket);
    });
    return summary;
  };

  return async (req, res) => {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    if (!url.pathname.startsWith(DASHBOARD_PREFIX)) return sendError(res, 404, `Not found: ${url.pathname}`, "not_found");
    if (!LOOPBACK_HOSTS.has(hostOf(req.headers.host) ?? "")) return sendError(res, 403, "The dashboard answers loopback requests only (Host must be 127.0.0.1 or localhost).", "not_loopback");
    if (req.method !== "GET" && req.method !== "HEAD") return sendError(res, 405, `Method ${req.method} is not allowed here; the dashboard is read-only.`, "method_not_allowed");
    const rest = url.pathname.slice(DASHBOARD_PREFIX.length);
    if (rest === "") {
      res.writeHead(308, { ...SECURITY_HEADERS, Location: `${DASHBOARD_PREFIX}/` });
      res.end();
      return;
    }
    if (rest === "/api/summary") {
      const bucket = (url.searchParams.get("bucket") ?? "hour") as Bucket;
      if (!BUCKETS.includes(bucket)) return sendError(res, 400, `bucket must be one of ${BUCKETS.join(", ")}`, "invalid_bucket");
      let summary: DashboardSummary;
      try {
        summary = await summaryFor(bucket);
      } catch (err) {
        const e = err as Error;
        return sendError(res, 503, `The dashboard could not read the tables (${source.description}): ${e.name}: ${e.message}`, "tables_unavailable");
      }
      return send(res, req, "application/json", JSON.stringify(summary));
    }
    const asset = Object.prototype.hasOwnProperty.call(STATIC, rest) ? STATIC[rest] : undefined;
    if (!asset) return sendError(res, 404, `Not found: ${url.pathname}`, "not_found");
    let body: Buffer | string;
    try {
      body = await fs.promises.readFile(asset.file);
    } catch {
      return sendError(res, 500, `The dashboard's file ${path.basename(asset.file)} is missing (is chart.js installed? npm ci)`, "asset_missing");
    }
    if (rest === "/") body = pageHtml(body.toString("utf8"), { refreshMs });
    send(res, req, asset.type, body);
  };
}

/** The dashboard as one of the local gateway's local pages (`GatewayOptions.localPages`). */
export function dashboardPage(source: DashboardSource, options: DashboardHandlerOptions = {}): { prefix: string; handler: DashboardHandler } {
  return { prefix: DASHBOARD_PREFIX, handler: createDashboardHandler(source, options) };
}

/** A server on 127.0.0.1 serving only the dashboard (`npm run dashboard`, and the tests). */
export interface DashboardServer {
  /** `http://127.0.0.1:<port>/_dashboard/` */
  url: string;
  port: number;
  stop(): Promise<void>;
}

/** Serves `handler` on 127.0.0.1:`port` (0 picks a free one); `/` redirects to the page. */
export async function startDashboardServer(handler: DashboardHandler, port = 0): Promise<DashboardServer> {
  const server = http.createServer((req, res) => {
    const pathname = (req.url ?? "/").split("?")[0];
    if (pathname === "/") {
      res.writeHead(302, { Location: `${DASHBOARD_PREFIX}/` });
      res.end();
      return;
    }
    if (pathname === "/favicon.ico") {
      res.writeHead(204);
      res.end();
      return;
    }
    handler(req, res).catch(() => {
      if (!res.headersSent) sendError(res, 500, "The dashboard failed to answer.", "internal_error");
      else res.destroy();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    // Loopback only: the page shows every customer's usage and is served without a key.
    server.listen(port, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const bound = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${bound}${DASHBOARD_PREFIX}/`,
    port: bound,
    stop: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
