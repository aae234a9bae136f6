/**
 * Runs once in every new kernel, silently: a `_cubicle` helper module for per-call env vars,
 * the `e2b/data` formatter that turns a pandas DataFrame into column lists, as the upstream
 * template's startup script does (`to_dict(orient="list")`), with NaN as None so it stays JSON,
 * and an `e2b/chart` formatter that describes matplotlib figures (line, scatter, bar, pie, and a
 * superchart for several axes) in the shape of the SDK's `ChartTypes`.
 */
export const SETUP_CODE = String.raw`
def _cubicle_setup():
    import json, math, os, sys, types
    helper = types.ModuleType("_cubicle")
    helper.saved_env = {}
    def set_env(encoded):
        updates = json.loads(encoded)
        helper.saved_env = {key: os.environ.get(key) for key in updates}
        os.environ.update(updates)
    def restore_env():
        for key, value in helper.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        helper.saved_env = {}
    helper.set_env = set_env
    helper.restore_env = restore_env
    sys.modules["_cubicle"] = helper
    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import ObjectName, Unicode
    except ImportError:
        return
    class E2BDataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    def dataframe_columns(frame):
        return {str(name): [clean(v) for v in values] for name, values in frame.to_dict(orient="list").items()}
    shell = get_ipython()
    formatter = E2BDataFormatter(parent=shell.display_formatter)
    formatter.for_type_by_name("pandas.core.frame", "DataFrame", dataframe_columns)
    shell.display_formatter.formatters["e2b/data"] = formatter

    class E2BChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict,)
        def pop(self, typ, default=None):
            # matplotlib-inline's select_figure_formats pops Figure from every formatter when the
            # inline backend starts; this one must keep describing figures.
            return default
    def number(value):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return str(value)
        return value if math.isfinite(value) else None
    def axis_facts(ax, name):
        axis = ax.xaxis if name == "x" else ax.yaxis
        return {
            name + "_label": axis.get_label().get_text(),
            name + "_scale": (ax.get_xscale() if name == "x" else ax.get_yscale()),
            name + "_ticks": [number(t) for t in axis.get_ticklocs()],
            name + "_tick_labels": [t.get_text() for t in axis.get_ticklabels()],
        }
    def axes_chart(ax):
        from matplotlib.collections import PathCollection
        from matplotlib.container import BarContainer
        from matplotlib.patches import Wedge
        title = ax.get_title()
        wedges = [p for p in ax.patches if isinstance(p, Wedge)]
        if wedges:
            return {"type": "pie", "title": title, "elements": [{"label": w.get_label(), "angle": number(w.theta2 - w.theta1), "radius": number(w.r)} for w in wedges]}
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        if bars:
            labels = {round(float(t), 6): l.get_text() for t, l in zip(ax.get_xticks(), ax.get_xticklabels())}
            elements = []
            for container in bars:
                group = container.get_label() or ""
                for rect in container.patches:
                    center = round(float(rect.get_x() + rect.get_width() / 2), 6)
                    elements.append({"label": labels.get(center, str(center)), "value": number(rect.get_height()), "group": "" if group.startswith("_") else group})
            return {"type": "bar", "title": title, "x_label": ax.get_xlabel(), "y_label": ax.get_ylabel(), "elements": elements}
        lines = ax.get_lines()
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        if not lines and not scatters:
            return None
        elements = []
        for line in lines:
            label = line.get_label()
            elements.append({"label": "" if label.startswith("_") else label, "points": [[number(x), number(y)] for x, y in zip(line.get_xdata(), line.get_ydata())]})
        for collection in scatters:
            label = collection.get_label()
            elements.append({"label": "" if label.startswith("_") else label, "points": [[number(x), number(y)] for x, y in collection.get_offsets()]})
        chart = {"type": "line" if lines and not scatters else "scatter", "title": title, "elements": elements}
        chart.update(axis_facts(ax, "x"))
        chart.update(axis_facts(ax, "y"))
        return chart
    def figure_chart(figure):
        try:
            charts = [c for c in (axes_chart(ax) for ax in figure.axes) if c]
        except Exception:
            return None
        if not charts:
            return None
        if len(charts) == 1:
            return charts[0]
        title = figure._suptitle.get_text() if getattr(figure, "_suptitle", None) else ""
        return {"type": "superchart", "title": title, "elements": charts}
    # A kernel restored from a template's warm snapshot would repeat the snapshot's random
    # sequence in every sandbox: reseed when the host (the sandbox id) is not the one seeded for.
    import socket
    seeded_for = [socket.gethostname()]
    def reseed_after_restore(*_args):
        host = socket.gethostname()
        if host == seeded_for[0]:
            return
        seeded_for[0] = host
        import random
        random.seed()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
    shell.events.register("pre_run_cell", reseed_after_restore)
    chart_formatter = E2BChartFormatter(parent=shell.display_formatter)
    chart_formatter.for_type_by_name("matplotlib.figure", "Figure", figure_chart)
    shell.display_formatter.formatters["e2b/chart"] = chart_formatter
_cubicle_setup()
del _cubicle_setup
`;
