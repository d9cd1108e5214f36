"""The README's example runs as written, on a tiny checkpoint saved with save_hf."""

import re
from pathlib import Path

import jax

from mechinterp.models import Decoder, DecoderConfig, save_hf

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path):
    config = DecoderConfig(vocab_size=8000, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_mlp=64, architecture="LlamaForCausalLM")
    model = Decoder(config)
    tokens = jax.numpy.zeros((1, 6), jax.numpy.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    save_hf(model, params, tmp_path)
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(code.replace("path/to/llama_or_qwen", str(tmp_path)), namespace)
    assert namespace["grid"].shape == (2, 6)
    assert namespace["ablated_logits"].shape == (1, 6, 8000)
    assert set(namespace["cache"]) == set(namespace["sites"])


def test_ci_runs_the_readmes_test_command():
    """CI (.ci/run) runs exactly the README's test command, so the README's claim holds."""
    root = README.parent
    readme_command = next(line.strip() for line in README.read_text().splitlines()
                          if line.strip().startswith("python3 -m venv") and "pytest" in line)
    assert readme_command in (root / ".ci" / "run").read_text()
