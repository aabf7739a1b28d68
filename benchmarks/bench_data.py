"""Data-preparation throughput: sftlab vs TRL 1.16 `SFTTrainer`, on the same rows, in the same run.

What is timed, per implementation, from the same in-memory `datasets.Dataset` of multi-turn
conversations (benchmarks/make_conversations.py) to packed rows of <= 1024 tokens:

- sftlab: `build_datasets` (read rows, chat template, tokenize, assistant-only loss mask, length
  policy) with the cache off, then `pack_examples(..., "bfd", 1024)` -- what `sftlab train` does
  with `data.packing: bfd`.
- TRL: `SFTTrainer._prepare_dataset(dataset, tokenizer, args, packing=True, ...)`, the method
  `SFTTrainer.__init__` calls for the train set, on a trainer built once (with a tiny random model
  and a few rows) for its state; so model setup is excluded without subtracting anything. TRL runs
  with `packing=True, packing_strategy="bfd", max_length=1024` and full-sequence loss: its
  `assistant_only_loss=True` needs `{% generation %}` tags, which SmolLM2's template lacks (checked
  below: SFTTrainer raises ValueError). Before timing, the bench checks that this direct call gives
  exactly the dataset `SFTTrainer(...)` itself builds.

Both use the real SmolLM2-135M-Instruct tokenizer. The implementations alternate within every
repeat (the machine is shared and noisy); the table reports the best of the repeats, and every
individual time is printed too. Correctness is checked cheaply: sftlab has target tokens, fewer
than its tokens; every packed row is <= 1024 tokens; packing keeps every token; sftlab's and TRL's
tokenizations agree (same total tokens, and token-for-token on a sample).

A second section times packing alone on 50k document lengths: `pack_bfd`, `pack_examples` and
TRL's `pack_dataset(..., "bfd")`. A third (`--profile`) splits sftlab's per-conversation work into
rendering, tokenizing, masking and packing.

    python benchmarks/bench_data.py            # 50k rows, 2 repeats, num_proc 1
    python benchmarks/bench_data.py --quick    # 5k rows, a smoke run
    python benchmarks/bench_data.py --procs 1,2 --repeat 3 --profile
    python benchmarks/bench_data.py --rows 1000000 --procs 1,2   # + the scale case (scale_case.py)

With `--rows` above 100k the comparison with TRL runs on the first `--compare-rows` (50k) rows,
and the scale case (benchmarks/scale_case.py) prepares all `--rows` from JSONL files written
streaming, in two shapes (this benchmark's conversations, and make_chats.py's longer multi-turn rows
at max_seq_length 4096), with num_proc 1 and 2, measuring the main process's peak RSS and the
anonymous PSS of main + workers, then starts training on the result and on 1k rows, comparing RssAnon.

The timed sftlab path ends with token arrays on disk (memory-mapped) and a packing plan; packed rows
are laid out when their micro-batch is built, as in training (TRL's packed Dataset is complete).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
import torch  # noqa: E402
from make_conversations import make_conversations  # noqa: E402

from sftlab.config.schema import DataConfig, ModelConfig  # noqa: E402
from sftlab.data import rendering, tokenize  # noqa: E402
from sftlab.data.dataset import DatasetSource, build_datasets  # noqa: E402
from sftlab.data.packing import pack_bfd, pack_examples, packing_efficiency  # noqa: E402
from sftlab.data.types import IGNORE_INDEX, TokenizedExample  # noqa: E402
from sftlab.model.loading import load_tokenizer  # noqa: E402

CAPACITY = 1024
TRL_VERSION = "1.16.0"


@dataclass
class Run:
    impl: str
    procs: int
    rows: int
    times: list[float] = field(default_factory=list)
    examples: int = 0  # documents packed (after any length policy)
    tokens: int = 0  # tokens in the packed rows
    targets: int = 0  # labels != -100 in the packed rows
    packed_rows: int = 0
    efficiency: float = 0.0
    doc_lengths: list[int] = field(default_factory=list, repr=False)

    @property
    def best(self) -> float:
        return min(self.times)


# --- sftlab -------------------------------------------------------------------------------------


def sftlab_prepare(ds: datasets.Dataset, tok, procs: int):
    cfg = DataConfig(
        max_seq_length=CAPACITY,
        on_overlength="drop",
        loss_on="assistant",
        packing="bfd",
        num_proc=procs,
        cache=False,
        eval_fraction=0.0,
    )
    train, _, report = build_datasets(cfg, tok, seed=0, train_sources=[DatasetSource(ds, name="bench")])
    return train, pack_examples(train, "bfd", CAPACITY), report


def check_sftlab(run: Run, train, rows, report) -> None:
    assert run.targets > 0, "sftlab produced no target tokens"
    assert run.targets < run.tokens, "assistant-only loss should leave prompt tokens unmasked... masked"
    assert all(len(r) <= CAPACITY for r in rows), "a packed row exceeds the capacity"
    assert sum(len(r) for r in rows) == train.num_tokens, "packing lost or added tokens"
    assert sum(len(r.doc_lengths) for r in rows) == len(train), "packing lost or duplicated documents"
    assert report.bad == 0, f"sftlab skipped bad rows: {report.summary()}"


def time_sftlab(ds, tok, procs: int, run: Run) -> None:
    t0 = time.perf_counter()
    train, rows, report = sftlab_prepare(ds, tok, procs)
    run.times.append(time.perf_counter() - t0)
    run.examples = len(train)
    run.tokens = sum(len(r) for r in rows)
    run.targets = sum(1 for r in rows for x in r.labels if x != IGNORE_INDEX)  # builds every row (not timed)
    run.packed_rows = len(rows)
    run.efficiency = packing_efficiency(rows, CAPACITY)
    run.doc_lengths = train.lengths.tolist()
    check_sftlab(run, train, rows, report)


# --- TRL ----------------------------------------------------------------------------------------


def tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CAPACITY,
    )
    return LlamaForCausalLM(cfg)


def trl_args(outdir: str, procs: int, **kw):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=outdir,
        report_to="none",
        max_length=CAPACITY,
        packing=True,
        packing_strategy="bfd",
        dataset_num_proc=procs if procs > 1 else None,
        use_cpu=True,
        **kw,
    )


def check_trl_assistant_only_loss(tok, small: datasets.Dataset, outdir: str) -> str:
    """Whether TRL accepts assistant_only_loss=True with SmolLM2's template (no {% generation %} tags)."""
    from trl import SFTTrainer

    try:
        SFTTrainer(
            model=tiny_model(len(tok)),
            args=trl_args(outdir, 1, assistant_only_loss=True),
            train_dataset=small,
            processing_class=copy.deepcopy(tok),
        )
    except ValueError as e:
        return f"ValueError: {str(e).splitlines()[0][:160]}"
    return "accepted (no error)"


