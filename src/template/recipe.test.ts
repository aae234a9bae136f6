import { test } from "node:test";
import assert from "node:assert/strict";
import { baseRecipe, canonicalJson, codeInterpreterRecipe, findRecipe, recipeHash, type Recipe } from "./recipe.js";
import { mmdebstrapArgv } from "./build.js";

test("a recipe hashes the same whatever the order of its keys", () => {
  const reordered = Object.fromEntries(Object.entries(baseRecipe).reverse()) as unknown as Recipe;
  assert.equal(recipeHash(reordered), recipeHash(baseRecipe));
  assert.match(recipeHash(baseRecipe), /^[0-9a-f]{64}$/);
});

test("adding a package changes the hash", () => {
  const withNano: Recipe = { ...baseRecipe, packages: [...baseRecipe.packages, "nano"] };
  assert.notEqual(recipeHash(withNano), recipeHash(baseRecipe));
});

test("a changed file content or user changes the hash", () => {
  const otherHosts: Recipe = { ...baseRecipe, files: baseRecipe.files.map((f) => ({ ...f, content: f.content + "#\n" })) };
  const otherUid: Recipe = { ...baseRecipe, users: baseRecipe.users.map((u) => ({ ...u, uid: 1001 })) };
  assert.notEqual(recipeHash(otherHosts), recipeHash(baseRecipe));
  assert.notEqual(recipeHash(otherUid), recipeHash(baseRecipe));
});

test("base and code-interpreter-v1 have different hashes", () => {
  assert.notEqual(recipeHash(codeInterpreterRecipe), recipeHash(baseRecipe));
});

test("canonical JSON sorts object keys but keeps array order", () => {
  assert.equal(canonicalJson({ b: 1, a: { d: [3, 1], c: null } }), '{"a":{"c":null,"d":[3,1]},"b":1}');
});

test("recipes are found by id and by alias, unknown names are not", () => {
  assert.equal(findRecipe("base"), baseRecipe);
  assert.equal(findRecipe("code-interpreter-v1"), codeInterpreterRecipe);
  assert.equal(findRecipe("no-such-template"), undefined);
});

test("the base recipe gives the E2B defaults: user with passwordless sudo, python, git, curl", () => {
  assert.equal(baseRecipe.defaultUser, "user");
  assert.equal(baseRecipe.defaultWorkdir, "/home/user");
  const user = baseRecipe.users.find((u) => u.name === "user");
  assert.deepEqual(
    user && { uid: user.uid, gid: user.gid, home: user.home, shell: user.shell, sudo: user.passwordlessSudo },
    { uid: 1000, gid: 1000, home: "/home/user", shell: "/bin/bash", sudo: true },
  );
  for (const pkg of ["python3", "python-is-python3", "git", "curl", "sudo", "procps"]) {
    assert.ok(baseRecipe.packages.includes(pkg), pkg);
  }
  assert.ok(baseRecipe.directories.some((d) => d.path === "/.cubicle"));
  assert.ok(codeInterpreterRecipe.packages.includes("python3-ipykernel"));
});

test("the mmdebstrap command keeps docs out and passes packages as one --include", () => {
  const argv = mmdebstrapArgv(baseRecipe, "/t/rootfs", "http://mirror.example/debian");
  assert.equal(argv[0], "mmdebstrap");
  assert.ok(argv.includes("--variant=minbase"));
  assert.ok(argv.includes(`--include=${baseRecipe.packages.join(",")}`));
  assert.ok(argv.includes("--dpkgopt=path-exclude=/usr/share/man/*"));
  assert.deepEqual(argv.slice(-3), ["bookworm", "/t/rootfs", "http://mirror.example/debian"]);
});

test("code-interpreter-v1 carries R, the JDK and the Java kernel's source, compiled by a step; the source is in the hash", async () => {
  const { JAVA_KERNEL_DIR, JAVA_KERNEL_SOURCE } = await import("../agent/interpreter/java-kernel-program.js");
  for (const pkg of ["r-cran-irkernel", "default-jdk-headless"]) assert.ok(codeInterpreterRecipe.packages.includes(pkg), pkg);
  const source = codeInterpreterRecipe.files.find((f) => f.path.startsWith(JAVA_KERNEL_DIR));
  assert.equal(source?.content, JAVA_KERNEL_SOURCE);
  assert.ok(codeInterpreterRecipe.steps.some((step) => step.includes("javac") && step.includes(source!.path)));
  assert.ok(codeInterpreterRecipe.dpkgPathFilters.includes("path-exclude=/usr/lib/jvm/*/jmods/*"));
  const edited: Recipe = { ...codeInterpreterRecipe, files: codeInterpreterRecipe.files.map((f) => (f === source ? { ...f, content: f.content + "\n" } : f)) };
  assert.notEqual(recipeHash(edited), recipeHash(codeInterpreterRecipe));
  assert.ok(!baseRecipe.packages.includes("r-cran-irkernel"));
});
