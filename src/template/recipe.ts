import { createHash } from "node:crypto";
import type { TemplateDefaults } from "../store/types.js";
// The one piece of the agent a template carries: the Java kernel's source, compiled at build.
import { JAVA_KERNEL_CLASS, JAVA_KERNEL_DIR, JAVA_KERNEL_SOURCE } from "../agent/interpreter/java-kernel-program.js";

/**
 * Bumped whenever the builder changes what a recipe produces (a new post-build step, another
 * ownership rule), so cached trees made by an older builder are rebuilt.
 */
export const BUILDER_VERSION = 1;

/** A Linux account the recipe creates inside the tree. */
export interface RecipeUser {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
  /** Supplementary groups; they must exist in the tree (Debian's `sudo` does). */
  groups: string[];
  /** Adds `/etc/sudoers.d/<name>` granting passwordless sudo. */
  passwordlessSudo: boolean;
}

/** A file written into the tree after the packages are installed. */
export interface RecipeFile {
  /** Absolute path inside the tree. */
  path: string;
  content: string;
  mode: number;
}

/** A directory created (or re-moded) inside the tree. */
export interface RecipeDirectory {
  path: string;
  mode: number;
}

/**
 * How to make a template rootfs from Debian packages with `mmdebstrap`. Data only: the builder
 * turns it into argv arrays, and its hash decides whether a cached tree is still current.
 */
export interface Recipe extends TemplateDefaults {
  /** Debian suite, e.g. `bookworm`. */
  suite: string;
  /** mmdebstrap variant: `minbase` = Essential + apt. */
  variant: "minbase" | "apt";
  /** Packages on top of the variant; recommends are not installed. */
  packages: string[];
  /** dpkg `path-exclude` / `path-include` filters that keep docs, man pages and locales out. */
  dpkgPathFilters: string[];
  /** Groups created before the users (name → gid). */
  groups: Array<{ name: string; gid: number }>;
  users: RecipeUser[];
  directories: RecipeDirectory[];
  files: RecipeFile[];
  /** Extra commands run inside the finished tree with `chroot`, as argv arrays. */
  steps: string[][];
}

const SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const keepDocsOut = [
  "path-exclude=/usr/share/man/*",
  "path-exclude=/usr/share/info/*",
  "path-exclude=/usr/share/locale/*",
  "path-include=/usr/share/locale/locale.alias",
  "path-exclude=/usr/share/doc/*",
  // Licences stay: they are small, and Debian asks to ship them.
  "path-include=/usr/share/doc/*/copyright",
  "path-exclude=/usr/share/lintian/*",
];

/** The `base` template: what `Sandbox.create()` gets (see e2b-wire-protocol.md §11). */
export const baseRecipe: Recipe = {
  templateId: "base",
  aliases: ["base"],
  suite: "bookworm",
  variant: "minbase",
  packages: [
    "bash",
    "coreutils",
    "procps",
    "less",
    "sudo",
    "ca-certificates",
    "curl",
    "git",
    "iproute2",
    "netbase",
    // Resolves whatever hostname the runtime gives a sandbox (sudo warns when it cannot).
    "libnss-myhostname",
    "python3",
    // Client code runs `python …` and `python -m http.server`.
    "python-is-python3",
  ],
  dpkgPathFilters: keepDocsOut,
  groups: [{ name: "user", gid: 1000 }],
  users: [
    {
      name: "user",
      uid: 1000,
      gid: 1000,
      home: "/home/user",
      shell: "/bin/bash",
      groups: ["sudo"],
      passwordlessSudo: true,
    },
  ],
  directories: [
    { path: "/root", mode: 0o700 },
    { path: "/tmp", mode: 0o1777 },
    // Mount point for the agent kit, bound read-only by the runtime.
    { path: "/.cubicle", mode: 0o755 },
  ],
  files: [
    { path: "/etc/hostname", content: "sandbox\n", mode: 0o644 },
    {
      path: "/etc/hosts",
      content: [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
        "",
      ].join("\n"),
      mode: 0o644,
    },
    // A regular file so the runtime can bind its own resolver configuration over it.
    { path: "/etc/resolv.conf", content: "# Replaced by the Cubicle runtime when a sandbox starts.\n", mode: 0o644 },
  ],
  steps: [
    // Every command runs as `bash -l -c …` (as upstream), so /etc/profile is read each time.
    // Debian's asks `$(id -u)` twice: a process start each, ~1.6 of a command's ~4 ms in bash.
    // bash knows its EUID; other shells still ask id.
    ["sed", "-i", "s/\\$(id -u)/${EUID:-$(id -u)}/g", "/etc/profile"],
  ],
  defaultUser: "user",
  defaultWorkdir: "/home/user",
  env: {
    PATH: SBIN_PATH,
    LANG: "C.UTF-8",
  },
  cpuCount: 2,
  memoryMB: 512,
  diskSizeMB: 4096,
};

