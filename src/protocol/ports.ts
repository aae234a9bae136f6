/** The agent's two ports inside every sandbox (e2b-wire-protocol.md §1): fixed by the E2B SDKs. */

/** envd: Connect RPCs (process, filesystem), `/files`, `/health`, `/init`, `/envs`, `/metrics`. */
export const ENVD_PORT = 49983;

/** The code interpreter (`@e2b/code-interpreter`): `/execute`, `/contexts`. */
export const INTERPRETER_PORT = 49999;
