"""Eager against torch.compile'd adapted blocks on compile_bench's --quick compile (20 atoms),
one process per mode, the compile repeated in it. Run from the repository root:

    python benchmarks/results/stop40/torch_compile_probe.py eager 3
    python benchmarks/results/stop40/torch_compile_probe.py compile 3

"compile" compiles each adapted decoder block (``nn.Module.compile(dynamic=True)``), leaves
the teacher and the candidate-vocabulary forwards eager (their KV caches recompile without
end), raises dynamo's recompile limits (the blocks share one code object) and turns off
donated buffers (the trainer back-propagates with ``retain_graph=True``). A scratch probe,
not shipped: the first repetition pays the compile.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from compile_bench import models_and_corpus, train_microlora  # noqa: E402

import compiler.trainer as trainer  # noqa: E402
from microlora.core.config import TrainConfig  # noqa: E402
from microlora.core.targets import find_blocks  # noqa: E402


def compile_adapted_blocks() -> None:
    init = trainer.AtomTrainer.__init__

    def compiled_init(self, model, tokenizer, config=TrainConfig()):
        init(self, model, tokenizer, config)
        _, blocks = find_blocks(model)
        for i in range(self.prefix.first, len(blocks)):
            if getattr(blocks[i], "_compiled_call_impl", None) is None:
                blocks[i].compile(dynamic=True)

    trainer.AtomTrainer.__init__ = compiled_init
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    torch._functorch.config.donated_buffer = False
    for name in ("_teacher", "_candidate_vocab"):
        method = getattr(trainer.AtomTrainer, name)

        def eager(*args, _method=method, **kwargs):
            with torch.compiler.set_stance("force_eager"):
                return _method(*args, **kwargs)

        setattr(trainer.AtomTrainer, name, eager)


def main() -> None:
    mode, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    args = argparse.Namespace(quick=True, atoms=None, base_model=None, embedder=None,
                              device=None, base_dtype="auto")
    base, embedder, docs = models_and_corpus(args)
    if mode == "compile":
        compile_adapted_blocks()
    for rep in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            _, seconds, report = train_microlora(base, embedder, docs, TrainConfig(),
                                                 Path(tmp) / "s")
        print(mode, rep, f"{seconds:.1f} s", report.atom_steps,
              f"mean final loss {report.mean_final_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
