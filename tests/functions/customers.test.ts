import { expect } from "chai";
import { CachedCustomerDirectory, StaticCustomerDirectory } from "../../functions/ai-chat/customers";
import { ServiceUnavailableError } from "../../functions/ai-chat/errors";
import { createLogger } from "../../functions/ai-chat/logger";
import { MemoryCustomerStore } from "../helpers/memory-customer-store";

const ACME = { apiKeyId: "key-acme", customerId: "acme", plan: "starter", stripeCustomerId: "cus_acme", status: "active" as const };

/** A directory over an in-memory table, on a clock the test moves by hand. */
function directory(options: { ttlMs?: number; maxEntries?: number } = {}) {
  const store = new MemoryCustomerStore({ jitter: 0 });
  store.putCustomer(ACME);
  const clock = { now: 1_000_000 };
  const logs: string[] = [];
  const log = createLogger({ level: "debug", write: (line) => logs.push(line) });
  const customers = new CachedCustomerDirectory({ store, log, clock: () => clock.now, ...options });
  const reads = () => store.calls.getCustomer ?? 0;
  return { store, clock, logs, customers, reads };
}

const unavailable = async (promise: Promise<unknown>): Promise<ServiceUnavailableError> => {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).to.be.instanceOf(ServiceUnavailableError);
  expect((err as ServiceUnavailableError).code).to.equal("customer_store_unavailable");
  expect((err as ServiceUnavailableError).status).to.equal(503);
  return err as ServiceUnavailableError;
};

describe("CachedCustomerDirectory", () => {
  it("reads a key once per TTL, and applies a change to the customer once the TTL has passed", async () => {
    const { store, clock, customers, reads } = directory({ ttlMs: 30_000 });
    expect(await customers.lookup("key-acme")).to.deep.equal({ customerId: "acme", plan: "starter", stripeCustomerId: "cus_acme", status: "active" });
    store.putCustomer({ ...ACME, plan: "pro", status: "suspended" });

    clock.now += 29_999;
    expect((await customers.lookup("key-acme"))?.plan).to.equal("starter");
    expect(reads()).to.equal(1);

    clock.now += 1;
    expect(await customers.lookup("key-acme")).to.include({ plan: "pro", status: "suspended" });
    expect(reads()).to.equal(2);
  });

  it("caches a key that is not there for 5 s, so a new key is served within 5 s", async () => {
    const { store, clock, customers, reads } = directory();
    expect(await customers.lookup("key-new")).to.equal(undefined);
    store.putCustomer({ ...ACME, apiKeyId: "key-new", customerId: "newco" });

    clock.now += 4_999;
    expect(await customers.lookup("key-new")).to.equal(undefined);
    expect(reads()).to.equal(1);

    clock.now += 1;
    expect((await customers.lookup("key-new"))?.customerId).to.equal("newco");
    expect(reads()).to.equal(2);
  });

  it("serves a customer read within the last 10 minutes while the table fails, and answers 503 after that", async () => {
    const { store, clock, customers, logs } = directory({ ttlMs: 30_000 });
    await customers.lookup("key-acme");
    store.fail.add("getCustomer");

    clock.now += 60_000;
    expect((await customers.lookup("key-acme"))?.customerId).to.equal("acme");
    expect(logs.some((l) => l.includes('"customer_lookup_stale"'))).to.equal(true);

    clock.now = 1_000_000 + 10 * 60_000;
    expect((await customers.lookup("key-acme"))?.customerId).to.equal("acme");

    clock.now += 1;
    await unavailable(customers.lookup("key-acme"));
    expect(logs.some((l) => l.includes('"customer_lookup_unavailable"'))).to.equal(true);
  });

  it("answers 503 for a key it never read while the table fails, and serves it once the table is back", async () => {
    const { store, clock, customers } = directory();
    store.fail.add("getCustomer");
    await unavailable(customers.lookup("key-acme"));
    store.fail.delete("getCustomer");
    clock.now += 5_000;
    expect((await customers.lookup("key-acme"))?.customerId).to.equal("acme");
  });

  it("asks a failing table at most once per 5 s, answering from the cache (or 503) in between", async () => {
    const { store, clock, customers, reads } = directory({ ttlMs: 1_000 });
    await customers.lookup("key-acme");
    store.fail.add("getCustomer");
    clock.now += 2_000;
    await customers.lookup("key-acme");
    expect(reads()).to.equal(2);

    for (let i = 0; i < 10; i++) {
      clock.now += 400;
      expect((await customers.lookup("key-acme"))?.customerId).to.equal("acme");
      await unavailable(customers.lookup("key-other"));
    }
    expect(reads()).to.equal(2);

    clock.now += 1_000;
    store.fail.delete("getCustomer");
    await customers.lookup("key-acme");
    expect(reads()).to.equal(3);
  });

  it("reads a key once for a burst of concurrent lookups", async () => {
    const { customers, reads } = directory();
    const found = await Promise.all(Array.from({ length: 20 }, () => customers.lookup("key-acme")));
    expect(found.every((c) => c?.customerId === "acme")).to.equal(true);
    expect(reads()).to.equal(1);
  });

  it("keeps at most maxEntries keys, dropping the one read longest ago", async () => {
    const { store, customers, reads } = directory({ maxEntries: 2 });
    for (const id of ["a", "b"]) store.putCustomer({ ...ACME, apiKeyId: `key-${id}`, customerId: id });
    await customers.lookup("key-acme");
    await customers.lookup("key-a");
    await customers.lookup("key-b");
    expect(reads()).to.equal(3);
    await customers.lookup("key-b");
    expect(reads()).to.equal(3);
    await customers.lookup("key-acme");
    expect(reads()).to.equal(4);
  });
});

describe("StaticCustomerDirectory", () => {
  it("answers the customers of the CUSTOMERS variable, and nothing for inherited names", async () => {
    const customers = new StaticCustomerDirectory(JSON.parse('{"key-acme": {"customerId": "acme", "plan": "starter"}}'));
    expect(await customers.lookup("key-acme")).to.deep.equal({ customerId: "acme", plan: "starter" });
    expect(await customers.lookup("constructor")).to.equal(undefined);
    expect(await customers.lookup("__proto__")).to.equal(undefined);
  });
});

describe("createDeps with CUSTOMERS_TABLE", () => {
  it("builds the table-backed store and cached directory, and no static customers", async () => {
    const { createDeps } = await import("../../functions/ai-chat/index");
    const deps = createDeps({ UPSTREAM_API_KEY: "k", CUSTOMERS_TABLE: "customers", CUSTOMERS: '{"key-a": {"customerId": "a", "plan": "p"}}', AWS_REGION: "us-east-1", LOG_LEVEL: "error" }, { write: () => undefined });
    expect(deps.config.problems).to.deep.equal([]);
    expect(deps.customers).to.be.instanceOf(CachedCustomerDirectory);
    expect(deps.store?.constructor.name).to.equal("DynamoCustomerStore");
    expect(deps.config.customers).to.deep.equal({});
    const without = createDeps({ UPSTREAM_API_KEY: "k", CUSTOMERS: "{}", LOG_LEVEL: "error" }, { write: () => undefined });
    expect(without.store).to.equal(undefined);
    expect(without.customers).to.equal(undefined);
  });
});
