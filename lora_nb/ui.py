"""ipywidgets forms built from a notebook's parameters.

A :class:`Form` is made from the parameter values; the notebook always reads
settings through :meth:`Form.values`, so a headless run (``interactive=False``:
no widgets at all) and a widget run take the same path. Callbacks only do
light work (recomputing numbers); training runs in its own cell.
"""

from __future__ import annotations

from typing import Callable


class Form:
    def __init__(self, params: dict, interactive: bool, choices: dict | None = None, help: dict | None = None,
                 on_change: Callable[[dict], None] | None = None, title: str = ""):
        self._params = dict(params)
        self._choices = choices or {}
        self._help = help or {}
        self._on_change = on_change
        self._widgets: dict = {}
        self._updating = False
        self.output = None
        self.box = None
        if interactive:
            self._build(title)

    @property
    def interactive(self) -> bool:
        return self.box is not None

    def _build(self, title: str) -> None:
        import ipywidgets as w

        style = {"description_width": "160px"}
        layout = w.Layout(width="480px")
        rows = []
        for name, value in self._params.items():
            desc = name.replace("_", " ")
            if name in self._choices:
                widget = w.Dropdown(options=list(self._choices[name]), value=value, description=desc, style=style, layout=layout)
            elif isinstance(value, bool):
                widget = w.Checkbox(value=value, description=desc, style=style, layout=layout, indent=False)
            elif isinstance(value, int):
                widget = w.IntText(value=value, description=desc, style=style, layout=layout)
            elif isinstance(value, float):
                widget = w.FloatText(value=value, description=desc, style=style, layout=layout, step=None)
            elif isinstance(value, str) and "\n" in value:  # prompt lines: one per line
                widget = w.Textarea(value=value, description=desc, style=style, layout=w.Layout(width="480px", height="80px"))
            else:
                widget = w.Text(value="" if value is None else str(value), description=desc, style=style, layout=layout)
            widget.observe(self._changed, names="value")
            self._widgets[name] = widget
            hint = self._help.get(name, "")
            rows.append(w.HBox([widget, w.HTML(f"<span style='color:#666;font-size:90%'>{hint}</span>")]))
        self.output = w.Output()
        header = [w.HTML(f"<b>{title}</b>")] if title else []
        self.box = w.VBox(header + rows + [self.output])

    def _changed(self, _change) -> None:
        if self._updating or self._on_change is None:
            return
        self.output.clear_output(wait=True)
        with self.output:
            self._on_change(self.values())

    def values(self) -> dict:
        """The current settings: from the widgets when interactive, else the parameters."""
        if not self._widgets:
            return dict(self._params)
        out = {}
        for name, widget in self._widgets.items():
            v = widget.value
            if isinstance(self._params[name], (int, float)) and not isinstance(self._params[name], bool) and isinstance(v, str):
                v = type(self._params[name])(v)
            out[name] = v
        return out

    def set_values(self, values: dict) -> None:
        """Change several settings at once (e.g. when a preset is chosen), with one refresh."""
        if not self._widgets:
            self._params.update({k: v for k, v in values.items() if k in self._params})
            return
        self._updating = True
        try:
            for k, v in values.items():
                if k in self._widgets:
                    self._widgets[k].value = v
        finally:
            self._updating = False
        self._changed(None)

    def show(self) -> None:
        """Display the form (nothing in a headless run) and run the callback once."""
        from IPython.display import display

        if self.box is not None:
            display(self.box)
            self._changed(None)
        elif self._on_change is not None:
            self._on_change(self.values())
