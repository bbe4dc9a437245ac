import { expect } from "chai";
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { CustomerStoreError, type CustomerStore } from "../../functions/shared/customer-port";
import { keyItem } from "../../functions/shared/customer-schema";
import { addCredits, CreditsError, parseAmountMicros, parseArgs } from "../../scripts/credits";
import { LedgerDb, syncKeyItems } from "../../scripts/local/ledger-db";
import { startLocalStack } from "../../scripts/local/stack";
import { tempProject, useLocalStack } from "../helpers/local-project";

const exec = promisify(execFile);
const ROOT = path.resolve(__dirname, "../..");
const TS_NODE = [path.join(ROOT, "node_modules/ts-node/dist/bin.js"), "--transpile-only"];
/** The command's view must not depend on the developer's shell: no AWS endpoint, region or profile of theirs. */
const CLEAN_ENV = { AWS_ENDPOINT_URL_DYNAMODB: "", AWS_ENDPOINT_URL: "", AWS_REGION: "", AWS_DEFAULT_REGION: "", AWS_PROFILE: "", LOCAL_DATA_DIR: "" };

/** A prepaid plan in dollars, one in yen, a postpaid priced plan and a free plan (no prices, no currency). */
const CREDITS_YAML = `
config:
  metered-ai-api:stageName: beta
  metered-ai-api:plans:
    credits:
      rateLimit: 1000
      burstLimit: 1000
      billing: prepaid
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    yen:
      rateLimit: 1000
      burstLimit: 1000
      billing: prepaid
      currency: jpy
      prices:
        gpt-4o-mini: { input: 20, output: 80 }
    metered:
      rateLimit: 1000
      burstLimit: 1000
      currency: usd
      prices:
        gpt-4o-mini: { input: 0.15, output: 0.6 }
    free:
      rateLimit: 1000
      burstLimit: 1000
  metered-ai-api:customers:
    initech: { plan: credits, stripeCustomerId: cus_initech }
    tanaka: { plan: yen }
    acme: { plan: metered, stripeCustomerId: cus_acme }
    hobby: { plan: free }
`;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `npm run credits -- <args>` as npm would; resolves with the exit code and output whatever the code. */
async function credits(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [...TS_NODE, path.join(ROOT, "scripts/credits.ts"), ...args], {
      cwd: ROOT,
      env: { ...process.env, ...CLEAN_ENV, STACK: "test", ...env },
      timeout: 60_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const failure = err as { code: number; stdout: string; stderr: string };
    return { code: failure.code, stdout: failure.stdout, stderr: failure.stderr };
  }
}

/** A failure as the command must report it: exit 1, one line on stderr, no stack trace, nothing on stdout. */
function expectOneLineFailure(run: Run, pattern: RegExp): void {
  expect(run.code, run.stderr).to.equal(1);
  const lines = run.stderr.trim().split("\n");
  expect(lines, run.stderr).to.have.length(1);
  expect(lines[0]).to.match(/^npm run credits: /);
  expect(lines[0]).to.match(pattern);
  expect(run.stdout).to.equal("");
}

interface JsonRow {
  customer: string;
  plan: string;
  currency: string | null;
  balance_micros: number;
  reserved_micros: number;
  billing: string | null;
}

describe("npm run credits: amounts", () => {
  it("parses decimal amounts exactly into micro-units, with a sign", () => {
    const cases: Array<[string, number]> = [
      ["5", 5_000_000],
      ["0.25", 250_000],
      ["0.000001", 1],
      ["12.340000", 12_340_000],
      ["-1.5", -1_500_000],
      ["+2", 2_000_000],
      ["0.1", 100_000],
      ["9007199254.740991", Number.MAX_SAFE_INTEGER],
    ];
    for (const [text, micros] of cases) expect(parseAmountMicros(text), text).to.equal(micros);
  });

  it("refuses amounts that are not exact decimals of at most six places, zero, or too large", () => {
    for (const text of ["", "abc", "1e3", "1,5", "1.5.2", ".5", "5.", "0", "-0.000", "0.0000001", "Infinity", "0x10", "9007199254.740992", "1 000"]) {
      expect(() => parseAmountMicros(text), text).to.throw(CreditsError);
    }
  });

  it("reads a negative amount as an amount, not an option, and refuses unknown options", () => {
    expect(parseArgs(["add", "acme", "-1", "--json"])).to.include({ json: true });
    expect(parseArgs(["add", "acme", "-1"]).positional).to.deep.equal(["add", "acme", "-1"]);
    expect(parseArgs(["--stack", "prod", "--data-dir", "/x"])).to.include({ stack: "prod", dataDir: "/x" });
    expect(() => parseArgs(["--force"])).to.throw(CreditsError, /unknown option --force/);
    expect(() => parseArgs(["--stack"])).to.throw(CreditsError, /--stack needs a value/);
  });
});

