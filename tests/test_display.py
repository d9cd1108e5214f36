"""Notebook display: treescope renderings of caches, sites, sweeps and interventions, and the
HTML attention view, checked in a real headless browser (Chromium).

Colours are compared with matplotlib's linear colormaps through the same end colours (an
independent implementation of the scales), to within 1 of 255. The browser test runs the
view's JavaScript (``chromium --headless --dump-dom``) and reads what it wrote: the token
labels, one cell per (query, key) with its value, and the colour the browser computed.
"""

import html
import json
import pickle
import re
import shutil
import subprocess
from html.parser import HTMLParser

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from matplotlib.colors import LinearSegmentedColormap
from tokenizers import Tokenizer, models, pre_tokenizers
from toy_models import ToyModel

import mechinterp as mi
from mechinterp.activation_cache import ActivationCache
from mechinterp.display import HtmlView, attention_html, heatmap_html
from mechinterp.sweep import SweepResult
from mechinterp.treescope_repr import intervention_kind

DIVERGING = LinearSegmentedColormap.from_list("rdbu", ["#2166ac", "#ffffff", "#b2182b"], N=4097)
SEQUENTIAL = LinearSegmentedColormap.from_list("blues", ["#ffffff", "#2166ac"], N=4097)


def rgb_of(colormap, x: float) -> np.ndarray:
    return np.asarray(colormap(x)[:3]) * 255


def parse_rgb(text: str) -> np.ndarray:
    return np.array([float(c) for c in re.findall(r"[\d.]+", text)[:3]])


class Elements(HTMLParser):
    """Every element as (tag, attrs, own text), in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self._open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), ""]
        self.elements.append(element)
        if tag not in ("meta", "br", "input"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self._open:
            self._open[-1][2] += data

    def find(self, tag, css_class=None):
        """The ``tag`` elements (with ``css_class`` among their classes)."""
        return [e for e in self.elements if e[0] == tag and (
            css_class is None or css_class in e[1].get("class", "").split())]


@pytest.fixture(scope="module")
def toy():
    model, x = ToyModel(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def rendered(obj) -> str:
    """treescope's HTML of ``obj``, attributes unescaped (embedded HTML sits in srcdoc)."""
    return html.unescape(treescope.render_to_html(obj, compressed=False))


# ----------------------------------------------------------------------- treescope


