import * as pulumi from "@pulumi/pulumi";

/** Pulumi's marker for a secret value inside mock inputs (runtime/rpc.js specialSecretSig). */
const SECRET_SIG = "4dabf18193072939515e22adb298388d";

export const isSecretInput = (value: unknown): boolean => typeof value === "object" && value !== null && SECRET_SIG in value;
export const unsecret = (value: unknown): any => (isSecretInput(value) ? (value as { value: unknown }).value : value);

export interface Recorded {
  type: string;
  name: string;
  inputs: any;
}

/** Mocks that record every resource and fill in the computed outputs the program reads. Unmocked calls throw. */
export function recordingMocks(created: Recorded[]): pulumi.runtime.Mocks {
  return {
    newResource(args) {
      created.push({ type: args.type, name: args.name, inputs: args.inputs });
      const id = `${args.name}-id`;
      const state: Record<string, unknown> = { ...args.inputs };
      switch (args.type) {
        case "aws:lambda/function:Function":
          state.arn = `arn:aws:lambda:us-east-1:123456789012:function:${args.inputs.name}`;
          state.invokeArn = `arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/${state.arn}/invocations`;
          break;
        case "aws:apigateway/restApi:RestApi":
          state.rootResourceId = "root-id";
          state.executionArn = `arn:aws:execute-api:us-east-1:123456789012:${id}`;
          break;
        case "aws:apigateway/stage:Stage":
          state.invokeUrl = `https://${args.inputs.restApi}.execute-api.us-east-1.amazonaws.com/${args.inputs.stageName}`;
          break;
        case "aws:apigateway/apiKey:ApiKey":
          state.value = `key-value-${args.name}`;
          break;
        case "aws:iam/role:Role":
          state.arn = `arn:aws:iam::123456789012:role/${args.name}`;
          break;
        case "aws:cloudwatch/logGroup:LogGroup":
          state.arn = `arn:aws:logs:us-east-1:123456789012:log-group:${args.inputs.name}`;
          break;
        case "stripe:index/webhookEndpoint:WebhookEndpoint":
          state.secret = "whsec_mock_signing_secret";
          break;
      }
      return { id, state };
    },
    call(args) {
      throw new Error(`unmocked call ${args.token}`);
    },
  };
}

export function promiseOf<T>(output: pulumi.Output<T>): Promise<T> {
  return new Promise((resolve) => output.apply((value) => { resolve(value); return value; }));
}
