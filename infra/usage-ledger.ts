/**
 * The usage ledger (a DynamoDB table, one item per metered request) and the usage forwarder that delivers its items
 * to Moesif and, with `stripeBilling: meters`, to Stripe.
 *
 * Two triggers, one handler (functions/usage-forwarder/index.ts):
 * - the table's stream (NEW_IMAGE, INSERTs only): delivery within seconds of the request;
 * - a sweep every minute (EventBridge): everything the stream did not deliver, from the sparse `undelivered` index
 *   (items older than the sweep's grace period, so it does not race the stream). The item in the table is the
 *   durable copy: whatever the stream skips (records before the mapping started, a batch given up on, a sink outage)
 *   the sweep delivers later, so nothing depends on the stream alone.
 * - a dead-letter queue on the stream mapping: a batch the forwarder failed on (a throw, not a sink outage, which
 *   leaves items pending and succeeds) lands there as a record of which shard range was skipped, for an alarm or a
 *   look; its items are still in the backlog index.
 */
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { LEDGER_TABLE_SCHEMA, UNDELIVERED_INDEX } from "../functions/shared/ledger-schema";
import { forwarderCustomersStatements } from "./customers-table";
import { sanitizeStackName } from "./function-env";
import { lambdaAssumeRolePolicy, secretsVersion, type SecretParameterArgs } from "./metered-ai-api";

/**
 * The stream → forwarder mapping's settings.
 * - `LATEST`, not `TRIM_HORIZON`: a mapping created (or re-created) at TRIM_HORIZON would replay up to 24 hours of
 *   INSERTs that were already delivered (Stripe only de-duplicates identifiers within a rolling 24 hours); at LATEST
 *   the records written before the mapping polls are skipped, and the sweep delivers those items a minute later.
 * - Batches of up to 100 (the most one Moesif batch or one Stripe meter event stream call takes), gathered for at
 *   most 1 s: a request's usage reaches the sinks within seconds.
 * - Partial batch responses + bisect: a record the forwarder cannot process is retried alone, not with its batch
 *   ("Splitting batches doesn't consume the retry quota", Lambda developer guide, services-dynamodb-errors).
 * - At most 5 retries and 1 hour (the defaults are unlimited and the stream's 24 hours, "a bad record can block
 *   processing on the affected shard for up to one day", same page): then the batch's description (shard and
 *   sequence numbers, not the items: "a JSON document containing metadata about the failed invocation") goes to the
 *   dead-letter queue, and the sweep delivers the items, still in the table, once the fault is fixed.
 */
export const STREAM_MAPPING = {
  startingPosition: "LATEST",
  batchSize: 100,
  maximumBatchingWindowInSeconds: 1,
  functionResponseTypes: ["ReportBatchItemFailures"],
  bisectBatchOnFunctionError: true,
  maximumRetryAttempts: 5,
  maximumRecordAgeInSeconds: 3600,
} as const;

/** Only new items trigger a delivery: the forwarder's own delivered/failed marks (MODIFY) must not trigger it again. */
export const STREAM_FILTER_PATTERN = JSON.stringify({ eventName: ["INSERT"] });

/** The sweep's schedule. */
export const SWEEP_SCHEDULE = "rate(1 minute)";

/** The dead-letter queue keeps a skipped batch's description for SQS's longest retention, 14 days (1,209,600 s). */
export const DEAD_LETTER_RETENTION_SECONDS = 14 * 24 * 60 * 60;

/**
 * The forwarder's timeout: 55 s, under the sweep's one-minute rate, so in the normal case a sweep invocation has
 * ended before EventBridge starts the next one (the function stops its own work 2 s before its deadline; sink calls
 * are bounded by SINK_TIMEOUT_MS, 10 s, and ledger calls by that deadline). Not a guarantee of no overlap:
 * EventBridge delivers at least once, an invocation can wait in Lambda's async queue, and stream invocations run
 * beside sweeps. Overlaps are harmless (marks are conditional writes, the sinks de-duplicate), only wasteful.
 */
export const FORWARDER_TIMEOUT_SECONDS = 55;

