"""The Python-standard-library domain: hand-written seeds, a retrieval corpus, a held-out set.

Texts come from this machine's CPython (docstrings, PSF License), never downloaded. The
corpus holds one passage per documented public function of :data:`RETRIEVAL_MODULES`
(``"os.path.join: Join two or more pathname components..."``); the held-out set asks
"What does `module.func` do?" about :data:`EVAL_MODULES` (disjoint from the corpus and the
seeds) and expects the docstring's first sentence. Retrieval is lexical: the passages
sharing the most distinct words with the query (no learned retriever).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import numpy as np

# Hand-written seed instructions and answers (our own words), about seed-only functions.
SEEDS = (
    ("What does `os.getcwd` do?", "Return a string with the current working directory."),
    ("What does `re.sub` do?", "Return the string obtained by replacing matches of a "
     "pattern with a replacement."),
    ("What does `math.gcd` do?", "Return the greatest common divisor of the integers."),
    ("What does `json.loads` do?", "Deserialize a string holding a JSON document to a "
     "Python object."),
    ("What does `sys.exit` do?", "Exit the interpreter by raising SystemExit."),
    ("What does `time.sleep` do?", "Delay execution for the given number of seconds."),
    ("What does `random.choice` do?", "Choose a random element from a non-empty sequence."),
    ("What does `collections.Counter` do?", "Count hashable items, as a dict mapping each "
     "item to its count."),
)
RETRIEVAL_MODULES = ("posixpath", "shutil", "json", "re", "math", "base64", "glob", "fnmatch",
                     "shlex", "copy", "urllib.parse", "tempfile", "gzip", "zlib", "binascii",
                     "secrets", "uuid", "html")
EVAL_MODULES = ("statistics", "heapq", "difflib", "calendar", "locale", "mimetypes",
                "email.utils", "ipaddress", "platform", "quopri", "filecmp", "functools")
ALIASES = {"posixpath": "os.path"}
SOURCE = ("docstrings of the CPython standard library installed here (Python Software "
          "Foundation License)")
STOP = frozenset("what does do the a an of to in is and or for how which it by with".split())


@dataclasses.dataclass(frozen=True)
class Passage:
    name: str  # "os.path.join"
    summary: str  # the docstring's first sentence

    @property
    def text(self) -> str:
        return f"{self.name}: {self.summary}"


def words(text: str) -> list[str]:
    """Lower-case word tokens (identifiers split at dots and underscores' neighbours)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    for match in re.finditer(r"[.!?](?=\s|$)", paragraph):
        if not paragraph[:match.end()].endswith(("e.g.", "i.e.", "etc.")):
            return paragraph[:match.end()]
    return paragraph


def documented(modules, min_words: int = 4, max_words: int = 25) -> list[Passage]:
    """One passage per public function of ``modules`` whose docstring opens with a
    sentence of ``min_words``..``max_words`` words (signature lines skipped)."""
    out = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        shown = ALIASES.get(module_name, module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", module_name) != module.__name__:
                continue  # re-exported from elsewhere
            doc = inspect.getdoc(obj) or ""
            summary = first_sentence(doc)
            if (summary.startswith(name + "(") or "==>" in summary
                    or not min_words <= len(summary.split()) <= max_words):
                continue
            out.append(Passage(f"{shown}.{name}", summary))
    return out


def question(name: str) -> str:
    return f"What does `{name}` do?"


def eval_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Up to ``n`` held-out (question, answer) pairs from :data:`EVAL_MODULES`, in a fixed
    random order of ``seed``."""
    passages = documented(EVAL_MODULES)
    order = np.random.default_rng(seed).permutation(len(passages))[:n]
    return [(question(passages[i].name), passages[i].summary) for i in order]


def retrieve(query: str, passages, k: int = 1) -> list[Passage]:
    """The ``k`` passages sharing the most distinct non-stop words with ``query`` (ties:
    the shorter passage, then corpus order); passages sharing none are never returned."""
    q = set(words(query)) - STOP
    scores = [(-len(q & set(words(p.text))), len(p.text), i) for i, p in enumerate(passages)]
    return [passages[i] for score, _, i in sorted(scores)[:k] if score < 0]
