import fs from "node:fs";
import path from "node:path";
import { buildSync } from "esbuild";

/** Tokenizer ranks (megabytes of data) ship beside the bundle and load only when a usage estimate is needed. */
const LAZY_RANKS = ["o200k_base", "cl100k_base"] as const;

export interface BundleOptions {
  /** Extra files written next to `index.js` after bundling (e.g. `plans.json`): name → content. */
  files?: Record<string, string>;
  /** Copy the tokenizer ranks (megabytes) the ai-chat function loads lazily. @default true */
  tokenizerRanks?: boolean;
}

export interface BundleResult {
  /** Directory holding `index.js` and its lazily loaded data: what the Lambda archive contains. */
  outdir: string;
  /** Path of the bundled handler module. */
  entry: string;
}

/**
 * Bundles a function's `index.ts` with esbuild into `outdir` (minified CommonJS for nodejs22.x).
 * Runs inside the Pulumi program so that `pulumi up` alone builds what it deploys.
 *
 * `@aws-sdk/*` stays out of the bundle: "Runtime versions nodejs18.x and later include version 3 of the SDK ... you
 * don't need to include the SDK library in your .zip file" (https://docs.aws.amazon.com/lambda/latest/dg/nodejs-package.html).
 * Bundling @aws-sdk/client-ssm would add 632 kB (175 kB zipped) to a 295 kB bundle for one GetParameters call.
 */
export function bundleFunction(entryTs: string, outdir: string, options: BundleOptions = {}): BundleResult {
  fs.rmSync(outdir, { recursive: true, force: true });
  fs.mkdirSync(outdir, { recursive: true });
  const entry = path.join(outdir, "index.js");
  buildSync({
    entryPoints: [entryTs],
    outfile: entry,
    bundle: true,
    platform: "node",
    target: "node22",
    format: "cjs",
    minify: true,
    sourcemap: false,
    legalComments: "none",
    external: ["@aws-sdk/*", ...LAZY_RANKS.map((name) => `js-tiktoken/ranks/${name}`)],
    logLevel: "error",
  });
  if (options.tokenizerRanks !== false) copyRanks(outdir);
  for (const [name, content] of Object.entries(options.files ?? {})) {
    if (name.includes("/") || name.includes("\\") || name.startsWith(".")) throw new Error(`bundle file names are plain names (got ${name})`);
    fs.writeFileSync(path.join(outdir, name), content);
  }
  return { outdir, entry };
}

function copyRanks(outdir: string): void {
  // The package's exports map hides package.json, so find its root from a rank file (dist/ranks/<name>.cjs).
  const pkgDir = path.resolve(path.dirname(require.resolve("js-tiktoken/ranks/o200k_base")), "..", "..");
  const pkgJson = path.join(pkgDir, "package.json");
  const target = path.join(outdir, "node_modules", "js-tiktoken");
  fs.mkdirSync(path.join(target, "dist", "ranks"), { recursive: true });
  fs.copyFileSync(pkgJson, path.join(target, "package.json"));
  for (const name of LAZY_RANKS) {
    fs.copyFileSync(path.join(pkgDir, "dist", "ranks", `${name}.cjs`), path.join(target, "dist", "ranks", `${name}.cjs`));
  }
}
