/**
 * The local DynamoDB: the same API the deployed functions use, served by `dynalite` (LevelDB files under
 * `<dataDir>/ledger/`), with the tables the Pulumi program creates: the usage ledger (`LEDGER_TABLE_SCHEMA`), the
 * customers table (`CUSTOMERS_TABLE_SCHEMA`: API keys, prepaid balances, usage counters) and the stored responses'
 * owners (`RESPONSE_OWNERS_TABLE_SCHEMA`). One dynalite serves them all, so one process (and one LevelDB lock) owns
 * all of a data dir's DynamoDB state. (dynalite has no TTL: expired owner items stay, and the function treats them as
 * absent, as it does on AWS before DynamoDB's lazy TTL deletion.)
 *
 * `LedgerDb.start(dataDir, { publish: true })` runs it for `npm start` and writes `<dataDir>/ledger.json` (`{ endpoint, pid }`) while it runs, so
 * scripts (`npm run usage`, `npm run reconcile`) reach the running one with `openLocalLedger`. LevelDB lets one
 * process at a time open its files, so when nothing serves the ledger a script starts a private dynalite on the same
 * files for the time it reads, and stops it again.
 *
 * A `ledger.json` left behind by a process that died without stopping (`kill -9`) is stale: its pid is gone, or its
 * endpoint does not answer; it is ignored and replaced (the operating system released the LevelDB lock with the
 * process).
 */
import fs from "node:fs";
import path from "node:path";
import { Worker } from "node:worker_threads";
import { CreateTableCommand, DescribeTableCommand, DynamoDBClient, ListTablesCommand } from "@aws-sdk/client-dynamodb";
import { DeleteCommand, PutCommand, ScanCommand, type DynamoDBDocumentClient, type ScanCommandOutput } from "@aws-sdk/lib-dynamodb";
import { CUSTOMERS_KEY, CUSTOMERS_TABLE_SCHEMA, KEY_ITEM_PREFIX, LOCAL_CUSTOMERS_TABLE, STRIPE_CUSTOMER_INDEX, STRIPE_CUSTOMER_KEY, type KeyItem } from "../../functions/shared/customer-schema";
import { LEDGER_KEY, LEDGER_TABLE_SCHEMA, LOCAL_LEDGER_TABLE, UNDELIVERED_INDEX, UNDELIVERED_KEY, UNDELIVERED_SORT } from "../../functions/shared/ledger-schema";
import { createLedgerDocumentClient, LedgerStore } from "../../functions/shared/ledger-store";
import { RESPONSE_OWNERS_TABLE_SCHEMA } from "../../functions/shared/response-owners";

/** The local name of the stored responses' owners table (`RESPONSES_TABLE`), beside `usage-ledger` and `customers`. */
export const LOCAL_RESPONSES_TABLE = "response-owners";

/** A local ledger problem the user can fix, said in one line (no stack trace). */
export class LocalLedgerError extends Error {
  override name = "LocalLedgerError";
}

/**
 * Credentials and region for dynalite, which checks neither. Set explicitly so the AWS SDK never walks its default
 * chain (profiles, the instance metadata service) on a laptop, and so no real AWS credential is ever sent to it.
 */