def make_trl_trainer(tok, small: datasets.Dataset, outdir: str):
    from trl import SFTTrainer

    return SFTTrainer(
        model=tiny_model(len(tok)), args=trl_args(outdir, 1), train_dataset=small, processing_class=tok
    )


def trl_prepare(trainer, ds: datasets.Dataset, procs: int) -> datasets.Dataset:
    args = copy.copy(trainer.args)
    args.dataset_num_proc = procs if procs > 1 else None
    return trainer._prepare_dataset(ds, trainer.processing_class, args, True, None, "train")


def time_trl(trainer, ds, procs: int, run: Run) -> None:
    t0 = time.perf_counter()
    out = trl_prepare(trainer, ds, procs)
    run.times.append(time.perf_counter() - t0)
    lengths = out["seq_lengths"]
    run.examples = sum(len(x) for x in lengths)
    run.tokens = sum(sum(x) for x in lengths)
    run.packed_rows = len(out)
    run.targets = sum(1 for labels in out["labels"] for x in labels if x != IGNORE_INDEX)
    run.efficiency = run.tokens / (run.packed_rows * CAPACITY)
    assert max(len(x) for x in out["input_ids"]) <= CAPACITY


def check_trl_path(trainer, small: datasets.Dataset) -> None:
    """The timed direct call builds exactly what SFTTrainer.__init__ built for its train set."""
    again = trl_prepare(trainer, small, 1)
    built = trainer.train_dataset
    assert again.column_names == built.column_names, (again.column_names, built.column_names)
    assert again.to_dict() == built.to_dict(), (
        "SFTTrainer._prepare_dataset differs from the trainer's own dataset"
    )


