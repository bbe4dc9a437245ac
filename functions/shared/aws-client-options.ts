/** What an AWS SDK v3 client needs from a function's environment. */
export interface AwsClientOptions {
  region?: string;
  endpoint?: string;
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
}

/**
 * AWS SDK client settings for one service from an explicit environment map: the region Lambda sets, the endpoint
 * override the SDK documents per service (`AWS_ENDPOINT_URL_<SERVICE>`, else `AWS_ENDPOINT_URL`; the local stack points
 * DynamoDB at dynalite, tests point SSM at a local server) and the credentials Lambda puts in the environment. Read from
 * `env` rather than left to the SDK because the local stack runs the functions in-process with their own environment
 * map: the map passed in is then the whole story. With an endpoint override and no region, `us-east-1` (local
 * stand-ins ignore it, the SDK requires one).
 */
export function awsClientOptions(env: NodeJS.ProcessEnv, service: "SSM" | "DYNAMODB"): AwsClientOptions {
  const { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey, AWS_SESSION_TOKEN: sessionToken } = env;
  const endpoint = env[`AWS_ENDPOINT_URL_${service}`] || env.AWS_ENDPOINT_URL || undefined;
  return {
    region: env.AWS_REGION || env.AWS_DEFAULT_REGION || (endpoint ? "us-east-1" : undefined),
    endpoint,
    credentials: accessKeyId && secretAccessKey ? { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) } : undefined,
  };
}
