import { CubicleError } from "../../shared/cubicle-error.js";
import type { ProcessConfig } from "./managed-process.js";

/**
 * SESSIONS_NOTE: persistent shell sessions (AgentFense's sessions on E2B's command API). A
 * command whose envs hold `CUBICLE_SESSION=<name>` runs in that session: it starts in the
 * directory the session's last command ended in, with the variables it had exported, and what
 * it changes (`cd`, `export`, `unset`) is there for the session's next command. The call's own
 * envs win over the session's for that call (and are kept by the session after it). A
 * session is the user's: its state is `~/.cubicle/sessions/<name>/` (`env`, `cwd`), written by
 * the shell itself when the command ends (also through `exit`, not when the shell is killed),
 * so it lives on the sandbox's disk and survives pause, resume, snapshots and forks.
 *
 * It applies to the SDK's `commands.run` shape, `/bin/bash -l -c <command>`: the command is
 * evaluated by a small wrapper in that same shell (so its `cd` and `export` stick), the
 * arguments are passed, never spliced into the script. `commands.list` shows the command as
 * it was sent. Other launches (a PTY, another program) with the variable run as they are.
 */
export const SESSION_ENV = "CUBICLE_SESSION";
const SESSION_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * $1: the command; $2: the session's name; $3: the names of the call's own envs. Variables of
 * the wrapper are not exported, so the session does not keep them.
 */
const WRAPPER = String.raw`__cs_dir="$HOME/.cubicle/sessions/$2"
[ -d "$__cs_dir" ] || mkdir -p -- "$__cs_dir" || exit 1
for __cs_n in $3; do eval "__cs_keep_$__cs_n="\${$__cs_n}""; done
[ -f "$__cs_dir/env" ] && . "$__cs_dir/env"
for __cs_n in $3; do eval "export $__cs_n="\${__cs_keep_$__cs_n}""; done
[ -f "$__cs_dir/cwd" ] && { IFS= read -r __cs_cwd < "$__cs_dir/cwd"; cd -- "$__cs_cwd" 2>/dev/null; }
__cs_save() {
  __cs_status=$?
  export -n SHLVL PWD OLDPWD _ 2>/dev/null
  { printf '%s
' 'for __cs_v in $(compgen -e); do case $__cs_v in HOME|USER|LOGNAME|PATH|SHELL) ;; *) unset "$__cs_v" ;; esac; done'; export -p; } > "$__cs_dir/env"
  pwd > "$__cs_dir/cwd"
  exit $__cs_status
}
trap __cs_save EXIT
eval "$1"`;

/** The launch of a session command, or undefined when `config` is not one (SESSIONS_NOTE). */
export function sessionLaunch(config: ProcessConfig): ProcessConfig | undefined {
  const name = config.envs[SESSION_ENV];
  if (name === undefined) return undefined;
  if (!SESSION_NAME.test(name)) throw new CubicleError("invalid_argument", `${SESSION_ENV} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter, digit or '_'`);
  const [flag, dashC, command, ...rest] = config.args;
  if (!/^(\/usr)?\/bin\/bash$/.test(config.cmd) || flag !== "-l" || dashC !== "-c" || command === undefined || rest.length > 0) return undefined;
  const callEnvs = Object.keys(config.envs).filter((key) => key !== SESSION_ENV && ENV_NAME.test(key));
  return { ...config, args: ["-l", "-c", WRAPPER, "cubicle-session", command, name, callEnvs.join(" ")] };
}
