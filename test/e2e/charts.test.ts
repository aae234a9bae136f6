/**
 * Charts and rich display results through the official `@e2b/code-interpreter` SDK against a real
 * server and a real `code-interpreter-v1` sandbox: matplotlib figures come back as png plus a
 * `chart` in E2B's chart protocol (line, scatter, bar, pie, box-and-whisker, superchart, unknown;
 * scales, ticks, units), and `display()` of images, SVG, LaTeX, JSON, JavaScript, Markdown, HTML
 * and DataFrames arrives in the matching result fields. The cases follow the upstream SDK's chart
 * and display tests, with exact values where upstream's are known.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Sandbox, type Execution, type Result } from "@e2b/code-interpreter";
import { startTestServer, useServerForSdk, type TestServer } from "./harness.js";

let server: TestServer;
let sandbox: Sandbox;

before(async () => {
  server = await startTestServer({ defaultTemplates: ["base", "code-interpreter-v1"] });
  useServerForSdk(server);
  sandbox = await Sandbox.create();
});

after(async () => {
  await sandbox?.kill().catch(() => undefined);
  await server?.stop();
});

/* eslint-disable @typescript-eslint/no-explicit-any -- charts are checked field by field */
async function run(code: string): Promise<Execution> {
  const execution = await sandbox.runCode(code);
  assert.equal(execution.error, undefined, execution.error?.traceback);
  return execution;
}

/** The one result that carries a chart: it must also carry the figure's png and text. */
function chartOf(execution: Execution): any {
  const withChart = execution.results.filter((r) => r.chart);
  assert.equal(withChart.length, 1, `results: ${JSON.stringify(execution.results.map((r) => r.formats()))}`);
  const [result] = withChart;
  assert.ok(isPng(result.png), "the chart's result also has the figure's png");
  assert.match(result.text ?? "", /Figure/);
  return result.chart;
}

function isPng(base64: string | undefined): boolean {
  return base64 !== undefined && Buffer.from(base64, "base64").subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
}

test("line chart with dates: datetime x scale, ISO points and ticks, units from the labels", async () => {
  const chart = chartOf(
    await run(`
import numpy as np
import matplotlib.pyplot as plt
import datetime

dates = [datetime.date(2023, 9, 1) + datetime.timedelta(days=i) for i in range(100)]
x = np.linspace(0, 2*np.pi, 100)
plt.figure(figsize=(10, 6))
plt.plot(dates, np.sin(x), label='sin(x)')
plt.plot(dates, np.cos(x), label='cos(x)')
plt.xlabel("Time (s)")
plt.ylabel("Amplitude (Hz)")
plt.title('Plot of sin(x) and cos(x)')
plt.show()
`),
  );
  assert.equal(chart.type, "line");
  assert.equal(chart.title, "Plot of sin(x) and cos(x)");
  assert.equal(chart.x_label, "Time (s)");
  assert.equal(chart.y_label, "Amplitude (Hz)");
  assert.equal(chart.x_unit, "s");
  assert.equal(chart.y_unit, "Hz");
  assert.equal(chart.x_scale, "datetime");
  assert.equal(chart.y_scale, "linear");

  assert.ok(chart.x_ticks.length > 1);
  for (const tick of chart.x_ticks) {
    assert.equal(typeof tick, "string");
    assert.ok(!Number.isNaN(Date.parse(tick)), `x tick ${tick} is a date`);
  }
  assert.ok(chart.x_ticks.every((tick: string) => tick >= "2023-08" && tick <= "2023-12-31"), JSON.stringify(chart.x_ticks));
  assert.ok(chart.y_ticks.length > 1 && chart.y_ticks.every((tick: unknown) => typeof tick === "number"));
  assert.equal(chart.x_tick_labels.length, chart.x_ticks.length);
  assert.ok(chart.x_tick_labels.every((label: unknown) => typeof label === "string" && label !== ""));
  assert.equal(chart.y_tick_labels.length, chart.y_ticks.length);

  assert.deepEqual(chart.elements.map((e: any) => e.label), ["sin(x)", "cos(x)"]);
  const [sin, cos] = chart.elements;
  assert.equal(sin.points.length, 100);
  assert.deepEqual(sin.points[0], ["2023-09-01", 0]);
  assert.equal(new Date(sin.points[0][0]).getTime(), Date.UTC(2023, 8, 1));
  assert.deepEqual(sin.points[99][0], "2023-12-09");
  assert.ok(Math.abs(sin.points[25][1] - Math.sin((25 * 2 * Math.PI) / 99)) < 1e-12);
  assert.deepEqual(cos.points[0], ["2023-09-01", 1]);
  assert.ok(cos.points.every((p: unknown[]) => typeof p[0] === "string" && typeof p[1] === "number"));
});