def test_capture_returns_an_activation_cache_that_is_a_dict_and_a_pytree(toy):
    model, params, x = toy
    _, cache = mi.capture(model, params, x, sites=["resid_pre", "hidden", "logits"])
    assert isinstance(cache, ActivationCache) and isinstance(cache, dict)
    assert cache.axes("hidden") == ("layer", "batch", "neuron")
    assert cache.specs["logits"].meaning == "outputs"
    assert jax.tree.leaves(cache) == jax.tree.leaves(dict(cache))  # same leaves, same order
    doubled = jax.jit(lambda c: jax.tree.map(lambda a: 2 * a, c))(cache)
    assert isinstance(doubled, ActivationCache) and doubled.specs == cache.specs
    np.testing.assert_array_equal(doubled["hidden"], 2 * cache["hidden"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(cache)]
    assert paths == ["['hidden']", "['logits']", "['resid_pre']"]
    assert jax.tree.map(lambda a: a[0], cache).axes("hidden") is None  # axes no longer fit
    restored = pickle.loads(pickle.dumps(cache))
    assert restored.specs == cache.specs and set(restored) == set(cache)


def test_treescope_shows_a_cache_with_axis_names_and_meanings(toy):
    model, params, x = toy
    _, cache = mi.capture(model, params, x, sites=["resid_pre", "hidden", "logits"])
    page = rendered(cache)
    for text in ("ActivationCache", "'resid_pre'", "'hidden'", "'logits'",
                 "float32[layer=3, batch=2, neuron=16]: MLP neurons",
                 "float32[layer=3, batch=2, d_model=8]: block input",
                 "float32[batch=2, n_out=5]: outputs"):
        assert text in page, text
    assert "float32[layer=3, batch=2, neuron=16]" in treescope.render_to_text(cache)


def test_treescope_shows_site_infos(toy):
    model, _, x = toy
    sites = mi.list_sites(model, x)
    page = rendered(sites)
    assert "SiteInfo" in page
    for name, info in sites.items():
        assert f"'{name}'" in page
        sizes = ", ".join(f"{a}={n}" for a, n in zip(info.axes, info.shape))
        assert f"float32[{sizes}]: {info.meaning}" in page


def test_intervention_kinds():
    v = jnp.ones(3)
    assert intervention_kind(mi.Intervention.zero()) == "zero ablation"
    assert intervention_kind(mi.Intervention.patch(v)) == "patch (replace by `add`)"
    assert intervention_kind(mi.Intervention.mean(v)) == "patch (replace by `add`)"
    assert intervention_kind(mi.Intervention.steer(v)) == "steering (add `add`)"
    assert intervention_kind(mi.Intervention.scale_by(2.0)) == "scaling (by `scale`)"
    assert intervention_kind(mi.Intervention.noop()) == "no-op (mask 0)"
    assert intervention_kind(mi.Intervention(scale=0.5, add=v)).startswith("affine")


def test_treescope_shows_dicts_and_lists_of_interventions():
    mask = jnp.zeros((3, 1, 16)).at[1, :, 2].set(1).at[2, :, 5].set(1)
    edits = {"hidden": mi.Intervention.zero(mask=mask),
             "logits": mi.Intervention.steer(jnp.arange(5.0))}
    page = rendered(edits)
    assert "'hidden'" in page and "'logits'" in page
    assert "zero ablation; mask on 2 of 48 entries (3, 1, 16)" in page
    assert "steering (add `add`)" in page
    text = treescope.render_to_text([mi.Intervention.noop(), mi.Intervention.scale_by(0.5)])
    assert "no-op (mask 0)" in text and "scaling (by `scale`)" in text


def check_heatmap(page: str, values: np.ndarray, axes, labels):
    """Every cell of ``values`` (2-d, or panels over leading axes) with its value and a
    colour equal to matplotlib's diverging map; the labels as row and column headers."""
    elements = Elements(page)
    cells = [e for e in elements.find("td") if "data-value" in e[1]]
    assert len(cells) == values.size
    vmax = np.abs(values).max()
    for (_, attrs, text), v in zip(cells, values.reshape(-1)):
        assert float(attrs["data-value"]) == v and text == f"{v:.3g}"
        colour = parse_rgb(attrs["style"].split("background:")[1])
        np.testing.assert_allclose(colour, rgb_of(DIVERGING, (v / vmax + 1) / 2), atol=1)
    columns = [e[2] for e in elements.find("th", "mi-col")]
    rows = [e[2] for e in elements.find("th", "mi-row")]
    n_panels = int(np.prod(values.shape[:-2]))
    assert columns == [str(c) for c in labels.get(axes[-1], range(values.shape[-1]))] * n_panels
    assert rows == [str(r) for r in labels.get(axes[-2], range(values.shape[-2]))] * n_panels
    assert f"{axes[-2]} \\ {axes[-1]}" in page


def test_sweep_result_renders_as_a_labelled_heatmap():
    values = np.arange(12.0).reshape(3, 4) - 4.5
    labels = {"pos": ["<bos>", " Mary", "&", "end"]}
    result = SweepResult(values, ("layer", "pos"), labels)
    page = rendered(result)
    assert "SweepResult" in page and "layer=3 x pos=4; values in [-4.5, 6.5]" in page
    check_heatmap(page, values, ("layer", "pos"), labels)
    assert "&lt;bos&gt;" in page  # one level of escaping inside the embedded page
    bundle = result._repr_mimebundle_()  # notebooks without treescope: the heatmap alone
    check_heatmap(bundle["text/html"], values, ("layer", "pos"), labels)


def test_heatmap_of_three_axes_is_one_table_per_leading_index():
    values = np.random.default_rng(0).normal(size=(2, 3, 4))
    page = heatmap_html(values, ("head", "layer", "pos"), {"head": ["h0", "h1"]})
    check_heatmap(page, values, ("head", "layer", "pos"), {})
    assert [e[2] for e in Elements(page).find("caption")] == ["head=h0", "head=h1"]


def test_heatmap_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) \(2 axes\) but 1 axis names"):
        heatmap_html(np.zeros((2, 3)), ("layer",))
    with pytest.raises(ValueError, match=r"labels\['pos'\] has 2 entries but axis 'pos' has "
                                         "length 3"):
        heatmap_html(np.zeros((2, 3)), ("layer", "pos"), {"pos": ["a", "b"]})


