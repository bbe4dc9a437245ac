import { expect } from "chai";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { DescribeTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { GetCommand, PutCommand, QueryCommand, ScanCommand, UpdateCommand } from "@aws-sdk/lib-dynamodb";
import { CUSTOMERS_TABLE_SCHEMA, keyItem, LOCAL_CUSTOMERS_TABLE, STRIPE_CUSTOMER_INDEX } from "../../functions/shared/customer-schema";
import { dynamoClientOptions, LEDGER_TABLE_SCHEMA, LOCAL_LEDGER_TABLE, UNDELIVERED_INDEX } from "../../functions/shared/ledger-schema";
import { RESPONSE_OWNERS_TABLE_SCHEMA } from "../../functions/shared/response-owners";
import { LedgerDb, LOCAL_RESPONSES_TABLE, ledgerDir, ledgerLockFile, LocalLedgerError, openLocalLedger, readLockFile, syncKeyItems } from "../../scripts/local/ledger-db";

/** A port nothing listens on (bound, then released). */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** The pid of a process that has exited. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" });
  return Number(child.stdout);
}

describe("local usage ledger (dynalite under <dataDir>/ledger)", function () {
  this.timeout(60_000);
  let dataDir: string;
  beforeEach(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "ledger-db-"));
  });
  afterEach(() => fs.rmSync(dataDir, { recursive: true, force: true }));

  it("creates the table as the Pulumi program declares it: the transaction id key and the sparse undelivered index", async () => {
    const db = await LedgerDb.start(dataDir);
    const dynamo = new DynamoDBClient(dynamoClientOptions(db.env));
    try {
      const { Table } = await dynamo.send(new DescribeTableCommand({ TableName: LOCAL_LEDGER_TABLE }));
      expect(Table?.TableStatus).to.equal("ACTIVE");
      expect(Table?.KeySchema).to.deep.equal(LEDGER_TABLE_SCHEMA.keySchema);
      expect(Table?.BillingModeSummary?.BillingMode).to.equal("PAY_PER_REQUEST");
      const index = Table?.GlobalSecondaryIndexes?.find((i) => i.IndexName === UNDELIVERED_INDEX);
      expect(index?.KeySchema).to.deep.equal(LEDGER_TABLE_SCHEMA.globalSecondaryIndexes[0].KeySchema);
      expect(index?.Projection?.ProjectionType).to.equal("ALL");
    } finally {
      dynamo.destroy();
      await db.stop();
    }
  });

  it("creates the customers table beside it, as the Pulumi program declares it: the pk key and the stripe_customer index", async () => {
    const db = await LedgerDb.start(dataDir);
    const dynamo = new DynamoDBClient(dynamoClientOptions(db.env));
    try {
      const { Table } = await dynamo.send(new DescribeTableCommand({ TableName: LOCAL_CUSTOMERS_TABLE }));
      expect(Table?.TableStatus).to.equal("ACTIVE");
      expect(Table?.KeySchema).to.deep.equal(CUSTOMERS_TABLE_SCHEMA.keySchema);
      const index = Table?.GlobalSecondaryIndexes?.find((i) => i.IndexName === STRIPE_CUSTOMER_INDEX);
      expect(index?.KeySchema).to.deep.equal(CUSTOMERS_TABLE_SCHEMA.globalSecondaryIndexes[0].KeySchema);
      expect(index?.Projection?.ProjectionType).to.equal("ALL");
      expect(db.customersEnv).to.include({ CUSTOMERS_TABLE: LOCAL_CUSTOMERS_TABLE, AWS_ENDPOINT_URL_DYNAMODB: db.endpoint });
    } finally {
      dynamo.destroy();
      await db.stop();
    }
  });

  it("creates the stored responses' owners table beside them, as the contract declares it (response_id key, no index)", async () => {
    const db = await LedgerDb.start(dataDir);
    const dynamo = new DynamoDBClient(dynamoClientOptions(db.env));
    try {
      const { Table } = await dynamo.send(new DescribeTableCommand({ TableName: LOCAL_RESPONSES_TABLE }));
      expect(Table?.TableStatus).to.equal("ACTIVE");
      expect(Table?.KeySchema).to.deep.equal(RESPONSE_OWNERS_TABLE_SCHEMA.keySchema);
      expect(Table?.AttributeDefinitions).to.deep.equal(RESPONSE_OWNERS_TABLE_SCHEMA.attributeDefinitions);
      expect(Table?.GlobalSecondaryIndexes).to.equal(undefined);
      expect(db.responsesTable).to.equal(LOCAL_RESPONSES_TABLE);
    } finally {
      dynamo.destroy();
      await db.stop();
    }
  });

  it("makes the key items exactly the stack's: writes each, deletes the others, never touches an account", async () => {
    const ledger = await openLocalLedger(dataDir, { create: true });
    const table = ledger.customersTable;
    const get = async (pk: string) => (await ledger.doc.send(new GetCommand({ TableName: table, Key: { pk } }))).Item;
    const byStripe = async (id: string) =>
      (await ledger.doc.send(new QueryCommand({ TableName: table, IndexName: STRIPE_CUSTOMER_INDEX, KeyConditionExpression: "stripe_customer_id = :s", ExpressionAttributeValues: { ":s": id } }))).Items?.map((i) => i.pk);
    try {
      const account = { pk: "account#b", customer_id: "b", currency: "usd", balance_micros: 5_000_000, reserved_micros: 0, holds: {}, credits: {} };
      await ledger.doc.send(new PutCommand({ TableName: table, Item: account }));
      const first = await syncKeyItems(ledger.endpoint, [keyItem("key-a", "a", { plan: "starter", stripeCustomerId: "cus_a" }), keyItem("key-b", "b", { plan: "pro", stripeCustomerId: "cus_b" })]);
      expect(first).to.deep.equal({ written: 2, removed: [], unindexed: [] });
      expect(await get("key#key-b")).to.deep.equal({ pk: "key#key-b", api_key_id: "key-b", customer_id: "b", plan: "pro", stripe_customer_id: "cus_b", status: "active" });

      // b leaves the stack file; a moves plan, Stripe customer and status.
      const second = await syncKeyItems(ledger.endpoint, [keyItem("key-a", "a", { plan: "pro", stripeCustomerId: "cus_a2", status: "suspended" })]);
      expect(second).to.deep.equal({ written: 1, removed: ["b"], unindexed: [] });
      expect(await get("key#key-b")).to.equal(undefined);
      expect(await get("key#key-a")).to.deep.equal(keyItem("key-a", "a", { plan: "pro", stripeCustomerId: "cus_a2", status: "suspended" }));
      expect(await get("account#b"), "a balance outlives its customer's key").to.deep.equal(account);
      expect(await byStripe("cus_b")).to.deep.equal([]);
      expect(await byStripe("cus_a")).to.deep.equal([]);
      expect(await byStripe("cus_a2")).to.deep.equal(["key#key-a"]);
    } finally {
      await ledger.close();
    }
  });

  it("removes a stripe_customer index entry a kill -9 left without its key item, so the webhook cannot find a removed customer", async () => {
    const items = [keyItem("key-a", "a", { plan: "p", stripeCustomerId: "cus_a" }), keyItem("key-b", "b", { plan: "p", stripeCustomerId: "cus_b" })];
    await (await openLocalLedger(dataDir, { create: true })).close();
    let db = await LedgerDb.start(dataDir);
    await syncKeyItems(db.endpoint, items);
    await db.stop();

    // Break it as a kill -9 between dynalite's index write and its item write does: b's item gone, its entry kept.
    const levelPath = require.resolve("level", { paths: [path.dirname(require.resolve("dynalite/package.json"))] });
    const { Level } = require(levelPath) as { Level: new (dir: string, options: object) => { iterator(): AsyncIterable<[string, Record<string, { S?: string }>]>; del(k: string): Promise<void>; close(): Promise<void> } };
    const level = new Level(ledgerDir(dataDir), { valueEncoding: "json" });
    const doomed: string[] = [];
    for await (const [key, value] of level.iterator()) if (key.startsWith(`item-${LOCAL_CUSTOMERS_TABLE}`) && value.pk?.S === "key#key-b") doomed.push(key);
    expect(doomed).to.have.length(1);
    await level.del(doomed[0]);
    await level.close();

    db = await LedgerDb.start(dataDir, { publish: true });
    const ledger = await openLocalLedger(dataDir).catch(async (err: unknown) => {
      await db.stop();
      throw err;
    });
    const byStripe = async (id: string) =>
      (await ledger.doc.send(new QueryCommand({ TableName: ledger.customersTable, IndexName: STRIPE_CUSTOMER_INDEX, KeyConditionExpression: "stripe_customer_id = :s", ExpressionAttributeValues: { ":s": id } }))).Items?.map((i) => i.pk);
    try {
      expect(await byStripe("cus_b"), "the broken state: an entry without its item").to.deep.equal(["key#key-b"]);
      const sync = await syncKeyItems(db.endpoint, [items[0]]);
      expect(sync).to.deep.equal({ written: 1, removed: [], unindexed: ["key#key-b"] });
      expect(await byStripe("cus_b")).to.deep.equal([]);
      expect(await byStripe("cus_a")).to.deep.equal(["key#key-a"]);
      const all = await ledger.doc.send(new ScanCommand({ TableName: ledger.customersTable }));
      expect(all.Items?.map((i) => i.pk)).to.deep.equal(["key#key-a"]);
    } finally {
      await ledger.close();
      await db.stop();
    }
  });

  it("keeps items on disk across a restart", async () => {
    const first = await openLocalLedger(dataDir, { create: true });
    await first.doc.send(new PutCommand({ TableName: first.table, Item: { transaction_id: "tx-keep", created_at: 1 } }));
    await first.close();
    expect(fs.existsSync(ledgerDir(dataDir))).to.equal(true);

    const again = await openLocalLedger(dataDir);
    try {
      const { Item } = await again.doc.send(new GetCommand({ TableName: again.table, Key: { transaction_id: "tx-keep" } }));
      expect(Item).to.deep.equal({ transaction_id: "tx-keep", created_at: 1 });
    } finally {
      await again.close();
    }
  });

  it("publishes ledger.json with its endpoint and pid while it runs, and removes it on stop", async () => {
    const db = await LedgerDb.start(dataDir, { publish: true });
    try {
      expect(readLockFile(dataDir)).to.deep.equal({ endpoint: db.endpoint, pid: process.pid });
    } finally {
      await db.stop();
    }
    expect(fs.existsSync(ledgerLockFile(dataDir))).to.equal(false);
  });

  it("gives scripts the running ledger through its endpoint, and a private dynalite when none runs", async () => {
    const db = await LedgerDb.start(dataDir, { publish: true });
    try {
      const shared = await openLocalLedger(dataDir);
      expect(shared.shared).to.equal(true);
      expect(shared.endpoint).to.equal(db.endpoint);
      await shared.close();
    } finally {
      await db.stop();
    }
    const own = await openLocalLedger(dataDir);
    expect(own.shared).to.equal(false);
    await own.close();
    // The private one let go of LevelDB: npm start can take it at once.
    const next = await LedgerDb.start(dataDir, { publish: true, lockWaitMs: 0 });
    await next.stop();
  });

  it("refuses to serve a data dir another live process already serves, naming it", async () => {
    const db = await LedgerDb.start(dataDir, { publish: true });
    try {
      const second = await LedgerDb.start(dataDir, { publish: true }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(second).to.be.instanceOf(LocalLedgerError);
      expect((second as Error).message).to.match(new RegExp(`already served by process ${process.pid} \\(${db.endpoint}\\)`));
    } finally {
      await db.stop();
    }
  });

  for (const [what, lock] of [
    ["names a process that is gone (kill -9)", async () => ({ endpoint: `http://127.0.0.1:${await closedPort()}`, pid: deadPid() })],
    ["names a live process whose endpoint does not answer (a reused pid)", async () => ({ endpoint: `http://127.0.0.1:${await closedPort()}`, pid: process.pid })],
  ] as const) {
    it(`treats a ledger.json that ${what} as stale: scripts read the files, npm start replaces it`, async () => {
      await (await openLocalLedger(dataDir, { create: true })).close();
      const stale = await lock();
      fs.writeFileSync(ledgerLockFile(dataDir), JSON.stringify(stale));

      const ledger = await openLocalLedger(dataDir);
      expect(ledger.shared).to.equal(false);
      await ledger.close();
      expect(fs.existsSync(ledgerLockFile(dataDir)), "the stale file is gone").to.equal(false);

      fs.writeFileSync(ledgerLockFile(dataDir), JSON.stringify(stale));
      const db = await LedgerDb.start(dataDir, { publish: true });
      try {
        expect(readLockFile(dataDir)).to.deep.equal({ endpoint: db.endpoint, pid: process.pid });
      } finally {
        await db.stop();
      }
    });
  }

  it("says so when another process holds the LevelDB lock without serving it", async () => {
    await (await openLocalLedger(dataDir, { create: true })).close();
    // A process holding the LevelDB open (as a hung npm start whose ledger.json was deleted would).
    const levelPath = require.resolve("level", { paths: [path.dirname(require.resolve("dynalite/package.json"))] });
    const holder = spawn(process.execPath, ["-e", `const { Level } = require(${JSON.stringify(levelPath)}); const db = new Level(${JSON.stringify(ledgerDir(dataDir))}); db.open().then(() => console.log("open")); setInterval(() => {}, 1000);`]);
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout.once("data", () => resolve());
        holder.once("exit", (code) => reject(new Error(`the holder exited with ${code}`)));
      });
      const failure = await openLocalLedger(dataDir, { lockWaitMs: 300 }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(failure).to.be.instanceOf(LocalLedgerError);
      expect((failure as Error).message).to.match(/LevelDB at .* is locked by another process/);
    } finally {
      holder.kill("SIGKILL");
    }
  });

  it("after an unclean stop, repairs what a write cut short between dynalite's index and its item left behind", async () => {
    const put = async (item: Record<string, unknown>) => {
      const ledger = await openLocalLedger(dataDir, { create: true });
      try {
        await ledger.doc.send(new PutCommand({ TableName: ledger.table, Item: item }));
      } finally {
        await ledger.close();
      }
    };
    const owed = (id: string, created: number) => ({ transaction_id: id, created_at: created, due_at: created, moesif_state: "pending", undelivered: "u3" });
    for (const [i, id] of ["tx-orphan", "tx-lost", "tx-fine", "tx-stale"].entries()) await put(owed(id, i + 1));
    await put({ transaction_id: "tx-done", created_at: 9, moesif_state: "delivered" });

    // Break it as a kill -9 does, in LevelDB itself (dynalite stopped): keys found by the item they hold.
    const levelPath = require.resolve("level", { paths: [path.dirname(require.resolve("dynalite/package.json"))] });
    type Stored = Record<string, { S?: string; N?: string }>;
    const { Level } = require(levelPath) as { Level: new (dir: string, options: object) => { iterator(): AsyncIterable<[string, Stored]>; put(k: string, v: unknown): Promise<void>; del(k: string): Promise<void>; close(): Promise<void> } };
    const openLevel = async () => {
      const level = new Level(ledgerDir(dataDir), { valueEncoding: "json" });
      const keys: Record<string, { item?: string; index?: string; itemValue?: Stored; indexValue?: Stored }> = {};
      for await (const [key, value] of level.iterator()) {
        const id = value.transaction_id?.S;
        if (!id) continue;
        keys[id] ??= {};
        if (key.startsWith("item-")) Object.assign(keys[id], { item: key, itemValue: value });
        if (key.startsWith("index-")) Object.assign(keys[id], { index: key, indexValue: value });
      }
      return { level, keys };
    };
    const before = await openLevel();
    const fine = before.keys["tx-fine"];
    await before.level.del(before.keys["tx-orphan"].item!); // a put wrote the index entry, not the item
    await before.level.del(before.keys["tx-lost"].index!); // an update removed the index entry, not yet rewrote the item
    // An update that took tx-stale out of the backlog wrote the item, not yet the index removal:
    await before.level.put(before.keys["tx-stale"].item!, { transaction_id: { S: "tx-stale" }, created_at: { N: "4" }, moesif_state: { S: "delivered" } });
    await before.level.close();
    // An update that moved tx-fine later in the index (due_at 3 -> 50) wrote the new entry, not yet the item.
    const ledger = await openLocalLedger(dataDir);
    await ledger.doc.send(new UpdateCommand({ TableName: ledger.table, Key: { transaction_id: "tx-fine" }, UpdateExpression: "SET due_at = :later", ExpressionAttributeValues: { ":later": 50 } }));
    await ledger.close();
    const after = await openLevel();
    await after.level.put(fine.item!, fine.itemValue);
    await after.level.put(fine.index!, fine.indexValue);
    await after.level.close();

    fs.writeFileSync(ledgerLockFile(dataDir), JSON.stringify({ endpoint: `http://127.0.0.1:${await closedPort()}`, pid: deadPid() }));
    const db = await LedgerDb.start(dataDir, { publish: true });
    try {
      expect(db.repaired?.restored).to.deep.equal(["tx-orphan"]);
      expect(db.repaired?.unindexed.sort()).to.deep.equal(["tx-fine", "tx-stale"]);
      expect(db.repaired?.reindexed).to.equal(3);
      const ledger = await openLocalLedger(dataDir);
      try {
        const backlog = await ledger.store.backlog({ now: Date.now(), graceMs: 0, limit: 100 });
        expect(backlog.map((i) => i.transaction_id).sort()).to.deep.equal(["tx-fine", "tx-lost", "tx-orphan"]);
        // One entry per item, each as its item is.
        const index = await ledger.doc.send(new ScanCommand({ TableName: ledger.table, IndexName: UNDELIVERED_INDEX }));
        expect(index.Items?.map((i) => `${i.transaction_id} ${i.due_at}`).sort()).to.deep.equal(["tx-fine 3", "tx-lost 2", "tx-orphan 1"]);
        const { Item } = await ledger.doc.send(new GetCommand({ TableName: ledger.table, Key: { transaction_id: "tx-orphan" } }));
        expect(Item).to.deep.equal(owed("tx-orphan", 1));
        const stale = await ledger.doc.send(new GetCommand({ TableName: ledger.table, Key: { transaction_id: "tx-stale" } }));
        expect(stale.Item).to.deep.equal({ transaction_id: "tx-stale", created_at: 4, moesif_state: "delivered" });
      } finally {
        await ledger.close();
      }
    } finally {
      await db.stop();
    }
    // A clean stop: nothing to repair next time.
    const clean = await LedgerDb.start(dataDir, { publish: true });
    expect(clean.repaired).to.equal(undefined);
    await clean.stop();
  });

  it("after an unclean stop, a script that opens the ledger first repairs the index (the next npm start no longer sees the stale file)", async () => {
    const ledger = await openLocalLedger(dataDir, { create: true });
    await ledger.doc.send(new PutCommand({ TableName: ledger.table, Item: { transaction_id: "tx-orphan", created_at: 1, due_at: 1, moesif_state: "pending", undelivered: "u3" } }));
    await ledger.close();
    // A kill -9 between dynalite's index write and its item write: the index entry without its item.
    const levelPath = require.resolve("level", { paths: [path.dirname(require.resolve("dynalite/package.json"))] });
    const { Level } = require(levelPath) as { Level: new (dir: string, options: object) => { iterator(): AsyncIterable<[string, { transaction_id?: { S?: string } }]>; del(k: string): Promise<void>; close(): Promise<void> } };
    const level = new Level(ledgerDir(dataDir), { valueEncoding: "json" });
    for await (const [key, value] of level.iterator()) if (key.startsWith("item-") && value.transaction_id?.S === "tx-orphan") await level.del(key);
    await level.close();
    fs.writeFileSync(ledgerLockFile(dataDir), JSON.stringify({ endpoint: `http://127.0.0.1:${await closedPort()}`, pid: deadPid() }));

    const script = await openLocalLedger(dataDir); // npm run usage / credits / reconcile before the next npm start
    try {
      const { Item } = await script.doc.send(new GetCommand({ TableName: script.table, Key: { transaction_id: "tx-orphan" } }));
      expect(Item, "the item the kill cut short is restored from its index entry").to.include({ transaction_id: "tx-orphan", moesif_state: "pending" });
    } finally {
      await script.close();
    }
    expect(fs.existsSync(ledgerLockFile(dataDir)), "the stale file is gone").to.equal(false);
  });

  it("says there is no ledger yet for a data dir npm start never used", async () => {
    const failure = await openLocalLedger(dataDir).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(failure).to.be.instanceOf(LocalLedgerError);
    expect((failure as Error).message).to.match(/^no ledger yet: .* does not exist \(run npm start and send a request\)$/);
    expect(fs.existsSync(ledgerDir(dataDir))).to.equal(false);
  });
});