export interface UsageLedgerArgs {
  /** The forwarder's code: a directory archive with `index.js` exporting `handler`. */
  forwarderCode: pulumi.Input<pulumi.asset.Archive>;
  /** The forwarder's plain environment (`forwarderEnvironment`); the component adds LEDGER_TABLE and the parameter names. */
  environment: Record<string, string>;
  /** SSM SecureString parameters created for the forwarder (the Moesif application id, the Stripe key), which only it may read. */
  secretParameters: SecretParameterArgs[];
  /**
   * The customers table (`CUSTOMERS_TABLE`): the forwarder's sweep settles or releases prepaid reservations left
   * behind by a crash, from the ledger item of their transaction (`forwarderCustomersStatements`, and GetItem on the
   * ledger table).
   */
  customers?: { tableName: pulumi.Input<string>; tableArn: pulumi.Input<string> };
  /** DynamoDB deletion protection on the table. @default true */
  deletionProtection?: boolean;
  /** @default "arm64" */
  architecture?: "arm64" | "x86_64";
  /** @default 30 */
  logRetentionDays?: number;
  /** Reserved concurrency of the forwarder; -1 leaves it unreserved. @default -1 */
  reservedConcurrency?: number;
}

/** The usage ledger table, its forwarder (stream trigger, minute sweep, dead-letter queue) and the forwarder's secrets. */
export class UsageLedger extends pulumi.ComponentResource {
  public readonly tableName: pulumi.Output<string>;
  public readonly tableArn: pulumi.Output<string>;
  public readonly streamArn: pulumi.Output<string>;
  public readonly forwarderFunctionName: pulumi.Output<string>;
  public readonly forwarderLogGroupName: pulumi.Output<string>;
  public readonly deadLetterQueueUrl: pulumi.Output<string>;
  public readonly deadLetterQueueArn: pulumi.Output<string>;
  /** The forwarder's environment variable → the SSM parameter it names (names only). */
  public readonly parameterNames: pulumi.Output<Record<string, string>>;

