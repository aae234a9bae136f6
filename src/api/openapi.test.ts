import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { apiSchema } from "../protocol/index.js";
import { API_ROUTES } from "./test-app.js";

describe("the OpenAPI definition (src/protocol/spec/api.openapi.json)", () => {
  it("describes exactly the routes the API serves", () => {
    const described = Object.values(apiSchema.apiOperations).map((operation) => `${operation.method} ${operation.route.replace(/:\w+/g, ":id")}`);
    const served = ["GET /health", ...API_ROUTES.map((route) => `${route.method} ${route.path}`)];
    assert.deepEqual([...described].sort(), [...served].sort());
  });
});