test("numpy datetime64 and pandas dates become ISO strings to the second", async () => {
  const chart = chartOf(
    await run(
      "import numpy as np\nimport pandas as pd\nimport matplotlib.pyplot as plt\nplt.figure()\nplt.plot(pd.date_range('2024-02-28 12:00', periods=3, freq='D'), [1, 2, 3])\nplt.plot(np.array(['2024-03-05T06:07:08', 'NaT'], dtype='datetime64[ms]'), [4, 5])\nplt.show()",
    ),
  );
  assert.equal(chart.x_scale, "datetime");
  assert.deepEqual(chart.elements[0].points, [["2024-02-28T12:00:00", 1], ["2024-02-29T12:00:00", 2], ["2024-03-01T12:00:00", 3]]);
  assert.deepEqual(chart.elements[1].points, [["2024-03-05T06:07:08", 4], [null, 5]]);
});

test("line chart without labels: default line names, null title and labels, NaN as null", async () => {
  const chart = chartOf(await run("import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2, 3], [4, float('nan'), 6])\nplt.plot([1, 2, 3], [3, 2, 1])\nplt.show()"));
  assert.equal(chart.type, "line");
  assert.equal(chart.title, null);
  assert.equal(chart.x_label, null);
  assert.equal(chart.y_label, null);
  assert.equal(chart.x_unit, null);
  assert.equal(chart.y_unit, null);
  assert.deepEqual(
    chart.elements.map((e: any) => [e.label, e.points]),
    [
      ["Line 0", [[1, 4], [2, null], [3, 6]]],
      ["Line 1", [[1, 3], [2, 2], [3, 1]]],
    ],
  );
});

test("log and symlog scales", async () => {
  const chart = chartOf(
    await run(`
import numpy as np
import matplotlib.pyplot as plt
x = np.linspace(0, 100, 100)
plt.figure(figsize=(10, 6))
plt.plot(x, np.exp(x), label='y = e^x')
plt.yscale('log')
plt.xlabel('X-axis')
plt.ylabel('Y-axis (log scale)')
plt.title('Graph with Log Scale on Y-axis')
plt.legend()
plt.grid(True)
plt.show()
`),
  );
  assert.equal(chart.type, "line");
  assert.equal(chart.title, "Graph with Log Scale on Y-axis");
  assert.equal(chart.x_label, "X-axis");
  assert.equal(chart.x_unit, null);
  assert.equal(chart.y_unit, "log scale");
  assert.equal(chart.x_scale, "linear");
  assert.equal(chart.y_scale, "log");
  assert.ok(chart.x_ticks.every((x: unknown) => typeof x === "number"));
  assert.ok(chart.y_ticks.every((y: unknown) => typeof y === "number"));
  assert.ok(chart.y_ticks.includes(1000), JSON.stringify(chart.y_ticks));
  assert.equal(chart.elements.length, 1, "grid lines are no elements");
  assert.equal(chart.elements[0].label, "y = e^x");
  assert.equal(chart.elements[0].points.length, 100);
  assert.ok(chart.elements[0].points.every(([x, y]: unknown[]) => typeof x === "number" && typeof y === "number"));

  const symlog = chartOf(await run("plt.figure()\nplt.plot([-10, 0, 10], [1, 2, 3])\nplt.xscale('symlog')\nplt.show()"));
  assert.equal(symlog.x_scale, "symlog");
  assert.equal(symlog.y_scale, "linear");
});

