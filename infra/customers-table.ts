/**
 * The customers table (functions/shared/customer-schema.ts): which customer and plan each API key belongs to (key
 * items, written here, one `aws.dynamodb.TableItem` per customer), and each customer's account (balance, open
 * reservations, credits, usage counters), which this program never writes, so no `pulumi up` can reset a balance.
 *
 * Also the one place that says what each function may do to the table (`chatCustomersStatements`,
 * `forwarderCustomersStatements`).
 *
 * How the provider keeps a key item in step (@pulumi/aws 7.48 bridges hashicorp/terraform-provider-aws;
 * internal/service/dynamodb/table_item.go, resourceTableItem and its CRUD functions):
 * - `table_name` and `hash_key` (the attribute's name, `pk`) are ForceNew; `item` (the whole item as DynamoDB JSON)
 *   updates in place and is compared as JSON (`DiffSuppressFunc: verify.SuppressEquivalentJSONDiffs`), so key order
 *   never shows as a change.
 * - Create is a PutItem conditional on `attribute_not_exists(pk)` ("Explode if item exists. We didn't create it."):
 *   a key item that exists without being in this stack's state (a lost state) fails the create instead of being
 *   silently taken over.
 * - Read is a consistent GetItem of that key and stores the whole item read back as `item`: with `pulumi refresh`
 *   (or `up --refresh`) an attribute edited or added by hand shows as drift, and the next update puts the stack
 *   config's item back; an item deleted by hand leaves the state and is created again.
 * - Update is one UpdateItem on the new key: PUT for every attribute of the new item, DELETE for every attribute of
 *   the old one it no longer has (a removed `stripeCustomerId` removes `stripe_customer_id`, so the key item leaves
 *   the `stripe_customer` index); when the key's value changed (a customer's API key was replaced) it then deletes the
 *   old key's item. No replacement: the old key's item goes only once the new one is written.
 * - Delete (a customer removed from the stack config) deletes the key item only; the customer's account item, and
 *   its balance, stay.
 * The provider also notes that attribute names are compared "with everything but letters removed"
 * (@pulumi/aws dynamodb/tableItem.d.ts, tableName): the key item's names stay distinct that way (`keyItemAttributeNames`).
 */
import { marshall } from "@aws-sdk/util-dynamodb";
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import {
  ACCOUNT_ITEM_PREFIX,
  CUSTOMERS_KEY,
  CUSTOMERS_TABLE_SCHEMA,
  KEY_ITEM_PREFIX,
  keyItem,
  STRIPE_CUSTOMER_INDEX,
  type KeyItem,
} from "../functions/shared/customer-schema";
import type { CustomerConfig } from "./stack-config";

export interface CustomersTableArgs {
  /** DynamoDB deletion protection (the balances customers paid for live here). @default true */
  deletionProtection?: boolean;
}

/** The customers table: on demand, point-in-time recovery, the `stripe_customer` index, deletion protection. */
export class CustomersTable extends pulumi.ComponentResource {
  public readonly tableName: pulumi.Output<string>;
  public readonly tableArn: pulumi.Output<string>;

  constructor(name: string, args: CustomersTableArgs = {}, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:CustomersTable", name, {}, opts);
    const table = new aws.dynamodb.Table(
      `${name}-table`,
      {
        // On demand: a few reads and writes per request, no capacity to plan or to throttle on a burst.
        billingMode: "PAY_PER_REQUEST",
        hashKey: CUSTOMERS_TABLE_SCHEMA.keySchema[0].AttributeName,
        attributes: CUSTOMERS_TABLE_SCHEMA.attributeDefinitions.map((a) => ({ name: a.AttributeName, type: a.AttributeType })),
        globalSecondaryIndexes: CUSTOMERS_TABLE_SCHEMA.globalSecondaryIndexes.map((index) => ({
          name: index.IndexName,
          keySchemas: index.KeySchema.map((k) => ({ attributeName: k.AttributeName, keyType: k.KeyType })),
          projectionType: index.Projection.ProjectionType,
        })),
        // Balances are money customers paid: restorable to any second of the last 35 days.
        pointInTimeRecovery: { enabled: true },
        deletionProtectionEnabled: args.deletionProtection ?? true,
        // No serverSideEncryption block: DynamoDB's default encryption with an AWS owned key, no KMS grant needed.
      },
      { parent: this },
    );
    this.tableName = table.name;
    this.tableArn = table.arn;
    this.registerOutputs({ tableName: this.tableName, tableArn: this.tableArn });
  }
}

