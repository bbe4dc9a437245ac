import { CreateTableCommand, DescribeTableCommand, DynamoDBClient } from "@aws-sdk/client-dynamodb";
import { GetCommand, PutCommand } from "@aws-sdk/lib-dynamodb";
import { expect } from "chai";
import { createResponseOwnersFromEnv, DynamoResponseOwners, MemoryResponseOwners } from "../../functions/shared/response-owner-store";
import { RESPONSE_OWNERS_TABLE_SCHEMA, RESPONSE_OWNERSHIP_TTL_MS, ResponseOwnersError, type ResponseOwners } from "../../functions/shared/response-owners";
import { CreditsFixture, HungServer } from "./dynalite-fixture";

const NOW = Date.UTC(2026, 10, 28, 12, 0, 0);

async function ownersErrorOf(promise: Promise<unknown>): Promise<ResponseOwnersError> {
  try {
    await promise;
  } catch (err) {
    expect(err).to.be.instanceOf(ResponseOwnersError);
    return err as ResponseOwnersError;
  }
  expect.fail("expected a ResponseOwnersError");
}

/** The behaviour both implementations promise (the port's contract). */
function contract(name: string, make: () => Promise<ResponseOwners>): void {
  describe(`${name}: the ResponseOwners contract`, () => {
    let owners: ResponseOwners;
    beforeEach(async () => {
      owners = await make();
    });

    it("records an owner and finds it again with its model and context tokens", async () => {
      const recorded = await owners.record({ responseId: "resp_a1", customerId: "alice", createdAt: NOW, model: "gpt-4o-mini", contextTokens: 42 }, NOW);
      expect(recorded).to.deep.equal({ responseId: "resp_a1", customerId: "alice", createdAt: NOW, model: "gpt-4o-mini", contextTokens: 42 });
      expect(await owners.lookup("resp_a1", NOW + 1000)).to.deep.equal(recorded);
    });

    it("answers undefined for an id nobody recorded", async () => {
      expect(await owners.lookup("resp_never", NOW)).to.equal(undefined);
    });

    it("keeps the first owner: a second customer recording the same id gets the first one back", async () => {
      await owners.record({ responseId: "resp_shared", customerId: "alice", createdAt: NOW }, NOW);
      const second = await owners.record({ responseId: "resp_shared", customerId: "bob", createdAt: NOW + 5 }, NOW + 5);
      expect(second.customerId).to.equal("alice");
      expect((await owners.lookup("resp_shared", NOW + 10))?.customerId).to.equal("alice");
    });

    it("treats a record past its 30-day retention as absent", async () => {
      await owners.record({ responseId: "resp_old", customerId: "alice", createdAt: NOW }, NOW);
      expect(await owners.lookup("resp_old", NOW + RESPONSE_OWNERSHIP_TTL_MS - 1000)).to.not.equal(undefined);
      expect(await owners.lookup("resp_old", NOW + RESPONSE_OWNERSHIP_TTL_MS)).to.equal(undefined);
    });

    it("lets only the owner set the context tokens", async () => {
      await owners.record({ responseId: "resp_ctx", customerId: "alice", createdAt: NOW }, NOW);
      await owners.setContextTokens("resp_ctx", "bob", 999);
      expect((await owners.lookup("resp_ctx", NOW))?.contextTokens).to.equal(undefined);
      await owners.setContextTokens("resp_ctx", "alice", 120);
      expect((await owners.lookup("resp_ctx", NOW))?.contextTokens).to.equal(120);
    });

    it("does not create a record when the context tokens of an unknown id are set", async () => {
      await owners.setContextTokens("resp_ghost", "alice", 10);
      expect(await owners.lookup("resp_ghost", NOW)).to.equal(undefined);
    });
  });
}