# ----------------------------------------------------------------------- attention view

TOKENS = ["<bos>", " Mary", "</script><script>document.body.dataset.pwned=1</script>",
          " & John", "\n", " gave"]


def causal_pattern(n_heads: int, n: int, seed: int = 0) -> np.ndarray:
    scores = np.random.default_rng(seed).normal(size=(n_heads, n, n)) * 2
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def view_data(page: str) -> dict:
    payload = re.search(r'<script type="application/json" class="mi-attn-data">(.*?)</script>',
                        page, re.S).group(1)
    return json.loads(payload)


def test_attention_html_embeds_escaped_tokens_and_the_pattern():
    pattern = causal_pattern(2, len(TOKENS))
    page = attention_html(pattern, TOKENS, title="<i>t</i>")
    assert "<script>document" not in page and "<i>t</i>" not in page
    assert "&lt;i&gt;t&lt;/i&gt;" in page
    data = view_data(page)
    assert data["tokens"] == TOKENS and data["heads"] == ["head 0", "head 1"]
    np.testing.assert_allclose(data["pattern"], pattern, atol=1e-6)
    assert "http" not in page.lower()  # nothing fetched: CSS and JS are inline
    one_head = view_data(mi.display.attention_html(pattern[1], TOKENS, vmax=0.5))
    assert one_head["vmax"] == 0.5
    np.testing.assert_allclose(one_head["pattern"], pattern[1:], atol=1e-6)


@pytest.mark.parametrize("pattern, tokens, head_names, message", [
    (np.zeros((1, 2, 6, 6)), TOKENS, None, r"\(heads, query, key\) or \(query, key\), got "
                                           r"shape \(1, 2, 6, 6\)"),
    (np.zeros((6,)), TOKENS, None, r"got shape \(6,\)"),
    (np.zeros((2, 5, 5)), TOKENS, None, "5 query and 5 key positions but 6 tokens"),
    (np.zeros((2, 6, 5)), TOKENS, None, "6 query and 5 key positions but 6 tokens"),
    (np.full((2, 6, 6), np.nan), TOKENS, None, "72 NaN or inf values, the first at head 0, "
                                                "query 0, key 0"),
    (-np.ones((2, 6, 6)), TOKENS, None, "negative values .* not scores"),
    (np.zeros((2, 6, 6)), TOKENS, ["a"], "name each of the pattern's 2 heads"),
])
def test_attention_html_bad_input_is_a_clear_error(pattern, tokens, head_names, message):
    with pytest.raises(ValueError, match=message):
        attention_html(pattern, tokens, head_names)


def test_attention_html_tokens_must_be_strings_and_vmax_positive():
    with pytest.raises(TypeError, match="token 1 is a int"):
        attention_html(np.zeros((2, 2)), ["a", 3])
    with pytest.raises(TypeError, match="list of strings"):
        attention_html(np.zeros((2, 2)), "ab")
    with pytest.raises(ValueError, match="vmax must be positive, got 0"):
        attention_html(np.zeros((2, 2)), ["a", "b"], vmax=0)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium binary: install it with "
                    "`apt-get install -y chromium` (Debian) to run the browser test")