  constructor(name: string, args: UsageLedgerArgs, opts?: pulumi.ComponentResourceOptions) {
    super("metered-ai-api:index:UsageLedger", name, {}, opts);
    const parent = { parent: this };
    const label = `metered-ai-api-${sanitizeStackName(pulumi.getStack())}`;

    const table = new aws.dynamodb.Table(
      `${name}-table`,
      {
        // On-demand: one write per request, no capacity to plan or to throttle on a burst.
        billingMode: "PAY_PER_REQUEST",
        hashKey: LEDGER_TABLE_SCHEMA.keySchema[0].AttributeName,
        attributes: LEDGER_TABLE_SCHEMA.attributeDefinitions.map((a) => ({ name: a.AttributeName, type: a.AttributeType })),
        globalSecondaryIndexes: LEDGER_TABLE_SCHEMA.globalSecondaryIndexes.map((index) => ({
          name: index.IndexName,
          keySchemas: index.KeySchema.map((k) => ({ attributeName: k.AttributeName, keyType: k.KeyType })),
          projectionType: index.Projection.ProjectionType,
        })),
        // The billing record: restorable to any second of the last 35 days.
        pointInTimeRecovery: { enabled: true },
        deletionProtectionEnabled: args.deletionProtection ?? true,
        streamEnabled: true,
        // The new item is all the forwarder needs; no old image (items are inserted once, then only marked).
        streamViewType: "NEW_IMAGE",
        // No serverSideEncryption block: DynamoDB's default encryption at rest with an AWS owned key, which needs no
        // KMS grant for the functions (a customer managed key would need kms:Decrypt/GenerateDataKey for each).
      },
      parent,
    );

    const deadLetterQueue = new aws.sqs.Queue(
      `${name}-dlq`,
      { messageRetentionSeconds: DEAD_LETTER_RETENTION_SECONDS, sqsManagedSseEnabled: true },
      parent,
    );

    const parameters = args.secretParameters.map(
      (p) => new aws.ssm.Parameter(`${name}-param-${p.slug}`, { type: aws.ssm.ParameterType.SecureString, value: p.value, description: p.description }, parent),
    );

    const logGroup = new aws.cloudwatch.LogGroup(
      `${name}-forwarder-logs`,
      { namePrefix: `/aws/lambda/${label}-usage-forwarder-`, retentionInDays: args.logRetentionDays ?? 30 },
      parent,
    );
    const role = new aws.iam.Role(`${name}-forwarder-role`, { assumeRolePolicy: lambdaAssumeRolePolicy() }, parent);
    const rolePolicy = new aws.iam.RolePolicy(
      `${name}-forwarder-policy`,
      {
        role: role.id,
        policy: pulumi
          .all([logGroup.arn, table.arn, table.streamArn, deadLetterQueue.arn, pulumi.all(parameters.map((p) => p.arn)), args.customers?.tableArn])
          .apply(([logGroupArn, tableArn, streamArn, deadLetterQueueArn, parameterArns, customersTableArn]) =>
            forwarderPolicy({ logGroupArn, tableArn, streamArn, deadLetterQueueArn, parameterArns, customersTableArn }),
          ),
      },
      parent,
    );

    const environment = pulumi
      .all([table.name, pulumi.all(parameters.map((p) => p.name)), pulumi.all(parameters.map((p) => p.version)), args.customers?.tableName])
      .apply(([tableName, names, versions, customersTable]) => ({
        ...args.environment,
        LEDGER_TABLE: tableName,
        ...(customersTable ? { CUSTOMERS_TABLE: customersTable } : {}),
        ...Object.fromEntries(args.secretParameters.map((p, i) => [p.envVar, names[i]])),
        // As for ai-chat: a changed secret changes the configuration, so no warm container keeps the old one.
        ...(parameters.length > 0 ? { SECRETS_VERSION: secretsVersion(versions) } : {}),
      }));
    const fn = new aws.lambda.Function(
      `${name}-forwarder`,
      {
        description: `metered-ai-api usage forwarder: ledger → Moesif / Stripe (${label})`,
        runtime: aws.lambda.Runtime.NodeJS22dX,
        architectures: [args.architecture ?? "arm64"],
        handler: "index.handler",
        code: args.forwarderCode,
        role: role.arn,
        memorySize: 256,
        timeout: FORWARDER_TIMEOUT_SECONDS,
        // When reserved, the forwarder keeps delivering while the chat function uses the account's whole concurrency,
        // and never runs more deliveries than this against the sinks' rate limits at once. Without it, it is already
        // bounded: one invocation per stream shard plus one sweep a minute.
        reservedConcurrentExecutions: args.reservedConcurrency ?? -1,
        environment: { variables: environment },
        loggingConfig: { logFormat: "Text", logGroup: logGroup.name },
      },
      { parent: this, dependsOn: [rolePolicy, logGroup, ...parameters] },
    );

    // Lambda checks the role's stream and queue permissions when it creates the mapping: the policy must exist first.
    new aws.lambda.EventSourceMapping(
      `${name}-stream-trigger`,
      {
        eventSourceArn: table.streamArn,
        functionName: fn.arn,
        ...STREAM_MAPPING,
        functionResponseTypes: [...STREAM_MAPPING.functionResponseTypes],
        filterCriteria: { filters: [{ pattern: STREAM_FILTER_PATTERN }] },
        destinationConfig: { onFailure: { destinationArn: deadLetterQueue.arn } },
      },
      { parent: this, dependsOn: [rolePolicy] },
    );

    const sweep = new aws.cloudwatch.EventRule(
      `${name}-sweep`,
      { description: `metered-ai-api: deliver the usage ledger's backlog (${label})`, scheduleExpression: SWEEP_SCHEDULE },
      parent,
    );
    // Only this rule may invoke the forwarder (besides the stream mapping, which uses the role, not a permission).
    const sweepPermission = new aws.lambda.Permission(
      `${name}-sweep-permission`,
      { action: "lambda:InvokeFunction", function: fn.name, principal: "events.amazonaws.com", sourceArn: sweep.arn },
      parent,
    );
    new aws.cloudwatch.EventTarget(`${name}-sweep-target`, { rule: sweep.name, arn: fn.arn }, { parent: this, dependsOn: [sweepPermission] });
    // A sweep that failed or waited in Lambda's async queue is superseded by the next one a minute later: no retries,
    // and none kept longer than that minute (60 s is the least Lambda accepts), so sweeps do not pile up (a late one
    // can still overlap the next; see FORWARDER_TIMEOUT_SECONDS).
    new aws.lambda.FunctionEventInvokeConfig(`${name}-sweep-invoke-config`, { functionName: fn.name, maximumRetryAttempts: 0, maximumEventAgeInSeconds: 60 }, parent);

    this.tableName = table.name;
    this.tableArn = table.arn;
    this.streamArn = table.streamArn;
    this.forwarderFunctionName = fn.name;
    this.forwarderLogGroupName = logGroup.name;
    this.deadLetterQueueUrl = deadLetterQueue.url;
    this.deadLetterQueueArn = deadLetterQueue.arn;
    this.parameterNames = pulumi
      .all(parameters.map((p) => p.name))
      .apply((names) => Object.fromEntries(args.secretParameters.map((p, i) => [p.envVar, names[i]])));
    this.registerOutputs({
      tableName: this.tableName,
      tableArn: this.tableArn,
      streamArn: this.streamArn,
      forwarderFunctionName: this.forwarderFunctionName,
      forwarderLogGroupName: this.forwarderLogGroupName,
      deadLetterQueueUrl: this.deadLetterQueueUrl,
      deadLetterQueueArn: this.deadLetterQueueArn,
      parameterNames: this.parameterNames,
    });
  }
}