describe("response owner store", () => {
  const fixture = new CreditsFixture();
  const stores: DynamoResponseOwners[] = [];
  let tables = 0;

  before(async () => {
    await fixture.start();
  });
  after(async () => {
    for (const store of stores) store.destroy();
    await fixture.stop();
  });

  async function newTable(): Promise<string> {
    const name = `responses-${++tables}`;
    const client = new DynamoDBClient({ region: "us-east-1", endpoint: fixture.endpoint, credentials: { accessKeyId: "local", secretAccessKey: "local" } });
    try {
      await client.send(
        new CreateTableCommand({
          TableName: name,
          AttributeDefinitions: RESPONSE_OWNERS_TABLE_SCHEMA.attributeDefinitions.map((d) => ({ ...d })),
          KeySchema: RESPONSE_OWNERS_TABLE_SCHEMA.keySchema.map((k) => ({ ...k })),
          BillingMode: "PAY_PER_REQUEST",
        }),
      );
      for (;;) {
        const { Table } = await client.send(new DescribeTableCommand({ TableName: name }));
        if (Table?.TableStatus === "ACTIVE") return name;
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    } finally {
      client.destroy();
    }
  }

  function dynamo(table: string, timeoutMs = 5000): DynamoResponseOwners {
    const store = createResponseOwnersFromEnv(fixture.env({ RESPONSES_TABLE: table }), { timeoutMs });
    stores.push(store);
    return store;
  }

  contract("DynamoResponseOwners (dynalite)", async () => dynamo(await newTable()));
  contract("MemoryResponseOwners", async () => new MemoryResponseOwners());

  describe("DynamoResponseOwners", () => {
    it("writes the item in the contract's schema, with its TTL attribute in epoch seconds", async () => {
      const table = await newTable();
      await dynamo(table).record({ responseId: "resp_item", customerId: "alice", createdAt: NOW, model: "m" }, NOW);
      const { Item } = await fixture.doc.send(new GetCommand({ TableName: table, Key: { response_id: "resp_item" }, ConsistentRead: true }));
      expect(Item).to.deep.equal({ response_id: "resp_item", customer_id: "alice", created_at: NOW, expires_at: Math.floor((NOW + RESPONSE_OWNERSHIP_TTL_MS) / 1000), model: "m" });
    });

    it("replaces an expired item that DynamoDB's lazy TTL has not deleted yet", async () => {
      const table = await newTable();
      await fixture.doc.send(new PutCommand({ TableName: table, Item: { response_id: "resp_reused", customer_id: "alice", created_at: NOW - RESPONSE_OWNERSHIP_TTL_MS - 5000, expires_at: Math.floor((NOW - 5000) / 1000) } }));
      const recorded = await dynamo(table).record({ responseId: "resp_reused", customerId: "bob", createdAt: NOW }, NOW);
      expect(recorded.customerId).to.equal("bob");
    });

    it("refuses an item without a customer as a store error, not as an absent owner", async () => {
      const table = await newTable();
      await fixture.doc.send(new PutCommand({ TableName: table, Item: { response_id: "resp_broken", created_at: NOW, expires_at: Math.floor(NOW / 1000) + 1000 } }));
      const err = await ownersErrorOf(dynamo(table).lookup("resp_broken", NOW));
      expect(err.message).to.match(/lookup/);
    });

    it("fails with ResponseOwnersError when the table does not exist", async () => {
      const err = await ownersErrorOf(dynamo("no-such-table").lookup("resp_x", NOW));
      expect(err.message).to.match(/ResourceNotFoundException/);
    });

    it("fails within its timeout with ResponseOwnersError when DynamoDB hangs", async () => {
      const hung = await new HungServer().start();
      try {
        const store = createResponseOwnersFromEnv({ ...fixture.env({ RESPONSES_TABLE: "responses" }), AWS_ENDPOINT_URL_DYNAMODB: hung.endpoint }, { timeoutMs: 150 });
        stores.push(store);
        const err = await ownersErrorOf(store.record({ responseId: "resp_hang", customerId: "alice", createdAt: NOW }, NOW));
        expect(err.message).to.match(/record/);
        expect(hung.connections).to.be.greaterThan(0);
      } finally {
        await hung.stop();
      }
    });

    it("needs RESPONSES_TABLE", () => {
      expect(() => createResponseOwnersFromEnv({})).to.throw(ResponseOwnersError, /RESPONSES_TABLE/);
    });
  });

  describe("MemoryResponseOwners", () => {
    it("rejects with ResponseOwnersError for a method told to fail", async () => {
      const owners = new MemoryResponseOwners();
      owners.fail.add("lookup");
      await ownersErrorOf(owners.lookup("resp_x", NOW));
      expect(owners.calls.lookup).to.equal(1);
    });

    it("forgets the oldest record beyond its size bound", async () => {
      const owners = new MemoryResponseOwners(2);
      for (const id of ["resp_1", "resp_2", "resp_3"]) await owners.record({ responseId: id, customerId: "alice", createdAt: NOW }, NOW);
      expect(await owners.lookup("resp_1", NOW)).to.equal(undefined);
      expect((await owners.lookup("resp_3", NOW))?.customerId).to.equal("alice");
    });
  });
});