test("categorical scale from string data and from named ticks", async () => {
  const strings = chartOf(await run("import matplotlib.pyplot as plt\nplt.figure(figsize=(10, 6))\nplt.plot([1, 2, 3, 4, 5], ['A', 'B', 'C', 'D', 'E'])\nplt.show()"));
  assert.equal(strings.type, "line");
  assert.equal(strings.x_scale, "linear");
  assert.equal(strings.y_scale, "categorical");
  assert.deepEqual(strings.y_tick_labels, ["A", "B", "C", "D", "E"]);
  assert.deepEqual(strings.elements[0].points, [[1, "A"], [2, "B"], [3, "C"], [4, "D"], [5, "E"]]);

  const named = chartOf(await run("plt.figure()\nplt.plot([0, 1, 2], [5, 7, 6])\nplt.xticks([0, 1, 2], ['low', 'mid', 'high'])\nplt.show()"));
  assert.equal(named.x_scale, "categorical");
  assert.equal(named.y_scale, "linear");
});

test("scatter chart: one element per dataset with its points", async () => {
  const chart = chartOf(
    await run(`
import matplotlib.pyplot as plt
plt.figure()
plt.xlabel("A")
plt.ylabel("B")
plt.scatter([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], c='blue', label='Dataset 1')
plt.scatter([0.5, 1.5], [2.5, 3.5], c='red', label='Dataset 2')
plt.show()
`),
  );
  assert.equal(chart.type, "scatter");
  assert.equal(chart.title, null);
  assert.equal(chart.x_label, "A");
  assert.equal(chart.y_label, "B");
  assert.equal(chart.x_scale, "linear");
  assert.ok(chart.x_ticks.every((tick: unknown) => typeof tick === "number"));
  assert.ok(chart.y_tick_labels.every((label: unknown) => typeof label === "string"));
  assert.deepEqual(
    chart.elements.map((e: any) => [e.label, e.points]),
    [
      ["Dataset 1", [[1, 5], [2, 4], [3, 3], [4, 2], [5, 1]]],
      ["Dataset 2", [[0.5, 2.5], [1.5, 3.5]]],
    ],
  );
});

test("bar chart: labels from the categories, values, default group", async () => {
  const chart = chartOf(
    await run(`
import matplotlib.pyplot as plt
authors = ['Author A', 'Author B', 'Author C', 'Author D']
sales = [100, 200, 300, 400]
plt.figure(figsize=(10, 6))
plt.bar(authors, sales)
plt.xlabel('Authors')
plt.ylabel('Number of Books Sold')
plt.title('Book Sales by Authors')
plt.tight_layout()
plt.show()
`),
  );
  assert.equal(chart.type, "bar");
  assert.equal(chart.title, "Book Sales by Authors");
  assert.equal(chart.x_label, "Authors");
  assert.equal(chart.y_label, "Number of Books Sold");
  assert.equal(chart.x_unit, null);
  assert.equal(chart.y_unit, null);
  assert.deepEqual(chart.elements.map((bar: any) => bar.value), [100, 200, 300, 400]);
  assert.deepEqual(chart.elements.map((bar: any) => bar.label), ["Author A", "Author B", "Author C", "Author D"]);
  assert.deepEqual(new Set(chart.elements.map((bar: any) => bar.group)), new Set(["Group 0"]));
});

