/**
 * The `end` event as upstream envd fills it from Go's os.ProcessState (§7.5): `exitCode` -1
 * when killed by a signal, `exited` only on a normal exit, `status` like "exit status 1" or
 * "signal: killed", `error` the same text whenever the wait failed (non-zero or signalled).
 */
import { constants } from "node:os";

export interface EndEvent {
  exitCode: number;
  exited: boolean;
  status: string;
  error?: string;
}

/** Go's names for signals (syscall/zerrors_linux_*.go signal table). */
const goSignalNames: Record<number, string> = {
  1: "hangup",
  2: "interrupt",
  3: "quit",
  4: "illegal instruction",
  5: "trace/breakpoint trap",
  6: "aborted",
  7: "bus error",
  8: "floating point exception",
  9: "killed",
  10: "user defined signal 1",
  11: "segmentation fault",
  12: "user defined signal 2",
  13: "broken pipe",
  14: "alarm clock",
  15: "terminated",
  16: "stack fault",
  17: "child exited",
  18: "continued",
  19: "stopped (signal)",
  20: "stopped",
  21: "stopped (tty input)",
  22: "stopped (tty output)",
  23: "urgent I/O condition",
  24: "CPU time limit exceeded",
  25: "file size limit exceeded",
  26: "virtual timer expired",
  27: "profiling timer expired",
  28: "window changed",
  29: "I/O possible",
  30: "power failure",
  31: "bad system call",
};

export function signalNumber(signal: NodeJS.Signals | number): number {
  return typeof signal === "number" ? signal : (constants.signals as Record<string, number>)[signal] ?? 0;
}

/** Builds the end event from what Node reports for an exited child: (code, signal). */
export function endEventFromExit(code: number | null, signal: NodeJS.Signals | number | null): EndEvent {
  if (signal !== null && signal !== 0) {
    const n = signalNumber(signal);
    const status = `signal: ${goSignalNames[n] ?? `signal ${n}`}`;
    return { exitCode: -1, exited: false, status, error: status };
  }
  const exitCode = code ?? 0;
  const status = `exit status ${exitCode}`;
  return exitCode === 0 ? { exitCode, exited: true, status } : { exitCode, exited: true, status, error: status };
}
