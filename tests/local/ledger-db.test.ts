import { expect } from "chai";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { DescribeTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { GetCommand, PutCommand } from "@aws-sdk/lib-dynamodb";
import { dynamoClientOptions, LEDGER_TABLE_SCHEMA, LOCAL_LEDGER_TABLE, UNDELIVERED_INDEX } from "../../functions/shared/ledger-schema";
import { LedgerDb, ledgerDir, ledgerLockFile, LocalLedgerError, openLocalLedger, readLockFile } from "../../scripts/local/ledger-db";

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