describe("npm run credits against a running npm start", function () {
  this.timeout(120_000);
  const local = useLocalStack("credits cli", {}, CREDITS_YAML);
  const run = (args: string[]) => credits([...args, "--project-dir", local.projectDir, "--data-dir", local.dataDir]);
  const balance = async (customer: string) => (await local.stack.customers.store.getBalance(customer)).balanceMicros;

  it("lists every customer with plan, billing, currency, balance and reserved", async () => {
    const result = await run([]);
    expect(result.code, result.stderr).to.equal(0);
    const lines = result.stdout.trimEnd().split("\n");
    expect(lines[0].split(/\s+/)).to.deep.equal(["customer", "plan", "billing", "currency", "balance", "reserved"]);
    expect(lines.slice(2).map((l) => l.split(/\s+/))).to.deep.equal([
      ["acme", "metered", "postpaid", "usd", "0.000000", "0.000000"],
      ["hobby", "free", "postpaid", "-", "0.000000", "0.000000"],
      ["initech", "credits", "prepaid", "usd", "0.000000", "0.000000"],
      ["tanaka", "yen", "prepaid", "jpy", "0.000000", "0.000000"],
    ]);
  });

  it("adds an exact decimal amount in the plan's currency, which the function spends at once", async () => {
    const added = await run(["add", "initech", "5"]);
    expect(added.code, added.stderr).to.equal(0);
    expect(added.stdout.trim()).to.match(/^initech: \+5\.000000 usd, balance now 5\.000000 usd \(credit cli:[0-9a-f-]{36}\)$/);
    expect((await run(["add", "initech", "0.000001"])).code).to.equal(0);
    expect(await balance("initech")).to.equal(5_000_001);

    // The running function reads the same table: a prepaid request is served from this balance.
    const response = await fetch(`${local.stack.baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": local.stack.apiKeys.initech },
      body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "spend" }] }),
    });
    expect(response.status, await response.clone().text()).to.equal(200);
  });

  it("credits a yen plan in yen (whole units are a million micro-units, as for every currency)", async () => {
    const added = await run(["add", "tanaka", "500", "--json"]);
    expect(added.code, added.stderr).to.equal(0);
    const result = JSON.parse(added.stdout) as Record<string, unknown>;
    expect(result).to.include({ customer: "tanaka", plan: "yen", currency: "jpy", amount_micros: 500_000_000, balance_micros: 500_000_000 });
    expect(result.credit_id).to.match(/^cli:[0-9a-f-]{36}$/);
  });

  it("prints --json as an array of {customer, plan, currency, balance_micros, reserved_micros, …}", async () => {
    const result = await run(["--json"]);
    expect(result.code, result.stderr).to.equal(0);
    const rows = JSON.parse(result.stdout) as JsonRow[];
    expect(rows.map((r) => r.customer)).to.deep.equal(["acme", "hobby", "initech", "tanaka"]);
    for (const row of rows) {
      expect(row).to.include.all.keys("customer", "plan", "currency", "balance_micros", "reserved_micros");
      expect(Number.isSafeInteger(row.balance_micros) && Number.isSafeInteger(row.reserved_micros)).to.equal(true);
    }
    const initech = rows.find((r) => r.customer === "initech")!;
    expect(initech).to.include({ plan: "credits", currency: "usd", billing: "prepaid", reserved_micros: 0 });
    // 5.000001 added, less what the served request cost (settled by now: the answer came back before this test).
    expect(initech.balance_micros).to.equal(await balance("initech"));
    expect(initech.balance_micros).to.be.within(1, 5_000_001);
    expect(rows.find((r) => r.customer === "hobby")).to.include({ currency: null, balance_micros: 0 });
  });

  it("takes credit away with a negative amount, but never below zero", async () => {
    const before = await balance("initech");
    const taken = await run(["add", "initech", "-1"]);
    expect(taken.code, taken.stderr).to.equal(0);
    expect(taken.stdout).to.match(/^initech: -1\.000000 usd, balance now /);
    expect(await balance("initech")).to.equal(before - 1_000_000);

    expectOneLineFailure(await run(["add", "initech", "-1000"]), /cannot take 1000\.000000 usd from "initech": the balance is \d+\.\d{6} usd.*never goes below zero/);
    expect(await balance("initech")).to.equal(before - 1_000_000);
  });

  it("refuses a bad amount before touching the table", async () => {
    const before = await balance("initech");
    // Every refused form is covered by the parser's own test above; here, that the command stops before writing.
    for (const amount of ["1e3", "0.0000001"]) {
      expectOneLineFailure(await run(["add", "initech", amount]), /amount/);
    }
    expect(await balance("initech")).to.equal(before);
  });

  it("refuses an unknown customer, naming the customers there are", async () => {
    expectOneLineFailure(await run(["add", "nobody", "5"]), /unknown customer "nobody": no API key item names it in the local customers table \(running npm start on .*\) \(customers: acme, hobby, initech, tanaka\)$/);
    expect(await balance("nobody")).to.equal(0);
  });

  it("refuses a customer whose plan has no currency (no prices)", async () => {
    expectOneLineFailure(await run(["add", "hobby", "5"]), /plan "free" has no currency/);
    expect(await balance("hobby")).to.equal(0);
  });

  it("refuses a malformed command line with its usage", async () => {
    expectOneLineFailure(await run(["add", "initech"]), /usage: npm run credits/);
    expectOneLineFailure(await run(["remove", "initech", "5"]), /unknown command "remove"/);
  });

  it("applies a credit once when a write that timed out after landing is tried again (one credit id per add)", async () => {
    const store = local.stack.customers.store;
    const before = await balance("acme");
    let calls = 0;
    // The first write lands, but its answer is lost (a timeout): the retry carries the same credit id.
    const flaky: CustomerStore = Object.assign(Object.create(store) as CustomerStore, {
      credit: async (args: Parameters<CustomerStore["credit"]>[0]) => {
        calls += 1;
        const result = await store.credit(args);
        if (calls === 1) throw new CustomerStoreError("the customers table did not answer within 10000 ms");
        return result;
      },
    });
    const result = await addCredits(flaky, local.stack.config.plans, "acme", "2.5");
    expect(calls).to.equal(2);
    expect(result.balance_micros).to.equal(before + 2_500_000);
    expect(await balance("acme")).to.equal(before + 2_500_000);

    // Replaying that credit id once more changes nothing either.
    const replay = await store.credit({ customerId: "acme", currency: "usd", creditId: result.credit_id, micros: 2_500_000, source: "cli", now: Date.now() });
    expect(replay).to.deep.include({ applied: false, reason: "duplicate" });
    expect(await balance("acme")).to.equal(before + 2_500_000);
  });
});

describe("npm run credits with no npm start running", function () {
  this.timeout(120_000);
  let project: ReturnType<typeof tempProject>;
  const run = (args: string[]) => credits([...args, "--project-dir", project.dir, "--data-dir", project.dataDir]);
  beforeEach(() => (project = tempProject(CREDITS_YAML)));
  afterEach(() => project.remove());

  it("adds and lists through a private dynalite on the stack's files, and npm start then sees the balance", async () => {
    // One start writes the customers' key items; then nothing runs.
    await (await startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env: {}, write: () => undefined })).stop();

    const added = await run(["add", "initech", "3.25"]);
    expect(added.code, added.stderr).to.equal(0);
    expect(added.stdout).to.match(/^initech: \+3\.250000 usd, balance now 3\.250000 usd/);
    const listed = await run(["--json"]);
    expect(listed.code, listed.stderr).to.equal(0);
    expect((JSON.parse(listed.stdout) as JsonRow[]).find((r) => r.customer === "initech")).to.include({ balance_micros: 3_250_000, reserved_micros: 0 });
    expectOneLineFailure(await run(["add", "nobody", "1"]), /unknown customer "nobody": no API key item names it in the local customers table \(private dynalite on /);

    // The private dynalite let go of LevelDB, and the balance is on disk.
    const stack = await startLocalStack({ stack: "test", projectDir: project.dir, dataDir: project.dataDir, port: 0, env: {}, write: () => undefined });
    try {
      expect(await stack.customers.store.getBalance("initech")).to.include({ balanceMicros: 3_250_000, currency: "usd" });
    } finally {
      await stack.stop();
    }
  });

  it("says to run npm start once when the data dir has no tables yet", async () => {
    expectOneLineFailure(await run(["add", "initech", "1"]), /no ledger yet: .* does not exist \(run npm start once: it writes the stack file's customers/);
    expect(fs.existsSync(path.join(project.dataDir, "ledger"))).to.equal(false);
  });

  it("says when the stack file cannot be read (STACK names the local one, as for npm start)", async () => {
    expectOneLineFailure(await credits(["--project-dir", project.dir, "--data-dir", project.dataDir], { STACK: "nosuch" }), /cannot read the stack config .*Pulumi\.nosuch\.yaml: ENOENT/);
  });
});

describe("npm run credits -- --stack <name>: a deployed stack's table", function () {
  this.timeout(120_000);
  let dir: string;
  let db: LedgerDb;
  let env: NodeJS.ProcessEnv;
  const run = (args: string[]) => credits([...args, "--project-dir", dir], env);

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "credits-aws-"));
    fs.writeFileSync(path.join(dir, "Pulumi.prod.yaml"), CREDITS_YAML);
    // dynalite stands in for DynamoDB, reached the way the SDK is told to (AWS_ENDPOINT_URL_DYNAMODB), with the table
    // and key items `pulumi up` would have made; a fake `pulumi` answers `stack output` as the CLI does.
    db = await LedgerDb.start(path.join(dir, "dynamo"));
    await syncKeyItems(db.endpoint, [keyItem("a1b2c3d4e5", "initech", { plan: "credits", stripeCustomerId: "cus_initech" }), keyItem("f6g7h8i9j0", "acme", { plan: "metered" })]);
    const bin = path.join(dir, "bin");
    fs.mkdirSync(bin);
    const outputs = JSON.stringify({ customersTableName: db.customersTable, customersTableArn: `arn:aws:dynamodb:eu-west-3:123456789012:table/${db.customersTable}`, ledgerTableName: "usage-ledger-x" });
    fs.writeFileSync(
      path.join(bin, "pulumi"),
      `#!/bin/sh\nif [ "$*" = "stack output --json --stack prod" ]; then echo '${outputs}'\nelif [ "$*" = "stack output --json --stack old" ]; then echo '{"invokeUrl":"https://x"}'\nelse echo "error: no stack named '$5' found" >&2; exit 255; fi\n`,
      { mode: 0o755 },
    );
    env = { PATH: `${bin}${path.delimiter}${process.env.PATH}`, AWS_ENDPOINT_URL_DYNAMODB: db.endpoint, AWS_ACCESS_KEY_ID: "AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY: "example-secret" };
  });
  after(async () => {
    await db?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("adds to and lists the table named by the stack's customersTableName output, in the stack file's currency", async () => {
    const added = await run(["add", "initech", "1.25", "--stack", "prod", "--json"]);
    expect(added.code, added.stderr).to.equal(0);
    expect(JSON.parse(added.stdout)).to.include({ customer: "initech", currency: "usd", amount_micros: 1_250_000, balance_micros: 1_250_000 });
    const listed = await run(["--stack", "prod", "--json"]);
    expect(listed.code, listed.stderr).to.equal(0);
    expect((JSON.parse(listed.stdout) as JsonRow[]).map((r) => [r.customer, r.plan, r.currency, r.balance_micros])).to.deep.equal([
      ["acme", "metered", "usd", 0],
      ["initech", "credits", "usd", 1_250_000],
    ]);
    // A postpaid customer may hold a balance (for a later move to prepaid); the command says it is not spent yet.
    const postpaid = await run(["add", "acme", "1", "--stack", "prod"]);
    expect(postpaid.code, postpaid.stderr).to.equal(0);
    expect(postpaid.stderr.trim()).to.equal('note: plan "metered" is postpaid: its requests are billed afterwards, and this balance is spent only once the plan is billing: prepaid');
    expectOneLineFailure(await run(["add", "tanaka", "1", "--stack", "prod"]), /unknown customer "tanaka": no API key item names it in table customers \(eu-west-3\) \(customers: acme, initech\)/);
  });

  it("says when the stack's outputs cannot be read, or have no customers table", async () => {
    expectOneLineFailure(await run(["--stack", "nosuch"]), /cannot read the outputs of stack nosuch \(pulumi stack output --json --stack nosuch\): error: no stack named 'nosuch' found/);
    expectOneLineFailure(await run(["--stack", "old"]), /stack old has no customersTableName output: run pulumi up with this version first/);
  });
});
