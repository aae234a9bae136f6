import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";
import { CubicleError } from "../../shared/cubicle-error.js";
import { ecrRegistryCredentials, gcpRegistryCredentials, parseAwsRegistry, signAwsV4 } from "./cloud-registries.js";

const AWS = { accessKeyId: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region: "us-east-1" };
const EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

test("Signature Version 4 matches AWS's published example (S3 GetObject of examplebucket/test.txt, 2013-05-24)", () => {
  const authorization = signAwsV4(
    {
      method: "GET",
      path: "/test.txt",
      query: "",
      headers: { host: "examplebucket.s3.amazonaws.com", range: "bytes=0-9", "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": "20130524T000000Z" },
      payloadHash: EMPTY_SHA256,
    },
    AWS,
    { region: "us-east-1", service: "s3", amzDate: "20130524T000000Z" },
  );
  assert.equal(
    authorization,
    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
  );
});

/** A stand-in for ECR's API on loopback: checks the request as AWS would (target, type, signature) and answers `answer`. */
async function fakeEcr(answer: (req: http.IncomingMessage, body: string, signatureOk: boolean) => { status: number; body: string }): Promise<{ url: string; requests: number; close(): void }> {
  const state = { requests: 0 };
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      state.requests++;
      const headers: Record<string, string> = {};
      for (const name of ["content-type", "host", "x-amz-date", "x-amz-target"]) headers[name] = String(req.headers[name] ?? "");
      const expected = signAwsV4({ method: req.method!, path: req.url!, query: "", headers, payloadHash: createHash("sha256").update(body).digest("hex") }, AWS, {
        region: AWS.region,
        service: "ecr",
        amzDate: headers["x-amz-date"]!,
      });
      const signatureOk = req.headers.authorization === expected && headers["x-amz-target"] === "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken" && headers["content-type"] === "application/x-amz-json-1.1";
      const reply = answer(req, body, signatureOk);
      res.writeHead(reply.status, { "content-type": "application/x-amz-json-1.1" });
      res.end(reply.body);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    get requests() {
      return state.requests;
    },
    close: () => server.close(),
  };
}

const token = (text: string) => JSON.stringify({ authorizationData: [{ authorizationToken: Buffer.from(text).toString("base64"), expiresAt: 1_800_000_000, proxyEndpoint: "https://123456789012.dkr.ecr.us-east-1.amazonaws.com" }] });

test("ECR: a signed GetAuthorizationToken gives the registry's username and password; refusals are clear and never carry the secret", async () => {
  const ecr = await fakeEcr((_req, body, signatureOk) => (signatureOk && body === "{}" ? { status: 200, body: token("AWS:registry-password:with-colon") } : { status: 403, body: JSON.stringify({ __type: "UnrecognizedClientException", message: "The security token included in the request is invalid." }) }));
  try {
    assert.deepEqual(await ecrRegistryCredentials(AWS, { endpoint: ecr.url }), { username: "AWS", password: "registry-password:with-colon" });
    const wrong = { ...AWS, secretAccessKey: "not-the-secret-0123456789" };
    await assert.rejects(ecrRegistryCredentials(wrong, { endpoint: ecr.url }), (err: unknown) => {
      assert.ok(err instanceof CubicleError && err.code === "failed_precondition");
      assert.match(err.message, /ECR refused the AWS credentials.*403.*security token included in the request is invalid/);
      assert.doesNotMatch(err.message, /not-the-secret|wJalr/);
      return true;
    });
    assert.equal(ecr.requests, 2);
  } finally {
    ecr.close();
  }
  for (const [body, status] of [["{}", 200], [token("no-colon"), 200], ["not json", 200], [token("AWS:x"), 500]] as const) {
    const odd = await fakeEcr(() => ({ status, body }));
    try {
      await assert.rejects(ecrRegistryCredentials(AWS, { endpoint: odd.url }), (err: unknown) => err instanceof CubicleError && err.code === "unavailable", body);
    } finally {
      odd.close();
    }
  }
  const closed = await fakeEcr(() => ({ status: 200, body: "" }));
  closed.close();
  await assert.rejects(ecrRegistryCredentials(AWS, { endpoint: closed.url }), (err: unknown) => err instanceof CubicleError && err.code === "unavailable" && /could not be reached/.test(err.message));
});

test("the SDK's AWS and GCP registry fields are checked; messages never carry a secret", () => {
  const aws = { type: "aws", awsAccessKeyId: AWS.accessKeyId, awsSecretAccessKey: AWS.secretAccessKey, awsRegion: "eu-west-3" };
  assert.deepEqual(parseAwsRegistry(aws), { accessKeyId: AWS.accessKeyId, secretAccessKey: AWS.secretAccessKey, region: "eu-west-3" });
  assert.equal(parseAwsRegistry({ ...aws, awsRegion: "us-gov-west-1" }).region, "us-gov-west-1");
  for (const [field, value] of [["awsAccessKeyId", "short"], ["awsAccessKeyId", 5], ["awsSecretAccessKey", ""], ["awsSecretAccessKey", "has space secret"], ["awsRegion", "moon-1"], ["awsRegion", "us-east-1/../x"]] as const) {
    assert.throws(() => parseAwsRegistry({ ...aws, [field]: value }), (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && err.message.includes(field) && !err.message.includes(AWS.secretAccessKey));
  }
  const key = JSON.stringify({ type: "service_account", client_email: "builder@project.iam.gserviceaccount.com", private_key: "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n" });
  assert.deepEqual(gcpRegistryCredentials({ serviceAccountJson: key }), { username: "_json_key", password: key });
  for (const json of [undefined, 5, "not json", "[]", JSON.stringify({ type: "authorized_user", client_email: "a", private_key: "secret" }), "x".repeat(70_000)]) {
    assert.throws(() => gcpRegistryCredentials({ serviceAccountJson: json }), (err: unknown) => err instanceof CubicleError && err.code === "invalid_argument" && !err.message.includes("secret"));
  }
});
