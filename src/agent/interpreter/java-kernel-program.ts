/**
 * The Java kernel: a small program on the JDK's `jdk.jshell` API. No Java Jupyter kernel is
 * packaged in Debian, so the `code-interpreter-v1` recipe writes this source into the tree and
 * compiles it there with `javac` (recipe.ts); the agent starts it (java-kernel.ts). The source
 * being part of the recipe, a change to it changes the recipe's hash and rebuilds the template.
 *
 * The protocol, one line per message:
 * - agent → kernel (stdin): `X <code> [<name> <value>]...` runs a cell with per-call env vars,
 *   every field base64 (UTF-8), separated by single spaces; `I` interrupts the running cell.
 * - kernel → agent (stdout): `<marker>{json}`, the marker being the program's first argument.
 *   Messages: `ready`, `stdout`/`stderr` {text}, `result` {text}, `error` {name, value,
 *   traceback}, `done`. Anything on stdout that is not a message (a child process started with
 *   `inheritIO()` writes there directly) is the cell's stdout.
 *
 * Cells run in this JVM (no second JVM for the snippets, as the jshell tool would start): a
 * DirectExecutionControl runs each snippet on a thread of its own, so an interrupt can stop
 * that thread and the result is the value itself (`String.valueOf`, not jshell's literal).
 * Per-call env vars go into the map behind `System.getenv()` (needs `--add-opens
 * java.base/java.util=ALL-UNNAMED`), so `System.getenv` and `ProcessBuilder.environment()` see
 * them; a child process whose ProcessBuilder environment was never asked for inherits the JVM's
 * real environment, which has the sandbox's env vars but not per-call ones.
 */

/** Where the recipe puts the source and the compiled classes. */
export const JAVA_KERNEL_DIR = "/usr/local/lib/cubicle/java-kernel";
export const JAVA_KERNEL_CLASS = "CubicleJavaKernel";

