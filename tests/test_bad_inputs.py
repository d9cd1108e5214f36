"""Every bad input gets a clear error (issue 14): one case per class of bad input, each
asserting the exception type and that the message names the culprit. Tiny models with
random weights (numpy draws, no compiled init)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp import ablation, metrics, patching, validate
from mechinterp.components import component
from mechinterp.models import Decoder, DecoderConfig, generate
from test_decoder import random_params

VOCAB, SEQ, BATCH = 11, 6, 2
CONFIG = DecoderConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, d_mlp=16)
MODEL = Decoder(CONFIG)


def toks(batch=BATCH, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    return random_params(MODEL, jnp.zeros((BATCH, SEQ), jnp.int32))


def with_value(row, pos, value):
    t = toks()
    t[row, pos] = value
    return t


def capture(params, t, **kw):
    return mi.capture(MODEL, params, t, sites=["resid_pre"], **kw)


def intervene(params, t, **kw):
    return mi.intervene(MODEL, params, t, interventions={}, **kw)


def sweep(params, t, metric=None, **kw):
    _, cache = mi.capture(MODEL, params, toks(), sites=["resid_pre"])
    return patching.get_act_patch_resid_pre(MODEL, params, t, cache,
                                             metric or metrics.logit_diff(1, 2), progress=False,
                                             **kw)


def ablate(params, t, **kw):
    return ablation.accuracy_under_ablation(MODEL, params, t, 1,
                                            [component("mlp.hidden", layer=0, d_mlp=0)], **kw)


def gen(params, t, **kw):
    return generate(MODEL, params, t, max_new_tokens=1, **kw)


def attribute(params, t, **kw):
    from mechinterp.attribution import attribution_patch
    _, cache = mi.capture(MODEL, params, toks(), sites=["resid_pre"])
    return attribution_patch(MODEL, params, t, cache, metrics.logit_diff(1, 2),
                             {"resid_pre": ("layer", "pos")}, **kw)


ENTRIES = {"capture": capture, "intervene": intervene, "sweep": sweep, "ablation": ablate,
           "generate": gen, "attribution": attribute}

TOKEN_CASES = [  # (tokens, exception, words in the message)
    ("negative", lambda: with_value(1, 3, -1), ValueError, ["row 1", "position 3", "-1",
                                                              f"vocabulary size {VOCAB}"]),
    ("ignore label", lambda: with_value(0, 2, -100), ValueError,
     ["row 0", "position 2", "-100", "ignore label"]),
    ("past vocab", lambda: with_value(1, 5, VOCAB), ValueError,
     ["row 1", "position 5", str(VOCAB), f"vocabulary size {VOCAB}"]),
    ("float", lambda: toks().astype(np.float32), TypeError, ["tokens", "integer", "float32"]),
    ("1-D", lambda: toks()[0], ValueError, ["(batch, pos)", "tokens[None]"]),
    ("list", lambda: toks().tolist(), TypeError, ["tokens", "list"]),
    ("empty batch", lambda: toks(batch=0), ValueError, ["empty", "(0, 6)"]),
    ("empty sequence", lambda: toks(seq=0), ValueError, ["empty", "(2, 0)"]),
]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("case", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_ids(params, entry, case):
    _, make, error, words = case
    with pytest.raises(error) as info:
        ENTRIES[entry](params, make())
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_generate_checks_a_jax_array(params):
    with pytest.raises(ValueError, match="row 0, position 1"):
        gen(params, jnp.asarray([[1, 99, 2]]))


@pytest.mark.parametrize("entry", ["capture", "intervene", "sweep", "generate"])
def test_mask_of_the_wrong_shape(params, entry):
    mask = np.ones((BATCH, SEQ - 1), np.int32)
    kw = ({"model_kwargs": {"attention_mask": mask}} if entry == "sweep"
          else {"attention_mask": mask})
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\).*\(2, 6\)"):
        ENTRIES[entry](params, toks(), **kw)


@pytest.mark.parametrize("pos, words", [(-10, ["pos=-10", "[-6, 6)"]),
                                         (6, ["pos=6", "[-6, 6)"]),
                                         (np.array([0, 7]), ["pos=7", "example 1"])])
@pytest.mark.parametrize("how", ["call", "sweep"])
def test_positions(params, pos, words, how):
    metric = metrics.logit_diff(1, 2, pos=pos)
    with pytest.raises(ValueError) as info:
        if how == "call":
            metric(jnp.zeros((BATCH, SEQ, VOCAB)))
        else:
            sweep(params, toks(), metric)
    for word in words:
        assert word in str(info.value)


ANSWER_CASES = [
    ("logit_diff", lambda: metrics.logit_diff(VOCAB, 2), ["correct_ids", str(VOCAB)]),
    ("logprob", lambda: metrics.logprob(-100), ["answer_ids", "-100", "ignore label"]),
    ("accuracy length", lambda: metrics.accuracy(np.array([1, 2, 3])),
     ["answer_ids", "(2,)", "(3,)"]),
    ("incorrect float", lambda: metrics.logit_diff(1, np.array([1.5, 2.0])),
     ["incorrect_ids", "float"]),
]


@pytest.mark.parametrize("case", ANSWER_CASES, ids=[c[0] for c in ANSWER_CASES])
@pytest.mark.parametrize("how", ["call", "sweep"])
def test_answer_ids(params, case, how):
    _, make, words = case
    with pytest.raises((ValueError, TypeError)) as info:
        if how == "call":
            make()(jnp.zeros((BATCH, SEQ, VOCAB)))
        else:
            sweep(params, toks(), make())
    for word in words:
        assert word in str(info.value)


def test_metric_over_empty_logits():
    with pytest.raises(ValueError, match="empty logits"):
        metrics.logprob(0)(jnp.zeros((0, SEQ, VOCAB)))


@pytest.mark.parametrize("make", [lambda: metrics.accuracy(0), lambda: metrics.logprob(0),
                                  lambda: metrics.kl(jnp.zeros((BATCH, SEQ, VOCAB)))])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_metric_over_non_finite_logits_is_nan(make, bad):
    logits = np.zeros((BATCH, SEQ, VOCAB), np.float32)
    logits[:, -1, 3] = bad
    assert np.isnan(float(make()(jnp.asarray(logits))))


def test_capture_check_finite_names_the_site(params):
    broken = jax.tree.map(lambda x: x, params)
    broken["layers"]["mlp"]["down"] = jnp.full_like(broken["layers"]["mlp"]["down"], jnp.nan)
    with pytest.raises(validate.NonFiniteError, match="'resid_post'"):
        mi.capture(MODEL, broken, toks(), sites=["resid_pre", "resid_post"], check_finite=True)
    mi.capture(MODEL, params, toks(), sites=["resid_post"], check_finite=True)


@pytest.mark.parametrize("layer", [0.5, "0", True])
def test_non_integer_layer_index(params, layer):
    with pytest.raises(TypeError, match=f"layer must be an int, got {layer!r}"):
        ablation.ablate(
            MODEL, params, toks(), components=[component("mlp.hidden", layer=layer, d_mlp=0)])
    with pytest.raises(TypeError, match="must be an int"):
        MODEL.remove_sublayers(params, [("attn", layer)])


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5])
def test_chunk_size(params, chunk_size):
    with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {chunk_size}"):
        sweep(params, toks(), chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ablation.sweep_component_sets(MODEL, params, toks(),
                                      [[component("mlp.hidden", layer=0, d_mlp=0)]],
                                      metrics.logit_diff(1, 2), chunk_size=chunk_size)


def test_mean_activations_over_batches_of_different_lengths(params):
    with pytest.raises(ValueError, match=r"batch 1 has input shapes \[\(2, 4\)\].*\[\(2, 6\)\]"):
        ablation.mean_activations(MODEL, params, [toks(), toks(seq=4)], ["mlp.hidden"])


def test_resample_source_of_another_batch_size(params):
    values = ablation.resample_activations(MODEL, params, toks(batch=1), ["mlp.hidden"], seed=0)
    with pytest.raises(ValueError, match=r"'mlp.hidden'.*\(1, 1, 6, 16\).*\(1, 2, 6, 16\)"):
        ablation.ablate(MODEL, params, toks(), method="resample", values=values,
                        components=[component("mlp.hidden", layer=0, d_mlp=0)])


def test_checks_can_be_bypassed_for_measuring(params):
    with validate.checks_disabled():
        capture(params, with_value(0, 0, VOCAB + 5))  # NaN, unchecked: the cost baseline
    with pytest.raises(ValueError):
        capture(params, with_value(0, 0, VOCAB + 5))


# --------------------------------------------------------------------------- Hugging Face

from mechinterp.models import load_hf, save_hf  # noqa: E402
from mechinterp.models.hf_config import config_from_hf, config_to_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(MODEL, params, folder)
    return folder


def hf_config(**changes):
    hf = config_to_hf(CONFIG)
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


HF_CONFIG_CASES = [  # (changes, words)
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings='false'", "JSON bool"]),
    ({"hidden_size": "8"}, ["hidden_size='8'", "positive integer"]),
    ({"num_hidden_layers": 0}, ["num_hidden_layers=0", "positive integer"]),
    ({"rms_norm_eps": -1.0}, ["rms_norm_eps=-1.0", "positive number"]),
    ({"rope_theta": "1e4"}, ["rope_theta='1e4'"]),
    ({"attention_bias": "no"}, ["attention_bias='no'"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
     ["rope_scaling", "rope_parameters", "disagree", "factor"]),
    ({"architectures": None, "model_type": "gpt2"}, ["architectures=None", "model_type='gpt2'"]),
]


@pytest.mark.parametrize("changes, words", HF_CONFIG_CASES,
                         ids=[next(iter(c[0])) + str(i) for i, c in enumerate(HF_CONFIG_CASES)])
def test_hf_config_fields(changes, words):
    with pytest.raises(ValueError) as info:
        config_from_hf(hf_config(**changes))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_hf_config_follows_transformers():
    # no architectures: fall back to model_type, as the Auto classes do
    assert config_from_hf(hf_config(architectures=None)).hf_architecture == "LlamaForCausalLM"
    # rope_scaling next to rope_parameters, agreeing: merged (theta from rope_parameters)
    config = config_from_hf(hf_config(
        rope_scaling={"type": "linear", "factor": 2.0},
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
    assert config.rope_scaling["factor"] == 2.0 and config.rope_theta == 5e5
    config = config_from_hf(hf_config(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                      rope_parameters={"rope_type": "default"}))
    assert config.rope_scaling["rope_type"] == "linear"


def copy_folder(source, target):
    import shutil
    shutil.copytree(source, target)
    return target


def test_hf_tied_config_with_a_distinct_lm_head_keeps_it(hf_folder, params, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    hf["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.warns(UserWarning, match="untied"):
        model, loaded = load_hf(folder)
    assert not model.config.tie_embeddings
    np.testing.assert_array_equal(loaded["lm_head"], params["lm_head"])


def test_hf_dtype_int_refused(hf_folder):
    with pytest.raises(TypeError, match="dtype=.*int32.*not a floating dtype"):
        load_hf(hf_folder, dtype=jnp.int32)


def test_hf_non_finite_weights_name_the_tensor(hf_folder, tmp_path):
    import safetensors.numpy
    folder = copy_folder(hf_folder, tmp_path / "m")
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = np.nan
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    with pytest.raises(validate.NonFiniteError, match="'model.layers.0.mlp.up_proj.weight'"):
        load_hf(folder)
    load_hf(folder, check_finite=False)


def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:20])


def _bad_json(folder):
    (folder / "config.json").write_text('{"vocab_size": 11,')


def _unreadable(folder):
    (folder / "config.json").chmod(0)  # root reads it anyway: os.access is patched below


def _index_without_weight_map(folder):
    (folder / "model.safetensors").rename(folder / "model-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')


FILE_CASES = [("truncated header", _truncate, ValueError, ["model.safetensors", "header"]),
              ("invalid JSON", _bad_json, ValueError, ["config.json", "not valid JSON"]),
              ("unreadable", _unreadable, PermissionError, ["config.json", "permission"]),
              ("index without weight_map", _index_without_weight_map, ValueError,
               ["model.safetensors.index.json", "weight_map"])]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_hf_files(hf_folder, tmp_path, case, monkeypatch):
    import os
    _, spoil, error, words = case
    if spoil is _unreadable:
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: (
            False if str(path).endswith("config.json") else real(path, mode)))
    folder = copy_folder(hf_folder, tmp_path / "m")
    spoil(folder)
    with pytest.raises(error) as info:
        load_hf(folder)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --------------------------------------------------------------------------- training

from mechinterp.train.checkpoint import Checkpointer  # noqa: E402
from mechinterp.train.config import default_config, resolve_config  # noqa: E402
from mechinterp.train.loop import NonFiniteLossError, fit  # noqa: E402


@pytest.mark.parametrize("key, value, words", [
    ("steps", 0, ["train.steps=0", ">= 1"]),
    ("log_every", 0, ["train.log_every=0"]),
    ("checkpoint_every", -5, ["train.checkpoint_every=-5"]),
    ("keep_checkpoints", 0, ["train.keep_checkpoints=0", "no checkpoint"]),
    ("steps", 2.5, ["train.steps=2.5"]),
])
def test_training_config_counts(key, value, words):
    with pytest.raises(ValueError) as info:
        resolve_config({"train": {key: value}})
    for word in words:
        assert word in str(info.value)


def _classifier_run(steps, on_step=None, workdir=None):
    from test_train_support import ToyClassifier
    config = default_config()
    config.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    config.data.batch_size = 8
    config.schedule.warmup_steps = 0
    config.train.update(steps=steps, log_every=1, checkpoint_every=1, progress=False,
                        tensorboard=False, objective="classification", async_checkpoints=False)
    rng = np.random.default_rng(0)
    source = [{"inputs": rng.normal(size=8).astype(np.float32), "label": np.int32(i % 4)}
              for i in range(16)]
    return fit(config, workdir, ToyClassifier(), source, on_step=on_step)


def test_training_steps_below_the_checkpoint_and_diverged_parameters(tmp_path):
    def diverge_at_3(step, state):  # parameters go NaN while the loss was still finite
        if step == 3:
            return state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
        return None

    with pytest.raises(NonFiniteLossError, match=r"parameters after step 3 hold NaN.*last good "
                                                 r"checkpoint is step 2"):
        _classifier_run(5, diverge_at_3, tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 2
    with pytest.raises(ValueError, match=r"train.steps=1 is below the step of the checkpoint.*"
                                         r"step 2"):
        _classifier_run(1, None, tmp_path)


def test_training_batch_token_ids(tmp_path):
    from mechinterp.train.loop import _checked_batch
    from mechinterp.train.losses import get_objective
    batch = {"tokens": with_value(1, 4, -100)}
    with pytest.raises(ValueError, match=r"training batch 'tokens'.*row 1, position 4.*"
                                         r"ignore label"):
        _checked_batch(MODEL, get_objective("next_token"), batch)


# --------------------------------------------------------------------------- run folders

import ml_collections  # noqa: E402

from mechinterp import atomic, cli  # noqa: E402
from mechinterp.experiments import kit  # noqa: E402
from mechinterp.train import loop as train_loop  # noqa: E402

TRAIN_CONFIG_FILE = '''
from mechinterp.train.config import default_config

def get_config():
    c = default_config()
    c.workdir = {workdir!r}
    return c
'''
FINISHED = '{"finished": "run"}\n'


def _cli(workdir, *overrides):
    def call(tmp_path):
        path = tmp_path / "cfg.py"
        path.write_text(TRAIN_CONFIG_FILE.format(workdir=str(workdir)))
        return cli.main(["run", str(path), *overrides])
    return call


def _kit_run(workdir):
    def call(tmp_path):
        with kit.Run(ml_collections.ConfigDict({"workdir": workdir, "seed": 0})):
            raise AssertionError("unreachable")
    return call


def _loop_run(workdir, **train):
    def call(tmp_path):
        config = default_config()
        config.train.update(train)
        return train_loop.run(config, workdir)
    return call


def _loop_fit(workdir):
    return lambda tmp_path: train_loop.fit(default_config(), workdir, None, None)


RUN_FOLDER_CASES = [  # (entry, exception, words): config.json of the folder must survive
    ("cli empty workdir", _cli(""), ValueError, ["config.workdir=''", "empty"]),
    ("cli blank workdir", _cli("  "), ValueError, ["config.workdir='  '", "empty"]),
    ("kit.Run empty workdir", _kit_run(""), ValueError, ["workdir=''", "empty"]),
    ("kit.Run no workdir", _kit_run(None), ValueError, ["workdir=None", "empty"]),
    ("train.loop.run empty workdir", _loop_run(""), ValueError, ["workdir=''", "empty"]),
    ("train.loop.fit empty workdir", _loop_fit(""), ValueError, ["workdir=''", "empty"]),
    ("cli rerun failing validation", _cli("run", "train.steps=0"), ValueError,
     ["train.steps=0"]),
    ("cli rerun with warmup beyond the steps", _cli("run", "train.steps=10"), ValueError,
     ["warmup_steps=50", "total_steps=10"]),
    ("cli rerun with a bad model", _cli("run", "model.n_heads=3"), ValueError,
     ["n_heads"]),
    ("train.loop.run rerun failing validation", _loop_run("run", log_every=-1), ValueError,
     ["train.log_every=-1"]),
]


@pytest.mark.parametrize("case", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_run_folder_is_checked_before_it_is_touched(case, tmp_path, monkeypatch):
    _, call, error, words = case
    monkeypatch.chdir(tmp_path)  # "run" and "" are relative to it
    for folder in (tmp_path, tmp_path / "run"):  # the current directory; a finished run
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(FINISHED)

    def listing():  # everything but the config file the CLI cases write first
        return sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "cfg.py")

    before = listing()
    with pytest.raises(error) as info:
        call(tmp_path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    for folder in (tmp_path, tmp_path / "run"):
        assert (folder / "config.json").read_text() == FINISHED
    assert listing() == before


def test_cli_runs_a_job_check_before_writing_config(tmp_path, monkeypatch):
    def job(config, workdir):
        raise AssertionError("unreachable")

    def refuse(config):
        raise ValueError(f"config.steps={config.steps} is refused")

    job.check_config = refuse
    monkeypatch.setattr(cli, "resolve_job", lambda spec: job)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(FINISHED)
    path = tmp_path / "cfg.py"
    path.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections."
                    f"ConfigDict({{'job': 'x:y', 'workdir': {str(tmp_path / 'run')!r}, "
                    "'steps': 3})\n")
    with pytest.raises(ValueError, match="config.steps=3 is refused"):
        cli.main(["run", str(path)])
    assert (tmp_path / "run" / "config.json").read_text() == FINISHED


@pytest.mark.parametrize("writer", ["atomic.write_json", "kit jsonio.write_json"])
def test_metadata_writes_are_atomic(writer, tmp_path, monkeypatch):
    import os
    from mechinterp.experiments.kit import jsonio
    write = atomic.write_json if writer == "atomic.write_json" else jsonio.write_json
    path = tmp_path / "run.json"
    write(path, {"status": "complete"})
    assert json.loads(path.read_text()) == {"status": "complete"}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(path, {"status": "running", "pad": "x" * 10_000})
    assert json.loads(path.read_text()) == {"status": "complete"}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left over


def _spoil_state(step_folder):
    import shutil
    shutil.rmtree(step_folder / "state")


def _empty_but_committed(step_folder):
    import shutil
    for child in step_folder.iterdir():
        if child.name != "commit_success.txt":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


CHECKPOINT_CASES = [("missing state/", _spoil_state, ["2", "no state/", "steps here: [1, 2]"]),
                    ("empty step folder", _empty_but_committed,
                     ["2", "no state/", "holds only ['commit_success.txt']"])]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_folder_with_a_missing_item(case, tmp_path):
    _, spoil, words = case
    state = {"w": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((2, 3), np.float32, sharding=device)}
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(2, state)
    spoil(tmp_path / "checkpoints" / "2")
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        with pytest.raises(FileNotFoundError) as info:
            checkpointer.restore(abstract)
        np.testing.assert_array_equal(checkpointer.restore(abstract, step=1)["w"], state["w"])
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "2") in message
    for word in words:
        assert word in message, (word, message)


def _result(shape, labels=None):
    from mechinterp.sweep import SweepResult
    values = np.random.default_rng(0).normal(size=shape)
    return SweepResult(values, ("layer", "pos"), labels or {})


PLOT_CASES = [  # (result, words)
    ("no columns", lambda: _result((3, 0)), ["'pos'", "no entries", "(3, 0)"]),
    ("no rows", lambda: _result((0, 4)), ["'layer'", "no entries"]),
    ("labels of the wrong length", lambda: _result((3, 4), {"pos": ["a", "b"]}),
     ["'pos'", "4 entries", "2 labels"]),
    ("all NaN", lambda: _result((2, 2)).__class__(np.full((2, 2), np.nan), ("layer", "pos")),
     ["NaN", "(2, 2)"]),
]


@pytest.mark.parametrize("case", PLOT_CASES, ids=[c[0] for c in PLOT_CASES])
def test_plot_of_nothing_is_an_error(case, tmp_path):
    _, make, words = case
    make().save(tmp_path / "r.npz")
    with pytest.raises(ValueError) as info:
        cli.main(["plot", str(tmp_path / "r.npz")])
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not (tmp_path / "r.png").exists()


METRICS_LOG_CASES = [  # (file text, kept steps or the words of the error)
    ("truncated last line", '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'
     '{"kind": "tra', [1, 2]),
    ("broken line inside", '{"kind": "train", "step": 1}\nxx\n{"kind": "train", "step": 2}\n',
     ["metrics.jsonl, line 2", "'xx'"]),
]


@pytest.mark.parametrize("case", METRICS_LOG_CASES, ids=[c[0] for c in METRICS_LOG_CASES])
def test_metrics_log_of_a_killed_run(case, tmp_path):
    _, text, expected = case
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    if isinstance(expected[0], int):  # resumes: the cut-off record is dropped
        train_loop.MetricsLog(path, resume_step=5)
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == expected
        return
    with pytest.raises(ValueError) as info:
        train_loop.MetricsLog(path, resume_step=5)
    for word in expected:
        assert word in str(info.value), (word, str(info.value))
    assert path.read_text() == text  # left as it was
