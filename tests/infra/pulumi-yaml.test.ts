import { expect } from "chai";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";
import { OBJECT_KEYS, OPTIONAL_SECRET_KEYS, PLAIN_KEYS, SECRET_KEYS } from "../../infra/config";
import { parseStackConfig, PROJECT, REQUIRED_CONFIG_KEYS } from "../../infra/stack-config";

const ROOT = path.resolve(__dirname, "../..");
const readYaml = (file: string) => YAML.parse(fs.readFileSync(path.join(ROOT, file), "utf8"));

interface ConfigType {
  type?: string;
  default?: unknown;
  value?: unknown;
  secret?: boolean;
  description?: string;
}

const project = readYaml("Pulumi.yaml") as { name: string; main: string; runtime: { options: Record<string, unknown> }; config: Record<string, ConfigType> };
const devStack = (readYaml("Pulumi.dev.yaml") as { config: Record<string, unknown> }).config;

/**
 * The CLI's check before any `pulumi up` / `preview` / `destroy`, ported from pulumi/pulumi v3.248.0
 * sdk/go/common/workspace/config.go:306-317 (mergeConfig): a key of the project's namespace that the stack does not
 * set and that has neither `value` nor `default` is missing, and the CLI stops with "Stack '<stack>' is missing
 * configuration value(s) …".
 */
function missingConfigKeys(projectConfig: Record<string, ConfigType>, stackConfig: Record<string, unknown>): string[] {
  return Object.keys(projectConfig)
    .sort()
    .filter((key) => {
      const namespaced = key.includes(":") ? key : `${project.name}:${key}`;
      if (!namespaced.startsWith(`${project.name}:`)) return false;
      const declared = projectConfig[key];
      return !(namespaced in stackConfig) && declared.value === undefined && declared.default === undefined;
    });
}

/** Pulumi's type check of a `default:` (project.go ValidateConfigValue). */
function matchesType(type: string, value: unknown): boolean {
  if (type === "string") return typeof value === "string";
  if (type === "integer") return typeof value === "number" && Number.isInteger(value);
  if (type === "boolean") return typeof value === "boolean";
  return false;
}

describe("Pulumi.yaml (what the CLI checks before the program runs)", () => {
  it("gives every optional key a default: a key without one is required and documented as such, or set by the dev stack", () => {
    for (const key of missingConfigKeys(project.config, {})) {
      const documented = (REQUIRED_CONFIG_KEYS as readonly string[]).includes(key) && /Required/.test(project.config[key].description ?? "");
      expect(documented || `${PROJECT}:${key}` in devStack, `${key} has no default, is not a documented required key and the dev stack does not set it`).to.equal(true);
    }
  });

  it("requires exactly the two secrets, the webhook URL and the plans", () => {
    expect(missingConfigKeys(project.config, {})).to.deep.equal([...REQUIRED_CONFIG_KEYS].sort());
  });

  it("lets the dev stack run once the README's steps set the secrets and the webhook URL", () => {
    const afterReadme = { ...devStack, ...Object.fromEntries(REQUIRED_CONFIG_KEYS.map((key) => [`${PROJECT}:${key}`, "set"])) };
    expect(missingConfigKeys(project.config, afterReadme)).to.deep.equal([]);
    expect(missingConfigKeys(project.config, devStack)).to.deep.equal(["moesifApplicationId", "moesifStripeWebhookUrl", "upstreamApiKey"]);
  });

  it("declares every key the program reads, and no other", () => {
    expect(Object.keys(project.config).sort()).to.deep.equal([...PLAIN_KEYS, ...OBJECT_KEYS, ...SECRET_KEYS].sort());
  });

  it("leaves optional secrets undeclared (declared, one would be required or refused) and documents them in a comment", () => {
    const text = fs.readFileSync(path.join(ROOT, "Pulumi.yaml"), "utf8");
    for (const key of OPTIONAL_SECRET_KEYS) {
      expect(project.config, key).to.not.have.property(key);
      expect(text, key).to.match(new RegExp(`^#.*\\b${key}\\b`, "m"));
      expect(text, key).to.include(`pulumi config set --secret ${key}`);
    }
  });

  it("gives secrets no default (a default is stored unencrypted, which the CLI refuses for a secret key)", () => {
    for (const key of SECRET_KEYS) expect(project.config[key]).to.include({ secret: true }).and.not.have.property("default");
  });

  it("types every default as the CLI validates it", () => {
    for (const [key, declared] of Object.entries(project.config)) {
      if (declared.type !== undefined && declared.default !== undefined) expect(matchesType(declared.type, declared.default), key).to.equal(true);
    }
  });

  it("has the program's own defaults: applying Pulumi.yaml's defaults changes nothing", () => {
    const required = { plans: { starter: { rateLimit: 1, burstLimit: 1 } }, moesifStripeWebhookUrl: "https://example.com/hook" };
    const defaults = Object.fromEntries(Object.entries(project.config).filter(([, d]) => d.default !== undefined).map(([key, d]) => [key, d.default]));
    expect(Object.keys(defaults).length).to.equal(Object.keys(project.config).length - REQUIRED_CONFIG_KEYS.length);
    expect(parseStackConfig({ ...defaults, ...required }, { forDeploy: true })).to.deep.equal(parseStackConfig(required, { forDeploy: true }));
  });

  it("keeps Pulumi.dev.yaml usable by `npm start` (the local stack parses it with the program's rules)", () => {
    const values = Object.fromEntries(Object.entries(devStack).filter(([key]) => key.startsWith(`${PROJECT}:`)).map(([key, value]) => [key.slice(PROJECT.length + 1), value]));
    const config = parseStackConfig(values, { forDeploy: false });
    expect(config.plans.starter.prices!["gpt-4o-mini"]).to.deep.equal({ input: 150_000, cachedInput: 75_000, output: 600_000 });
    expect(config.plans.pro.prices!["o1-pro"]).to.deep.equal({ input: 150_000_000, output: 600_000_000 });
  });
});

