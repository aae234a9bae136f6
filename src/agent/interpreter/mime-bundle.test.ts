import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { resultFromMimeBundle } from "./mime-bundle.js";

describe("resultFromMimeBundle", () => {
  it("maps every Jupyter mimetype to its E2B result field", () => {
    const chart = { type: "line", title: "t", elements: [] };
    const result = resultFromMimeBundle(
      {
        "text/plain": "<Figure>",
        "text/html": "<b>x</b>",
        "text/markdown": "# x",
        "image/svg+xml": "<svg/>",
        "image/png": "iVBOR",
        "image/jpeg": "/9j/",
        "application/pdf": "JVBER",
        "text/latex": "$x^2$",
        "application/json": { a: [1, 2] },
        "application/javascript": "console.log(1)",
        "e2b/data": { a: [1] },
        "e2b/chart": chart,
      },
      false,
    );
    assert.deepEqual(result, {
      type: "result",
      is_main_result: false,
      text: "<Figure>",
      html: "<b>x</b>",
      markdown: "# x",
      svg: "<svg/>",
      png: "iVBOR",
      jpeg: "/9j/",
      pdf: "JVBER",
      latex: "$x^2$",
      json: { a: [1, 2] },
      javascript: "console.log(1)",
      data: { a: [1] },
      chart,
    });
  });

  it("joins nbformat line arrays, strips a string repr's quotes, keeps unknown mimetypes in extra", () => {
    const result = resultFromMimeBundle({ "text/plain": "'hello'", "image/svg+xml": ["<svg>", "</svg>"], "image/gif": "R0lG" }, true);
    assert.equal(result.is_main_result, true);
    assert.equal(result.text, "hello");
    assert.equal(result.svg, "<svg></svg>");
    assert.deepEqual(result.extra, { "image/gif": "R0lG" });
  });

  it("puts values a field cannot hold in extra instead of the field", () => {
    const result = resultFromMimeBundle(
      { "text/plain": 42, "image/png": { not: "base64" }, "e2b/chart": { title: "no type" }, "e2b/data": [1, 2], "text/html": "<i>ok</i>" },
      false,
    );
    assert.equal(result.text, undefined);
    assert.equal(result.png, undefined);
    assert.equal(result.chart, undefined);
    assert.equal(result.data, undefined);
    assert.equal(result.html, "<i>ok</i>");
    assert.deepEqual(result.extra, { "text/plain": 42, "image/png": { not: "base64" }, "e2b/chart": { title: "no type" }, "e2b/data": [1, 2] });
  });

  it("drops the trailing newline some kernels put after base64 images", () => {
    const result = resultFromMimeBundle({ "image/png": "iVBOR\n", "image/jpeg": ["/9j/", "4AAQ\n"], "text/plain": "keeps\n" }, false);
    assert.equal(result.png, "iVBOR");
    assert.equal(result.jpeg, "/9j/4AAQ");
    assert.equal(result.text, "keeps\n");
  });

  it("an empty bundle is a bare result", () => {
    assert.deepEqual(resultFromMimeBundle({}, false), { type: "result", is_main_result: false });
  });
});
