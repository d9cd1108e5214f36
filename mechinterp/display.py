"""Self-contained HTML views for notebooks: attention patterns and labelled heatmaps.

    html = mechinterp.display.attention_html(cache["attn.pattern"][layer, 0], str_tokens)
    mechinterp.display.HtmlView(html).save("attention.html")    # or display it in Jupyter
    lm.attention_view("When Mary and John went", layer=3)         # the same, from a prompt

Every view is one HTML fragment with its CSS and JavaScript inline: no network, no CDN,
no torch. Token strings and labels reach the page only as escaped text (``html.escape``
in Python, ``textContent`` in JavaScript), so a token ``<script>`` shows as text.
:class:`~mechinterp.sweep.SweepResult` shows as :func:`heatmap_html` in notebooks;
treescope renderings of caches, sites, sweeps and interventions: ``treescope_repr``.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["HtmlView", "attention_html", "diverging_rgb", "heatmap_html", "sequential_rgb"]

WHITE = np.array([255.0, 255.0, 255.0])
RED = np.array([178.0, 24.0, 43.0])  # positive end of the diverging scale (ColorBrewer RdBu)
BLUE = np.array([33.0, 102.0, 172.0])  # negative end, and the attention scale's full end
MAX_HEATMAP_CELLS = 20_000


@dataclasses.dataclass(frozen=True)
class HtmlView:
    """An HTML fragment that Jupyter displays (``_repr_html_``) and :meth:`save` writes as a
    standalone UTF-8 page."""

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text('<!doctype html>\n<html><head><meta charset="utf-8"></head><body>\n'
                        f"{self.html}\n</body></html>\n", encoding="utf-8")
        return path


def _rgb(colour: np.ndarray) -> str:
    r, g, b = (int(c) for c in np.round(colour))
    return f"rgb({r}, {g}, {b})"


def diverging_rgb(value: float, vmax: float) -> str:
    """White at 0, red at ``+vmax``, blue at ``-vmax`` (clipped), as ``rgb(r, g, b)``."""
    t = float(np.clip(value / vmax, -1.0, 1.0))
    return _rgb(WHITE + abs(t) * ((RED if t > 0 else BLUE) - WHITE))


def sequential_rgb(value: float, vmax: float) -> str:
    """White at 0, blue at ``vmax`` (clipped): the attention scale (same formula as the
    view's JavaScript)."""
    return _rgb(WHITE + float(np.clip(value / vmax, 0.0, 1.0)) * (BLUE - WHITE))


# ------------------------------------------------------------------------ heatmaps


def _axis_labels(axes, shape, labels) -> list[list[str]]:
    out = []
    for axis, n in zip(axes, shape):
        given = labels.get(axis)
        if given is None:
            out.append([str(i) for i in range(n)])
            continue
        if len(given) != n:
            raise ValueError(f"labels[{axis!r}] has {len(given)} entries but axis {axis!r} "
                             f"has length {n}: give one label per index")
        out.append([str(label) for label in given])
    return out


def _heatmap_table(panel: np.ndarray, row_axis, rows, col_axis, cols, vmax, caption) -> str:
    esc = html.escape
    corner = f"{row_axis} \\ {col_axis}" if row_axis else col_axis
    head = "".join(f'<th class="mi-col" scope="col">{esc(c)}</th>' for c in cols)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, col in enumerate(cols):
            v = float(panel[i, j])
            where = ", ".join(f"{a}={b}" for a, b in ((row_axis, row), (col_axis, col)) if a)
            where = esc(f"{where}: ") if where else ""
            if not np.isfinite(v):
                cells.append(f'<td class="mi-nan" data-value="{v}" title="{where}{v}">{v}</td>')
                continue
            ink = "#fff" if abs(v) / vmax > 0.6 else "#000"
            cells.append(f'<td data-value="{v!r}" style="background: {diverging_rgb(v, vmax)};'
                         f' color: {ink}" title="{where}{v:.6g}">{v:.3g}</td>')
        body.append(f'<tr><th class="mi-row" scope="row">{esc(row)}</th>{"".join(cells)}</tr>')
    return (f'<table class="mi-heatmap"><caption>{esc(caption)}</caption>'
            f'<tr><th class="mi-corner">{esc(corner)}</th>{head}</tr>'
            f'{"".join(body)}</table>')


def heatmap_html(values, axes: Sequence[str], labels: Mapping[str, Sequence] | None = None,
                 title: str | None = None) -> str:
    """A labelled heatmap of ``values`` (one table per index of the axes before the last
    two): rows ``axes[-2]``, columns ``axes[-1]``, each cell coloured on a diverging scale
    centred on 0 (``±max|value|``) and showing its value. ``labels``: ``{axis: one label
    per index}`` (default: the indices)."""
    values = np.asarray(values, dtype=np.float64)
    axes = tuple(axes)
    if len(axes) != values.ndim:
        raise ValueError(f"values have shape {values.shape} ({values.ndim} axes) but "
                         f"{len(axes)} axis names {axes} were given: name every axis")
    names = _axis_labels(axes, values.shape, dict(labels or {}))
    if values.ndim < 2:  # one row of values
        values, axes = values.reshape(1, -1), ("", *axes) if axes else ("", "")
        names = [[""], *names] if names else [[""], [""]]
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    lead = values.shape[:-2]
    panels, shown = [], 0
    for index in np.ndindex(*lead):
        if shown + values.shape[-2] * values.shape[-1] > MAX_HEATMAP_CELLS and panels:
            panels.append(f'<p class="mi-more">{int(np.prod(lead)) - len(panels)} more '
                          "panels not shown: index the values with np.asarray(result)</p>")
            break
        caption = ", ".join(f"{axes[a]}={names[a][i]}" for a, i in enumerate(index))
        panels.append(_heatmap_table(values[index], axes[-2], names[-2], axes[-1], names[-1],
                                     vmax, caption))
        shown += values.shape[-2] * values.shape[-1]
    legend = (f'<div class="mi-legend">{-vmax:.3g} <span class="mi-bar" style="background: '
              f'linear-gradient(to right, {diverging_rgb(-vmax, vmax)}, rgb(255, 255, 255), '
              f'{diverging_rgb(vmax, vmax)})"></span> {vmax:.3g}</div>')
    title_html = f'<div class="mi-title">{html.escape(title)}</div>' if title else ""
    return f'<div class="mi-heatmaps">{_HEATMAP_CSS}{title_html}{legend}{"".join(panels)}</div>'


_HEATMAP_CSS = """<style>
.mi-heatmaps { font: 12px sans-serif; }
.mi-heatmaps table { border-collapse: collapse; margin: 4px 0 10px; }
.mi-heatmaps caption { text-align: left; font-weight: bold; }
.mi-heatmaps td { min-width: 3.2em; padding: 2px 4px; text-align: right;
  border: 1px solid #eee; }
.mi-heatmaps th { padding: 2px 4px; font-weight: normal; white-space: pre; }
.mi-heatmaps th.mi-corner { font-style: italic; color: #555; }
.mi-heatmaps td.mi-nan { background: #ccc; }
.mi-heatmaps .mi-bar { display: inline-block; width: 12em; height: 0.9em;
  vertical-align: middle; border: 1px solid #aaa; }
</style>"""


# ------------------------------------------------------------------------ attention


def _check_pattern(pattern, tokens, head_names) -> tuple[np.ndarray, list[str], list[str]]:
    """The pattern as (heads, query, key) float64, the tokens and the head names, checked."""
    pattern = np.asarray(pattern, dtype=np.float64)
    if pattern.ndim not in (2, 3):
        raise ValueError(
            f"pattern must be (heads, query, key) or (query, key), got shape {pattern.shape}; "
            "from a cache's attn.pattern (layer, batch, head, query, key) take one layer "
            "and one example: cache['attn.pattern'][layer, 0]")
    pattern = pattern[None] if pattern.ndim == 2 else pattern
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a list of strings (lm.to_str_tokens(text)), got "
                        f"{type(tokens).__name__}")
    bad = [(i, type(t).__name__) for i, t in enumerate(tokens) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokens must be strings; token {bad[0][0]} is a {bad[0][1]} "
                        "(convert ids with lm.to_str_tokens)")
    n_heads, n_query, n_key = pattern.shape
    if n_query != len(tokens) or n_key != len(tokens):
        raise ValueError(f"pattern has {n_query} query and {n_key} key positions but "
                         f"{len(tokens)} tokens were given: give one token per position")
    bad = np.argwhere(~np.isfinite(pattern))
    if bad.size:
        h, q, k = bad[0]
        raise ValueError(f"pattern holds {len(bad)} NaN or inf values, the first at head {h}, "
                         f"query {q}, key {k} ({pattern[h, q, k]}): pass finite attention "
                         "probabilities")
    if pattern.min() < 0:
        h, q, k = np.unravel_index(pattern.argmin(), pattern.shape)
        raise ValueError(f"pattern has negative values (min {pattern.min():.4g} at head {h}, "
                         f"query {q}, key {k}): pass attention probabilities (the "
                         "attn.pattern site), not scores")
    if head_names is None:
        head_names = [f"head {h}" for h in range(n_heads)]
    elif isinstance(head_names, str) or len(head_names) != n_heads:
        raise ValueError(f"head_names must name each of the pattern's {n_heads} heads, got "
                         f"{head_names!r}")
    return pattern, list(tokens), [str(name) for name in head_names]