def test_attention_view_renders_in_a_headless_browser(tmp_path):
    pattern = causal_pattern(3, len(TOKENS))
    second = np.ascontiguousarray(pattern[::-1])
    script = """<script>
      const views = document.querySelectorAll(".mi-attn");
      views[1].querySelector('button[data-head="2"]').click();
      views[1].querySelector('td[data-q="3"][data-k="1"]').dispatchEvent(
        new MouseEvent("mouseover", {bubbles: true}));
      document.querySelectorAll("td").forEach(
        (td) => { td.dataset.computed = getComputedStyle(td).backgroundColor; });
    </script>"""
    page = HtmlView(attention_html(pattern, TOKENS, ["L0H0", "L0H1", "L0H2"])
                    + attention_html(second, TOKENS) + script).save(tmp_path / "view.html")
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    elements = Elements(dom)
    body = elements.find("body")[0][1]
    assert "data-pwned" not in body  # the <script> token stayed text
    roots = [e[1] for e in elements.find("div", "mi-attn")]
    assert [(r.get("data-ready"), r.get("data-head")) for r in roots] == [("1", "0"), ("1", "2")]
    shown = [t.replace("\n", "\u23ce") for t in TOKENS]
    assert [e[2] for e in elements.find("th", "mi-key")] == shown * 2
    rows = [e[2] for e in elements.find("th", "mi-row")]
    assert rows == shown + shown
    assert [e[2] for e in elements.find("button")] == ["L0H0", "L0H1", "L0H2",
                                                       "head 0", "head 1", "head 2"]
    assert [e[1]["aria-pressed"] for e in elements.find("button")] == [
        "true", "false", "false", "false", "false", "true"]
    cells = elements.find("td")
    n = len(TOKENS)
    assert len(cells) == 2 * n * n
    for view, expected in enumerate([pattern[0], second[2]]):
        for cell in cells[view * n * n:(view + 1) * n * n]:
            q, k = int(cell[1]["data-q"]), int(cell[1]["data-k"])
            value = float(cell[1]["data-value"])
            assert abs(value - expected[q, k]) < 1e-6
            np.testing.assert_allclose(parse_rgb(cell[1]["data-computed"]),
                                       rgb_of(SEQUENTIAL, value), atol=1)
    info = elements.find("div", "mi-attn-info")[1][2]
    assert info == f"{shown[3]} \u2192 {shown[1]}: {second[2, 3, 1]:.4f}"
    highlighted = [e[2] for e in elements.find("th", "mi-hl")]
    assert highlighted == [shown[1], shown[3]]


# ----------------------------------------------------------------------- LanguageModel

WORDS = ["<unk>", "<bos>", "the", "cat", "sat", "on", "mat"]


@pytest.fixture(scope="module")
def lm():
    from mechinterp.models import Decoder, DecoderConfig

    model = Decoder(DecoderConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_mlp=32))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return mi.LanguageModel(model, params, tokenizer, bos_token_id=1, add_bos=True)


def test_language_model_attention_view(lm, tmp_path):
    text = "the cat sat on the mat"
    view = lm.attention_view(text, layer=1, heads=[3, 0])
    data = view_data(view.html)
    assert data["tokens"] == lm.to_str_tokens(text) == ["<bos>", *text.split()]
    assert data["heads"] == ["L1H3", "L1H0"]
    _, cache = lm.run_with_cache(text, sites=["attn.pattern"])
    expected = np.asarray(cache["attn.pattern"])[1, 0, [3, 0]]
    np.testing.assert_allclose(data["pattern"], expected, atol=1e-6)
    assert view._repr_html_() == view.html
    saved = view.save(tmp_path / "a.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in saved and view.html in saved
    assert view_data(lm.attention_view(text, layer=-1, heads=2).html)["heads"] == ["L1H2"]
    with pytest.raises(ValueError, match="layer 2 is out of range: the model has 2 layers"):
        lm.attention_view(text, layer=2)
    with pytest.raises(ValueError, match="head 4 is out of range: layer 0 has 4 heads"):
        lm.attention_view(text, layer=0, heads=[4])
    with pytest.raises(TypeError, match="one text"):
        lm.attention_view([text], layer=0)