test("grouped and horizontal bars: groups from the legend labels, category axis first", async () => {
  const grouped = chartOf(
    await run(`
import numpy as np
import matplotlib.pyplot as plt
x = np.arange(3)
fig, ax = plt.subplots()
ax.bar(x - 0.2, [20, 34, 30], 0.4, label='Men')
ax.bar(x + 0.2, [25, 32, 34], 0.4, label='Women')
ax.set_xticks(x, ['G1', 'G2', 'G3'])
ax.set_ylabel('Scores [pts]')
plt.show()
`),
  );
  assert.equal(grouped.type, "bar");
  assert.equal(grouped.y_unit, "pts");
  assert.deepEqual(
    grouped.elements.map((bar: any) => [bar.group, bar.label, bar.value]),
    [
      ["Men", "G1", 20],
      ["Men", "G2", 34],
      ["Men", "G3", 30],
      ["Women", "G1", 25],
      ["Women", "G2", 32],
      ["Women", "G3", 34],
    ],
  );

  const horizontal = chartOf(await run("fig, ax = plt.subplots()\nax.barh(['tea', 'coffee'], [7, 7])\nax.set_xlabel('Cups (per day)')\nax.set_ylabel('Drink')\nplt.show()"));
  assert.equal(horizontal.type, "bar");
  assert.equal(horizontal.x_label, "Drink");
  assert.equal(horizontal.y_label, "Cups (per day)");
  assert.equal(horizontal.y_unit, "per day");
  assert.deepEqual(horizontal.elements.map((bar: any) => [bar.label, bar.value]), [["tea", 7], ["coffee", 7]]);
});

test("pie chart: wedge labels, angles in degrees and radius", async () => {
  const chart = chartOf(
    await run(`
import matplotlib.pyplot as plt
categories = ["No", "No, in blue"]
sizes = [90, 10]
fig, ax = plt.subplots(figsize=(8, 8))
plt.xlabel("x")
plt.ylabel("y")
ax.pie(sizes, labels=categories, autopct='%1.1f%%', startangle=90, colors=plt.cm.Pastel1.colors[:len(categories)])
ax.axis('equal')
plt.title('Will I wake up early tomorrow?')
plt.show()
`),
  );
  assert.equal(chart.type, "pie");
  assert.equal(chart.title, "Will I wake up early tomorrow?");
  assert.deepEqual(chart.elements, [
    { label: "No", angle: 324, radius: 1 },
    { label: "No, in blue", angle: 36, radius: 1 },
  ]);
});

const examScores = `
import matplotlib.pyplot as plt
data = {
    'Class A': [85, 90, 78, 92, 88],
    'Class B': [95, 89, 76, 91, 84, 87],
    'Class C': [75, 82, 88, 79, 86]
}
fig, ax = plt.subplots(figsize=(10, 6))
ax.set_title('Exam Scores Distribution')
ax.set_xlabel('Class')
ax.set_ylabel('Score')
`;
const examBoxes = [
  { label: "Class A", min: 78, first_quartile: 85, median: 88, third_quartile: 90, max: 92, outliers: [] },
  { label: "Class B", min: 84, first_quartile: 84.75, median: 88, third_quartile: 90.5, max: 95, outliers: [76] },
  { label: "Class C", min: 75, first_quartile: 79, median: 82, third_quartile: 86, max: 88, outliers: [] },
];

test("box-and-whisker chart: quartiles, whiskers and outliers per box", async () => {
  const chart = chartOf(await run(`${examScores}ax.boxplot(data.values(), labels=data.keys(), patch_artist=True)\nax.legend()\nplt.tight_layout()\nplt.show()`));
  assert.equal(chart.type, "box_and_whisker");
  assert.equal(chart.title, "Exam Scores Distribution");
  assert.equal(chart.x_label, "Class");
  assert.equal(chart.y_label, "Score");
  assert.equal(chart.x_unit, null);
  assert.equal(chart.y_unit, null);
  assert.deepEqual(chart.elements, examBoxes);
});

test("box plots drawn with lines only, and horizontal ones, are box-and-whisker too", async () => {
  const lines = chartOf(await run(`${examScores}ax.boxplot(list(data.values()), labels=list(data.keys()))\nplt.show()`));
  assert.equal(lines.type, "box_and_whisker");
  assert.deepEqual(lines.elements, examBoxes);

  const horizontal = chartOf(await run(`${examScores}ax.boxplot(list(data.values()), labels=list(data.keys()), vert=False)\nplt.show()`));
  assert.equal(horizontal.type, "box_and_whisker");
  // x_label names the category axis, as for horizontal bars.
  assert.equal(horizontal.x_label, "Score");
  assert.equal(horizontal.y_label, "Class");
  assert.deepEqual(horizontal.elements, examBoxes);
});