export interface ForwarderPolicyArgs {
  logGroupArn: string;
  tableArn: string;
  streamArn: string;
  deadLetterQueueArn: string;
  parameterArns: string[];
  /** With prepaid reservations to sweep: the customers table. */
  customersTableArn?: string;
}

/**
 * The forwarder's permissions, each on its own resource and nothing else:
 * - its log group;
 * - Query on the `undelivered` index only (the sweep's backlog) and UpdateItem on the table (the delivered/failed
 *   marks): no PutItem, DeleteItem or Scan;
 * - the four stream actions the DynamoDB developer guide's policy for a Lambda function reading a stream lists
 *   (DescribeStream, GetRecords, GetShardIterator, ListStreams: iam-policy-example-lamda-process-dynamodb-streams),
 *   on this table's stream. DescribeStream, GetRecords and GetShardIterator take a `stream` resource; ListStreams has
 *   no resource type in the Service Authorization Reference (list_amazondynamodb: "Resource types: (none)"), so only
 *   `*` would match it, which this policy never grants. It is listed on the stream as the guide's own example does
 *   (`table/GameScores/stream/*`) and as the Serverless Framework's default role has for years
 *   (serverless/serverless lib/plugins/aws/package/compile/events/stream.js: the four actions on the stream ARN):
 *   a mapping given the stream's ARN works without ListStreams ever being authorized;
 * - SendMessage on the dead-letter queue (the mapping's on-failure destination uses the function's role);
 * - GetParameter(s) on its own SSM parameters (AWS managed key: no kms:Decrypt needed, see `functionPolicy`);
 * - with a customers table: GetItem on the ledger table (a stale reservation is settled at its transaction's billed
 *   cost, or released when there is no ledger item) and `forwarderCustomersStatements` on the customers table.
 */
export function forwarderPolicy(args: ForwarderPolicyArgs): string {
  const statements: object[] = [
    { Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents"], Resource: `${args.logGroupArn}:*` },
    { Effect: "Allow", Action: ["dynamodb:Query"], Resource: `${args.tableArn}/index/${UNDELIVERED_INDEX}` },
    { Effect: "Allow", Action: ["dynamodb:UpdateItem"], Resource: args.tableArn },
    { Effect: "Allow", Action: ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator", "dynamodb:ListStreams"], Resource: args.streamArn },
    { Effect: "Allow", Action: ["sqs:SendMessage"], Resource: args.deadLetterQueueArn },
  ];
  if (args.parameterArns.length > 0) statements.push({ Effect: "Allow", Action: ["ssm:GetParameters", "ssm:GetParameter"], Resource: [...args.parameterArns] });
  if (args.customersTableArn) {
    statements.push({ Effect: "Allow", Action: ["dynamodb:GetItem"], Resource: args.tableArn }, ...forwarderCustomersStatements(args.customersTableArn));
  }
  return JSON.stringify({ Version: "2012-10-17", Statement: statements });
}
