/**
 * Who an API key belongs to. Two implementations of one narrow port: the customers table (DynamoDB, through the
 * `CustomerStore` port), cached per container; and the `CUSTOMERS` variable, for deployments and tests without a
 * table.
 *
 * Cache rules (the table is read once per key and container, not once per request):
 * - a key found is kept `ttlMs` (`CUSTOMER_CACHE_TTL_MS`, default 30 s): a change to a customer's plan or status, or
 *   a key moved to another customer, applies within that time;
 * - a key not found is kept 5 s, so a key created a moment ago is served soon while a flood of requests from an
 *   unknown key id still costs one read per 5 s;
 * - when the table cannot answer, a key found within the last 10 minutes is served from the cache (an outage of the
 *   table does not stop customers it already knew), and anything else answers 503 `customer_store_unavailable`
 *   (fail closed: usage that cannot be attributed is not served). After a failure the table is asked again at most
 *   once per `retryAfterMs`, so an outage costs one timeout per few seconds, not one per request;
 * - a key whose item the table returned but that cannot be read (`CustomerItemInvalidError`: an unknown status, no
 *   plan…) is a fact about that key, not an outage: that key answers 403 `customer_invalid` (logged as an error,
 *   cached like a miss), its earlier cached customer is dropped rather than served stale, and the back-off that
 *   protects the table from an outage is not armed, so no other key is affected.
 */
import { CustomerItemInvalidError, type CustomerRecord, type CustomerStore } from "../shared/customer-port";
import type { Customer } from "./config";
import { ForbiddenError, ServiceUnavailableError } from "./errors";
import { describeError, type Logger } from "./logger";

/** Narrow port: the customer an API Gateway key id belongs to. */
export interface CustomerDirectory {
  /**
   * The customer, or undefined when the key belongs to none. Rejects with `ServiceUnavailableError`
   * (`customer_store_unavailable`) when it cannot tell, and with `ForbiddenError` (`customer_invalid`) when the key's
   * item exists but cannot be read.
   */
  lookup(apiKeyId: string): Promise<Customer | undefined>;
}

/** Customers from the `CUSTOMERS` variable (key id → customer). */
export class StaticCustomerDirectory implements CustomerDirectory {
  constructor(private readonly customers: Record<string, Customer>) {}

  async lookup(apiKeyId: string): Promise<Customer | undefined> {
    // Own keys only: a key id such as "constructor" must not resolve to Object's.
    return Object.prototype.hasOwnProperty.call(this.customers, apiKeyId) ? this.customers[apiKeyId] : undefined;
  }
}

/** How long a key that was not found is cached. */
export const MISS_TTL_MS = 5_000;
/** How old a cached customer may be and still be served while the table cannot answer. */
export const STALE_FOR_MS = 10 * 60_000;

export interface CachedCustomerDirectoryOptions {
  store: Pick<CustomerStore, "getCustomer">;
  /** How long a key found is served from the cache. @default 30000 */
  ttlMs?: number;
  /** @default 5000 */
  missTtlMs?: number;
  /** @default 600000 */
  staleForMs?: number;
  /** After a failed read, how long lookups answer from the cache (or 503) without asking the table. @default 5000 */
  retryAfterMs?: number;
  /** Most keys kept; past it the ones read from the table longest ago go. @default 10000 */
  maxEntries?: number;
  clock?: () => number;
  log: Logger;
}

interface Entry {
  customer?: Customer;
  /** The key's item was found but could not be read: the key is refused until the entry expires (as a miss). */
  invalid?: boolean;
  fetchedAt: number;
}

/** The answer for a key whose item cannot be read: the operator has to fix the item; nothing the caller does helps. */
function invalidCustomer(): ForbiddenError {
  return new ForbiddenError("This API key's customer record is invalid; ask the service's operator.", "customer_invalid");
}