test("several axes make a superchart of their charts", async () => {
  const chart = chartOf(
    await run(`
import matplotlib.pyplot as plt
import numpy as np
x1 = np.linspace(0, 10, 100)
fig, axs = plt.subplots(1, 3, figsize=(12, 6))
fig.suptitle('Multiple Charts Example', fontsize=16)
axs[0].plot(x1, np.sin(x1), 'r')
axs[0].set_title('Sine Wave')
axs[0].grid(True)
axs[1].scatter([0.1, 0.2, 0.3, 0.4, 0.5], [1, 2, 3, 4, 5], c='blue', label='Dataset 1')
axs[1].set_xlabel('X')
axs[1].set_ylabel('Y (m)')
axs[1].set_title('Scatter Plot')
axs[2].pie([1, 3], labels=['a', 'b'])
plt.show()
`),
  );
  assert.equal(chart.type, "superchart");
  assert.equal(chart.title, "Multiple Charts Example");
  assert.deepEqual(chart.elements.map((c: any) => c.type), ["line", "scatter", "pie"]);
  const [line, scatter, pie] = chart.elements;
  assert.equal(line.title, "Sine Wave");
  assert.equal(line.x_label, null);
  assert.equal(line.y_label, null);
  assert.equal(line.elements.length, 1);
  assert.equal(line.elements[0].points.length, 100);
  assert.equal(scatter.title, "Scatter Plot");
  assert.equal(scatter.x_label, "X");
  assert.equal(scatter.y_unit, "m");
  assert.equal(scatter.elements[0].label, "Dataset 1");
  assert.equal(scatter.elements[0].points.length, 5);
  assert.deepEqual(pie.elements.map((w: any) => [w.label, w.angle]), [["a", 90], ["b", 270]]);
});

test("a figure that is no known chart is 'unknown' with its title", async () => {
  const chart = chartOf(
    await run(`
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.add_artist(plt.Circle((0, 0), 1, color='blue', fill=False, linewidth=2))
ax.add_artist(plt.Circle((0, 0), 2, color='red', fill=False, linewidth=2))
ax.grid(True)
plt.title('Two Concentric Circles')
plt.show()
`),
  );
  assert.deepEqual(chart, { type: "unknown", title: "Two Concentric Circles", elements: [] });

  const mixed = chartOf(await run("plt.figure()\nplt.imshow([[0, 1], [1, 0]])\nplt.show()"));
  assert.deepEqual(mixed, { type: "unknown", title: null, elements: [] });
});

test("a figure the describer cannot read still comes back as png, without chart or error", async () => {
  const execution = await run(`
import matplotlib.pyplot as plt
from IPython.display import display
fig, ax = plt.subplots()
ax.plot([1, 2, 3])
def broken():
    raise RuntimeError("no axes for you")
fig.get_axes = broken
display(fig)
plt.close(fig)
`);
  assert.equal(execution.results.length, 1, JSON.stringify(execution.results.map((r) => r.formats())));
  assert.ok(isPng(execution.results[0].png));
  assert.equal(execution.results[0].chart, undefined);
  assert.deepEqual(execution.logs.stderr, []);
});

test("the kernel setup loads neither matplotlib, numpy, pandas nor Pillow", async () => {
  const context = await sandbox.createCodeContext({ language: "python" });
  const execution = await sandbox.runCode("import sys\n[m for m in ('matplotlib', 'numpy', 'pandas', 'PIL') if m in sys.modules]", { context });
  assert.equal(execution.error, undefined, execution.error?.traceback);
  assert.equal(execution.text, "[]");
  await sandbox.removeCodeContext(context).catch(() => undefined);
});