/**
 * The key item of one customer as the provider's `item` takes it: exactly `keyItem(apiKeyId, customerId, customer)`
 * (the contract the function and the local stack share), marshalled to DynamoDB JSON by the AWS SDK's own
 * `marshall`, so `pulumi up` writes byte for byte the attributes the local stack writes with the SDK.
 */
export function keyItemJson(apiKeyId: string, customerId: string, customer: CustomerConfig): string {
  return JSON.stringify(marshall(keyItem(apiKeyId, customerId, customer)));
}

/**
 * The key item's attribute names as the provider compares them, letters only (tableItem.d.ts): they must stay
 * distinct, or the provider would confuse two of them.
 */
export function keyItemAttributeNames(item: KeyItem): string[] {
  return Object.keys(item).map((name) => name.replace(/[^a-zA-Z]+/g, ""));
}

/** Arguments of the `aws.dynamodb.TableItem` holding one customer's key item. */
export function keyItemArgs(tableName: pulumi.Input<string>, apiKeyId: pulumi.Input<string>, customerId: string, customer: CustomerConfig): aws.dynamodb.TableItemArgs {
  return {
    tableName,
    hashKey: CUSTOMERS_KEY,
    item: pulumi.output(apiKeyId).apply((id) => keyItemJson(id, customerId, customer)),
  };
}

/** An IAM statement (Condition optional). */
export interface PolicyStatement {
  Effect: "Allow";
  Action: string[];
  Resource: string | string[];
  Condition?: Record<string, Record<string, string[]>>;
}

/**
 * Limits an item action to items whose partition key matches one of the patterns: `dynamodb:LeadingKeys` holds the
 * request's partition key values, and ForAllValues requires every one of them to match ("Using IAM policy conditions
 * for fine-grained access control", DynamoDB developer guide:
 * https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/specifying-conditions.html). StringLike because
 * the key is a prefix plus an id (`key#<apiKeyId>`, `account#<customerId>`).
 */
function leadingKeys(...prefixes: string[]): PolicyStatement["Condition"] {
  return { "ForAllValues:StringLike": { "dynamodb:LeadingKeys": prefixes.map((prefix) => `${prefix}*`) } };
}

/**
 * What the chat function may do to the customers table, and nothing else:
 * - GetItem on key items (the API key's customer) and account items (balance, usage counters for `GET /v1/usage`,
 *   the read-back after a refused reservation);
 * - UpdateItem on account items only (reserve, settle, usage counters, the webhook's credits): it can never change
 *   which customer or plan a key belongs to, nor create a key item;
 * - Query on the `stripe_customer` index only (the webhook's customer lookup).
 * No PutItem, DeleteItem, Scan or BatchWriteItem.
 */
export function chatCustomersStatements(tableArn: string): PolicyStatement[] {
  return [
    { Effect: "Allow", Action: ["dynamodb:GetItem"], Resource: tableArn, Condition: leadingKeys(KEY_ITEM_PREFIX, ACCOUNT_ITEM_PREFIX) },
    { Effect: "Allow", Action: ["dynamodb:UpdateItem"], Resource: tableArn, Condition: leadingKeys(ACCOUNT_ITEM_PREFIX) },
    { Effect: "Allow", Action: ["dynamodb:Query"], Resource: `${tableArn}/index/${STRIPE_CUSTOMER_INDEX}` },
  ];
}

/**
 * What the usage forwarder's stale-reservation sweep may do to the customers table: Scan it (the accounts with holds;
 * `CustomerStore.staleHolds`), and UpdateItem and GetItem on account items only (settle or release a hold, and read an
 * account back). The GetItem reads nothing the Scan does not already show; it only keeps a store implementation that
 * reads an account back from failing with AccessDenied. No key item can be changed.
 */
export function forwarderCustomersStatements(tableArn: string): PolicyStatement[] {
  return [
    { Effect: "Allow", Action: ["dynamodb:Scan"], Resource: tableArn },
    { Effect: "Allow", Action: ["dynamodb:UpdateItem", "dynamodb:GetItem"], Resource: tableArn, Condition: leadingKeys(ACCOUNT_ITEM_PREFIX) },
  ];
}