/** Customers from the customers table, cached per container (see the module's notes for the rules). */
export class CachedCustomerDirectory implements CustomerDirectory {
  private readonly entries = new Map<string, Entry>();
  private readonly inflight = new Map<string, Promise<Customer | undefined>>();
  private readonly clock: () => number;
  private readonly ttlMs: number;
  private readonly missTtlMs: number;
  private readonly staleForMs: number;
  private readonly retryAfterMs: number;
  private readonly maxEntries: number;
  private failedUntil = 0;

  constructor(private readonly options: CachedCustomerDirectoryOptions) {
    this.clock = options.clock ?? Date.now;
    this.ttlMs = options.ttlMs ?? 30_000;
    this.missTtlMs = options.missTtlMs ?? MISS_TTL_MS;
    this.staleForMs = options.staleForMs ?? STALE_FOR_MS;
    this.retryAfterMs = options.retryAfterMs ?? 5_000;
    this.maxEntries = Math.max(1, options.maxEntries ?? 10_000);
  }

  async lookup(apiKeyId: string): Promise<Customer | undefined> {
    const now = this.clock();
    const entry = this.entries.get(apiKeyId);
    if (entry && now - entry.fetchedAt < (entry.customer ? this.ttlMs : this.missTtlMs)) {
      if (entry.invalid) throw invalidCustomer();
      return entry.customer;
    }
    if (now < this.failedUntil) return this.fallback(apiKeyId, entry, now, "the customers table failed moments ago");
    // One read per key at a time: a burst of requests from one key after its entry expired waits for the same read.
    let pending = this.inflight.get(apiKeyId);
    if (!pending) {
      pending = this.read(apiKeyId).finally(() => this.inflight.delete(apiKeyId));
      this.inflight.set(apiKeyId, pending);
    }
    return pending;
  }

  private async read(apiKeyId: string): Promise<Customer | undefined> {
    let record: CustomerRecord | undefined;
    try {
      record = await this.options.store.getCustomer(apiKeyId);
    } catch (err) {
      const now = this.clock();
      if (err instanceof CustomerItemInvalidError) {
        // The table answered: this key's item is broken (a hand edit, a bad import). Only this key is refused, and
        // its earlier `active` entry goes with it: a botched suspension must not keep serving the key.
        this.options.log.error("customer_item_invalid", { api_key_id: apiKeyId, error: describeError(err) });
        this.remember(apiKeyId, { invalid: true, fetchedAt: now });
        throw invalidCustomer();
      }
      this.failedUntil = now + this.retryAfterMs;
      this.options.log.warn("customer_lookup_failed", { api_key_id: apiKeyId, error: describeError(err), retry_after_ms: this.retryAfterMs });
      return this.fallback(apiKeyId, this.entries.get(apiKeyId), now, describeError(err).message);
    }
    const customer = record ? toCustomer(record) : undefined;
    this.remember(apiKeyId, { customer, fetchedAt: this.clock() });
    return customer;
  }

  /** While the table cannot answer: a customer cached within `staleForMs`, or 503. */
  private fallback(apiKeyId: string, entry: Entry | undefined, now: number, reason: string): Customer | undefined {
    if (entry?.customer && now - entry.fetchedAt <= this.staleForMs) {
      this.options.log.warn("customer_lookup_stale", { api_key_id: apiKeyId, customer_id: entry.customer.customerId, age_ms: now - entry.fetchedAt });
      return entry.customer;
    }
    this.options.log.error("customer_lookup_unavailable", { api_key_id: apiKeyId, reason });
    throw new ServiceUnavailableError("The service cannot look up this API key's customer right now; retry shortly.", "customer_store_unavailable");
  }

  private remember(apiKeyId: string, entry: Entry): void {
    this.entries.delete(apiKeyId);
    this.entries.set(apiKeyId, entry);
    // A Map iterates in insertion order, and every read from the table re-inserts: the first key was read longest ago.
    while (this.entries.size > this.maxEntries) this.entries.delete(this.entries.keys().next().value as string);
  }
}

/** A key item, in the function's terms. */
export function toCustomer(record: CustomerRecord): Customer {
  return {
    customerId: record.customerId,
    plan: record.plan,
    ...(record.stripeCustomerId ? { stripeCustomerId: record.stripeCustomerId } : {}),
    status: record.status,
  };
}
