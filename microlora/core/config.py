"""Every stage's configuration, in one torch-free module: the single source of defaults.

The CLI reads its option defaults from these dataclasses (``defaults``), so ``--help`` stays
fast and no default is typed twice. Validation errors name the CLI option to fix. The server's
config, made of these, is the face's: ``microlora.server.config``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from microlora.core.errors import MicroloraError, TargetError

VIEW_STYLES = ("sentence", "clause")  # compiler.views: how a question view is asked
TEMPLATES = ("qa", "completion")  # composer.prompts: answer a question, or continue a text
COMPOSITIONS = ("stacked", "merged")  # composer: adapters beside W, or folded into it
HYBRIDS = ("ensemble", "gated", "rerank", "joint")  # composer: how --mode hybrid combines
WEIGHTINGS = ("uniform", "score", "mean")  # composer.retrieval: each atom's weight in the sum
COMPANIES = ("random", "nearest")  # compiler.trainer: which batch-mates train beside an atom
COMPANY_WEIGHTS = ("one", "mean")  # compiler.trainer: each composed atom's weight in training
STOP_ON = ("targets", "answers")  # compiler.trainer: which tokens decide that an atom has learned
SUBJECT_CONTEXTS = ("off", "embedding", "lessons")  # compiler.lessons: where a subject goes
# core.models: how the base model's weights are held (``--base-dtype``). int8 and int4 are
# weight-only quantized decoder linears (``core.quant``), everything else in bf16.
# "auto" holds the base in bf16 where bf16 matmuls are the fast ones (CUDA, CPUs with AMX;
# ``core.runtime.bf16_is_fast``), else in fp32. Measured (benchmarks/RESULTS.md, "Quantized
# base" and "Compile: fp32 where bf16 is slow"): with AMX a bf16 base answers the docs tune
# split as well as fp32 (EM .344 vs .312) in a third of the time and 64 % of the memory;
# without AMX bf16 compiles 1.36x slower than fp32 (300 vs 220 s), EM level. An fp32 base
# holds a large vocabulary (embedding, output layer) in bf16 (``hold_vocabulary_in_bf16``).
BASE_DTYPES = ("auto", "fp32", "bf16", "int8", "int4")
WEIGHT_DTYPES = BASE_DTYPES[1:]  # what "auto" resolves to, or a quantized base
QUANTIZED_DTYPES = ("int8", "int4")
DEFAULT_BASE_DTYPE = "auto"


def quantization(base_dtype: str | None) -> str | None:
    """What a store records of a base dtype: "int8" or "int4", or None for a float base
    (fp32 and bf16 are one model to the store, as to its fingerprint: adapters move between
    them, and differ only in rounding)."""
    return base_dtype if base_dtype in QUANTIZED_DTYPES else None


def defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's field defaults by name (fields with a default factory included)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


class Mode(str, Enum):
    """Where the knowledge comes from when answering."""

    PARAMETRIC = "parametric"  # the retrieved atoms' adapters, no passage text: the default
    CONTEXT = "context"  # classic RAG: the atoms' text in the prompt, no adapters
    HYBRID = "hybrid"  # both
    NONE = "none"  # closed book: the base model alone

    @property
    def uses_adapters(self) -> bool:
        return self in (Mode.PARAMETRIC, Mode.HYBRID)

    @property
    def uses_passages(self) -> bool:
        return self in (Mode.CONTEXT, Mode.HYBRID)

    @property
    def retrieves(self) -> bool:
        return self is not Mode.NONE


MODES = tuple(m.value for m in Mode)


@dataclass(frozen=True)
class TargetSpec:
    """Where adapters go.

    modules: fnmatch patterns matched against a linear's name inside its decoder block
        (CLI ``--targets``); the default ``mlp.*`` is every MLP projection.
    last_layers: adapt only the last N decoder blocks (CLI ``--last-layers``); None = all.
    layers: explicit block indices (negative counts from the end); overrides last_layers.
    """

    modules: tuple[str, ...] = ("mlp.*",)
    last_layers: int | None = 6
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.modules:
            raise TargetError("--targets needs at least one module pattern, e.g. 'mlp.*'")
        if self.last_layers is not None and self.last_layers < 1:
            raise TargetError(f"--last-layers must be >= 1, got {self.last_layers}")

    def block_indices(self, num_blocks: int) -> list[int]:
        if self.layers is not None:
            out = []
            for i in self.layers:
                if not -num_blocks <= i < num_blocks:
                    raise TargetError(f"layer {i} is out of range for a model with "
                                      f"{num_blocks} layers")
                out.append(i % num_blocks)
            return sorted(set(out))
        n = num_blocks if self.last_layers is None else min(self.last_layers, num_blocks)
        return list(range(num_blocks - n, num_blocks))


# Recipe fields newer than the stores in use, with their defaults then: at those values they
# stay out of the recipe key, so existing atom ids hold (tests/test_atom_ids.py pins them).
_KEY_SINCE_V1 = {"qa_views": 0, "view_style": "sentence", "resolve_pronouns": False,
                 "window_views": 0, "distill": 0.0, "distill_topk": 16, "distill_window": 160,
                 "company": "random", "subject_context": "off",
                 "company_weight": "one", "stop_on": "targets"}


@dataclass(frozen=True)
class TrainConfig:
    """The compile recipe; every field but batch_atoms is part of an atom's id, so changing
    one retrains.

    rank: adapter rank per atom (``--rank``): 1, chosen on the docs tune split against 2
        (EM .387 vs .344 with a bf16 base, the same compile time, half the bytes per atom);
        held out it is level (docs .323 vs .349, cpkc .230 vs .210: benchmarks/RESULTS.md,
        "Fidelity V"). 2, 4 or 8 where an atom must hold more.
    scale: s in W + s·BA (PEFT's alpha / r); folded into B when the atom is stored.
    targets: which linears get adapters (``--targets``, ``--last-layers``).
    lr, max_steps: Adam learning rate and the step budget per atom (``--lr``, ``--steps``).
        12 steps, chosen on the docs tune split against 8, 16 and 25 (parametric EM k=1
        .387 vs .344 / .366 / .398, k=2 .419 vs .333 / .376 / .355) at 54 % of the compile
        time of 25; held out (docs eval) k=1 .302 vs .323, k=4 .213 vs .120, compile 1.6x
        faster (benchmarks/RESULTS.md, "Compile: a 12-step budget").
    stop_prob: an atom stops when every deciding token has at least this probability.
    stop_on: which tokens decide: every "targets" token (its sentence and its question views'
        answers) or only its question views' "answers" (the sentence still trains; an atom
        with no views is decided by its sentence). "answers" stopped atoms 17 % sooner but
        answered 4 questions of 93 fewer on the docs tune split (benchmarks/RESULTS.md,
        "Compile: fp32 where bf16 is slow"): not the default.
    neighbours: other atoms' adapters composed beside each atom while it trains.
    company: which batch-mates those are: "random", or the "nearest" by embedding (its
        query-time company; measured worse: an atom leans on them and answers less alone).
    company_weight: each atom's weight in the composition it trains in: "one" (every atom at
        1, the sum, as ``ask --weighting uniform`` composes) or "mean" (each of the 1 +
        ``neighbours`` atoms at 1/(1 + neighbours), as ``--weighting mean`` composes
        1 + neighbours atoms at query time).
    batch_atoms: atoms trained together in one step (``--batch-size``): 16, measured on 2
        CPU cores against 32 (153-atom compile: peak memory 3,296 vs 3,505 MB, 233 vs 256 s,
        the same answers; benchmarks/RESULTS.md, "Compile memory"); a GPU may want more.
    length_groups: a step's rows run as up to this many forwards of rows of similar length,
        each at its own width (``compiler.buckets``: less padding computed; 1 = one padded
        forward). Like batch_atoms it changes speed, not what an atom is: not in its id.
    bf16: autocast matmuls to bf16 on a base held in bf16 (or int8/int4, the rest in bf16):
        what ``--base-dtype auto`` holds where bf16 matmuls are fast (CUDA, CPUs with AMX).
        An fp32 base trains in fp32, the fast path on other CPUs and exact everywhere.
    title_context: prefix each atom with its document title (not trained on, only read).
    vocab_candidates: train against a candidate vocabulary, the union of the base model's
        top-N tokens at every target position plus the targets, instead of all 262k tokens
        (0 = the full softmax). Whether an atom has learned, and its recorded loss, are always
        decided with the full softmax.
    neighbours_learn: batch neighbours are not detached, so each adapter also learns not to
        disturb the atoms it is composed beside (a locality term at no extra compute).
    qa_views: also train each atom on up to this many questions about its sentence, answered
        by one of its names, numbers or dates (``compiler.views``): parametric answers gain
        on both splits, compiling costs ~2.6x.
    view_style: "sentence" asks each view with the whole sentence around the answer,
        "clause" with only the clause around it (``compiler.views``).
    resolve_pronouns: an atom that opens with a pronoun is trained, embedded and asked about
        with the name it refers to in its place (``compiler.decontext``).
    subject_context: a sentence that does not name its paragraph's subject gets it in front
        ("Talia Orven: In 1891 she opened ..."): "off", in its retrieval "embedding" only, or
        in its "lessons" too (its text and its question views; ``compiler.lessons``).
    """

    rank: int = 1
    scale: float = 1.0
    targets: TargetSpec = field(default_factory=TargetSpec)
    lr: float = 5e-3
    max_steps: int = 12
    stop_prob: float = 0.5
    stop_on: str = "targets"
    neighbours: int = 3
    batch_atoms: int = 16
    length_groups: int = 3
    seed: int = 0
    bf16: bool = True
    title_context: bool = False
    vocab_candidates: int = 256
    neighbours_learn: bool = False
    qa_views: int = 2  # measured: benchmarks/RESULTS.md, "question views"
    view_style: str = "sentence"
    resolve_pronouns: bool = False
    window_views: int = 0
    distill: float = 0.5  # measured: benchmarks/RESULTS.md, "Fidelity II"
    distill_topk: int = 16
    distill_window: int = 160
    company: str = "random"
    subject_context: str = "embedding"  # measured: benchmarks/RESULTS.md, "Fidelity III"
    company_weight: str = "one"

    def __post_init__(self) -> None:
        if self.rank not in (1, 2, 4, 8):
            raise ValueError(f"--rank must be 1, 2, 4 or 8 (micro-adapters), got {self.rank}")
        if self.max_steps < 1 or self.batch_atoms < 1 or self.neighbours < 0 \
                or self.length_groups < 1:
            raise ValueError("--steps and --batch-size must be >= 1, neighbours >= 0 and "
                             "length_groups >= 1")
        if not 0.0 <= self.distill <= 1.0 or self.distill_topk < 1 or self.window_views < 0:
            raise ValueError("--distill must be in [0, 1], its top-k >= 1 and --window-views "
                             ">= 0")
        if self.subject_context not in SUBJECT_CONTEXTS:
            raise ValueError(f"--subject-context must be one of {SUBJECT_CONTEXTS}, got "
                             f"{self.subject_context!r}")
        if self.company not in COMPANIES:
            raise ValueError(f"--company must be one of {COMPANIES}, got {self.company!r}")
        if self.company_weight not in COMPANY_WEIGHTS:
            raise ValueError(f"--company-weight must be one of {COMPANY_WEIGHTS}, got "
                             f"{self.company_weight!r}")
        if self.stop_on not in STOP_ON:
            raise ValueError(f"--stop-on must be one of {STOP_ON}, got {self.stop_on!r}")
        if self.view_style not in VIEW_STYLES:
            raise ValueError(f"--view-style must be one of {VIEW_STYLES}, got "
                             f"{self.view_style!r}")

    def key(self) -> str:
        """A stable text form of the recipe for atom ids (batch size and length groups
        excluded: they change how fast atoms train, not what they are)."""
        d = asdict(self)
        d.pop("batch_atoms")
        d.pop("length_groups")
        for name, default in _KEY_SINCE_V1.items():  # fields added later: at their default
            if d[name] == default:  # they stay out of the key, so existing atom ids hold
                d.pop(name)
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class ChunkConfig:
    """max_tokens: a sentence's token limit under the base model's tokenizer (CLI
    ``--max-atom-tokens``; longer ones split); min_chars: shorter fragments join a neighbour;
    sentences: consecutive sentences of a paragraph per atom (``--atom-sentences``), each
    taught with its own question views."""

    max_tokens: int = 64
    min_chars: int = 30
    sentences: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError(f"--max-atom-tokens must be at least 8, got {self.max_tokens}")
        if self.sentences < 1:
            raise ValueError(f"--atom-sentences must be at least 1, got {self.sentences}")


@dataclass(frozen=True)
class ReaderConfig:
    """The shared reader (``compiler.reader``). rank: its LoRA rank; lr, epochs, batch: Adam
    over the examples; targets: the atoms' targets (the default recipe's); answerable_only:
    train only on questions whose retrieved atoms' text holds the answer (measured on the docs
    tune split with 310 invented documents: EM .430 with it, .204 without, .387 with no
    reader; benchmarks/RESULTS.md, "Fidelity VI")."""

    rank: int = 8
    lr: float = 1e-3
    epochs: int = 3
    batch: int = 8
    seed: int = 0
    targets: TargetSpec = TargetSpec()
    answerable_only: bool = True


@dataclass(frozen=True)
class AskConfig:
    """How a question is answered.

    k: atoms composed per question (measured: benchmarks/RESULTS.md, "choosing k").
    min_score: drop retrieved atoms with a lower cosine similarity; when none is left the
        answer says nothing relevant was found (None keeps all k). 0.3 for the default
        embedder: on both tune splits every answerable question's best atom scored above
        it, and it refuses 24-38 % of questions about passages the store does not hold
        (benchmarks/RESULTS.md, "nothing found"); another embedder needs its own.
    weighting: "uniform" (every atom at weight 1, as trained), "score", or "mean" (each at
        1/k: measured on the docs tune split, k=2 .290 vs uniform .194, still under k=1 .312).
    composition: "stacked" or "merged" (same outputs; see ``composer.composer``).
    no_repeat_ngram: > 0 bans repeating an n-gram of the answer (composed adapters can loop).
    template: "qa" answers the question; "completion" continues it as plain text.
    reader: compose the store's reader adapter (if it has one) beside the atoms.
    end_bias: added to the line-break logits once an answer has begun, in the modes that
        compose adapters (base models' prompts): composed atoms answer with a name and then
        run on, while in-context copying ends well by itself and a bias cuts its names short
        (measured: benchmarks/RESULTS.md, "ending answers").
    echo_penalty: subtracted, in the rows that compose adapters, from the logits of the
        tokens that would begin a name the question itself names (composed atoms tend to
        answer with their sentence's salient name, often the one asked about); 0 is off.
    window_tokens: how much of its paragraph each retrieved atom shows in the passage modes
        (``context``, the passage side of ``hybrid``): its sentence and its neighbours up to
        this many tokens (``composer.windows``); 0 shows the sentence alone.
    hybrid: "ensemble" decodes the answer from two rows at once, the adapters with the bare
        question and the passages with no adapters, each token maximising
        log p(adapters) + passage_weight * log p(passages); "gated" scales the adapters' term
        by 1 - the passages' top probability at each step, so the passages decide wherever
        they are sure; "rerank" decodes the two rows alone and keeps, of their two answers,
        the one with the higher log p(adapters) + passage_weight * log p(passages) as a
        whole; "joint" puts both in one row,
        where the composed adapters disturb the reading of the passages (measured:
        benchmarks/RESULTS.md, "hybrid as an ensemble"). Twice the rows per question.
    passage_weight: 8, the best ensemble weight on both tune splits with windows (2, 4, 8
        measured: benchmarks/RESULTS.md, "Fidelity I"); the larger it is, the closer the
        hybrid comes to the passages alone.
    prefix_cache: reuse the prompt prefix's states in the blocks below the first adapted
        one (computed once per template; ``composer.prefix``): the same answers, a shorter
        prefill. Off only to measure it.
    adapt_prefix: compose the atoms over the prompt's shared few-shot prefix too. False: the
        base model alone reads it (atoms are trained on bare questions, never on the shots),
        so its states are computed once in every block and only the question and answer run
        through the composed adapters (needs ``prefix_cache`` and stacked composition).
        None (the default) decides by mode (``atoms_on_prefix``): off for parametric answers
        (docs eval EM .328 off vs .323 on; a batch of 64 mixed requests .90x the base
        batch's speed instead of .76-.83x), on for hybrid ones (.479 on vs .391 off: its adapter
        row answers with the shots read through the atoms; benchmarks/RESULTS.md, "Atoms
        off the prompt's prefix by mode").
    """

    mode: Mode = Mode.PARAMETRIC
    k: int = 1
    min_score: float | None = 0.3
    weighting: str = "uniform"
    composition: str = "stacked"
    max_new_tokens: int = 32
    no_repeat_ngram: int = 0
    template: str = "qa"
    reader: bool = True
    end_bias: float = 8.0
    window_tokens: int = 160
    echo_penalty: float = 0.0
    hybrid: str = "ensemble"
    passage_weight: float = 8.0
    prefix_cache: bool = True
    adapt_prefix: bool | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise MicroloraError(f"mode must be one of {MODES}, got {self.mode!r}") from None
        for name, choices in (("template", TEMPLATES), ("composition", COMPOSITIONS),
                              ("hybrid", HYBRIDS), ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in choices:
                raise MicroloraError(f"{name} must be one of {choices}, got "
                                     f"{getattr(self, name)!r}")
        if self.k < 1:
            raise MicroloraError(f"k must be at least 1, got {self.k}")
        if self.max_new_tokens < 1:
            raise MicroloraError("max_new_tokens must be at least 1")
        if self.passage_weight < 0:
            raise MicroloraError("passage_weight must be at least 0")
        if self.window_tokens < 0:
            raise MicroloraError("window_tokens must be at least 0")
        if self.adapt_prefix is False and (self.composition == "merged"
                                           or not self.prefix_cache):
            raise MicroloraError("keeping the atoms off the prompt's prefix (--no-adapt-prefix) "
                                 "needs the prefix cache and --composition stacked")
        if self.mode is Mode.HYBRID and self.hybrid != "joint" and \
                self.composition == "merged":
            raise MicroloraError("the ensemble hybrid keeps the adapters out of its passage "
                                 "row, which merged weights cannot: use stacked composition, "
                                 "or the joint hybrid (--hybrid joint)")

    @property
    def atoms_on_prefix(self) -> bool:
        """Whether the composed atoms act on the prompt's shared prefix: ``adapt_prefix``
        when set; else off for parametric answers where the prefix cache and stacked
        composition allow it, on otherwise."""
        if self.adapt_prefix is not None:
            return self.adapt_prefix
        return not (self.mode is Mode.PARAMETRIC and self.composition == "stacked"
                    and self.prefix_cache)


# Namespaces a store may hold (deleted ones included until it is compacted): LMDB reserves a
# slot per database in every transaction, so a read transaction costs ~1 us per thousand.
MAX_NAMESPACES = 1024
ADAPTER_DTYPES = ("int8", "bf16", "fp16")  # store.record: how a store keeps an adapter


@dataclass(frozen=True)
class StoreConfig:
    """How a store writes what it is given (``microlora compile --adapter-dtype``; reading
    takes any of them, one atom at a time).

    adapter_dtype: "int8" keeps each adapter as int8 values with one bf16 scale per row (a
        rank component of a module's A or B: ``store/quantize.py``), half the bytes of bf16;
        every value comes back within half its row's scale. "bf16" and "fp16" keep the
        adapter as it was trained, to their precision, in the record format every store
        before int8 holds.
    background_verify: where a store is opened to serve (``microlora serve``), hash each
        namespace's records in a background thread once it is first read (and every namespace
        at start), so that questions find their atoms' checksums already checked: hashing a
        record costs about as much as fetching it, and first reads set a fetch's p99. A read
        that gets to an atom first still checks it itself. Before its first check the thread
        reads each namespace's index into memory where it fits in a quarter of the available
        memory (FAISS searches a memory-mapped one 2.6x slower) and LMDB's file into the page
        cache where it fits in half (``store/page_cache.py``): a store opened cold otherwise
        answers its first questions from the disk. Off in one-shot commands (``ask``,
        ``compile``), where hashing the whole store would only compete with the model.
    """

    adapter_dtype: str = "int8"
    background_verify: bool = True

    def __post_init__(self) -> None:
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise MicroloraError(f"--adapter-dtype must be one of {', '.join(ADAPTER_DTYPES)},"
                                 f" not {self.adapter_dtype!r}")
