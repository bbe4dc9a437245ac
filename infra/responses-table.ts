/**
 * The responses table (functions/shared/response-owners.ts): which customer created each stored Responses API
 * response, so that no other customer can read, continue, cancel or delete it through the service's shared upstream
 * key. One item per stored response, written once by the chat function, expired by DynamoDB TTL after 30 days
 * (OpenAI's default retention of stored responses).
 *
 * - On demand: one PutItem per created response, one GetItem per stored-response request.
 * - TTL on `expires_at` (`ttl { attribute_name, enabled }` of terraform-provider-aws's aws_dynamodb_table, bridged by
 *   @pulumi/aws 7.48 as `ttl: { attributeName, enabled }`; dynamodb/table.d.ts `TableTtl`). DynamoDB deletes expired
 *   items lazily ("typically within a few days"), so the function treats an expired item as absent itself.
 * - No point-in-time recovery and no deletion protection: the items are a 30-day index of ownership, not billing
 *   records (the ledger and the customers table hold those). Losing the table makes every stored response "not
 *   found" for everyone, which is safe; it never hands one customer's response to another.
 */
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { RESPONSE_OWNERS_TABLE_SCHEMA, RESPONSE_OWNERS_TTL_ATTRIBUTE } from "../functions/shared/response-owners";
import type { PolicyStatement } from "./customers-table";

export class ResponsesTable extends pulumi.ComponentResource {
  public readonly tableName: pulumi.Output<string>;
  public readonly tableArn: pulumi.Output<string>;

  constructor(name: string, args: Record<string, never> = {}, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:ResponsesTable", name, args, opts);
    const table = new aws.dynamodb.Table(
      `${name}-table`,
      {
        billingMode: "PAY_PER_REQUEST",
        hashKey: RESPONSE_OWNERS_TABLE_SCHEMA.keySchema[0].AttributeName,
        attributes: RESPONSE_OWNERS_TABLE_SCHEMA.attributeDefinitions.map((a) => ({ name: a.AttributeName, type: a.AttributeType })),
        ttl: { attributeName: RESPONSE_OWNERS_TTL_ATTRIBUTE, enabled: true },
      },
      { parent: this },
    );
    this.tableName = table.name;
    this.tableArn = table.arn;
    this.registerOutputs({ tableName: this.tableName, tableArn: this.tableArn });
  }
}

/**
 * What the chat function may do to the responses table: exactly the commands `DynamoResponseOwners` sends
 * (functions/shared/response-owner-store.ts): PutItem (record, conditional), GetItem (lookup, and the read-back
 * after a lost condition) and UpdateItem (the context tokens of a streamed response). No Scan, Query or DeleteItem.
 */
export function chatResponsesStatements(tableArn: string): PolicyStatement[] {
  return [{ Effect: "Allow", Action: ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"], Resource: tableArn }];
}