describe("deploying after `npm ci --omit=dev`", () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8")) as { dependencies: Record<string, string>; devDependencies: Record<string, string> };
  // What `pulumi up` loads besides the program's imports: esbuild (bundle.ts), and for Pulumi's TypeScript runtime
  // typescript and ts-node (sdk/nodejs/tsutils.ts typeScriptRequireStrings: require("typescript") / ("ts-node"),
  // else the vendored typescript@3.8.3, which cannot parse this code) plus the types its type check loads.
  const runtimePackages = ["esbuild", "typescript", "ts-node", "@types/node"];

  it("lists esbuild, typescript, ts-node and @types/node as production dependencies", () => {
    for (const name of runtimePackages) {
      expect(pkg.dependencies, name).to.have.property(name);
      expect(pkg.devDependencies, name).to.not.have.property(name);
    }
  });

  it("type-checks the program with a tsconfig whose types are all production dependencies", () => {
    const tsconfigFile = project.runtime.options.tsconfig as string;
    expect(tsconfigFile).to.be.a("string");
    const tsconfig = JSON.parse(fs.readFileSync(path.join(ROOT, tsconfigFile), "utf8")) as { extends?: string; compilerOptions: { types: string[]; module: string } };
    // Pulumi spreads the file's compilerOptions over its defaults without following `extends`.
    expect(tsconfig).to.not.have.property("extends");
    expect(tsconfig.compilerOptions.module).to.equal("commonjs");
    for (const types of tsconfig.compilerOptions.types) expect(pkg.dependencies, `@types/${types}`).to.have.property(`@types/${types}`);
    execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "--noEmit", "-p", tsconfigFile], { cwd: ROOT, stdio: "pipe" });
  });

  it("installs them in the lockfile's production tree", () => {
    const tree = execFileSync("npm", ["ls", "--omit=dev", "--all", "--json"], { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
    const dependencies = (JSON.parse(tree) as { dependencies: Record<string, { dependencies?: Record<string, unknown> }> }).dependencies;
    for (const name of runtimePackages) expect(dependencies, name).to.have.property(name);
    expect(dependencies["ts-node"].dependencies ?? {}).to.have.property("acorn");
  });
});