export const LOCAL_AWS_ENV = { AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local" } as const;

/** What `<dataDir>/ledger.json` holds while a process serves the ledger. */
export interface LedgerLock {
  endpoint: string;
  pid: number;
}

/** The environment the functions need to reach a local ledger (LEDGER_TABLE, the endpoint, local credentials). */
export function ledgerEnv(endpoint: string, table = LOCAL_LEDGER_TABLE): NodeJS.ProcessEnv {
  return { LEDGER_TABLE: table, AWS_ENDPOINT_URL_DYNAMODB: endpoint, ...LOCAL_AWS_ENV };
}

/** The environment `createCustomerStoreFromEnv` needs to reach the local customers table (same dynalite). */
export function customersEnv(endpoint: string, table = LOCAL_CUSTOMERS_TABLE): NodeJS.ProcessEnv {
  return { CUSTOMERS_TABLE: table, AWS_ENDPOINT_URL_DYNAMODB: endpoint, ...LOCAL_AWS_ENV };
}

export const ledgerDir = (dataDir: string) => path.join(dataDir, "ledger");
export const ledgerLockFile = (dataDir: string) => path.join(dataDir, "ledger.json");

/**
 * dynalite runs in a worker thread: each ledger request costs a few milliseconds of JavaScript (SDK client and
 * dynalite server alike), and on the stack's one event loop, beside the gateway, the function, the model server and
 * the sinks, the server's share made ledger writes miss their 1 s budget under load (measured: 1,000 requests at
 * concurrency 50). A worker gets its own event loop (and core), and still dies with the process, so a `kill -9`
 * leaves no orphan holding the LevelDB lock. Plain JavaScript, evaluated: no TypeScript loader in the worker.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const dynalite = require(workerData.dynalite);
// createTableMs 0: a table is ACTIVE at once (dynalite otherwise mimics DynamoDB's CREATING phase).
const server = dynalite({ path: workerData.path, createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
server.once("error", (err) => parentPort.postMessage({ error: String(err && err.code || err) }));
server.listen(workerData.port, "127.0.0.1", () => parentPort.postMessage({ port: server.address().port }));
parentPort.on("message", (message) => {
  if (message !== "stop") return;
  // In-flight requests finish before LevelDB closes (dynalite closes it once the HTTP server has closed; a request
  // still running then fails outside any handler). Idle keep-alive sockets go at once, busy ones after 5 s.
  const force = setTimeout(() => server.closeAllConnections(), 5000);
  server.close(() => { clearTimeout(force); parentPort.postMessage({ stopped: true }); parentPort.close(); });
  server.closeIdleConnections();
});
`;

/** A running dynalite (in a worker thread) with the ledger, customers and response owners tables. */
export class LedgerDb {
  private stopping?: Promise<void>;

  private constructor(
    private readonly worker: Worker,
    /** `http://127.0.0.1:<port>` */
    readonly endpoint: string,
    readonly table: string,
    readonly dataDir: string,
    private readonly lockFile?: string,
    private readonly exitHook?: () => void,
    /** What `repairIndex` fixed at start after an unclean stop (undefined when the last stop was clean). */
    readonly repaired?: IndexRepair,
  ) {}

  /** The customers table's name (`customers`). */
  readonly customersTable = LOCAL_CUSTOMERS_TABLE;

  /** The stored responses' owners table's name (`response-owners`): the function's `RESPONSES_TABLE`. */
  readonly responsesTable = LOCAL_RESPONSES_TABLE;

  /** LEDGER_TABLE, AWS_ENDPOINT_URL_DYNAMODB and the local credentials, for the functions' environments. */
  get env(): NodeJS.ProcessEnv {
    return ledgerEnv(this.endpoint, this.table);
  }

  /** CUSTOMERS_TABLE, AWS_ENDPOINT_URL_DYNAMODB and the local credentials. */
  get customersEnv(): NodeJS.ProcessEnv {
    return customersEnv(this.endpoint, this.customersTable);
  }

  /**
   * Starts dynalite on `<dataDir>/ledger` and creates each table that is absent (a data dir from before the
   * customers table gets it on its next start). `publish` (what `npm start` does)
   * writes `<dataDir>/ledger.json` and refuses to start when another live process already serves this ledger.
   * A LevelDB still locked by a short-lived script (a private `openLocalLedger`) is waited for, up to `lockWaitMs`.
   */
  static async start(dataDir: string, options: { port?: number; publish?: boolean; lockWaitMs?: number } = {}): Promise<LedgerDb> {
    const lockFile = ledgerLockFile(dataDir);
    // A ledger.json whose process is gone: the last run ended without stop() (kill -9, a crash).
    let unclean = false;
    if (options.publish) {
      const running = await liveLedger(dataDir);
      unclean = !running && readLockFile(dataDir) !== undefined;
      if (running) {
        throw new LocalLedgerError(
          `the ledger in ${ledgerDir(dataDir)} is already served by process ${running.pid} (${running.endpoint}): stop that npm start, or give this one another data dir (--data-dir / LOCAL_DATA_DIR)`,
        );
      }
    }
    fs.mkdirSync(dataDir, { recursive: true });
    await waitForLevelDb(ledgerDir(dataDir), options.lockWaitMs ?? 10_000);

    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { dynalite: require.resolve("dynalite"), path: ledgerDir(dataDir), port: options.port ?? 0 } });
    let port: number;
    try {
      port = await new Promise<number>((resolve, reject) => {
        worker.once("error", reject);
        worker.once("exit", (code) => reject(new Error(`dynalite's worker exited with ${code} while starting`)));
        worker.once("message", (message: { port?: number; error?: string }) => {
          if (message.port) resolve(message.port);
          else reject(new LocalLedgerError(`cannot serve the ledger on 127.0.0.1:${options.port ?? 0}: ${message.error}`));
        });
      });
    } catch (err) {
      await stopWorker(worker);
      throw err;
    }
    worker.removeAllListeners();
    worker.on("error", (err) => process.stderr.write(`local ledger (dynalite) failed: ${err.message}\n`));
    const endpoint = `http://127.0.0.1:${port}`;
    let exitHook: (() => void) | undefined;
    let repaired: IndexRepair | undefined;
    try {
      await ensureTable(endpoint, LOCAL_LEDGER_TABLE, LEDGER_TABLE_SCHEMA);
      await ensureTable(endpoint, LOCAL_CUSTOMERS_TABLE, CUSTOMERS_TABLE_SCHEMA);
      await ensureTable(endpoint, LOCAL_RESPONSES_TABLE, RESPONSE_OWNERS_TABLE_SCHEMA);
      if (unclean) repaired = await repairIndex(endpoint, LOCAL_LEDGER_TABLE);
      if (options.publish) {
        writeLockFile(lockFile, { endpoint, pid: process.pid });
        // A process that exits without stop() (an uncaught error, process.exit) leaves no stale file behind either.
        exitHook = () => removeLockFile(lockFile, process.pid);
        process.once("exit", exitHook);
      }
    } catch (err) {
      await stopWorker(worker);
      throw err;
    }
    return new LedgerDb(worker, endpoint, LOCAL_LEDGER_TABLE, dataDir, options.publish ? lockFile : undefined, exitHook, repaired);
  }

  /** Stops serving (requests in flight finish), closes LevelDB (releasing its lock) and removes our `ledger.json`. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (this.lockFile) removeLockFile(this.lockFile, process.pid);
      if (this.exitHook) process.off("exit", this.exitHook);
      await stopWorker(this.worker);
    })();
    return this.stopping;
  }
}

/**
 * Asks the worker to close dynalite and waits for it to end on its own (it closes its port once LevelDB is closed).
 * `terminate()` is only the fallback after `graceMs`: observed to hang after a clean close with the native LevelDB
 * binding loaded, so it is not awaited.
 */
