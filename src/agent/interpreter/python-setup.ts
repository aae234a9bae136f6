/**
 * Python source of `describe_figure(figure)`: a matplotlib figure as a chart of E2B's protocol, or
 * None. Compiled inside the kernel on the first figure it describes.
 */
export const CHART_DESCRIBER_CODE = String.raw`
import math, sys

def close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
def tidy(value, relative=1e-9):
    # Values matplotlib computed (box quartiles, wedge angles from float32 fractions) carry
    # float noise: 323.99999141693115 is a 324 degree wedge. Shortest decimal within tolerance.
    value = float(value)
    if not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    tolerance = relative * abs(value)
    for digits in range(17):
        rounded = round(value, digits)
        if abs(rounded - value) <= tolerance:
            return rounded
    return value
def plain(value):
    import datetime
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.datetime64):
        if numpy.isnat(value):
            return None
        return str(value.astype("datetime64[s]"))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None
def text_or_none(text):
    return text if text else None
def unit_of(label):
    # "Temperature (°C)" and "Distance [km]" name their units, as upstream reads them.
    if not label:
        return None
    import re
    match = re.search(r"\s\((.*?)\)|\[(.*?)\]", label)
    return (match.group(1) or match.group(2)) if match else None
def converter_of(axis):
    getter = getattr(axis, "get_converter", None)
    return getter() if getter is not None else getattr(axis, "converter", None)
def is_date_axis(axis):
    import matplotlib.dates as mdates
    kinds = tuple(k for k in (getattr(mdates, "DateConverter", None), getattr(mdates, "_SwitchableDateConverter", None), getattr(mdates, "ConciseDateConverter", None)) if k is not None)
    return isinstance(converter_of(axis), kinds)
def category_names(axis):
    # A string-category axis maps each category to 0, 1, ...; the inverse gives labels back.
    import matplotlib.category as mcategory
    if not isinstance(converter_of(axis), mcategory.StrCategoryConverter):
        return None
    mapping = getattr(getattr(axis, "units", None), "_mapping", None) or {}
    return {int(index): str(name) for name, index in mapping.items()}
def axis_scale(axis, scale, ticks, labels):
    if is_date_axis(axis):
        return "datetime"
    if scale != "linear":
        return scale
    if category_names(axis) is not None:
        return "categorical"
    # Ticks at 0, 1, 2, ... labelled with words (set_xticks(range(n), names)) are categories.
    if not ticks or len(ticks) != len(labels):
        return "linear"
    for index, (tick, label) in enumerate(zip(ticks, labels)):
        if not isinstance(tick, float) or tick != index:
            return "linear"
        try:
            if float(label.replace("\u2212", "-")) == tick:
                return "linear"
        except ValueError:
            pass
    return "categorical"
def axis_facts(ax, name):
    axis = ax.xaxis if name == "x" else ax.yaxis
    scale = ax.get_xscale() if name == "x" else ax.get_yscale()
    locations = list(axis.get_ticklocs())
    labels = [label.get_text() for label in axis.get_ticklabels()]
    if is_date_axis(axis):
        import matplotlib.dates as mdates
        ticks = [mdates.num2date(tick).isoformat() for tick in locations]
    else:
        ticks = [tidy(tick) for tick in locations]
    return {
        name + "_ticks": ticks,
        name + "_tick_labels": labels,
        name + "_scale": axis_scale(axis, scale, ticks, labels),
    }
def base_chart(kind, ax):
    return {"type": kind, "title": text_or_none(ax.get_title()), "elements": []}
def labelled_chart(kind, ax):
    chart = base_chart(kind, ax)
    x_label, y_label = text_or_none(ax.get_xlabel()), text_or_none(ax.get_ylabel())
    chart.update({"x_label": x_label, "y_label": y_label, "x_unit": unit_of(x_label), "y_unit": unit_of(y_label)})
    return chart
def swap_axes_labels(chart):
    # Horizontal bars and boxes: x_label/x_unit always name the category axis, as upstream.
    chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
    chart["x_unit"], chart["y_unit"] = chart["y_unit"], chart["x_unit"]
def is_grid_line(line):
    # axhline/axvline-like: two points on one horizontal or vertical.
    xs, ys = line.get_xdata(), line.get_ydata()
    if len(xs) != 2 or len(ys) != 2:
        return False
    try:
        return bool(xs[0] == xs[1] or ys[0] == ys[1])
    except Exception:
        return False
def finite_or_none(numbers):
    return [n if math.isfinite(n) else None for n in numbers]
def column(values):
    # Whole numpy columns at once: a plot of a million points must not cost seconds per show().
    import numpy
    try:
        array = numpy.asarray(values)
    except Exception:
        array = None
    if array is not None and array.ndim == 1:
        kind = array.dtype.kind
        if kind in "fiub":
            numbers = array.astype(float)
            listed = numbers.tolist()
            return listed if bool(numpy.isfinite(numbers).all()) else finite_or_none(listed)
        if kind == "M":
            texts = numpy.datetime_as_string(array.astype("datetime64[s]")).tolist()
            return [None if text == "NaT" else text for text in texts]
        if kind == "U" and isinstance(values, numpy.ndarray):
            return array.tolist()
    return [plain(value) for value in values]
def axis_column(numbers, dates, names):
    # Scatter offsets are already axis numbers: dates and categories are turned back.
    if dates:
        import matplotlib.dates as mdates
        return [mdates.num2date(n).isoformat() if math.isfinite(n) else None for n in numbers]
    if names is not None:
        return [(names.get(int(n), n) if n.is_integer() else n) if math.isfinite(n) else None for n in numbers]
    return finite_or_none(numbers)
def label_text(label):
    return "" if label is None else str(label)
def point_chart(kind, ax):
    chart = labelled_chart(kind, ax)
    chart.update(axis_facts(ax, "x"))
    chart.update(axis_facts(ax, "y"))
    if kind == "line":
        lines = ax.get_lines()
        data_lines = [line for line in lines if not is_grid_line(line)] or lines
        for line in data_lines:
            label = label_text(line.get_label())
            if label.startswith("_child") and label[6:].isdigit():
                label = "Line " + label[6:]
            points = list(map(list, zip(column(line.get_xdata()), column(line.get_ydata()))))
            chart["elements"].append({"label": label, "points": points})
        return chart
    import numpy
    x_dates, y_dates = is_date_axis(ax.xaxis), is_date_axis(ax.yaxis)
    x_names, y_names = category_names(ax.xaxis), category_names(ax.yaxis)
    for collection in ax.collections:
        offsets = numpy.asarray(collection.get_offsets(), dtype=float).reshape(-1, 2)
        xs = axis_column(offsets[:, 0].tolist(), x_dates, x_names)
        ys = axis_column(offsets[:, 1].tolist(), y_dates, y_names)
        chart["elements"].append({"label": label_text(collection.get_label()), "points": list(map(list, zip(xs, ys)))})
    return chart
def tick_label_at(axis, position, index, count):
    locations = list(axis.get_ticklocs())
    labels = [label.get_text() for label in axis.get_ticklabels()]
    for location, label in zip(locations, labels):
        if close(float(location), position):
            return label
    # Grouped bars sit beside their tick; when there is one tick per item, pair by order.
    if len(labels) == count and index < count:
        return labels[index]
    names = category_names(axis)
    if names is not None and float(position).is_integer() and int(position) in names:
        return names[int(position)]
    return str(plain(position))
def bar_chart(ax):
    from matplotlib.container import BarContainer
    chart = labelled_chart("bar", ax)
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    horizontal = False
    for container in containers:
        rects = list(container.patches)
        orientation = getattr(container, "orientation", None)
        if orientation is None:
            heights = [r.get_height() for r in rects]
            orientation = "horizontal" if len(rects) > 1 and all(h == heights[0] for h in heights) else "vertical"
        horizontal = orientation == "horizontal"
        group = container.get_label() or ""
        if group.startswith("_container") and group[10:].isdigit():
            group = "Group " + group[10:]
        values = getattr(container, "datavalues", None)
        if values is None or len(values) != len(rects):
            values = [r.get_width() if horizontal else r.get_height() for r in rects]
        axis = ax.yaxis if horizontal else ax.xaxis
        for index, (rect, value) in enumerate(zip(rects, values)):
            center = rect.get_y() + rect.get_height() / 2 if horizontal else rect.get_x() + rect.get_width() / 2
            chart["elements"].append({"label": tick_label_at(axis, float(center), index, len(rects)), "value": plain(value), "group": group})
    if horizontal:
        swap_axes_labels(chart)
    return chart
def pie_chart(ax):
    from matplotlib.patches import Wedge
    chart = base_chart("pie", ax)
    for wedge in ax.patches:
        if isinstance(wedge, Wedge):
            angle = tidy(abs(wedge.theta2 - wedge.theta1), 1e-7)
            chart["elements"].append({"label": label_text(wedge.get_label()), "angle": angle, "radius": tidy(wedge.r, 1e-7)})
    return chart
def rectangle_line(line):
    # With patch_artist=False a box is a closed five-point rectangle line.
    points = line.get_xydata()
    if len(points) != 5 or not (close(points[0][0], points[4][0]) and close(points[0][1], points[4][1])):
        return None
    xs, ys = sorted({round(float(p[0]), 12) for p in points}), sorted({round(float(p[1]), 12) for p in points})
    if len(xs) != 2 or len(ys) != 2:
        return None
    return (xs[0], xs[1], ys[0], ys[1])
def box_outlines(artists):
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch
    boxes, lines = [], []
    for artist in artists:
        if isinstance(artist, PathPatch):
            vertices = artist.get_path().vertices
            if len(vertices) == 0:
                return None
            boxes.append((float(vertices[:, 0].min()), float(vertices[:, 0].max()), float(vertices[:, 1].min()), float(vertices[:, 1].max())))
        elif isinstance(artist, Line2D):
            outline = rectangle_line(artist)
            if outline is None:
                lines.append(artist)
            else:
                boxes.append(outline)
        else:
            return None
    return (boxes, lines) if boxes else None
def box_statistics(boxes, lines, vertical):
    # bxp draws per box: two whiskers (constant position, from a quartile outwards), two caps,
    # a median (constant value across the box), and fliers (markers only).
    stats = []
    for x0, x1, y0, y1 in boxes:
        low, high, lo, hi = (x0, x1, y0, y1) if vertical else (y0, y1, x0, x1)
        stats.append({"span": (low, high), "first_quartile": lo, "third_quartile": hi, "median": None, "median_width": -1.0, "min": None, "max": None, "markers": []})
    def inside(position, box):
        low, high = box["span"]
        return low - 1e-9 * max(1.0, abs(low)) <= position <= high + 1e-9 * max(1.0, abs(high))
    for line in lines:
        points = [(float(p[0]), float(p[1])) if vertical else (float(p[1]), float(p[0])) for p in line.get_xydata()]
        if line.get_linestyle() in ("None", "none", " ", "") or len(points) != 2:
            for position, value in points:
                for box in stats:
                    if inside(position, box):
                        box["markers"].append(value)
                        break
            continue
        (p0, v0), (p1, v1) = points
        if close(p0, p1):
            for box in stats:
                if not inside(p0, box):
                    continue
                if close(max(v0, v1), box["first_quartile"]) and box["min"] is None:
                    box["min"] = min(v0, v1)
                    break
                if close(min(v0, v1), box["third_quartile"]) and box["max"] is None:
                    box["max"] = max(v0, v1)
                    break
        if close(v0, v1):
            width, center = abs(p1 - p0), (p0 + p1) / 2
            for box in stats:
                low, high = box["span"]
                if inside(center, box) and width <= high - low + 1e-9 and box["first_quartile"] - 1e-9 <= v0 <= box["third_quartile"] + 1e-9 and width > box["median_width"]:
                    box["median"], box["median_width"] = v0, width
                    break
    if any(box["median"] is None or box["min"] is None or box["max"] is None for box in stats):
        return None
    for box in stats:
        box["outliers"] = [tidy(v) for v in box["markers"] if v < box["min"] or v > box["max"]]
    return stats
def box_chart(ax, artists):
    found = box_outlines(artists)
    if found is None:
        return None
    boxes, lines = found
    for vertical in (True, False):
        stats = box_statistics(boxes, lines, vertical)
        if stats is not None:
            break
    else:
        return None
    chart = labelled_chart("box_and_whisker", ax)
    axis = ax.xaxis if vertical else ax.yaxis
    for index, box in enumerate(stats):
        low, high = box["span"]
        chart["elements"].append({
            "label": tick_label_at(axis, (low + high) / 2, index, len(stats)),
            "min": tidy(box["min"]),
            "first_quartile": tidy(box["first_quartile"]),
            "median": tidy(box["median"]),
            "third_quartile": tidy(box["third_quartile"]),
            "max": tidy(box["max"]),
            "outliers": box["outliers"],
        })
    if not vertical:
        swap_axes_labels(chart)
    return chart
def axes_chart(ax):
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge
    from matplotlib.text import Text
    children = getattr(ax, "_children", None)
    if children is None:
        children = list(ax.lines) + list(ax.patches) + list(ax.collections) + list(ax.images) + list(ax.artists)
    artists = [a for a in children if not isinstance(a, Text)]
    if artists and all(isinstance(a, (Line2D, PathPatch)) for a in artists):
        chart = box_chart(ax, artists)
        if chart is not None:
            return chart
    if all(isinstance(a, Line2D) for a in artists):
        return point_chart("line", ax)
    artists = [a for a in artists if not (isinstance(a, Line2D) and is_grid_line(a))]
    if all(isinstance(a, PathCollection) for a in artists):
        return point_chart("scatter", ax)
    if all(isinstance(a, Wedge) for a in artists):
        return pie_chart(ax)
    if all(isinstance(a, Rectangle) for a in artists):
        return bar_chart(ax)
    return base_chart("unknown", ax)
def safe_axes_chart(ax):
    try:
        return axes_chart(ax)
    except Exception:
        try:
            return {"type": "unknown", "title": text_or_none(ax.get_title()), "elements": []}
        except Exception:
            return {"type": "unknown", "title": None, "elements": []}
def describe_figure(figure):
    try:
        axes = figure.get_axes()
        if not axes:
            return None
        if len(axes) == 1:
            chart = safe_axes_chart(axes[0])
        else:
            get_suptitle = getattr(figure, "get_suptitle", None)
            if get_suptitle is not None:
                title = get_suptitle()
            else:
                suptitle = getattr(figure, "_suptitle", None)
                title = suptitle.get_text() if suptitle is not None else ""
            chart = {"type": "superchart", "title": title, "elements": [safe_axes_chart(ax) for ax in axes]}
        return chart
    except Exception:
        return None
`;

