import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { constantTimeEquals } from "../shared/compare.js";
import { computeFileSignature, fileOperationOf, fileSignaturePattern } from "./file-signature.js";

describe("file signatures", () => {
  it("signs as the SDK does, for known inputs", () => {
    // Values computed with the formula of e2b-wire-protocol.md §6.3 before it moved here.
    assert.equal(computeFileSignature("/home/user/a.txt", "read", "user", "tok-123", 1700000000), "v1_cWHH2w7MWeWKT76Q7LcxgQX1PgGNqmpacZTVNE0Qsdg");
    assert.equal(computeFileSignature("a", "write", "", "tok"), "v1_w8rtgQdl70+aXHkqFLgagnFV5UL5l0vhT3Sa0dMx5kc");
  });

  it("takes an expiration given as text as it is (the router signs what the URL carries)", () => {
    assert.equal(computeFileSignature("/x", "read", "root", "tok", "007"), "v1_jGDPWm2LlwMHTgutx3dTu/QHBw+1pUSFHc5HYHPOK7M");
    assert.equal(computeFileSignature("/x", "read", "root", "tok", "1700000000"), computeFileSignature("/x", "read", "root", "tok", 1700000000));
  });

  it("matches its own format", () => {
    assert.match(computeFileSignature("/", "read", "user", "t"), fileSignaturePattern);
    assert.doesNotMatch("v1_short", fileSignaturePattern);
  });

  it("an upload writes, anything else reads", () => {
    assert.equal(fileOperationOf("POST"), "write");
    assert.equal(fileOperationOf("GET"), "read");
    assert.equal(fileOperationOf(undefined), "read");
  });

  it("compares: equal passes, another value or another length is refused", () => {
    const signature = computeFileSignature("/a", "read", "user", "tok");
    assert.equal(constantTimeEquals(signature, signature), true);
    assert.equal(constantTimeEquals(signature, computeFileSignature("/a", "write", "user", "tok")), false);
    assert.equal(constantTimeEquals(signature, signature.slice(0, -1)), false);
    assert.equal(constantTimeEquals(signature, signature + "A"), false);
    assert.equal(constantTimeEquals(signature, ""), false);
  });
});
