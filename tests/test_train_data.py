"""Synthetic tasks, the word tokenizer, the tfds array_record builder and grain loading."""

import numpy as np
import pytest

from mechinterp.train import tasks as T
from mechinterp.train.data import batches, build_synthetic, shard_options, synthetic_tokenizer
from mechinterp.train.tokenizer import WordTokenizer

MIXTURE = T.mixture_from_config(
    {"recall": {}, "hop": {"hops": 2, "holdout": 0.3}, "chain": {"length": 4},
     "arith": {"n_terms": 3, "max_value": 20}},
    knowledge={"n_entities": 12, "n_relations": 3}, seq_len=32, seed=7)


def _words(example, tokenizer):
    prompt, target = T.decode_example(example, tokenizer)
    return prompt.split()[2:], target.split()[:-1]  # drop <bos> <task> and <eos>


def test_word_tokenizer_round_trip_and_errors(tmp_path):
    tokenizer = WordTokenizer(["a", "b", "="])
    ids = tokenizer.encode("a = b")
    assert ids.tolist() == [3, 5, 4] and tokenizer.decode(ids) == "a = b"
    assert tokenizer.decode([1, 3, 0, 0]) == "<bos> a"
    with pytest.raises(KeyError, match="word 'c' is not in the vocabulary"):
        tokenizer.encode("a c")
    with pytest.raises(ValueError, match="duplicate words"):
        WordTokenizer(["a", "a"])
    tokenizer.save(tmp_path / "vocab.json")
    assert WordTokenizer.load(tmp_path / "vocab.json") == tokenizer


def test_examples_are_seeded_and_answers_are_right():
    tokenizer, table = MIXTURE.tokenizer(), MIXTURE.knowledge.table(MIXTURE.seed)
    seen = set()
    for i in range(200):
        example = MIXTURE.example("train", i)
        task = MIXTURE.tasks[int(example["task"])][0]
        seen.add(task.name)
        prompt, target = _words(example, tokenizer)
        if task.name == "recall":
            e, r = int(prompt[0][1:]), int(prompt[1][1:])
            assert target == [f"e{table[e, r]}"]
        elif task.name == "hop":
            entity = int(prompt[0][1:])
            for r in prompt[1:-1]:
                entity = table[entity, int(r[1:])]
            assert target[-1] == f"e{entity}" and target[1] == ";"  # scratchpad first
        elif task.name == "chain":
            edges = dict(zip(prompt[0:-3:4], prompt[2:-3:4]))
            node, path = prompt[-2], []
            while node in edges:
                node = edges[node]
                path.append(node)
            assert target == path
        else:
            expression = "".join(prompt[:-1])
            partial_sums = "".join(target).split(";")
            assert int(partial_sums[-1]) == eval(expression)  # noqa: S307 (digits and +-)
        mask = example["loss_mask"].astype(bool)
        assert tokenizer.decode(example["tokens"][mask]).endswith("<eos>")
    assert seen == {"recall", "hop", "chain", "arith"}
    again = MIXTURE.example("train", 17)
    np.testing.assert_array_equal(again["tokens"], MIXTURE.example("train", 17)["tokens"])
    other_seed = T.TaskMixture(MIXTURE.tasks, MIXTURE.knowledge, MIXTURE.seq_len, seed=8)
    assert any(not np.array_equal(MIXTURE.example("train", i)["tokens"],
                                  other_seed.example("train", i)["tokens"]) for i in range(5))


def test_multi_hop_holds_out_combinations_for_test():
    hop = T.TaskMixture(((T.MultiHop(hops=2, holdout=0.3), 1.0),), T.KnowledgeBase(6, 2))
    tokenizer = hop.tokenizer()

    def combos(split):
        return {tuple(_words(hop.example(split, i), tokenizer)[0]) for i in range(300)}

    train, test = combos("train"), combos("test")
    assert train and test and not train & test


def test_bad_task_configs_are_clear_errors():
    with pytest.raises(ValueError, match="seq_len=8 is too short"):
        T.mixture_from_config({"chain": {"length": 6}}, seq_len=8)
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        T.mixture_from_config({"sort": {}})
    with pytest.raises(ValueError, match=r"task 'hop' has no field\(s\) \['hop'\]"):
        T.mixture_from_config({"hop": {"hop": 2}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return build_synthetic(MIXTURE, num_train=96, num_test=16, data_dir=data_dir), data_dir


def test_tfds_builder_writes_array_record_without_tensorflow(built):
    builder, data_dir = built
    assert sorted(p.name.split("-")[1] for p in data_dir.rglob("*.array_record*")) == [
        "test.array_record", "train.array_record"]
    train = builder.as_data_source("train")
    assert len(train) == 96 and len(builder.as_data_source("test")) == 16
    stored = {tuple(train[i]["tokens"]) for i in range(len(train))}
    generated = {tuple(e["tokens"]) for e in MIXTURE.examples("train", 96)}
    assert stored == generated
    assert synthetic_tokenizer(builder) == MIXTURE.tokenizer()
    again = build_synthetic(MIXTURE, num_train=96, num_test=16, data_dir=data_dir)
    assert again.data_dir == builder.data_dir  # prepared once, reused


def test_grain_batches_are_seeded_sharded_and_resumable(built):
    source = built[0].as_data_source("train")

    def first(n, **kwargs):
        iterator = batches(source, batch_size=8, **kwargs)
        return [next(iterator)["tokens"] for _ in range(n)]

    a, b = first(3, seed=0), first(3, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], first(1, seed=1)[0])
    epoch = np.concatenate(first(12, seed=0))  # 96 examples = one epoch
    assert len({tuple(t) for t in epoch}) == len({tuple(source[i]["tokens"]) for i in range(96)})

    indexed = [{"i": np.int32(i)} for i in range(40)]
    hosts = [batches(indexed, batch_size=8, seed=0, shard=shard_options(h, 2)) for h in range(2)]
    rows = [np.concatenate([next(it)["i"] for _ in range(5)]) for it in hosts]
    assert rows[0].shape == (20,)  # each of 2 hosts reads 4 rows of every batch
    assert sorted(np.concatenate(rows)) == list(range(40))  # disjoint, together one epoch

    iterator = batches(source, batch_size=8, seed=0)
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["tokens"] for _ in range(2)]
    resumed = batches(source, batch_size=8, seed=0)
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["tokens"], e) for e in expected)
    with pytest.raises(ValueError, match="does not split over 3 hosts"):
        batches(source, batch_size=8, seed=0, shard=shard_options(0, 3))