def attention_html(pattern, tokens: Sequence[str], head_names: Sequence[str] | None = None,
                   title: str | None = None, vmax: float | None = None) -> str:
    """An attention-pattern view: one query x key grid per head, labelled by the tokens.

    ``pattern``: (heads, query, key) or (query, key) attention probabilities (e.g.
    ``cache["attn.pattern"][layer, 0]``); ``tokens``: one string per position. Buttons
    select the head; hovering a cell shows ``query token -> key token: weight``. Cells are
    white at 0 and blue at ``vmax`` (default 1, or the largest weight if above 1).
    """
    pattern, tokens, head_names = _check_pattern(pattern, tokens, head_names)
    if vmax is None:
        vmax = max(1.0, float(pattern.max()))
    elif not vmax > 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    data = {"tokens": tokens, "heads": head_names, "vmax": float(vmax),
            "white": WHITE.tolist(), "full": BLUE.tolist(),
            "pattern": np.round(pattern, 6).tolist()}
    # JSON inside <script>: escape <, > and & so no token can close the element
    payload = (json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e")
               .replace("&", "\\u0026"))
    title_html = f'<div class="mi-attn-title">{html.escape(title)}</div>' if title else ""
    return (f'<div class="mi-attn">{_ATTENTION_CSS}{title_html}'
            '<div class="mi-attn-heads"></div>'
            '<div class="mi-attn-info">hover a cell: query token &rarr; key token</div>'
            '<table class="mi-attn-grid"></table>'
            "<noscript>This attention view needs JavaScript.</noscript>"
            f'<script type="application/json" class="mi-attn-data">{payload}</script>'
            f"<script>{_ATTENTION_JS}</script></div>")