/**
 * The `code-interpreter-v1` template: `base` plus a Python kernel and the usual data stack, from
 * Debian packages only (PyPI is not reachable from the build).
 */
export const codeInterpreterRecipe: Recipe = {
  ...baseRecipe,
  templateId: "code-interpreter-v1",
  aliases: ["code-interpreter-v1"],
  packages: [
    ...baseRecipe.packages,
    "python3-ipykernel",
    "python3-numpy",
    "python3-pandas",
    "python3-matplotlib",
    // Satisfies python3-fonttools' "python3-scipy | python3-munkres" with the small choice:
    // scipy drags in pythran, g++ and boost (≈620 MB). Add "python3-scipy" here to have it.
    "python3-munkres",
    // The R kernel (IRkernel speaks the Jupyter protocol; r-base-core comes with it).
    "r-cran-irkernel",
    // The Java kernel runs on the JDK's jshell API (java-kernel-program.ts).
    "default-jdk-headless",
  ],
  directories: [...baseRecipe.directories, { path: JAVA_KERNEL_DIR, mode: 0o755 }],
  files: [...baseRecipe.files, { path: `${JAVA_KERNEL_DIR}/${JAVA_KERNEL_CLASS}.java`, content: JAVA_KERNEL_SOURCE, mode: 0o644 }],
  dpkgPathFilters: [
    ...baseRecipe.dpkgPathFilters,
    // The JDK's own man pages: with /usr/share/man/man1 kept out, its postinst would fail to
    // link them there (it adds the man slave links only when these files exist).
    "path-exclude=/usr/lib/jvm/*/man/*",
    // jmods only serve jlink (≈70 MB); javac, jshell and the runtime do not read them.
    "path-exclude=/usr/lib/jvm/*/jmods/*",
    // R packages' vignettes and manuals.
    "path-exclude=/usr/lib/R/site-library/*/doc/*",
    "path-exclude=/usr/lib/R/library/*/doc/*",
    "path-exclude=/usr/share/R/doc/*",
  ],
  env: {
    ...baseRecipe.env,
    // ipykernel starts debugpy, which otherwise warns on stderr about frozen modules at every
    // kernel start.
    PYDEVD_DISABLE_FILE_VALIDATION: "1",
  },
  steps: [
    ...baseRecipe.steps,
    // matplotlib builds its font cache on first import (seconds); do it once here for both
    // users, so each sandbox's first plot does not pay for it.
    ["python3", "-c", "import matplotlib.pyplot"],
    ["runuser", "-u", "user", "--", "env", "HOME=/home/user", "python3", "-c", "import matplotlib.pyplot"],
    // The Java kernel (java-kernel-program.ts); its source is in `files`, so the hash follows it.
    // The JDK's launchers find libjli.so through $ORIGIN, which ld.so resolves with /proc, and a
    // build's chroot has no /proc: name the library directory.
    ["env", "LD_LIBRARY_PATH=/usr/lib/jvm/default-java/lib", "javac", "-encoding", "UTF-8", "-d", JAVA_KERNEL_DIR, `${JAVA_KERNEL_DIR}/${JAVA_KERNEL_CLASS}.java`],
  ],
};

/** Built-in recipes by template id. */
export const recipes: ReadonlyMap<string, Recipe> = new Map(
  [baseRecipe, codeInterpreterRecipe].map((recipe) => [recipe.templateId, recipe]),
);

/** The built-in recipe whose id or alias is `idOrAlias`, if any. */
export function findRecipe(idOrAlias: string): Recipe | undefined {
  const byId = recipes.get(idOrAlias);
  if (byId) return byId;
  for (const recipe of recipes.values()) {
    if (recipe.aliases.includes(idOrAlias)) return recipe;
  }
  return undefined;
}

/**
 * A hex digest of everything that shapes the built tree: the recipe (keys in a fixed order,
 * so reordering fields in source does not force a rebuild) and the builder version.
 */
export function recipeHash(recipe: Recipe): string {
  return createHash("sha256")
    .update(canonicalJson({ builderVersion: BUILDER_VERSION, recipe }))
    .digest("hex");
}

/** JSON with object keys sorted at every level; arrays keep their order (it matters). */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, inner: unknown) => {
    if (inner === null || typeof inner !== "object" || Array.isArray(inner)) return inner;
    const sorted: Record<string, unknown> = {};
    for (const key of Object.keys(inner).sort()) sorted[key] = (inner as Record<string, unknown>)[key];
    return sorted;
  });
}