def check_same_tokens(tok, ds: datasets.Dataset, k: int = 64) -> None:
    """sftlab's input_ids equal TRL's (apply_chat_template) token for token on the first k rows."""
    cfg = DataConfig(max_seq_length=10**6, loss_on="assistant", cache=False, eval_fraction=0.0)
    sample = ds.select(range(min(k, len(ds))))
    train, _, _ = build_datasets(cfg, tok, seed=0, train_sources=[DatasetSource(sample, name="sample")])
    for i, (ex, row) in enumerate(zip(train, sample)):
        ref = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert ex.input_ids == list(ref), f"row {i}: sftlab and apply_chat_template tokenize differently"


# --- packing alone ------------------------------------------------------------------------------


def bench_packing(doc_lengths: list[int], n: int, repeat: int, trl_ok: bool) -> list[tuple[str, float]]:
    rng = random.Random(1)
    lengths = doc_lengths[:n] if len(doc_lengths) >= n else [rng.choice(doc_lengths) for _ in range(n)]
    examples = [TokenizedExample([1] * m, [1] * m) for m in lengths]
    out = []
    best = min(_timed(lambda: pack_bfd(lengths, CAPACITY)) for _ in range(repeat))
    out.append(("sftlab pack_bfd (lengths -> bins)", best))
    best = min(_timed(lambda: pack_examples(examples, "bfd", CAPACITY)) for _ in range(repeat))
    out.append(("sftlab pack_examples bfd (-> PackedRows)", best))
    if trl_ok:
        from trl.data_utils import pack_dataset

        ds = datasets.Dataset.from_dict(
            {"input_ids": [ex.input_ids for ex in examples], "labels": [ex.labels for ex in examples]}
        )
        best = min(_timed(lambda: pack_dataset(ds, CAPACITY, "bfd")) for _ in range(repeat))
        out.append(("TRL pack_dataset bfd (Dataset -> Dataset)", best))
    bins = pack_bfd(lengths, CAPACITY)
    assert all(sum(lengths[i] for i in b) <= CAPACITY for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- where sftlab's time goes -------------------------------------------------------------------


def profile_sftlab(tok, ds: datasets.Dataset, n: int) -> list[tuple[str, float]]:
    """Per-stage seconds of sftlab's per-conversation work on the first n rows, plus TRL's floor.

    Stages use the public pieces of rendering.py (render, assistant_spans) and tokenize.py (labels_from_spans) and the
    tokenizer the way `tokenize_conversations` calls it; the last lines time the real entry points.
    """
    sample = ds.select(range(min(n, len(ds))))
    convs = [row["messages"] for row in sample]
    template = tok.chat_template
    stages: list[tuple[str, float]] = []

    def stage(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        stages.append((name, time.perf_counter() - t0))
        return out

    stage(
        "render the full conversation once (rendering.render)",
        lambda: [rendering.render(template, m) for m in convs],
    )
    rendered = stage(
        "assistant_spans (render + locate every assistant turn)",
        lambda: [rendering.assistant_spans(template, m) for m in convs],
    )
    texts = [t for t, _ in rendered]
    stage(
        "tokenize, one call per text, with offsets",
        lambda: [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts],
    )
    enc = stage(
        "tokenize, one batched call (offsets from .encodings)",
        lambda: tok(texts, add_special_tokens=False, return_attention_mask=False),
    )
    stage(
        "  of which the Rust encode alone (Tokenizer.encode_batch_fast)",
        lambda: tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False),
    )

    def mask():
        out = []
        for j, (_, spans) in enumerate(rendered):
            ids = enc["input_ids"][j]
            m = tokenize.labels_from_spans(enc.encodings[j].offsets, spans)
            out.append(TokenizedExample(ids, [i if k else IGNORE_INDEX for i, k in zip(ids, m)]))
        return out

    examples = stage("masks: labels_from_spans + label lists", mask)
    stage("pack_examples bfd", lambda: pack_examples(examples, "bfd", CAPACITY))
    batched = getattr(tokenize, "tokenize_conversations", None)
    if batched is not None:
        stage(
            "= tokenize.tokenize_conversations (render+spans+tokenize+mask)",
            lambda: batched(tok, convs, "assistant"),
        )
    else:
        stage(
            "= tokenize.tokenize_conversation loop",
            lambda: [tokenize.tokenize_conversation(tok, m) for m in convs],
        )
    stage("= whole sftlab path (build_datasets + pack_examples)", lambda: sftlab_prepare(sample, tok, 1))
    stage(
        "TRL's per-row work: apply_chat_template(tokenize=True) loop",
        lambda: [tok.apply_chat_template(m, tokenize=True, return_dict=True) for m in convs],
    )
    return stages


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sftlab vs TRL data-preparation throughput")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument(
        "--compare-rows",
        type=int,
        default=50_000,
        help="rows of the TRL comparison when --rows is larger (then the scale case runs on --rows)",
    )
    ap.add_argument(
        "--scale-dir", default=None, help="work directory of the scale case (default: a temp dir)"
    )
    ap.add_argument("--quick", action="store_true", help="5000 rows, 1 repeat: a smoke run")
    ap.add_argument(
        "--repeat", type=int, default=None, help="timed repeats per implementation (default 2; quick 1)"
    )
    ap.add_argument("--procs", default="1", help="comma-separated worker counts, e.g. 1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-trl", action="store_true", help="time sftlab only")
    ap.add_argument("--profile", action="store_true", help="also split sftlab's time into stages")
    ap.add_argument("--profile-rows", type=int, default=5000)
    ap.add_argument("--pack-lengths", type=int, default=50_000)
    args = ap.parse_args(argv)
    n = 5000 if args.quick and args.rows == 50_000 else args.rows
    scale_rows = n if n > 100_000 else 0
    n = min(n, args.compare_rows) if scale_rows else n
    repeat = args.repeat or (1 if args.quick else 2)
    procs = [int(p) for p in args.procs.split(",")]

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    datasets.disable_progress_bar()
    datasets.disable_caching()

    trl_ok = not args.no_trl
    if trl_ok:
        try:
            import trl

            if trl.__version__ != TRL_VERSION:
                print(f"warning: TRL {trl.__version__} installed, the baseline is {TRL_VERSION}")
        except ImportError:
            print(
                f"TRL is not installed (pip install trl=={TRL_VERSION}, or `make bench`); timing sftlab only"
            )
            trl_ok = False

    print(
        f"# sftlab data-prep benchmark: {n} conversations (seed {args.seed}), pack to {CAPACITY}, "
        f"{repeat} repeat(s), procs {procs}"
    )
    print(
        f"# {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, "
        f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}, batched tokenize_conversations: {hasattr(tokenize, 'tokenize_conversations')}"
    )
    t0 = time.perf_counter()
    tok = load_tokenizer(ModelConfig())
    tok_trl = load_tokenizer(ModelConfig()) if trl_ok else None
    rows = make_conversations(n, args.seed)
    ds = datasets.Dataset.from_list(rows)
    print(f"setup (tokenizer, generate rows, Dataset.from_list; not timed): {time.perf_counter() - t0:.1f}s")

    check_same_tokens(tok, ds)
    trainer = None
    with tempfile.TemporaryDirectory() as outdir:
        if trl_ok:
            small = ds.select(range(min(64, n)))
            print(
                f"TRL assistant_only_loss=True on SmolLM2's template: "
                f"{check_trl_assistant_only_loss(tok_trl, small, outdir)}"
            )
            trainer = make_trl_trainer(tok_trl, small, outdir)
            check_trl_path(trainer, small)
            print(
                "checks: TRL's timed _prepare_dataset call == SFTTrainer's own train_dataset; "
                "sftlab's input_ids == apply_chat_template's on 64 rows"
            )

        runs: dict[tuple[str, int], Run] = {}
        for rep in range(repeat):
            for p in procs:
                order = ["sftlab", "trl"] if rep % 2 == 0 else ["trl", "sftlab"]
                for impl in order:
                    if impl == "trl" and not trl_ok:
                        continue
                    run = runs.setdefault((impl, p), Run(impl, p, n))
                    if impl == "sftlab":
                        time_sftlab(ds, tok, p, run)
                    else:
                        time_trl(trainer, ds, p, run)
                    print(f"  repeat {rep + 1}: {impl:6s} num_proc={p}: {run.times[-1]:7.2f}s")

    print()
    print(
        f"{'impl':24s} {'proc':>4s} {'rows':>7s} {'seconds':>8s} {'examples/s':>11s} {'tokens/s':>10s} "
        f"{'packed':>7s} {'effic.':>7s} {'targets':>10s}"
    )
    for (impl, p), r in runs.items():
        name = "sftlab (assistant loss)" if impl == "sftlab" else "TRL 1.16 (full loss)"
        print(
            f"{name:24s} {p:4d} {r.rows:7d} {r.best:8.2f} {r.rows / r.best:11.0f} {r.tokens / r.best:10.0f} "
            f"{r.packed_rows:7d} {r.efficiency:7.1%} {r.targets:10d}"
        )
    for p in procs:
        if ("trl", p) in runs:
            s, t = runs[("sftlab", p)], runs[("trl", p)]
            print(
                f"ratio sftlab/TRL examples/s, num_proc={p}: {t.best / s.best:.2f}x "
                f"(median of repeats: {statistics.median(t.times) / statistics.median(s.times):.2f}x)"
            )
            if s.tokens != t.tokens:
                print(
                    f"  note: token totals differ: sftlab {s.tokens} (dropped {n - s.examples} rows over "
                    f"{CAPACITY}), TRL {t.tokens} (truncates)"
                )
    s1 = runs[("sftlab", procs[0])]
    print(
        f"checks passed: sftlab {s1.targets} target tokens of {s1.tokens}; every packed row <= {CAPACITY}; "
        f"packing kept every token and document"
    )

    lengths = s1.doc_lengths
    print(
        f"\n## packing alone: {args.pack_lengths} document lengths (mean {statistics.mean(lengths):.0f} tokens; {'the real ones' if len(lengths) >= args.pack_lengths else 'resampled from the real ones'}), "
        f"capacity {CAPACITY}, best of {max(repeat, 3)}"
    )
    for name, sec in bench_packing(lengths, args.pack_lengths, max(repeat, 3), trl_ok):
        print(f"{name:44s} {sec:7.3f}s  {args.pack_lengths / sec:12.0f} docs/s")

    if args.profile:
        m = min(args.profile_rows, n)
        print(f"\n## where sftlab's time goes: {m} rows, 1 process")
        for name, sec in profile_sftlab(tok, ds, m):
            print(f"{name:66s} {sec:7.2f}s  {m / sec:9.0f} rows/s")

    if scale_rows:
        from scale_case import run_scale_case

        del ds, rows, runs
        if args.scale_dir:
            run_scale_case(scale_rows, args.seed, Path(args.scale_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="sftlab-scale-") as work:
                run_scale_case(scale_rows, args.seed, Path(work))


if __name__ == "__main__":
    main()