export const JAVA_KERNEL_SOURCE = String.raw`import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.stream.Collectors;
import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;
import jdk.jshell.execution.DirectExecutionControl;
import jdk.jshell.spi.ExecutionControl;
import jdk.jshell.spi.ExecutionControlProvider;
import jdk.jshell.spi.ExecutionEnv;

public final class CubicleJavaKernel {
    private static final Object NO_VALUE = new Object();
    private static PrintStream protocol;
    private static String marker;
    private static CellStream cellOut;
    private static CellStream cellErr;

    /** Runs each snippet on its own thread, keeps its value, and stops that thread on interrupt. */
    static final class CellControl extends DirectExecutionControl {
        volatile Thread cellThread;
        /** Set by an interrupt, cleared when the next cell arrives (both on the input thread). */
        volatile boolean stopped;
        volatile Object lastValue = NO_VALUE;

        @Override
        protected String invoke(Method doit) throws Exception {
            Object[] value = { null };
            Throwable[] failure = { null };
            Thread thread = new Thread(() -> {
                try {
                    value[0] = doit.invoke(null);
                } catch (Throwable t) {
                    failure[0] = t;
                }
            }, "cell");
            cellThread = thread;
            // An interrupt that came while the snippet compiled stops it before it starts.
            if (!stopped) {
                thread.start();
                thread.join();
            }
            cellThread = null;
            if (stopped) throw new ExecutionControl.StoppedException();
            if (failure[0] instanceof Exception) throw (Exception) failure[0];
            if (failure[0] instanceof Error) throw (Error) failure[0];
            lastValue = value[0];
            return valueString(value[0]);
        }

        @SuppressWarnings("deprecation")
        void interrupt() {
            stopped = true;
            Thread thread = cellThread;
            if (thread != null) thread.stop();
        }
    }

    /**
     * What a cell writes to System.out / System.err. Only the kernel's own threads send it (every
     * 20 ms and at the end of a cell), never the cell's thread: an interrupt stops that thread
     * wherever it is, and must not cut a message in half. A cell that writes faster than the
     * agent reads waits here once 1 MiB is pending.
     */
    static final class CellStream extends OutputStream {
        private static final int MAX_PENDING = 1 << 20;
        private final String type;
        private final ByteArrayOutputStream pending = new ByteArrayOutputStream();

        CellStream(String type) {
            this.type = type;
        }

        @Override
        public synchronized void write(int b) {
            pending.write(b);
            waitForRoom();
        }

        @Override
        public synchronized void write(byte[] bytes, int offset, int length) {
            pending.write(bytes, offset, length);
            waitForRoom();
        }

        private void waitForRoom() {
            while (pending.size() > MAX_PENDING) {
                try {
                    wait();
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    return;
                }
            }
        }

        /** The cell's flush: what is pending goes out with the next send, within 20 ms. */
        @Override
        public void flush() {
        }

        /** Sends what is pending up to the last whole UTF-8 character. */
        synchronized void drain() {
            byte[] bytes = pending.toByteArray();
            int end = bytes.length;
            int back = 0;
            while (back < 3 && end - back - 1 >= 0 && (bytes[end - back - 1] & 0xC0) == 0x80) back++;
            if (end - back - 1 >= 0) {
                int lead = bytes[end - back - 1] & 0xFF;
                int need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
                if (need > back) end = end - back - 1;
            }
            if (end == 0) return;
            pending.reset();
            pending.write(bytes, end, bytes.length - end);
            send("{\"type\":\"" + type + "\",\"text\":" + json(new String(bytes, 0, end, StandardCharsets.UTF_8)) + "}");
            notifyAll();
        }
    }

    static synchronized void send(String message) {
        protocol.print(marker + message + "\n");
        protocol.flush();
    }

    static String json(String text) {
        StringBuilder out = new StringBuilder(text.length() + 2).append('"');
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            switch (c) {
                case '"': out.append("\\\""); break;
                case '\\': out.append("\\\\"); break;
                case '\n': out.append("\\n"); break;
                case '\r': out.append("\\r"); break;
                case '\t': out.append("\\t"); break;
                default:
                    if (c < 0x20 || Character.isSurrogate(c) && !validSurrogate(text, i)) out.append(String.format("\\u%04x", (int) c));
                    else out.append(c);
            }
        }
        return out.append('"').toString();
    }

    private static boolean validSurrogate(String text, int i) {
        char c = text.charAt(i);
        if (Character.isHighSurrogate(c)) return i + 1 < text.length() && Character.isLowSurrogate(text.charAt(i + 1));
        return i > 0 && Character.isHighSurrogate(text.charAt(i - 1));
    }

    static void sendError(String name, String value, String traceback) {
        flushStreams();
        send("{\"type\":\"error\",\"name\":" + json(name) + ",\"value\":" + json(value) + ",\"traceback\":" + json(traceback) + "}");
    }

    static void flushStreams() {
        System.out.flush();
        System.err.flush();
        cellOut.drain();
        cellErr.drain();
    }

    @SuppressWarnings("unchecked")
    static Map<String, String> writableEnvironment() throws ReflectiveOperationException {
        Map<String, String> environment = System.getenv();
        Field inner = environment.getClass().getDeclaredField("m");
        inner.setAccessible(true);
        return (Map<String, String>) inner.get(environment);
    }

    public static void main(String[] args) throws Exception {
        marker = args[0];
        protocol = new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
        cellOut = new CellStream("stdout");
        cellErr = new CellStream("stderr");
        // No autoflush: what a cell prints goes out in batches (CellStream), not a message a line.
        System.setOut(new PrintStream(cellOut, false, StandardCharsets.UTF_8));
        System.setErr(new PrintStream(cellErr, false, StandardCharsets.UTF_8));
        System.setIn(new ByteArrayInputStream(new byte[0]));

        CellControl control = new CellControl();
        JShell shell = JShell.builder()
            .executionEngine(new ExecutionControlProvider() {
                public String name() {
                    return "cubicle";
                }

                public ExecutionControl generate(ExecutionEnv env, Map<String, String> parameters) {
                    return control;
                }
            }, Map.of())
            .build();

        BlockingQueue<String> cells = new LinkedBlockingQueue<>();
        BufferedReader input = new BufferedReader(new InputStreamReader(new java.io.FileInputStream(FileDescriptor.in), StandardCharsets.UTF_8));
        Thread reader = new Thread(() -> {
            try {
                for (String line; (line = input.readLine()) != null; ) {
                    if (line.equals("I")) {
                        control.interrupt();
                    } else {
                        control.stopped = false;
                        cells.add(line);
                    }
                }
            } catch (Exception ignored) {
                // the agent is gone
            }
            Runtime.getRuntime().halt(0);
        }, "kernel-input");
        reader.setDaemon(true);
        reader.start();

        Thread flusher = new Thread(() -> {
            while (true) {
                try {
                    Thread.sleep(20);
                } catch (InterruptedException e) {
                    return;
                }
                cellOut.drain();
                cellErr.drain();
            }
        }, "kernel-output");
        flusher.setDaemon(true);
        flusher.start();

        send("{\"type\":\"ready\"}");
        while (true) {
            String line = cells.take();
            String[] fields = line.split(" ", -1);
            Base64.Decoder base64 = Base64.getDecoder();
            Map<String, String> saved = new LinkedHashMap<>();
            Map<String, String> environment = null;
            try {
                if (!fields[0].equals("X") || fields.length < 2 || fields.length % 2 != 0) throw new IllegalArgumentException("malformed request from the agent");
                String code = new String(base64.decode(fields[1]), StandardCharsets.UTF_8);
                if (fields.length > 2) {
                    environment = writableEnvironment();
                    for (int i = 2; i < fields.length; i += 2) {
                        String name = new String(base64.decode(fields[i]), StandardCharsets.UTF_8);
                        String value = new String(base64.decode(fields[i + 1]), StandardCharsets.UTF_8);
                        if (!saved.containsKey(name)) saved.put(name, environment.get(name));
                        environment.put(name, value);
                    }
                }
                // Fresh streams for every cell: a cell stopped inside println leaves what it
                // printed so far in the old PrintStream's own buffers, and the next print on that
                // stream would send it as a later cell's output.
                System.setOut(new PrintStream(cellOut, false, StandardCharsets.UTF_8));
                System.setErr(new PrintStream(cellErr, false, StandardCharsets.UTF_8));
                runCell(shell, control, code);
            } catch (Throwable t) {
                sendError(t.getClass().getName(), String.valueOf(t.getMessage()), stackTrace(t.getClass().getName(), t.getMessage(), t.getStackTrace()));
            } finally {
                if (environment != null) {
                    for (Map.Entry<String, String> entry : saved.entrySet()) {
                        if (entry.getValue() == null) environment.remove(entry.getKey());
                        else environment.put(entry.getKey(), entry.getValue());
                    }
                }
                flushStreams();
                send("{\"type\":\"done\"}");
            }
        }
    }

    /** Splits a cell into snippets and evaluates them in order, up to the first error. */
    static void runCell(JShell shell, CellControl control, String code) {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String remaining = code;
        String result = null;
        while (!remaining.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(remaining);
            SourceCodeAnalysis.Completeness completeness = info.completeness();
            if (completeness == SourceCodeAnalysis.Completeness.EMPTY) break;
            String source = completeness.isComplete() ? info.source() : remaining;
            remaining = completeness.isComplete() ? info.remaining() : "";
            control.lastValue = NO_VALUE;
            result = null;
            List<SnippetEvent> events = shell.eval(source);
            if (control.stopped) {
                sendError("Interrupted", "the execution was interrupted", "");
                return;
            }
            if (events.isEmpty() && !completeness.isComplete()) {
                sendError("CompilationException", "the cell ends inside an unfinished statement or block", source);
                return;
            }
            for (SnippetEvent event : events) {
                if (event.causeSnippet() != null) continue;
                Snippet snippet = event.snippet();
                if (event.status() == Snippet.Status.REJECTED) {
                    sendError("CompilationException", describeDiagnostics(shell, snippet), snippet.source());
                    return;
                }
                if (event.exception() != null) {
                    reportException(shell, event.exception());
                    return;
                }
                if (showsValue(snippet) && control.lastValue != NO_VALUE) result = String.valueOf(control.lastValue);
            }
        }
        if (result != null) {
            flushStreams();
            send("{\"type\":\"result\",\"text\":" + json(result) + "}");
        }
    }

    /** An expression's value is the cell's result; declarations and assignments show nothing. */
    static boolean showsValue(Snippet snippet) {
        switch (snippet.subKind()) {
            case TEMP_VAR_EXPRESSION_SUBKIND:
            case VAR_VALUE_SUBKIND:
            case OTHER_EXPRESSION_SUBKIND:
                return true;
            default:
                return false;
        }
    }

    static String describeDiagnostics(JShell shell, Snippet snippet) {
        String source = snippet.source();
        List<String> lines = new ArrayList<>();
        for (Diag diag : shell.diagnostics(snippet).collect(Collectors.toList())) {
            if (!diag.isError()) continue;
            String message = diag.getMessage(Locale.ROOT);
            long position = diag.getStartPosition();
            if (position >= 0 && position <= source.length()) {
                int line = 1;
                for (int i = 0; i < position; i++) if (source.charAt(i) == '\n') line++;
                message = "line " + line + ": " + message;
            }
            lines.add(message);
        }
        return lines.isEmpty() ? "the snippet was rejected" : String.join("\n", lines);
    }

    static void reportException(JShell shell, Exception exception) {
        if (exception instanceof EvalException) {
            EvalException eval = (EvalException) exception;
            String name = eval.getExceptionClassName();
            sendError(name, eval.getMessage() == null ? "" : eval.getMessage(), stackTrace(name, eval.getMessage(), eval.getStackTrace()));
        } else if (exception instanceof UnresolvedReferenceException) {
            Snippet snippet = ((UnresolvedReferenceException) exception).getSnippet();
            String missing = snippet instanceof jdk.jshell.DeclarationSnippet
                ? shell.unresolvedDependencies((jdk.jshell.DeclarationSnippet) snippet).collect(Collectors.joining(", "))
                : "";
            sendError("UnresolvedReferenceException", "a definition used here is not defined yet" + (missing.isEmpty() ? "" : ": " + missing), snippet.source());
        } else {
            sendError(exception.getClass().getName(), String.valueOf(exception.getMessage()), stackTrace(exception.getClass().getName(), exception.getMessage(), exception.getStackTrace()));
        }
    }

    /** The frames down to the snippet's own (the kernel's and reflection's are noise). */
    static String stackTrace(String name, String message, StackTraceElement[] frames) {
        StringBuilder out = new StringBuilder(name);
        if (message != null) out.append(": ").append(message);
        for (StackTraceElement frame : frames) {
            String owner = frame.getClassName();
            if (owner.startsWith("jdk.internal.reflect.") || owner.startsWith("java.lang.reflect.") || owner.startsWith("CubicleJavaKernel")) break;
            out.append("\n\tat ").append(frame);
        }
        return out.toString();
    }
}
`;
