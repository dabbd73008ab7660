"""ListOps: evaluate nested MAX / MIN / MED / SUM_MOD expressions over digits.

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9        [SM 3 [MED 8 1 5 ] 4 ]  ->  2

Nangia & Bowman (2018, "ListOps: a diagnostic dataset for latent tree learning");
Long Range Arena (Tay et al., 2021) made it a long-sequence benchmark (depth <= 10,
arity <= 10, 500-2000 tokens). Semantics follow the LRA generator: MED of an even
count is the floor of the mean of the middle two, SM is the sum modulo 10. The class
is the value, 0-9. The parentheses of the LRA files are the generator's binarisation
and carry no information; they are dropped.

Generated expressions grow top-down to a length drawn uniformly from
[dependency_length, seq_len] (capped by what `max_depth` and `max_arity` allow): a
random digit slot becomes an operator with 2..max_arity arguments while 3 or more
tokens are missing, otherwise an operator takes one more digit, so the length is hit
exactly (up to 2 short when every operator is already full, e.g. max_arity=2, where
lengths are 3m + 1). The answer
depends on every token, so `dependency_length` is the shortest expression.
Chance: the frequency of the most common value (MAX pushes answers to 9 and MIN to
0), estimated once from 4000 generated expressions.

With `task.files` (TSV files in the LRA release format: a 'Source<TAB>Target' header,
then one expression and its value per row) the examples come from the files instead;
see `listops_files`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import SPLITS, Task, require
from flaxformer_lite.tasks import listops_files
from flaxformer_lite.tasks.common import PAD, as_patterns, check_ints, check_seq_len, classify_example
from flaxformer_lite.tasks.listops_vocab import DIGIT0, END, OP0, OPS, WORDS

_LEAF = -1


def apply(op: int, values: list[int]) -> int:
    """Value of operator `op` (index into OPS) on its arguments."""
    if op == 0:
        return min(values)
    if op == 1:
        return max(values)
    if op == 2:
        s = sorted(values)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return sum(values) % 10


def capacity(max_depth: int, max_arity: int) -> int:
    """Tokens of the largest expression: every operator full, every leaf at max depth."""
    size = 1
    for _ in range(max_depth):
        size = 2 + max_arity * size
    return size


class ListOps(Task):
    name = 'listops'
    DEFAULTS = dict(
        seq_len=128,  # longest expression (LRA: 2000)
        dependency_length=64,  # shortest expression (LRA: 500)
        max_depth=6,  # operator nesting (LRA: 10)
        max_arity=5,  # arguments per operator, >= 2 (LRA: 10)
        files=None,  # LRA-format TSV files (glob or tuple of globs); unset: generate
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        c.setdefault('files', None)
        check_ints(c, dict(seq_len=4))
        self.patterns = as_patterns(c['files'])
        self._chance: dict[str, float] | None = None
        if self.patterns:
            self.rows = listops_files.load(self.patterns, c['seq_len'])
            return
        check_ints(c, dict(dependency_length=4, max_depth=1, max_arity=2))
        cap = capacity(c['max_depth'], c['max_arity'])
        require(cap >= c['dependency_length'], 'max_depth',
                f"expressions of depth <= {c['max_depth']} and arity <= {c['max_arity']} have at "
                f"most {cap} tokens, fewer than dependency_length={c['dependency_length']}; raise "
                f"task.max_depth or task.max_arity, or lower task.dependency_length")
        check_seq_len(c, self.min_seq_len(c),
                      f"expressions of dependency_length={c['dependency_length']} tokens")
        self.longest = min(c['seq_len'], cap)

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length']

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind='classify', vocab_size=END + 1, input_len=self.cfg['seq_len'],
                        target_len=1, num_outputs=10, pad_id=PAD)

    # --- generated expressions ------------------------------------------------
    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        depth_cap, arity = c['max_depth'], c['max_arity']
        goal = int(rng.integers(c['dependency_length'], self.longest + 1))
        u = iter(rng.random(3 * goal + 8).tolist())
        ops = iter(rng.integers(0, len(OPS), size=goal).tolist())
        # A node is [op, depth, child, child, ...]; a child is _LEAF or a node.
        # slots: leaves that may become operators; open_nodes: operators below max arity.
        # Children are only appended, so a slot's (node, index) stays valid.
        k = 2 + int(next(u) * (min(arity, goal - 2) - 1))
        root = [next(ops), 1] + [_LEAF] * k
        length = k + 2
        slots = [(root, 2 + j) for j in range(k)] if depth_cap > 1 else []
        open_nodes = [root] if k < arity else []
        while length < goal:
            if goal - length >= 3 and slots:  # a leaf becomes an operator with k arguments
                j = int(next(u) * len(slots))
                slots[j], slots[-1] = slots[-1], slots[j]
                parent, where = slots.pop()
                k = 2 + int(next(u) * (min(arity, goal - length - 1) - 1))
                child = [next(ops), parent[1] + 1] + [_LEAF] * k
                parent[where] = child
                length += k + 1
                if child[1] < depth_cap:
                    slots.extend((child, 2 + m) for m in range(k))
                if k < arity:
                    open_nodes.append(child)
            elif open_nodes:  # an operator takes one more digit
                j = int(next(u) * len(open_nodes))
                node = open_nodes[j]
                node.append(_LEAF)
                length += 1
                if node[1] < depth_cap:
                    slots.append((node, len(node) - 1))
                if len(node) - 2 == arity:
                    open_nodes[j] = open_nodes[-1]
                    open_nodes.pop()
            else:  # every operator full: the goal is not reachable (binary trees: 3m + 1)
                break
        digits = iter(rng.integers(0, 10, size=length).tolist())
        out: list[int] = []
        label = _emit(root, out, digits)
        return classify_example(out, c['seq_len'], label)

    # --- file-backed ------------------------------------------------------------
    def num_examples(self, split: str) -> int:
        if self.patterns:
            return len(self.rows[split][1])
        return super().num_examples(split)

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Generated: the base class's hashed draw. Files: row `index` of the split
        (taken modulo its size, so any index is valid)."""
        if not self.patterns:
            return super().example(split, index)
        tokens, labels = self.rows[split]
        i = int(index) % len(labels)
        return classify_example(tokens[i], self.cfg['seq_len'], labels[i])

    def with_dependency_length(self, length: int) -> Task:
        if self.patterns:
            raise ConfigError('eval.dependency_lengths: task listops reads task.files, whose '
                              'expressions have the lengths they have; unset one or the other')
        return super().with_dependency_length(length)

    # --- shared -----------------------------------------------------------------
    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        words = [WORDS[int(t)] for t in example['inputs'] if t != PAD]
        return ' '.join(words), str(int(example['targets']))

    def chance(self) -> dict[str, float]:
        if self._chance is None:
            if self.patterns:
                train = np.bincount(self.rows['train'][1], minlength=10)
                held = np.asarray(self.rows['eval'][1])
                accuracy = float(np.mean(held == np.argmax(train)))
            else:
                rng = np.random.default_rng([self.seed, len(SPLITS), 2**31])
                labels = [int(self._generate(rng)['targets']) for _ in range(4000)]
                accuracy = float(np.bincount(labels, minlength=10).max() / len(labels))
            self._chance = {'accuracy': accuracy}
        return dict(self._chance)


def _emit(node: list[Any], out: list[int], digits) -> int:
    """Append the tokens of `node` to `out`, drawing leaf digits; return its value."""
    out.append(OP0 + node[0])
    values = []
    for child in node[2:]:
        if child == _LEAF:
            d = next(digits)
            out.append(DIGIT0 + d)
            values.append(d)
        else:
            values.append(_emit(child, out, digits))
    out.append(END)
    return apply(node[0], values)
