/**
 * An in-memory `CustomerStore` that keeps the rules the port documents (and `customer-store.ts` keeps on DynamoDB):
 * the balance never goes negative, `reserved_micros` is the sum of the holds, a transaction is settled at most once,
 * a credit is applied at most once, and an account's currency is fixed by its first write.
 *
 * Each method answers after a few event-loop turns (`jitter`), then does its check and its write in one synchronous
 * step, as DynamoDB applies one conditional write atomically: so concurrent requests interleave between writes, never
 * inside one. `fail` makes chosen methods reject with `CustomerStoreError`, as the real store does when DynamoDB
 * cannot answer. Every write checks the invariants and records a violation instead of hiding it.
 */
import {
  CustomerStoreError,
  type AccountBalance,
  type CreditArgs,
  type CreditResult,
  type CustomerAccount,
  type CustomerRecord,
  type CustomerStore,
  type ReserveArgs,
  type ReserveResult,
  type SettleArgs,
  type SettleResult,
  type StaleHold,
  type UsageIncrement,
  type UsageTotals,
} from "../../functions/shared/customer-port";

type Method = keyof CustomerStore;

interface Account {
  currency?: string;
  balance: number;
  reserved: number;
  holds: Map<string, { micros: number; at: number; periodStart?: string }>;
  credits: Map<string, { micros: number; at: number; source: string }>;
  counters: Map<string, Omit<UsageTotals, "balance">>;
}

export interface MemoryCustomerStoreOptions {
  /** Most event-loop turns a call waits before it acts (a random number from 0 to this). @default 3 */
  jitter?: number;
}

export class MemoryCustomerStore implements CustomerStore {
  private readonly customers = new Map<string, CustomerRecord>();
  private readonly accounts = new Map<string, Account>();
  /** Methods that reject (`CustomerStoreError`) until removed. */
  readonly fail = new Set<Method>();
  /** Calls per method, failed ones included. */
  readonly calls: Partial<Record<Method, number>> = {};
  /** Broken invariants seen after a write (must stay empty). */
  readonly violations: string[] = [];
  /** The lowest balance any write left (must never be negative). */
  lowestBalance = Number.POSITIVE_INFINITY;

  constructor(private readonly options: MemoryCustomerStoreOptions = {}) {}

  /** Adds (or replaces) a key item. */
  putCustomer(record: CustomerRecord): void {
    this.customers.set(record.apiKeyId, { ...record });
  }

  /** Removes a key item. */
  deleteCustomer(apiKeyId: string): void {
    this.customers.delete(apiKeyId);
  }

  /** A snapshot of an account (zeros when never written). */
  account(customerId: string): { currency?: string; balanceMicros: number; reservedMicros: number; holds: number; credits: number } {
    const account = this.accounts.get(customerId);
    return {
      currency: account?.currency,
      balanceMicros: account?.balance ?? 0,
      reservedMicros: account?.reserved ?? 0,
      holds: account?.holds.size ?? 0,
      credits: account?.credits.size ?? 0,
    };
  }

  async getCustomer(apiKeyId: string): Promise<CustomerRecord | undefined> {
    await this.enter("getCustomer");
    const record = this.customers.get(apiKeyId);
    return record ? { ...record } : undefined;
  }

  async findByStripeCustomer(stripeCustomerId: string): Promise<CustomerRecord | undefined> {
    await this.enter("findByStripeCustomer");
    const record = [...this.customers.values()].find((c) => c.stripeCustomerId === stripeCustomerId);
    return record ? { ...record } : undefined;
  }

  async getBalance(customerId: string): Promise<AccountBalance> {
    await this.enter("getBalance");
    return this.balanceOf(customerId);
  }

  async getUsage(customerId: string, periodStart: string): Promise<UsageTotals> {
    await this.enter("getUsage");
    const totals = this.accounts.get(customerId)?.counters.get(periodStart);
    const balance = this.balanceOf(customerId);
    return totals ? { ...totals, balance } : { periodStart, requests: 0, promptTokens: 0, completionTokens: 0, costMicros: 0, balance };
  }

  async reserve(args: ReserveArgs): Promise<ReserveResult> {
    await this.enter("reserve");
    const account = this.accounts.get(args.customerId);
    const balance = account?.balance ?? 0;
    if (account?.currency !== undefined && account.currency !== args.currency) return { ok: false, reason: "currency_mismatch", balanceMicros: balance };
    // A retried reservation (same transaction, same amount) is the one already made; any other is a bug.
    const held = account?.holds.get(args.transactionId);
    if (held && held.micros === args.micros) return { ok: true, balanceMicros: balance };
    if (held) throw new CustomerStoreError(`reserve: transaction ${args.transactionId} already holds ${held.micros} micro-units`);
    if (balance < args.micros) return { ok: false, reason: "insufficient_balance", balanceMicros: balance };
    const written = this.open(args.customerId, args.currency);
    written.balance -= args.micros;
    written.reserved += args.micros;
    written.holds.set(args.transactionId, { micros: args.micros, at: args.now, periodStart: args.periodStart });
    this.check(args.customerId);
    return { ok: true, balanceMicros: written.balance };
  }

