import { createHash } from "node:crypto";
import * as pulumi from "@pulumi/pulumi";

/** Pulumi's marker for a secret value inside mock inputs (runtime/rpc.js specialSecretSig). */
const SECRET_SIG = "4dabf18193072939515e22adb298388d";

export const isSecretInput = (value: unknown): boolean => typeof value === "object" && value !== null && SECRET_SIG in value;
export const unsecret = (value: unknown): any => (isSecretInput(value) ? (value as { value: unknown }).value : value);

/** The resource options the SDK sent to the engine (what mocks' `newResource` is not told). */
export interface RecordedOptions {
  deleteBeforeReplace: boolean;
  additionalSecretOutputs: string[];
  retainOnDelete: boolean;
  /** URNs of explicit and implicit dependencies. */
  dependencies: string[];
  parent: string;
}

export interface Recorded {
  type: string;
  name: string;
  /** The id the mock gave the resource. */
  id: string;
  /** The inputs as the engine would receive them (secret inputs wrapped, see `isSecretInput`). */
  inputs: any;
  /** The state the mock answered: inputs plus the computed outputs a provider would add. */
  state: Record<string, any>;
  options: RecordedOptions;
  urn: string;
}

const ACCOUNT = "123456789012";
const REGION = "us-east-1";
/** A TableItem's hash key value as the provider computes it (table_item.go attributeValueToString: S and N verbatim). */
function tableItemKeyValue(item: string, hashKey: string): string {
  const value = (JSON.parse(item) as Record<string, Record<string, string>>)[hashKey];
  return value?.S ?? value?.N ?? "";
}

/** A deterministic string of `length` characters from [a-z0-9] (API Gateway ids) or [A-Za-z0-9] (key values). */
function derived(seed: string, length: number, alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"): string {
  let out = "";
  for (let i = 0; out.length < length; i++) {
    for (const byte of createHash("sha256").update(`${seed}:${i}`).digest()) {
      if (out.length < length) out += alphabet[byte % alphabet.length];
    }
  }
  return out;
}