async function stopWorker(worker: Worker, graceMs = 15_000): Promise<void> {
  // threadId is -1 once the thread has ended (a crash while starting).
  if (worker.threadId === -1) return;
  await new Promise<void>((resolve) => {
    const fallback = setTimeout(() => {
      void worker.terminate();
      resolve();
    }, graceMs);
    worker.once("exit", () => {
      clearTimeout(fallback);
      resolve();
    });
    worker.postMessage("stop");
  });
}

function writeLockFile(file: string, lock: LedgerLock): void {
  const temp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(temp, JSON.stringify(lock) + "\n");
  fs.renameSync(temp, file);
}

function removeLockFile(file: string, pid: number): void {
  try {
    const lock = JSON.parse(fs.readFileSync(file, "utf8")) as Partial<LedgerLock>;
    if (lock.pid === pid) fs.unlinkSync(file);
  } catch {
    // Gone already, or not ours to remove.
  }
}

/** `ledger.json`'s content, or undefined when there is none or it is unreadable (a half-written file counts as none). */
export function readLockFile(dataDir: string): LedgerLock | undefined {
  try {
    const lock = JSON.parse(fs.readFileSync(ledgerLockFile(dataDir), "utf8")) as Partial<LedgerLock>;
    if (typeof lock.endpoint === "string" && Number.isInteger(lock.pid)) return { endpoint: lock.endpoint, pid: lock.pid as number };
  } catch {
    // fall through
  }
  return undefined;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: alive, owned by someone else.
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** The process serving this data dir's ledger, if `ledger.json` names one whose pid is alive and whose endpoint answers. */
export async function liveLedger(dataDir: string): Promise<LedgerLock | undefined> {
  const lock = readLockFile(dataDir);
  if (!lock || !pidAlive(lock.pid)) return undefined;
  // A live pid may be another program that reused the number after a kill -9: the endpoint decides.
  return (await answers(lock.endpoint)) ? lock : undefined;
}

function client(endpoint: string, timeoutMs: number): DynamoDBClient {
  return new DynamoDBClient({
    endpoint,
    region: LOCAL_AWS_ENV.AWS_REGION,
    credentials: { accessKeyId: LOCAL_AWS_ENV.AWS_ACCESS_KEY_ID, secretAccessKey: LOCAL_AWS_ENV.AWS_SECRET_ACCESS_KEY },
    maxAttempts: 1,
    requestHandler: { connectionTimeout: timeoutMs, requestTimeout: timeoutMs },
  });
}

async function answers(endpoint: string): Promise<boolean> {
  const dynamo = client(endpoint, 1000);
  try {
    await dynamo.send(new ListTablesCommand({ Limit: 1 }));
    return true;
  } catch {
    return false;
  } finally {
    dynamo.destroy();
  }
}

/** A table in CreateTable's terms, as the schema modules declare them. */
interface TableSchema {
  attributeDefinitions: ReadonlyArray<{ AttributeName: string; AttributeType: string }>;
  keySchema: ReadonlyArray<{ AttributeName: string; KeyType: string }>;
  /** Absent for a table without indexes (CreateTable refuses an empty list). */
  globalSecondaryIndexes?: ReadonlyArray<{ IndexName: string; KeySchema: ReadonlyArray<{ AttributeName: string; KeyType: string }>; Projection: { ProjectionType: string } }>;
}

async function ensureTable(endpoint: string, table: string, schema: TableSchema): Promise<void> {
  const dynamo = client(endpoint, 10_000);
  try {
    let status: string | undefined;
    try {
      status = (await dynamo.send(new DescribeTableCommand({ TableName: table }))).Table?.TableStatus;
    } catch (err) {
      if ((err as { name?: string }).name !== "ResourceNotFoundException") throw err;
    }
    if (status === undefined) {
      await dynamo.send(
        new CreateTableCommand({
          TableName: table,
          BillingMode: "PAY_PER_REQUEST",
          AttributeDefinitions: schema.attributeDefinitions.map((a) => ({ ...a }) as { AttributeName: string; AttributeType: "S" | "N" | "B" }),
          KeySchema: schema.keySchema.map((k) => ({ ...k }) as { AttributeName: string; KeyType: "HASH" | "RANGE" }),
          GlobalSecondaryIndexes: schema.globalSecondaryIndexes?.length
            ? schema.globalSecondaryIndexes.map((index) => ({
                IndexName: index.IndexName,
                KeySchema: index.KeySchema.map((k) => ({ ...k }) as { AttributeName: string; KeyType: "HASH" | "RANGE" }),
                Projection: { ...index.Projection } as { ProjectionType: "ALL" | "KEYS_ONLY" | "INCLUDE" },
              }))
            : undefined,
        }),
      );
    }
    // dynalite answers CreateTable with CREATING and turns the table ACTIVE on a timer; until then every read and
    // write answers ResourceNotFoundException. Wait for ACTIVE, so no caller (nor a stop right after creating, which
    // would leave the table CREATING on disk for ever) races that timer.
    const deadline = Date.now() + 5_000;
    while (status !== "ACTIVE") {
      status = (await dynamo.send(new DescribeTableCommand({ TableName: table }))).Table?.TableStatus;
      if (status === "ACTIVE") break;
      if (Date.now() > deadline) {
        throw new LocalLedgerError(`the local table ${table} stays ${status ?? "unknown"}; stop npm start and delete the ledger directory under the data dir to start afresh`);
      }
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  } finally {
    dynamo.destroy();
  }
}

/** What `repairIndex` did: items restored from the index, index entries rewritten, stale index entries removed. */
export interface IndexRepair {
  /** Items the index held and the table did not (a put cut between its index write and its item write). */
  restored: string[];
  /** Items owing a delivery whose index entry was rewritten (it may have been lost with an update cut short). */
  reindexed: number;
  /** Index entries that no longer matched their item (an update cut short after the index, before the item). */
  unindexed: string[];
}

/**
 * Makes the backlog index agree with the table again after a `kill -9`. dynalite writes an item's index entries and
 * the item itself as separate LevelDB writes (node_modules/dynalite/actions/putItem.js and updateItem.js:
 * `db.updateIndexes(...)`, then `itemDb.put(...)`), so a process killed between the two leaves them disagreeing;
 * DynamoDB maintains a GSI itself and has no such state. Run before anything else uses the ledger:
 * - an index entry without its item: the item is restored from the entry (the index projects ALL attributes, so it
 *   is the item as the request path put it); dropping it would lose a request's usage;
 * - an index entry whose keys (`undelivered`, `due_at`) are not its item's: removed, by pointing the item at that
 *   entry and then putting the item back as it is (dynalite deletes an entry only through its item's writes);
 * - every item owing a delivery: put again as it is, which writes its index entry (restoring a lost one).
 */
export async function repairIndex(endpoint: string, table: string): Promise<IndexRepair> {
  const doc = createLedgerDocumentClient(ledgerEnv(endpoint, table), { timeoutMs: 30_000 });
  const repair: IndexRepair = { restored: [], reindexed: 0, unindexed: [] };
  const put = (item: Record<string, unknown>, onlyNew = false) =>
    doc.send(new PutCommand({ TableName: table, Item: item, ...(onlyNew ? { ConditionExpression: "attribute_not_exists(#key)", ExpressionAttributeNames: { "#key": LEDGER_KEY } } : {}) }));
  try {
    const items = new Map<string, Record<string, unknown>>();
    let start: Record<string, unknown> | undefined;
    do {
      const page: ScanCommandOutput = await doc.send(new ScanCommand({ TableName: table, ExclusiveStartKey: start }));
      for (const item of page.Items ?? []) items.set(item[LEDGER_KEY] as string, item);
      start = page.LastEvaluatedKey;
    } while (start);
    const indexed: Array<Record<string, unknown>> = [];
    do {
      const page: ScanCommandOutput = await doc.send(new ScanCommand({ TableName: table, IndexName: UNDELIVERED_INDEX, ExclusiveStartKey: start }));
      indexed.push(...(page.Items ?? []));
      start = page.LastEvaluatedKey;
    } while (start);

    for (const entry of indexed) {
      const id = entry[LEDGER_KEY] as string;
      const item = items.get(id);
      if (!item) {
        await put(entry, true);
        items.set(id, entry);
        repair.restored.push(id);
      } else if (entry[UNDELIVERED_KEY] !== item[UNDELIVERED_KEY] || entry[UNDELIVERED_SORT] !== item[UNDELIVERED_SORT]) {
        await put({ ...item, [UNDELIVERED_KEY]: entry[UNDELIVERED_KEY], [UNDELIVERED_SORT]: entry[UNDELIVERED_SORT] });
        await put(item);
        repair.unindexed.push(id);
      }
    }
    for (const item of items.values()) {
      if (item[UNDELIVERED_KEY] === undefined) continue;
      await put(item);
      repair.reindexed += 1;
    }
    return repair;
  } finally {
    doc.destroy();
  }
}

/** What `syncKeyItems` changed in the customers table. */
export interface KeySync {
  /** Key items written (every one the stack file names, each time: a changed plan or Stripe id takes effect). */
  written: number;
  /** Customer ids whose key items were deleted: gone from the stack file since the last start. */
  removed: string[];
  /** `stripe_customer` index entries that matched no key item (a write cut short by `kill -9`), removed. */
  unindexed: string[];
}

/**
 * Makes the customers table's key items exactly `items`, as `pulumi up` makes the deployed table's (one
 * `aws.dynamodb.TableItem` per customer): writes each, deletes every other `key#…` item (a customer dropped from the
 * stack file loses its key at once, not at the next cache expiry of a stale item), and removes `stripe_customer`
 * index entries no key item backs. Account items are never touched: balances outlive a customer's key.
 *
 * The index check is the one `repairIndex` does for the ledger: dynalite writes an item and its index entries as
 * separate LevelDB writes, so a `kill -9` between them can leave an entry naming a Stripe customer its item no longer
 * has, and the webhook would then credit the wrong account. Putting an item always rewrites its own entry; an entry
 * with another key is removed by putting the item as the entry has it, then putting (or deleting) the real one, since
 * dynalite deletes an entry only through its item's writes (node_modules/dynalite/db/index.js `getIndexActions`).
 */
export async function syncKeyItems(endpoint: string, items: KeyItem[], table = LOCAL_CUSTOMERS_TABLE): Promise<KeySync> {
  const doc = createLedgerDocumentClient(customersEnv(endpoint, table), { timeoutMs: 30_000 });
  const sync: KeySync = { written: 0, removed: [], unindexed: [] };
  const scanAll = async (indexName?: string) => {
    const out: Array<Record<string, unknown>> = [];
    let start: Record<string, unknown> | undefined;
    do {
      const page: ScanCommandOutput = await doc.send(
        new ScanCommand({
          TableName: table,
          ...(indexName ? { IndexName: indexName } : {}),
          FilterExpression: "begins_with(#pk, :prefix)",
          ExpressionAttributeNames: { "#pk": CUSTOMERS_KEY },
          ExpressionAttributeValues: { ":prefix": KEY_ITEM_PREFIX },
          ExclusiveStartKey: start,
        }),
      );
      out.push(...(page.Items ?? []));
      start = page.LastEvaluatedKey;
    } while (start);
    return out;
  };
  const put = (item: Record<string, unknown>) => doc.send(new PutCommand({ TableName: table, Item: item }));
  const remove = (pk: string) => doc.send(new DeleteCommand({ TableName: table, Key: { [CUSTOMERS_KEY]: pk } }));
  try {
    const wanted = new Map(items.map((item) => [item.pk, item]));
    for (const item of items) {
      await put({ ...item });
      sync.written += 1;
    }
    for (const existing of await scanAll()) {
      const pk = existing[CUSTOMERS_KEY] as string;
      if (wanted.has(pk)) continue;
      await remove(pk);
      sync.removed.push(typeof existing.customer_id === "string" ? existing.customer_id : pk);
    }
    for (const entry of await scanAll(STRIPE_CUSTOMER_INDEX)) {
      const pk = entry[CUSTOMERS_KEY] as string;
      const item = wanted.get(pk);
      if (item && item.stripe_customer_id === entry[STRIPE_CUSTOMER_KEY]) continue;
      await put(entry);
      if (item) await put({ ...item });
      else await remove(pk);
      sync.unindexed.push(pk);
    }
    return sync;
  } finally {
    doc.destroy();
  }
}

interface LevelLike {
  open(): Promise<void>;
  close(): Promise<void>;
}

/**
 * Waits until no other process holds the LevelDB at `dir`. dynalite opens its LevelDB lazily and, when another
 * process holds the lock, throws "Database is not open" from inside its first request's handler (its thread dies)
 * instead of failing to start; so the lock is tried here first with the same `level` module dynalite uses (its own
 * dependency), and a locked ledger is reported as such.
 */
async function waitForLevelDb(dir: string, waitMs: number): Promise<void> {
  const levelPath = require.resolve("level", { paths: [path.dirname(require.resolve("dynalite/package.json"))] });
  const { Level } = require(levelPath) as { Level: new (location: string, options?: Record<string, unknown>) => LevelLike };
  const deadline = Date.now() + waitMs;
  for (;;) {
    const db = new Level(dir, { valueEncoding: "json" });
    try {
      await db.open();
      await db.close();
      return;
    } catch (err) {
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      const locked = cause?.code === "LEVEL_LOCKED" || /lock/i.test(cause?.message ?? "");
      if (!locked) throw new LocalLedgerError(`cannot open the ledger's LevelDB at ${dir}: ${cause?.message ?? (err as Error).message}`);
      if (Date.now() >= deadline) {
        throw new LocalLedgerError(
          `the ledger's LevelDB at ${dir} is locked by another process (an npm start or npm run usage/reconcile on the same data dir): ` +
            `stop it, or wait for it to finish`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

/** A ledger opened by a script: the running `npm start`'s, or a private dynalite started for the script. */
export interface LocalLedger {
  endpoint: string;
  table: string;
  /** The customers table, served by the same dynalite. */
  customersTable: string;
  /** CUSTOMERS_TABLE, the endpoint and the local credentials (for `createCustomerStoreFromEnv`). */
  customersEnv: NodeJS.ProcessEnv;
  /** Whether this is the running `npm start`'s ledger (true) or a private dynalite (false). */
  shared: boolean;
  doc: DynamoDBDocumentClient;
  store: LedgerStore;
  env: NodeJS.ProcessEnv;
  /** Stops the private dynalite (if any) and the client. */
  close(): Promise<void>;
}

/**
 * Opens `<dataDir>`'s ledger for a script: the running one when `ledger.json` names a live process whose endpoint
 * answers, else a private dynalite on the same files (stopped by `close()`). Throws `LocalLedgerError` when the data
 * dir has no ledger yet (unless `create`), or its LevelDB is locked by a process that serves no endpoint.
 */
export async function openLocalLedger(dataDir: string, options: { create?: boolean; lockWaitMs?: number; missingHint?: string } = {}): Promise<LocalLedger> {
  let endpoint: string;
  let db: LedgerDb | undefined;
  const running = await liveLedger(dataDir);
  if (running) endpoint = running.endpoint;
  else {
    if (!options.create && !fs.existsSync(ledgerDir(dataDir))) {
      throw new LocalLedgerError(`no ledger yet: ${ledgerDir(dataDir)} does not exist (${options.missingHint ?? "run npm start and send a request"})`);
    }
    db = await LedgerDb.start(dataDir, { lockWaitMs: options.lockWaitMs ?? 10_000 });
    endpoint = db.endpoint;
    // Holding the LevelDB lock proves nothing else serves it: a ledger.json still here is stale (kill -9). The next
    // `npm start` would have repaired the index on seeing it; removing it, this script does the repair instead.
    const stale = readLockFile(dataDir);
    if (stale) {
      try {
        await repairIndex(endpoint, LOCAL_LEDGER_TABLE);
      } catch (err) {
        await db.stop();
        throw err;
      }
      fs.rmSync(ledgerLockFile(dataDir), { force: true });
    }
  }
  const env = ledgerEnv(endpoint);
  const doc = createLedgerDocumentClient(env, { timeoutMs: 30_000 });
  return {
    endpoint,
    table: LOCAL_LEDGER_TABLE,
    customersTable: LOCAL_CUSTOMERS_TABLE,
    customersEnv: customersEnv(endpoint),
    shared: db === undefined,
    doc,
    store: new LedgerStore(doc, LOCAL_LEDGER_TABLE),
    env,
    close: async () => {
      doc.destroy();
      await db?.stop();
    },
  };
}