  async settle(args: SettleArgs): Promise<SettleResult> {
    await this.enter("settle");
    const account = this.accounts.get(args.customerId);
    const hold = account?.holds.get(args.transactionId);
    if (!account || !hold) return { settled: false, chargedMicros: 0, shortfallMicros: 0, balanceMicros: account?.balance ?? 0 };
    // The port's rule: the hold covers what it can; above it, only what the balance holds is charged.
    const cost = Math.max(0, args.costMicros);
    const extra = Math.max(0, cost - hold.micros);
    const takenFromBalance = Math.min(extra, account.balance);
    const charged = Math.min(cost, hold.micros) + takenFromBalance;
    account.balance += hold.micros - Math.min(cost, hold.micros) - takenFromBalance;
    account.reserved -= hold.micros;
    account.holds.delete(args.transactionId);
    if (args.usage) this.count(account, args.usage);
    this.check(args.customerId);
    return { settled: true, chargedMicros: charged, shortfallMicros: cost - charged, balanceMicros: account.balance };
  }

  async addUsage(customerId: string, usage: UsageIncrement, _now: number): Promise<void> {
    await this.enter("addUsage");
    this.count(this.open(customerId), usage);
  }

  async credit(args: CreditArgs): Promise<CreditResult> {
    await this.enter("credit");
    const account = this.accounts.get(args.customerId);
    const balance = account?.balance ?? 0;
    if (account?.credits.has(args.creditId)) return { applied: false, reason: "duplicate", balanceMicros: balance };
    if (account?.currency !== undefined && account.currency !== args.currency) return { applied: false, reason: "currency_mismatch", balanceMicros: balance };
    if (balance + args.micros < 0) return { applied: false, reason: "insufficient_balance", balanceMicros: balance };
    const written = this.open(args.customerId, args.currency);
    written.balance += args.micros;
    written.credits.set(args.creditId, { micros: args.micros, at: args.now, source: args.source });
    this.check(args.customerId);
    return { applied: true, balanceMicros: written.balance };
  }

  async listAccounts(): Promise<CustomerAccount[]> {
    await this.enter("listAccounts");
    return [...this.customers.values()].map((customer) => ({ customer: { ...customer }, balance: this.balanceOf(customer.customerId) }));
  }

  async staleHolds(olderThan: number): Promise<StaleHold[]> {
    await this.enter("staleHolds");
    const stale: StaleHold[] = [];
    for (const [customerId, account] of this.accounts) {
      for (const [transactionId, hold] of account.holds) if (hold.at < olderThan) stale.push({ customerId, transactionId, micros: hold.micros, at: hold.at, ...(hold.periodStart ? { periodStart: hold.periodStart } : {}) });
    }
    return stale;
  }

  private balanceOf(customerId: string): AccountBalance {
    const account = this.accounts.get(customerId);
    return {
      customerId,
      currency: account?.currency,
      balanceMicros: account?.balance ?? 0,
      reservedMicros: account?.reserved ?? 0,
      holds: Object.fromEntries([...(account?.holds ?? new Map<string, { micros: number; at: number }>())].map(([tx, hold]) => [tx, { ...hold }])),
    };
  }

  /** The account, created empty (`if_not_exists`) if needed; its currency set by the first write that names one. */
  private open(customerId: string, currency?: string): Account {
    let account = this.accounts.get(customerId);
    if (!account) {
      account = { balance: 0, reserved: 0, holds: new Map(), credits: new Map(), counters: new Map() };
      this.accounts.set(customerId, account);
    }
    if (account.currency === undefined && currency !== undefined) account.currency = currency;
    return account;
  }

  private count(account: Account, usage: UsageIncrement): void {
    const totals = account.counters.get(usage.periodStart) ?? { periodStart: usage.periodStart, requests: 0, promptTokens: 0, completionTokens: 0, costMicros: 0 };
    totals.requests += usage.requests;
    totals.promptTokens += usage.promptTokens;
    totals.completionTokens += usage.completionTokens;
    totals.costMicros += usage.costMicros;
    account.counters.set(usage.periodStart, totals);
  }

  private check(customerId: string): void {
    const account = this.accounts.get(customerId)!;
    this.lowestBalance = Math.min(this.lowestBalance, account.balance);
    if (account.balance < 0) this.violations.push(`${customerId}: balance ${account.balance} < 0`);
    const held = [...account.holds.values()].reduce((sum, hold) => sum + hold.micros, 0);
    if (held !== account.reserved) this.violations.push(`${customerId}: reserved ${account.reserved} != sum of holds ${held}`);
    if (!Number.isSafeInteger(account.balance) || !Number.isSafeInteger(account.reserved)) this.violations.push(`${customerId}: money is not a safe integer`);
  }

  private async enter(method: Method): Promise<void> {
    this.calls[method] = (this.calls[method] ?? 0) + 1;
    const turns = Math.floor(Math.random() * ((this.options.jitter ?? 3) + 1));
    for (let i = 0; i < turns; i++) await new Promise<void>((resolve) => setImmediate(resolve));
    if (this.fail.has(method)) throw new CustomerStoreError(`${method}: the customers table did not answer (simulated)`);
  }
}