test("plt.savefig displays the saved image; display(Image(path)) returns that file's png", async () => {
  const execution = await run(`
import matplotlib.pyplot as plt
from IPython.display import Image, display
plt.figure()
plt.plot([1, 2, 3], [3, 1, 2])
plt.title('saved')
plt.savefig('saved.png')
display(Image('saved.png'))
import base64
base64.b64encode(open('saved.png', 'rb').read()).decode()
`);
  const onDisk = execution.text!;
  const pngs = execution.results.filter((r) => isPng(r.png));
  // savefig (through Pillow), display(Image), and the figure itself at the end of the cell.
  assert.equal(pngs.length, 3, JSON.stringify(execution.results.map((r) => r.formats())));
  assert.equal(pngs[1].png, onDisk);
  assert.equal(pngs[0].chart, undefined);
  assert.equal(pngs[2].chart?.type, "line");
  assert.equal(pngs[2].chart?.title, "saved");
});

test("Pillow images: show(), save(path) and a last expression come back as png", async () => {
  const execution = await run(`
import numpy
from PIL import Image
image = Image.fromarray((numpy.ones((16, 16, 3)) * 200).astype('uint8')).convert('RGBA')
image.show()
image.save('pillow.png')
image
`);
  const pngs = execution.results.filter((r) => isPng(r.png));
  assert.equal(pngs.length, 3, JSON.stringify(execution.results.map((r) => r.formats())));
  assert.equal(execution.results.at(-1)?.isMainResult, true);
  const bad = await sandbox.runCode("image.save('/proc/nope/x.png')");
  assert.equal(bad.error?.name, "FileNotFoundError");
  assert.equal(bad.results.length, 0, "a failed save displays nothing");
});

test("display() of SVG, LaTeX, JSON, JavaScript, Markdown, HTML and JPEG fills their fields", async () => {
  const execution = await run(`
from IPython.display import SVG, Latex, JSON, Javascript, Markdown, HTML, Image, display
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><circle cx="5" cy="5" r="4"/></svg>'))
display(Latex(r'$\\frac{a}{b}$'))
display(JSON({'answer': 42, 'list': [1, 'two', None]}))
display(Javascript('console.log("hi")'))
display(Markdown('# Title'))
display(HTML('<b>bold</b>'))
jpeg = bytes.fromhex('ffd8ffe000104a46494600010100000100010000ffd9')
display(Image(data=jpeg, format='jpeg'))
`);
  const results: Result[] = execution.results;
  assert.equal(results.length, 7, JSON.stringify(results.map((r) => r.formats())));
  assert.ok(results.every((r) => !r.isMainResult));
  assert.match(results[0].svg ?? "", /^<svg[^]*<circle/);
  assert.equal(results[1].latex, "$\\frac{a}{b}$");
  assert.deepEqual(results[2].json, { answer: 42, list: [1, "two", null] });
  assert.equal(results[3].javascript, 'console.log("hi")');
  assert.equal(results[4].markdown, "# Title");
  assert.equal(results[5].html, "<b>bold</b>");
  assert.equal(results[6].jpeg, Buffer.from("ffd8ffe000104a46494600010100000100010000ffd9", "hex").toString("base64"));
  assert.deepEqual(results.map((r) => r.formats()[0]), ["svg", "latex", "json", "javascript", "markdown", "html", "jpeg"]);
});

test("display(df) gives html and data; a DataFrame as last expression is the main result", async () => {
  const execution = await run(`
import pandas as pd
from IPython.display import display
df = pd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [3.5, 19.0]})
display(df)
df.describe()
`);
  assert.equal(execution.results.length, 2);
  const [shown, main] = execution.results;
  assert.equal(shown.isMainResult, false);
  assert.match(shown.html ?? "", /<table[^]*Oslo/);
  assert.deepEqual(shown.data, { city: ["Oslo", "Lima"], temp: [3.5, 19] });
  assert.equal(main.isMainResult, true);
  const stats = (main.data as any).temp as number[];
  assert.deepEqual([stats[0], stats[1], stats[3], stats[7]], [2, 11.25, 3.5, 19], "count, mean, min, max");
  assert.ok(Math.abs(stats[2] - 10.96015510839) < 1e-9, "std");
});
