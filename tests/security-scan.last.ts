// Runs after every other test file (see .mocharc.json): scans all captured responses, log lines, metering payloads
// and stack outputs for every API key, key value, upstream key, Moesif app id and Stripe key the suite used.
import { expect } from "chai";
import { scanForSecrets } from "./helpers/secret-scan";

describe("security scan of everything the suite captured", () => {
  it("finds no API key, upstream key or Stripe key in any response, log line, metering event or output", () => {
    const { outputs, secrets, hits } = scanForSecrets();
    expect(secrets, "secrets registered").to.be.at.least(6);
    expect(outputs, "outputs captured").to.be.at.least(1000);
    expect(hits, hits.slice(0, 20).join("\n")).to.deep.equal([]);
  });
});
