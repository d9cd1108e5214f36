"""Datasets as tfds builders writing ``array_record``, loaded with grain.

tfds builds without TensorFlow here: ``GeneratorBasedBuilder`` with
``file_format='array_record'`` writes the records and ``builder.as_data_source(split)``
reads them back as a random-access source (numpy in, numpy out), which grain loads.

Loading (:func:`batches`) is deterministic given the seed: the host's shard of the
records (grain ``ShardOptions``; by default one shard per JAX process) is shuffled anew
each epoch, repeated and batched. The iterator's position is checkpointable
(``get_state``/``set_state``, saved with the model by :mod:`.checkpoint`), so a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds
from mechinterp.train.tasks import TaskMixture
from mechinterp.train.tokenizer import WordTokenizer


@dataclasses.dataclass(eq=False)
class SyntheticTasksConfig(tfds.core.BuilderConfig):
    """A :class:`TaskMixture` and how many examples each split gets."""

    mixture: TaskMixture | None = None
    num_train: int = 0
    num_test: int = 0


class SyntheticTasks(tfds.core.GeneratorBasedBuilder):
    """The seeded synthetic token tasks of :mod:`.tasks` as a tfds dataset.

    Features: ``tokens`` and ``loss_mask`` (int32, ``seq_len``), ``task`` (int32). The
    vocabulary is stored in the dataset's metadata (see :func:`synthetic_tokenizer`).
    Each distinct mixture/size gets its own config directory (named by a hash).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    # Nothing is downloaded, so there is no checksums file next to the code. (Left to
    # itself tfds would look for one via ``importlib_resources``, which it does not
    # install, and fail for builders defined inside an installed package.)
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        mixture = self.builder_config.mixture
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Synthetic token tasks: {mixture}",
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(mixture.seq_len,), dtype=np.int32),
                "loss_mask": tfds.features.Tensor(shape=(mixture.seq_len,), dtype=np.int32),
                "task": np.int32,
            }),
            metadata=tfds.core.MetadataDict(vocab=list(mixture.tokenizer().vocab),
                                            tasks=[t.name for t, _ in mixture.tasks]),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "test": self._generate_examples("test", config.num_test)}

    def _generate_examples(self, split: str, n: int):
        yield from enumerate(self.builder_config.mixture.examples(split, n))


def _config_name(*settings) -> str:
    """A config directory name that changes whenever any of ``settings`` (by repr) does."""
    digest = hashlib.sha256(repr(settings).encode()).hexdigest()
    return f"m{digest[:16]}"


class SeededSplits(tfds.core.GeneratorBasedBuilder):
    """Base of a generated image set: splits ``train`` / ``test`` of ``config.n_train`` /
    ``config.n_test`` examples, each split drawn by ``example(rng)`` from one generator
    seeded with ``(config.seed, split == "test")``. Subclasses give ``_info``, ``example``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    code_path = None  # nothing to download, no checksums file (see SyntheticTasks)

    def example(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {"train": self._generate_examples("train", c.n_train),
                "test": self._generate_examples("test", c.n_test)}

    def _generate_examples(self, split: str, n: int):
        rng = np.random.default_rng([self.builder_config.seed, split == "test"])
        for k in range(n):
            yield f"{k}", self.example(rng)


def prepare(builder_class: type[tfds.core.GeneratorBasedBuilder],
            config: tfds.core.BuilderConfig, data_dir: str | Path):
    """``builder_class(config)`` in ``data_dir`` as ``array_record``, generated once (later
    calls with an equal config reuse the files)."""
    builder = builder_class(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def build_synthetic(mixture: TaskMixture, *, num_train: int, num_test: int,
                    data_dir: str | Path) -> SyntheticTasks:
    """Generate (once; later calls reuse the files) and return the prepared builder."""
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    config = SyntheticTasksConfig(name=_config_name(mixture, num_train, num_test),
                                  mixture=mixture, num_train=num_train, num_test=num_test)
    return prepare(SyntheticTasks, config, data_dir)


def synthetic_tokenizer(builder: SyntheticTasks) -> WordTokenizer:
    """The tokenizer stored with a built synthetic dataset."""
    return WordTokenizer(builder.info.metadata["vocab"])


def shard_options(shard_index: int | None = None, shard_count: int | None = None
                  ) -> grain.sharding.ShardOptions:
    """This host's shard: by default one per JAX process (``ShardByJaxProcess``)."""
    if shard_index is None and shard_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                       drop_remainder=True)


def batches(source, *, batch_size: int, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, shard: grain.sharding.ShardOptions | None = None,
            read_threads: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator over this host's batches (dicts of numpy arrays).

    ``batch_size`` is global: each of ``shard.shard_count`` hosts gets
    ``batch_size // shard_count`` rows per batch (assemble them with
    :func:`mechinterp.train.mesh.global_batch`). ``num_epochs=None`` repeats forever; a
    final partial batch is dropped, so every batch has the same shape.
    """
    shard = shard or shard_options()
    if batch_size % shard.shard_count:
        raise ValueError(
            f"batch size {batch_size} does not split over {shard.shard_count} hosts; use a "
            f"multiple of {shard.shard_count}"
        )
    ds = grain.MapDataset.source(source)
    n = len(ds) - len(ds) % shard.shard_count if shard.drop_remainder else len(ds)
    ds = ds[:n][shard.shard_index::shard.shard_count]
    per_host = batch_size // shard.shard_count
    if len(ds) < per_host:
        raise ValueError(
            f"this host's shard has {len(ds)} examples, fewer than one batch of {per_host}"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(per_host, drop_remainder=True)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * per_host)
    return iter(ds.to_iter_dataset(options))
