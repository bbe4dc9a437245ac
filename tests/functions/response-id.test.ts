import { expect } from "chai";
import { RESPONSE_ID_PATTERN, responseOwnerItem, RESPONSE_OWNERSHIP_TTL_MS } from "../../functions/shared/response-owners";

describe("response ids the function accepts", () => {
  it("accepts OpenAI's and other servers' ids", () => {
    for (const id of ["resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b", "resp_mock_0a1b2c3d_1", "chatcmpl-abc", "a:b.c-d", "..."]) {
      expect(RESPONSE_ID_PATTERN.test(id), id).to.equal(true);
    }
  });

  it("refuses ids the upstream URL would resolve as path segments, or that carry other characters", () => {
    // `<upstream>/responses/..` is `<upstream>/` once the URL is normalised: never asked upstream.
    for (const id of [".", "..", "", "a/b", "a%2Fb", "résumé", "a b", "x".repeat(257)]) {
      expect(RESPONSE_ID_PATTERN.test(id), JSON.stringify(id)).to.equal(false);
    }
  });

  it("keeps ownership 30 days, as OpenAI keeps stored responses (DynamoDB TTL in epoch seconds)", () => {
    const item = responseOwnerItem({ responseId: "resp_1", customerId: "acme", createdAt: 1_700_000_000_123 });
    expect(item.expires_at).to.equal(Math.floor((1_700_000_000_123 + RESPONSE_OWNERSHIP_TTL_MS) / 1000));
    expect(item).to.not.have.property("context_tokens");
  });
});