_ATTENTION_CSS = """<style>
.mi-attn { font: 12px sans-serif; }
.mi-attn-heads button { margin: 0 2px 4px 0; }
.mi-attn-heads button[aria-pressed="true"] { font-weight: bold; background: #cde; }
.mi-attn-info { min-height: 1.4em; color: #333; white-space: pre; }
.mi-attn-grid { border-collapse: collapse; }
.mi-attn-grid td { width: 1.6em; height: 1.6em; border: 1px solid #eee; padding: 0; }
.mi-attn-grid th { font-weight: normal; white-space: pre; padding: 0 3px; }
.mi-attn-grid th.mi-key { writing-mode: vertical-rl; transform: rotate(180deg);
  text-align: left; }
.mi-attn-grid th.mi-row { text-align: right; }
.mi-attn-grid th.mi-hl { background: #fe9; }
</style>"""

_ATTENTION_JS = """(function (root) {
  const data = JSON.parse(root.querySelector("script.mi-attn-data").textContent);
  const grid = root.querySelector("table.mi-attn-grid");
  const info = root.querySelector(".mi-attn-info");
  const bar = root.querySelector(".mi-attn-heads");
  const shown = (t) => t.replace(/\\n/g, "\\u23ce").replace(/\\t/g, "\\u21e5");
  const colour = (v) => {
    const t = Math.min(1, Math.max(0, v / data.vmax));
    const c = data.white.map((w, i) => Math.round(w + t * (data.full[i] - w)));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  };
  const cell = (tag, text, cls) => {
    const el = document.createElement(tag);
    el.textContent = text;
    if (cls) el.className = cls;
    return el;
  };
  function render(h) {
    grid.replaceChildren();
    const top = document.createElement("tr");
    top.appendChild(cell("th", "query \\\\ key", "mi-corner"));
    data.tokens.forEach((t, k) => {
      const th = cell("th", shown(t), "mi-key");
      th.dataset.k = k;
      top.appendChild(th);
    });
    grid.appendChild(top);
    data.pattern[h].forEach((row, q) => {
      const tr = document.createElement("tr");
      const th = cell("th", shown(data.tokens[q]), "mi-row");
      th.dataset.q = q;
      tr.appendChild(th);
      row.forEach((v, k) => {
        const td = document.createElement("td");
        td.dataset.q = q;
        td.dataset.k = k;
        td.dataset.value = v;
        td.style.backgroundColor = colour(v);
        td.title = `${shown(data.tokens[q])} \\u2192 ${shown(data.tokens[k])}: ${v.toFixed(4)}`;
        tr.appendChild(td);
      });
      grid.appendChild(tr);
    });
    root.dataset.head = h;
    bar.querySelectorAll("button").forEach(
      (b) => b.setAttribute("aria-pressed", String(Number(b.dataset.head) === h)));
  }
  data.heads.forEach((name, h) => {
    const b = cell("button", name);
    b.type = "button";
    b.dataset.head = h;
    b.addEventListener("click", () => render(h));
    bar.appendChild(b);
  });
  grid.addEventListener("mouseover", (e) => {
    const td = e.target.closest("td");
    if (!td) return;
    grid.querySelectorAll(".mi-hl").forEach((el) => el.classList.remove("mi-hl"));
    grid.querySelector(`th.mi-row[data-q="${td.dataset.q}"]`).classList.add("mi-hl");
    grid.querySelector(`th.mi-key[data-k="${td.dataset.k}"]`).classList.add("mi-hl");
    info.textContent = td.title;
  });
  render(0);
  root.dataset.ready = "1";
})(document.currentScript.parentElement);"""