/** An API key value of the kind API Gateway generates: 40 alphanumeric characters. */
export function mockApiKeyValue(logicalName: string): string {
  return derived(`key-value:${logicalName}`, 40, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789");
}

/** A Stripe webhook signing secret of realistic length, one per endpoint (Stripe gives each endpoint its own). */
export function mockWebhookSecret(logicalName: string): string {
  return `whsec_${derived(`webhook:${logicalName}`, 32, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")}`;
}
/** The Moesif webhook endpoint's signing secret. */
export const MOCK_WEBHOOK_SECRET = mockWebhookSecret("moesif-stripe-endpoint");
/** The credits webhook endpoint's signing secret. */
export const MOCK_CREDITS_WEBHOOK_SECRET = mockWebhookSecret("metered-ai-api-stripe-credits-endpoint");


/**
 * Mocks that record every resource (inputs, answered state and the options the SDK sent) and fill in the computed
 * outputs the program reads, the way the AWS provider would: auto-names, ARNs, API Gateway's 10-character key ids,
 * the key value on both the ApiKey and the UsagePlanKey, Stripe ids and per-endpoint signing secrets. The region and
 * partition invokes answer us-east-1 / aws; other calls throw.
 */
export function recordingMocks(created: Recorded[], pendingOptions: Map<string, RecordedOptions & { urn: string }> = new Map()): pulumi.runtime.Mocks {
  const keyValues = new Map<string, string>();
  return {
    newResource(args) {
      const inputs = args.inputs;
      const state: Record<string, any> = { ...inputs };
      let id = `${args.name}-id`;
      const autoName = () => `${args.name}-${derived(`autoname:${args.name}`, 7, "0123456789abcdef")}`;
      switch (args.type) {
        case "aws:lambda/function:Function":
          state.name = inputs.name ?? autoName();
          state.arn = `arn:aws:lambda:${REGION}:${ACCOUNT}:function:${state.name}`;
          state.invokeArn = `arn:aws:apigateway:${REGION}:lambda:path/2015-03-31/functions/${state.arn}/invocations`;
          state.responseStreamingInvokeArn = `arn:aws:apigateway:${REGION}:lambda:path/2021-11-15/functions/${state.arn}/response-streaming-invocations`;
          break;
        case "aws:apigateway/restApi:RestApi":
          id = derived(`id:${args.name}`, 10);
          state.rootResourceId = "root-id";
          state.executionArn = `arn:aws:execute-api:${REGION}:${ACCOUNT}:${id}`;
          break;
        case "aws:apigateway/stage:Stage":
          state.invokeUrl = `https://${inputs.restApi}.execute-api.${REGION}.amazonaws.com/${inputs.stageName}`;
          break;
        case "aws:apigateway/apiKey:ApiKey":
          id = derived(`id:${args.name}`, 10);
          state.value = mockApiKeyValue(args.name);
          keyValues.set(id, state.value);
          break;
        case "aws:apigateway/usagePlanKey:UsagePlanKey":
          // What GetUsagePlanKey returns: the key's name and value (terraform-provider-aws usage_plan_key.go Read).
          state.value = keyValues.get(inputs.keyId);
          state.name = `${inputs.keyId}-name`;
          break;
        case "aws:iam/role:Role":
          state.name = inputs.name ?? autoName();
          state.arn = `arn:aws:iam::${ACCOUNT}:role/${state.name}`;
          break;
        case "aws:cloudwatch/logGroup:LogGroup":
          // The provider's name_prefix adds a 26-character unique suffix.
          state.name = inputs.name ?? `${inputs.namePrefix ?? "terraform-"}${derived(`prefix:${args.name}`, 26, "0123456789")}`;
          state.arn = `arn:aws:logs:${REGION}:${ACCOUNT}:log-group:${state.name}`;
          break;
        case "aws:ssm/parameter:Parameter":
          // Auto-named when no name is given: the logical name, a dash and 7 random characters.
          state.name = inputs.name ?? `${args.name}-${derived(`ssm:${args.name}`, 7, "0123456789abcdef")}`;
          state.arn = `arn:aws:ssm:${REGION}:${ACCOUNT}:parameter/${String(state.name).replace(/^\//, "")}`;
          // SSM numbers a parameter's values from 1; a new value gets the next version.
          state.version = 1;
          break;
        case "aws:apigateway/authorizer:Authorizer":
          id = derived(`id:${args.name}`, 6);
          break;
        case "stripe:index/webhookEndpoint:WebhookEndpoint":
          id = `we_${derived(`stripe:${args.name}`, 24, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")}`;
          state.secret = mockWebhookSecret(args.name);
          break;
        case "aws:dynamodb/tableItem:TableItem":
          // The provider's id and identity: table name and hash key value joined by a comma (table_item.go
          // tableItemCreateResourceID, flex.ResourceIdSeparator).
          state.hashKeyValue = tableItemKeyValue(inputs.item, inputs.hashKey);
          id = `${inputs.tableName},${state.hashKeyValue}`;
          break;
        case "aws:dynamodb/table:Table":
          state.name = inputs.name ?? autoName();
          id = state.name;
          state.arn = `arn:aws:dynamodb:${REGION}:${ACCOUNT}:table/${state.name}`;
          // A stream's ARN is the table's plus /stream/<label> (the label is the stream's creation time).
          if (inputs.streamEnabled) {
            state.streamLabel = "2026-11-27T00:00:00.000";
            state.streamArn = `${state.arn}/stream/${state.streamLabel}`;
          }
          break;
        case "aws:sqs/queue:Queue":
          state.name = inputs.name ?? autoName();
          state.arn = `arn:aws:sqs:${REGION}:${ACCOUNT}:${state.name}`;
          state.url = `https://sqs.${REGION}.amazonaws.com/${ACCOUNT}/${state.name}`;
          id = state.url;
          break;
        case "aws:cloudwatch/eventRule:EventRule":
          state.name = inputs.name ?? autoName();
          id = state.name;
          state.arn = `arn:aws:events:${REGION}:${ACCOUNT}:rule/${state.name}`;
          break;
        case "aws:lambda/eventSourceMapping:EventSourceMapping":
          state.uuid = derived(`uuid:${args.name}`, 32, "0123456789abcdef");
          id = state.uuid;
          state.arn = `arn:aws:lambda:${REGION}:${ACCOUNT}:event-source-mapping:${state.uuid}`;
          break;
        case "stripe:index/meter:Meter":
          id = `mtr_${derived(`stripe:${args.name}`, 24, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")}`;
          break;
        case "stripe:index/product:Product":
          id = `prod_${derived(`stripe:${args.name}`, 14, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")}`;
          break;
        case "stripe:index/price:Price":
          id = `price_${derived(`stripe:${args.name}`, 24, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")}`;
          break;
      }
      const options = pendingOptions.get(`${args.type}::${args.name}`);
      created.push({
        type: args.type,
        name: args.name,
        id,
        inputs,
        state,
        urn: options?.urn ?? "",
        options: options ?? { deleteBeforeReplace: false, additionalSecretOutputs: [], retainOnDelete: false, dependencies: [], parent: "" },
      });
      return { id, state };
    },
    call(args) {
      switch (args.token) {
        case "aws:index/getRegion:getRegion":
          return { id: REGION, region: REGION, name: REGION, endpoint: `ec2.${REGION}.amazonaws.com`, description: "US East (N. Virginia)" };
        case "aws:index/getPartition:getPartition":
          return { id: "aws", partition: "aws", dnsSuffix: "amazonaws.com", reverseDnsPrefix: "com.amazonaws" };
      }
      throw new Error(`unmocked call ${args.token}`);
    },
  };
}

/**
 * `setMocks` with `recordingMocks`, plus a look at each RegisterResource request before the mock monitor answers
 * it: resource options (deleteBeforeReplace, additionalSecretOutputs, retainOnDelete, dependencies) never reach
 * `newResource`, so they are read from the request itself, as the engine would receive them.
 */
export async function setRecordingMocks(created: Recorded[], project: string, stack: string, preview = false): Promise<void> {
  const pending = new Map<string, RecordedOptions & { urn: string }>();
  await pulumi.runtime.setMocks(recordingMocks(created, pending), project, stack, preview);
  const monitor = pulumi.runtime.getMonitor() as unknown as {
    registerResource(req: RegisterResourceRequest, callback: unknown): unknown;
  };
  const registerResource = monitor.registerResource.bind(monitor);
  monitor.registerResource = (req, callback) => {
    const type = req.getType();
    const name = req.getName();
    // The URN the mock monitor gives it (runtime/mocks.js newUrn): the parent's qualified type, then this type.
    const parentType = req.getParent() ? req.getParent().split("::")[2].split("$").pop() : "";
    const qualifiedType = parentType ? `${parentType}$${type}` : type;
    pending.set(`${type}::${name}`, {
      deleteBeforeReplace: req.getDeletebeforereplace(),
      additionalSecretOutputs: req.getAdditionalsecretoutputsList(),
      retainOnDelete: req.getRetainondelete() === true,
      dependencies: req.getDependenciesList(),
      parent: req.getParent(),
      urn: `urn:pulumi:${stack}::${project}::${qualifiedType}::${name}`,
    });
    return registerResource(req, callback);
  };
}

interface RegisterResourceRequest {
  getType(): string;
  getName(): string;
  getParent(): string;
  getDeletebeforereplace(): boolean;
  getAdditionalsecretoutputsList(): string[];
  getRetainondelete(): boolean | undefined;
  getDependenciesList(): string[];
}

/**
 * The resource's state as the engine would store it in the checkpoint in plain text: without the outputs the SDK
 * asked to keep secret (`additionalSecretOutputs`) and without the properties whose input was secret.
 */
export function plainState(resource: Recorded): Record<string, unknown> {
  const secret = new Set(resource.options.additionalSecretOutputs);
  return redactSecrets(Object.fromEntries(Object.entries(resource.state).filter(([key]) => !secret.has(key)))) as Record<string, unknown>;
}

/** Replaces every secret value, at any depth, by a marker: the engine encrypts those in the checkpoint. */
export function redactSecrets(value: unknown): unknown {
  if (isSecretInput(value)) return "[secret]";
  if (Array.isArray(value)) return value.map(redactSecrets);
  if (value && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, redactSecrets(v)]));
  return value;
}

export function promiseOf<T>(output: pulumi.Output<T>): Promise<T> {
  return new Promise((resolve) => output.apply((value) => { resolve(value); return value; }));
}
