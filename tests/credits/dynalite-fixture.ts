/**
 * What the credits suites share: dynalite in-process with a fresh customers table (from `CUSTOMERS_TABLE_SCHEMA`,
 * with its `stripe_customer` index) and a fresh ledger table per test, raw reads of both, and a TCP server that
 * accepts connections and never answers (a hung DynamoDB).
 */
import { CreateTableCommand, DescribeTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { DynamoDBDocumentClient, GetCommand, PutCommand, ScanCommand } from "@aws-sdk/lib-dynamodb";
import net from "node:net";
import type { AddressInfo } from "node:net";
import { accountItemKey, CUSTOMERS_TABLE_SCHEMA, type AccountItem } from "../../functions/shared/customer-schema";
import { createCustomerStoreFromEnv, DynamoCustomerStore } from "../../functions/shared/customer-store";
import { LEDGER_TABLE_SCHEMA, type LedgerItem } from "../../functions/shared/ledger-schema";
import { LedgerStore } from "../../functions/shared/ledger-store";

interface DynaliteServer {
  listen(port: number, host: string, cb: () => void): void;
  close(cb: () => void): void;
  address(): AddressInfo;
}

type TableSchema = {
  readonly attributeDefinitions: ReadonlyArray<{ AttributeName: string; AttributeType: string }>;
  readonly keySchema: ReadonlyArray<{ AttributeName: string; KeyType: string }>;
  readonly globalSecondaryIndexes: ReadonlyArray<{ IndexName: string; KeySchema: ReadonlyArray<{ AttributeName: string; KeyType: string }>; Projection: { ProjectionType: string } }>;
};

export class CreditsFixture {
  endpoint = "";
  doc!: DynamoDBDocumentClient;
  private client!: DynamoDBClient;
  private server?: DynaliteServer;
  private tables = 0;
  private stores: DynamoCustomerStore[] = [];
  customersTable = "";
  ledgerTable = "";

  /** `maxItemSizeKb`: dynalite's item size limit (DynamoDB's is 400 KB), smaller to reach it cheaply. */
  async start(options: { maxItemSizeKb?: number } = {}): Promise<void> {
    this.server = (require("dynalite") as (options: object) => DynaliteServer)({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0, ...options });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    this.endpoint = `http://127.0.0.1:${this.server.address().port}`;
    this.client = new DynamoDBClient({ region: "us-east-1", endpoint: this.endpoint, credentials: { accessKeyId: "local", secretAccessKey: "local" } });
    this.doc = DynamoDBDocumentClient.from(this.client, { marshallOptions: { removeUndefinedValues: true } });
  }

  async stop(): Promise<void> {
    for (const store of this.stores) store.destroy();
    this.doc?.destroy();
    if (this.server) await new Promise<void>((resolve) => this.server!.close(() => resolve()));
  }

  /** New empty customers and ledger tables (so tests do not see each other's items). */
  async newTables(): Promise<void> {
    const n = ++this.tables;
    this.customersTable = `customers-${n}`;
    this.ledgerTable = `usage-ledger-${n}`;
    await Promise.all([this.createTable(this.customersTable, CUSTOMERS_TABLE_SCHEMA), this.createTable(this.ledgerTable, LEDGER_TABLE_SCHEMA)]);
  }

  /** The environment a function gets for these tables (plus `extra`). */
  env(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
    return {
      CUSTOMERS_TABLE: this.customersTable,
      LEDGER_TABLE: this.ledgerTable,
      AWS_ENDPOINT_URL_DYNAMODB: this.endpoint,
      AWS_REGION: "us-east-1",
      AWS_ACCESS_KEY_ID: "local",
      AWS_SECRET_ACCESS_KEY: "local",
      ...extra,
    };
  }

  /** The store under test, as the functions build it (closed by `stop`). */
  store(options: { timeoutMs?: number; scanPageSize?: number } = {}): DynamoCustomerStore {
    const store = createCustomerStoreFromEnv(this.env(), { timeoutMs: options.timeoutMs ?? 5000, scanPageSize: options.scanPageSize });
    this.stores.push(store);
    return store;
  }

  ledger(): LedgerStore {
    return new LedgerStore(this.doc, this.ledgerTable);
  }

  async putCustomerItem(item: Record<string, unknown>): Promise<void> {
    await this.doc.send(new PutCommand({ TableName: this.customersTable, Item: item }));
  }

  async putLedgerItem(item: LedgerItem): Promise<void> {
    await this.doc.send(new PutCommand({ TableName: this.ledgerTable, Item: item }));
  }

  /** The account item exactly as stored (strongly consistent), or undefined. */
  async account(customerId: string): Promise<AccountItem | undefined> {
    const output = await this.doc.send(new GetCommand({ TableName: this.customersTable, Key: { pk: accountItemKey(customerId) }, ConsistentRead: true }));
    return output.Item as AccountItem | undefined;
  }

  async customerItems(): Promise<Record<string, unknown>[]> {
    return (await this.doc.send(new ScanCommand({ TableName: this.customersTable, ConsistentRead: true }))).Items ?? [];
  }

  private async createTable(name: string, schema: TableSchema): Promise<void> {
    await this.client.send(
      new CreateTableCommand({
        TableName: name,
        AttributeDefinitions: schema.attributeDefinitions.map((d) => ({ AttributeName: d.AttributeName, AttributeType: d.AttributeType as "S" | "N" })),
        KeySchema: schema.keySchema.map((k) => ({ AttributeName: k.AttributeName, KeyType: k.KeyType as "HASH" | "RANGE" })),
        GlobalSecondaryIndexes: schema.globalSecondaryIndexes.map((i) => ({
          IndexName: i.IndexName,
          KeySchema: i.KeySchema.map((k) => ({ AttributeName: k.AttributeName, KeyType: k.KeyType as "HASH" | "RANGE" })),
          Projection: { ProjectionType: i.Projection.ProjectionType as "ALL" },
        })),
        BillingMode: "PAY_PER_REQUEST",
      }),
    );
    // dynalite answers CreateTable with CREATING and turns the table ACTIVE on a later tick, even with createTableMs 0.
    for (;;) {
      const { Table } = await this.client.send(new DescribeTableCommand({ TableName: name }));
      if (Table?.TableStatus === "ACTIVE" && (Table.GlobalSecondaryIndexes ?? []).every((i) => i.IndexStatus === "ACTIVE")) return;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }
}

/** A TCP server that accepts connections and never answers: a DynamoDB that hangs. */
export class HungServer {
  private server?: net.Server;
  private sockets: net.Socket[] = [];

  get endpoint(): string {
    return `http://127.0.0.1:${(this.server!.address() as AddressInfo).port}`;
  }

  async start(): Promise<this> {
    this.server = net.createServer((socket) => {
      this.sockets.push(socket);
      socket.on("error", () => undefined);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    return this;
  }

  /** Connections it took (each one a request that never got an answer). */
  get connections(): number {
    return this.sockets.length;
  }

  async stop(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