/**
 * Runs once in every new kernel, silently. It installs:
 * - a `_cubicle` helper module for per-call env vars (and the chart describer, for tests);
 * - the `e2b/data` formatter that turns a pandas DataFrame into column lists, as the upstream
 *   template's startup script does (`to_dict(orient="list")`), with NaN as None so it stays JSON;
 * - the `e2b/chart` formatter that describes a matplotlib figure in the SDK's chart protocol
 *   (`ChartTypes` in `@e2b/code-interpreter`): `line`, `scatter`, `bar`, `pie`,
 *   `box_and_whisker`, `superchart` for several axes, and `unknown` (only the title) for anything
 *   else. Any failure describes nothing, so the figure's png is never lost;
 * - Pillow hooks, as the upstream template has: `Image.show()` and `Image.save(path)` display the
 *   image (and so does `plt.savefig(path)`, which saves through Pillow), installed lazily when
 *   `PIL.Image` is first imported.
 *
 * Nothing here imports matplotlib, pandas or Pillow: the setup runs in every new kernel and in the
 * template's warm snapshot, and those modules are only looked at once user code has loaded them.
 */
export const SETUP_CODE = `CHART_DESCRIBER = ${JSON.stringify(CHART_DESCRIBER_CODE)}
` + String.raw`
def _cubicle_setup(CHART_DESCRIBER=CHART_DESCRIBER):
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

    # The describer is compiled on the first figure, not in every kernel start.
    describer = {}
    def describe_figure(figure):
        try:
            if not describer:
                namespace = {"__name__": "_cubicle_charts"}
                exec(compile(CHART_DESCRIBER, "<cubicle charts>", "exec"), namespace)
                describer["describe"] = namespace["describe_figure"]
            return describer["describe"](figure)
        except Exception:
            return None
    helper.describe_figure = describe_figure

    # ---- Pillow: show() and save(path) display the image ----
    def display_image(image):
        try:
            from IPython import get_ipython
            if get_ipython() is None:
                return
            png = image._repr_png_()
            if not png:
                return
            import base64
            from IPython.display import display
            display({"image/png": base64.b64encode(png).decode("ascii"), "text/plain": repr(image)}, raw=True)
        except Exception:
            pass
    def patch_pillow(module):
        image_class = getattr(module, "Image", None)
        if image_class is None or getattr(image_class, "_cubicle_patched", False):
            return
        original_save = image_class.save
        def save(self, fp, format=None, **params):
            result = original_save(self, fp, format, **params)
            if isinstance(fp, (str, os.PathLike)):
                display_image(self)
            return result
        def show(self, title=None, **options):
            # No screen in a sandbox: showing an image means displaying it in the cell's results.
            display_image(self)
        image_class.save = save
        image_class.show = show
        image_class._cubicle_patched = True
    if "PIL.Image" in sys.modules:
        patch_pillow(sys.modules["PIL.Image"])
    else:
        import importlib.machinery
        class PillowImportHook:
            def find_spec(self, name, path=None, target=None):
                if name != "PIL.Image":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                loader = getattr(spec, "loader", None)
                if loader is None or not hasattr(loader, "exec_module"):
                    return spec
                original_exec = loader.exec_module
                def exec_module(module):
                    original_exec(module)
                    try:
                        patch_pillow(module)
                    except Exception:
                        pass
                loader.exec_module = exec_module
                return spec
        sys.meta_path.insert(0, PillowImportHook())

    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import ObjectName, Unicode
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    class E2BDataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    def dataframe_columns(frame):
        return {str(name): [clean(v) for v in values] for name, values in frame.to_dict(orient="list").items()}
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
    chart_formatter = E2BChartFormatter(parent=shell.display_formatter)
    chart_formatter.for_type_by_name("matplotlib.figure", "Figure", describe_figure)
    shell.display_formatter.formatters["e2b/chart"] = chart_formatter

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
_cubicle_setup()
del _cubicle_setup, CHART_DESCRIBER
`;
