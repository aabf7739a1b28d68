"""Training throughput: sftlab vs TRL 1.16 `SFTTrainer`, same model, same rows, same steps, in the same run.

Both sides fine-tune the embedded SmolLM2-135M-Instruct (the local safetensors directory that
`resolve_model_path(ModelConfig())` gives; or `--model`, below) on the benchmark's seeded multi-turn conversations
(benchmarks/make_conversations.py, a few hundred, written to a temporary `messages` JSONL), packed
with best-fit decreasing into rows of <= 1024 tokens, loss on the assistant turns only:

- case 1: micro-batch of 1 packed row (<= 1024 tokens per optimizer step);
- case 4: micro-batch of 4 packed rows (<= 4 x 1024 tokens per step, for memory);

gradient accumulation 1, lr 2e-5, N optimizer steps (default 8). Each side runs in its own fresh
process (`bench_train.py --worker trl|sftlab`): per case, every TRL configuration (below) then every
sftlab configuration, for `--repeats`; the table reports the median over repeats.

**What trains.** Full fine-tuning by default. `--adapter lora`: both sides train the same LoRA adapter,
r=16, alpha 32, dropout 0, on every linear layer but the head -- TRL through `peft_config=LoraConfig(r=16,
lora_alpha=32, target_modules="all-linear", lora_dropout=0)`, sftlab through its `peft` section with the
same values; the trainable parameter counts are printed and must be equal (else the bench exits 1), and a
TRL worker reports frozen parameters left with a gradient (none expected). `--adapter qlora`: the same on
an nf4 base (sftlab's own `BitsAndBytesConfig` for `peft.quantize: nf4`, given to TRL's model too); where
bitsandbytes' nf4 does not train on the device (a 4-bit layer's forward and backward are tried first) the
bench prints `qlora: skipped, <reason>` and exits 0. `--bf16-exact-weights`: both sides train a copy of
the model with every weight rounded to bf16 (stored float32); sftlab holds a frozen weight (a LoRA base) in
bf16 only where bf16 holds it exactly, so this measures the lever "frozen base in the compute dtype, no
fp32 copy" against the same run on the original weights (where its frozen base stays fp32 under autocast).

**The baseline is TRL's best on the machine it runs on.** TRL runs in several configurations, each
timed and checked on its own, and the fastest (tokens/s, per case) is the baseline of the ratio:

- `bf16`: bf16 autocast over float32 weights (`bf16=True`, TRL's default);
- `fp32`: float32 (`bf16=False`);
- `bf16-gc`, `fp32-gc`: the same with activation checkpointing (`activation_checkpointing=True`, as
  `gradient_checkpointing` is called in transformers 5; TRL's SFTConfig turns it on by default). It
  trades time for memory: the table shows both, so a slower but smaller TRL is visible too;
- `bf16-liger` (not in the default set; CUDA + liger-kernel): bf16 with `use_liger_kernel=True`;
- `bf16-compile`, `bf16-gc-compile` (not in the default set): bf16 (with activation checkpointing) and
  `torch_compile=True`, transformers' Trainer compiling the whole model. Its packed rows change length every
  step, so it recompiles on the next steps (dynamic shapes) and tokens/s over steps 2..N counts that; the
  per-step times printed show when it settles. Measured (LoRA, 1x1024, AMD EPYC with AVX512-BF16, 2 cores):
  steps of 187, 38, 263 s, then 7.1-7.7 s, its eager bf16 step (6.9-7.6 s): no steady gain on a CPU.

**Equal recompute.** sftlab runs in its own configurations, `--sftlab-configs off,on` by default: `off`
and `on` set `train.gradient_checkpointing` false and true, `auto` leaves sftlab's default (its log line,
shown, says what it chose, the activations it expects with and without recomputing, the memory free and
what its choice leaves); `off-compile` and `on-compile` also set `train.compile: true` (the others leave
`compile: auto`, which keeps a short run eager: the compile time would not pay back in a few steps; a long
run compiles where this machine measured a gain, so these two show what such a run trains at after its first
step; TRL's counterpart is `bf16-compile`). Per case the bench prints sftlab's fastest against TRL's fastest ("TRL's best"),
then at equal recompute: the fastest sftlab side that recomputes against TRL's fastest -gc configuration
and against its smallest (peak memory), and the same for the sides that do not recompute.

`--trl-configs bf16,fp32,bf16-gc,fp32-gc` is the default; `--quick` runs `bf16,fp32` only (and sftlab
`off`). Which
is fastest depends on the machine: bf16 autocast only pays on a CPU with bf16 matmul instructions
(AVX512-BF16 or AMX) or on a GPU; without them it is far slower than fp32 (2-core AVX2-only EPYC
under load, SmolLM2-135M, 1024-token steps: TRL bf16 2.7 tokens/s, ~400 s a step, fp32 20.1), so on
such a CPU the default leaves the bf16 configurations out and says so in the header (`--trl-configs`
naming them runs them). The header says which
the CPU has (from /proc/cpuinfo flags `avx512_bf16`, `amx_bf16`, `amx_tile`), with the torch,
transformers and TRL versions; on CUDA, the GPU.

- sftlab: `sftlab train cfg.yaml [train.gradient_checkpointing=...] [--sftlab-override ...]` as a
  subprocess of the worker, at its defaults except what the comparison needs (the data source, `data.packing: bfd`,
  `data.max_seq_length: 1024`, `data.loss_on`, `train.micro_batch_size`, `train.max_steps`,
  `optim.lr`, a temporary `train.output_dir`; checkpoints and match_eval are off by default;
  `data.cache: false` so every run masks the rows afresh). Tokens/s from its metrics.jsonl
  (`tokens_per_s * step_time_s` = the step's tokens).
  `sftlab train` runs as `python -m sftlab.cli train ...` with PYTHONPATH leading to the sftlab the
  bench imports: the first on sys.path, so an editable install of another checkout wins over a git
  worktree's `src` unless PYTHONPATH names it (`PYTHONPATH=<worktree>/src python <worktree>/benchmarks/...`
  to measure the worktree's code).
- TRL 1.16: `SFTConfig(bf16=<config>, activation_checkpointing=<config>, use_cpu=<not CUDA>,
  packing=True, packing_strategy="bfd", padding_free=True, max_length=1024, assistant_only_loss=True,
  dataloader_num_workers=0, logging_steps=1, no eval, no saving, report_to="none")`; the model is
  loaded in float32 with sdpa attention as sftlab loads it (`bf16=True` is autocast mixed precision
  over float32 weights).
  A `TrainerCallback` times every optimizer step, from the batch fetch (hooked in
  `get_batch_samples`) to `on_step_end`, the same span sftlab's `step_time_s` covers (collate,
  forward, backward, clip, optimizer and LR step; not logging); on CUDA it synchronizes at both ends.

tokens/s = tokens of steps 2..N / their summed step times (step 1 warms up allocators and kernels);
every side counts the real tokens of its packed rows (no padding). Peak RSS is each training
process's own `ru_maxrss`: the TRL worker reports `RUSAGE_SELF`, the sftlab worker `RUSAGE_CHILDREN`
after its one child (`sftlab train`) exits; each measurement is a fresh process. On CUDA the table
adds each side's peak `torch.cuda.max_memory_allocated()` (the sftlab child writes it at exit).

MFU: sftlab's own (metrics.jsonl `mfu`: model FLOPs -- attention included, the head at the target tokens
with the target-only head -- over the peak its matmul probe measured at start in its compute dtype on the
model's matmul shape; run.json `reasons.peak_flops` names it; the time-weighted mean of steps 2..N), and
beside it the achieved model GFLOP/s (`model_gflops_per_s`). The line "6N
ceiling at the run's probe" divides that peak (run.json `peak_flops`) by 6 x the model's matmul
parameters: the tokens/s no run can pass there (attention comes on top), and the table gives every
row as a share of it -- TRL's rows included, on the same scale.

**Fair comparison: the same rows in the same order, the same loss.**

- Masking. TRL's `assistant_only_loss=True` needs `{% generation %}` tags; SmolLM2's ChatML template
  has none and TRL 1.16 only patches templates it knows (SFTTrainer raises "The chat template is not
  training-compatible ... patching is not supported for this template"). So TRL gets SmolLM2's own
  template with each assistant message's `content + '<|im_end|>'` wrapped in
  `{% generation %}...{% endgeneration %}` (the newline after `<|im_end|>` outside): it renders
  byte-identical text (checked on every row in the TRL worker) and gives exactly sftlab's
  `loss_on: assistant` convention (assistant content plus the end-of-turn token that closes it).
  With `--loss-on all` TRL trains on every token (`assistant_only_loss=False`) and sftlab uses
  `data.loss_on: all`. TRL's padding-free collator also drops the label at every document start;
  sftlab never has a target there either (a document starts with `<|im_start|>`).
- Order. Both BFD packers give the same rows from these conversations, but sftlab shuffles them
  with `train.seed` and TRL with its own sampler, so first-step losses would be on different rows
  (row-to-row loss varies by ~5 %). The parent process therefore builds sftlab's packed rows and its
  micro-batch order with sftlab's own functions (`build_datasets`, `pack_examples`,
  `MicroBatchStream`, on the same config) and hands TRL its packed dataset reordered to that order,
  read sequentially (`train_sampling_strategy="sequential"`). Checked after the runs: both sides
  saw the same tokens and the same target tokens at every step, and the first-step losses
  (before any update) agree within 2 % (precision and kernels are what may differ);
  the bench exits 1 when they do not. All of this is checked for every TRL configuration, against the
  sftlab configuration with the same recompute setting (else the first).
- Schedule. Both sides: linear decay from the peak lr with no warmup (`optim.warmup_steps: 0`; sftlab's
  warmup runs no step at lr 0, transformers' runs its first warmup step at lr 0, so with warmup the two
  schedules differ by one step), AdamW, weight decay 0, max grad norm 1.0, seed 42.
- Geometry. Same rows per micro-batch. TRL's padding-free collator concatenates the micro-batch's
  rows into one (1, <= 4096) sequence with restarting position_ids (transformers then builds a
  block-diagonal mask over 4096 positions); sftlab passes (4, <= 1024) rows, each padded to the
  longest with restarting positions. Both keep documents from attending to each other.
- Precision: TRL in each of its configurations (above); sftlab at its own default precision (`auto`:
  bf16 autocast where the hardware has bf16 matmuls, else float32; the bench prints the `precision:`
  line of its log), or whatever `--sftlab-override` sets (e.g. `train.mixed_precision=bf16`).
  `--trl-fp32` (old spelling) is `--trl-configs fp32`.
- Model: `--model` takes a local HF model directory, `random-1b` (a Llama-3.2-1B-shaped model --
  hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192 -- randomly initialised on SmolLM2's config
  and tokenizer, ~1.07 B parameters, saved to the temporary directory) or a .json of config keys over
  SmolLM2's config. The chat template must stay SmolLM2's ChatML (the tagged-template trick above).
- Device: `--device auto` (CUDA when there is one) / `cpu` (CUDA hidden from both sides) / `cuda`.
  A TRL configuration that fails (e.g. `bf16-liger` without liger-kernel) is reported and left out;
  the bench then exits 1.

    python benchmarks/bench_train.py                       # cases 1 and 4, 8 steps, 1 repeat, 4 TRL configs
    python benchmarks/bench_train.py --quick               # case 1 only, 4 steps, TRL bf16 and fp32
    python benchmarks/bench_train.py --steps 4 --cases 1 --trl-configs fp32,fp32-gc
    python benchmarks/bench_train.py --device cuda --model random-1b --trl-configs bf16 --sftlab-override train.liger=true
    python benchmarks/bench_train.py --cases 4 --steps 4 --repeats 2 --json /tmp/train.json
    python benchmarks/bench_train.py --sftlab-override train.mixed_precision=bf16
    python benchmarks/bench_train.py --adapter lora --steps 6                 # LoRA, both recompute settings
    python benchmarks/bench_train.py --adapter lora --steps 3 --cases 1 --trl-configs bf16,bf16-gc
    python benchmarks/bench_train.py --adapter lora --cases 1 --trl-configs bf16,bf16-compile --sftlab-configs off,off-compile
    python benchmarks/bench_train.py --adapter lora --bf16-exact-weights --no-trl --sftlab-configs off
    python benchmarks/bench_train.py --adapter qlora --trl-configs bf16,bf16-gc   # where bitsandbytes runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CAPACITY = 1024
TRL_VERSION = "1.16.0"
LR = 2e-5
SEED = 42  # sftlab's default train.seed; TRL gets the same
LOSS_TOLERANCE = 0.02
# TRL's configurations: name -> (bf16 autocast, activation checkpointing, Liger kernels, torch.compile); the first
# four by default
TRL_CONFIGS = {
    "bf16": (True, False, False, False),
    "fp32": (False, False, False, False),
    "bf16-gc": (True, True, False, False),
    "fp32-gc": (False, True, False, False),
    "bf16-liger": (True, False, True, False),
    "bf16-compile": (True, False, False, True),
    "bf16-gc-compile": (True, True, False, True),
}
TRL_DEFAULT = "bf16,fp32,bf16-gc,fp32-gc"
TRL_QUICK = "bf16,fp32"
# sftlab's configurations: name -> (its train.gradient_checkpointing, its train.compile); None: sftlab's own
# default (`auto`)
SFTLAB_CONFIGS = {
    "off": (False, None),
    "on": (True, None),
    "auto": (None, None),
    "off-compile": (False, True),
    "on-compile": (True, True),
}
SFTLAB_DEFAULT = "off,on"
SFTLAB_QUICK = "off"
# --adapter lora|qlora, both sides: LoRA r=16, alpha 32, every linear layer but the head, no dropout
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}

# SmolLM2's ChatML message line, and the same text with the assistant's content + end-of-turn token
# inside {% generation %} tags (the trailing newline stays outside, as sftlab's masks leave it out).
CHATML_LINE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
CHATML_LINE_TAGGED = (
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
    "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}" + CHATML_LINE + "{% endif %}"
)

# `sftlab train` in the sftlab worker's child: the CLI as `python -m sftlab.cli` runs it (so the child imports
# the sftlab the bench imports: PYTHONPATH is passed down), and at exit the CUDA allocator's peak, if CUDA was used.
SFTLAB_CHILD = """
import atexit, json, os, runpy, sys
def _cuda_peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(os.environ["BENCH_CUDA_PEAK"], "w") as f:
            json.dump({"max_allocated": torch.cuda.max_memory_allocated()}, f)
atexit.register(_cuda_peak)
sys.argv = ["sftlab", *sys.argv[1:]]
runpy.run_module("sftlab.cli", run_name="__main__", alter_sys=True)
"""


def row_key(input_ids, doc_lengths) -> str:
    """A packed row's identity: its documents' token ids, order-free (the two packers may order them differently)."""
    docs, start = [], 0
    for n in doc_lengths:
        docs.append(hashlib.sha1(json.dumps(list(input_ids[start : start + n])).encode()).hexdigest())
        start += n
    return hashlib.sha1("".join(sorted(docs)).encode()).hexdigest()


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def throughput(steps: list[dict]) -> float:
    """Tokens of steps 2..N over their summed step times (all steps when there is only one)."""
    timed = steps[1:] or steps
    return sum(s["tokens"] for s in timed) / sum(s["time_s"] for s in timed)


class WorkerFailed(RuntimeError):
    pass


def frozen_with_grad(model) -> int:
    """Frozen parameters holding a gradient after training (weight gradients nobody needs): 0 expected."""
    return sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)


def run_gflops(steps: list[dict]) -> float | None:
    """sftlab's achieved model GFLOP/s over steps 2..N (metrics.jsonl `model_gflops_per_s`), time-weighted."""
    timed = [s for s in steps[1:] if s.get("gflops") is not None]
    if not timed:
        return None
    return sum(s["gflops"] * s["time_s"] for s in timed) / sum(s["time_s"] for s in timed)


def run_mfu(steps: list[dict]) -> float | None:
    """sftlab's MFU over steps 2..N (the peak is one number per run: FLOPs-weighted = time-weighted mean)."""
    timed = steps[1:] or steps
    if any(s.get("mfu") is None for s in timed):
        return None
    return sum(s["mfu"] * s["time_s"] for s in timed) / sum(s["time_s"] for s in timed)


# --- workers (each in its own process) -----------------------------------------------------------


def worker_trl(spec: dict) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    t_setup = time.perf_counter()
    path, mbs, steps = spec["model_path"], spec["micro_batch_size"], spec["steps"]
    cuda = spec["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(path)
    rows = datasets.load_dataset("json", data_files=spec["data"], split="train")
    assistant_only = spec["loss_on"] == "assistant"
    if assistant_only:
        template = tok.chat_template
        if CHATML_LINE not in template:
            raise SystemExit(
                "the tokenizer's chat template is not SmolLM2's ChatML: cannot add {% generation %} tags"
            )
        tagged = template.replace(CHATML_LINE, CHATML_LINE_TAGGED)
        for r in rows:  # the tagged template must render exactly the same text
            if tok.apply_chat_template(
                r["messages"], tokenize=False, chat_template=tagged
            ) != tok.apply_chat_template(r["messages"], tokenize=False):
                raise SystemExit("the tagged template renders differently from SmolLM2's own")
        tok.chat_template = tagged

    adapter = spec.get("adapter", "none")
    quantization = None
    if adapter == "qlora":  # sftlab's own BitsAndBytesConfig for peft.quantize: nf4 (model/adapters.py)
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", quantization_config=quantization
    )
    peft_config = None
    if adapter != "none":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            target_modules=LORA["target_modules"],
            lora_dropout=LORA["dropout"],
            task_type="CAUSAL_LM",
        )
    order = spec.get("order")  # packed-row keys, in the order sftlab consumes them
    args = SFTConfig(
        output_dir=spec["output_dir"],
        bf16=spec["trl_bf16"],
        use_cpu=not cuda,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        max_length=CAPACITY,
        assistant_only_loss=assistant_only,
        completion_only_loss=False,
        activation_checkpointing=spec["trl_gc"],
        use_liger_kernel=spec.get(
            "trl_liger", False
        ),  # CUDA + liger-kernel; TRL applies its layer kernels only
        torch_compile=spec.get("trl_compile", False),  # transformers' Trainer compiles the whole model
        per_device_train_batch_size=mbs,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=spec["warmup_steps"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        train_sampling_strategy="sequential" if order else "random",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timings: list[dict] = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()  # the step's queued kernels are part of it
            t = trainer._bench
            timings.append(
                {
                    "step": state.global_step,
                    "time_s": time.perf_counter() - t["t0"],
                    "tokens": t["tokens"],
                    "targets": t["targets"],
                }
            )

    class TimedSFTTrainer(SFTTrainer):
        """Stamps the start of each optimizer step at its batch fetch, and counts its tokens."""

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            sync()
            t0 = time.perf_counter()
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            self._bench = {
                "t0": t0,
                "tokens": sum(int(b["input_ids"].numel()) for b in batches),  # padding-free: no pads
                "targets": sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches),
            }
            return batches, n_items

    trainer = TimedSFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tok,
        callbacks=[StepTimer()],
        peft_config=peft_config,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    packed = trainer.train_dataset
    ordered = False
    if order:
        where: dict[str, list[int]] = {}
        for i, r in enumerate(packed):
            where.setdefault(row_key(r["input_ids"], r["seq_lengths"]), []).append(i)
        if all(k in where for k in order):
            trainer.train_dataset = packed.select([where[k][0] for k in order])
            ordered = True
        else:
            print(
                f"warning: {sum(k not in where for k in order)} of sftlab's packed rows are not among TRL's; "
                "TRL keeps its own shuffled order",
                file=sys.stderr,
            )
            trainer.args.train_sampling_strategy = "random"
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h and "step" in h}
    for t in timings:
        t["loss"] = logs.get(t["step"], {}).get("loss")
        t["grad_norm"] = logs.get(t["step"], {}).get("grad_norm")
    checkpointing = getattr(type(trainer.model), "is_activation_checkpointing", None)
    checkpointing = trainer.model.is_activation_checkpointing if checkpointing is not None else None
    return {
        "side": "trl",
        "version": trl.__version__,
        "steps": timings,
        "setup_s": setup_s,
        "packed_rows": len(packed),
        "same_order_as_sftlab": ordered,
        "bf16": spec["trl_bf16"],
        "activation_checkpointing": checkpointing,
        "trainable_params": trainable,
        "frozen_with_grad": frozen_with_grad(trainer.model),
        "device": str(trainer.args.device),
        "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def worker_sftlab(spec: dict) -> dict:
    out = Path(spec["output_dir"])
    cmd = [sys.executable, "-c", SFTLAB_CHILD, "train", spec["config"], *spec["overrides"]]
    shown = f"python -m sftlab.cli train {spec['config']} {' '.join(spec['overrides'])}".strip()
    log_path = out.parent / f"{out.name}.log"
    peak_file = out.parent / f"{out.name}.cuda-peak.json"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, BENCH_CUDA_PEAK=str(peak_file))
        ).returncode
    wall = time.perf_counter() - t0
    rss = peak_rss_mb(resource.RUSAGE_CHILDREN)  # this fresh worker's only child: sftlab train
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"sftlab train exited {rc}: {shown}\n{tail}")
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step_time_s" not in r:
            continue
        steps.append(
            {
                "step": r["step"],
                "time_s": r["step_time_s"],
                "loss": r["loss"],
                "grad_norm": r.get("grad_norm"),
                "tokens": round(r["tokens_per_s"] * r["step_time_s"]),
                "targets": r["target_tokens"],
                "mfu": r.get("mfu"),
                "gflops": r.get("model_gflops_per_s"),
            }
        )
    info = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    # what sftlab says about its precision, if it says anything (e.g. "precision: weights float32, compute bf16")
    log_lines = log_path.read_text(errors="replace").splitlines()
    notes = [ln.strip() for ln in log_lines if ln.startswith(("precision", "allocator"))]
    # its recompute decision with the reason (`auto`: the memory it expects and leaves), its adapter line
    recompute = next((ln.strip() for ln in log_lines if ln.startswith("gradient checkpointing:")), None)
    peft = next(
        (m for ln in log_lines if (m := re.search(r"([\d,]+) trainable parameters of ([\d,]+)", ln))), None
    )
    gpu = json.loads(peak_file.read_text())["max_allocated"] / 2**20 if peak_file.is_file() else None
    return {
        "side": "sftlab",
        "steps": steps,
        "wall_s": wall,
        "command": shown,
        "peak_rss_mb": rss,
        "peak_gpu_mb": gpu,
        "precision": notes,  # its precision and allocator lines
        "recompute": recompute,
        "trainable_params": int(peft.group(1).replace(",", "")) if peft else None,
        "peak_flops": info.get("peak_flops"),
        "mixed_precision": info.get("mixed_precision"),
        "compute_dtype": info.get("compute_dtype"),
        "device": info.get("device"),
    }


def worker_main(side: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = worker_trl(spec) if side == "trl" else worker_sftlab(spec)
    Path(out_path).write_text(json.dumps(result))


# --- parent ---------------------------------------------------------------------------------------


def write_sftlab_config(
    path: Path,
    data: Path,
    out: Path,
    mbs: int,
    steps: int,
    loss_on: str,
    model: str | None = None,
    adapter: str = "none",
) -> None:
    import yaml

    cfg = {
        "data": {
            "train": [{"path": str(data), "format": "messages"}],
            "max_seq_length": CAPACITY,
            "packing": "bfd",
            "loss_on": loss_on,
            "cache": False,
        },
        "optim": {"lr": LR, "warmup_steps": 0},  # the same schedule on both sides (see Schedule above)
        "train": {"output_dir": str(out), "micro_batch_size": mbs, "grad_accum_steps": 1, "max_steps": steps},
    }
    if model is not None:  # --model; else sftlab's default (the embedded SmolLM2-135M-Instruct)
        cfg = {"model": {"name_or_path": model}, **cfg}
    if adapter != "none":  # the adapter TRL gets as its peft_config (LORA)
        cfg["peft"] = {"method": "lora", **LORA, "quantize": "nf4" if adapter == "qlora" else None}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def sftlab_plan(config: Path, overrides: list[str], steps: int, model_path: str):
    """sftlab's packed rows and micro-batch order for this config, built with its own functions as
    `sftlab train` does: (row keys in consumption order, #packed rows, warmup steps, all batches full)."""
    from sftlab.config import load_config
    from sftlab.data.collate import MicroBatchStream
    from sftlab.data.dataset import build_datasets
    from sftlab.data.packing import pack_examples
    from sftlab.model.loading import load_tokenizer

    try:
        from sftlab.trainer.optim import warmup_steps
    except ImportError:  # the HF convention sftlab follows

        def warmup_steps(o, total):
            return (
                min(o.warmup_steps, total)
                if o.warmup_steps is not None
                else math.ceil(o.warmup_ratio * total)
            )

    cfg = load_config(config, overrides)
    tok = load_tokenizer(cfg.model, model_path)
    train, _, _ = build_datasets(cfg.data, tok, cfg.train.seed)
    units = pack_examples(train, cfg.data.packing, cfg.data.max_seq_length)
    stream = iter(MicroBatchStream(len(units), cfg.train.micro_batch_size, cfg.train.seed))
    batches = [next(stream) for _ in range(steps)]
    keys = [row_key(units[i].input_ids, units[i].doc_lengths) for b in batches for i in b]
    full = all(len(b) == cfg.train.micro_batch_size for b in batches)
    return keys, len(units), warmup_steps(cfg.optim, steps), full


def run_worker(side: str, spec: dict, work: Path, tag: str, device: str = "cpu") -> dict:
    import sftlab

    spec_path, out_path, log_path = (
        work / f"{tag}.spec.json",
        work / f"{tag}.result.json",
        work / f"{tag}.worker.log",
    )
    spec_path.write_text(json.dumps(spec))
    # the workers (and `sftlab train` under the sftlab worker) import the sftlab this process imports
    src = str(Path(sftlab.__file__).resolve().parents[1])
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on the CPU
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                side,
                "--spec",
                str(spec_path),
                "--out",
                str(out_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        ).returncode
    if rc != 0:
        print(log_path.read_text(errors="replace")[-4000:])
        raise WorkerFailed(f"{side} worker failed (exit {rc}); log: {log_path}")
    res = json.loads(out_path.read_text())
    res["worker_wall_s"] = time.perf_counter() - t0
    res["tokens_per_s"] = throughput(res["steps"])
    res["first_loss"] = res["steps"][0]["loss"]
    res["mfu"] = run_mfu(res["steps"])
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="sftlab vs TRL training throughput")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; --quick 4)")
    ap.add_argument(
        "--cases", default=None, help="micro-batch sizes in packed rows, e.g. 1,4 (default 1,4; --quick 1)"
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per side and case, alternating TRL configs, sftlab"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"case 1 only, 4 steps, TRL configs {TRL_QUICK} (unless given): a smoke run",
    )
    ap.add_argument(
        "--loss-on",
        choices=["assistant", "all"],
        default="assistant",
        help="assistant: sftlab data.loss_on=assistant, TRL assistant_only_loss with tagged template; "
        "all: every token on both sides",
    )
    ap.add_argument(
        "--sftlab-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `sftlab train` override (repeatable), e.g. model.dtype=bfloat16",
    )
    ap.add_argument(
        "--trl-configs",
        default=None,
        metavar="LIST",
        help=f"TRL configurations to run, comma-separated, of {','.join(TRL_CONFIGS)} (default: {TRL_DEFAULT}; "
        f"--quick: {TRL_QUICK}; on a CPU without bf16 matmul instructions the bf16 ones are left out "
        "unless named here; bf16-liger needs CUDA and liger-kernel); the fastest is the baseline",
    )
    ap.add_argument(
        "--trl-fp32", action="store_true", help="the same as --trl-configs fp32 (kept for old commands)"
    )
    ap.add_argument(
        "--sftlab-configs",
        default=None,
        metavar="LIST",
        help=f"sftlab configurations, comma-separated, of {','.join(SFTLAB_CONFIGS)}: its "
        "train.gradient_checkpointing off, on or auto (sftlab's default, which prints its choice), -compile "
        f"with train.compile: true (else compile: auto); default: {SFTLAB_DEFAULT}, next to TRL's configurations "
        f"without and with activation checkpointing; --quick: {SFTLAB_QUICK}",
    )
    ap.add_argument(
        "--adapter",
        choices=["none", "lora", "qlora"],
        default="none",
        help="none: full fine-tuning; lora: LoRA r=16, alpha 32, dropout 0 on every linear layer but the head, "
        "both sides (TRL's peft_config, sftlab's peft section); qlora: the same on an nf4 base (bitsandbytes; "
        "skipped, saying why, where it does not run)",
    )
    ap.add_argument(
        "--bf16-exact-weights",
        action="store_true",
        help="both sides train a copy of the model whose weights are rounded to bf16 (stored float32): sftlab "
        "then holds a frozen LoRA base in bf16 (it does so only where bf16 holds the weight exactly), the lever "
        "'frozen base in the compute dtype, no fp32 copy'",
    )
    ap.add_argument("--no-trl", action="store_true", help="run sftlab only")
    ap.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_PRESET",
        help="a local HF model directory, 'random-1b' (a Llama-3.2-1B-shaped random model on SmolLM2's "
        "tokenizer) or a .json of config keys over SmolLM2's config (random init); default: the "
        "embedded SmolLM2-135M-Instruct",
    )
    ap.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CUDA when there is a device, else CPU (cpu hides CUDA from both sides)",
    )
    ap.add_argument(
        "--conversations",
        type=int,
        default=None,
        help="rows of make_conversations.py (default: enough packed rows for every step, >= 300)",
    )
    ap.add_argument("--seed", type=int, default=0, help="make_conversations seed")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (configs, logs, metrics)"
    )
    ap.add_argument("--worker", choices=["trl", "sftlab"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    args.steps = args.steps or (4 if args.quick else 8)
    args.cases = [int(c) for c in (args.cases or ("1" if args.quick else "1,4")).split(",")]
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is the warm-up, excluded from tokens/s)")
    if args.trl_fp32 and args.trl_configs:
        ap.error("--trl-fp32 and --trl-configs: give one")
    args.explicit_trl = bool(args.trl_fp32 or args.trl_configs)
    names = "fp32" if args.trl_fp32 else args.trl_configs or (TRL_QUICK if args.quick else TRL_DEFAULT)
    args.trl_configs = [c.strip() for c in names.split(",") if c.strip()]
    unknown = [c for c in args.trl_configs if c not in TRL_CONFIGS]
    if unknown or not args.trl_configs:
        ap.error(f"--trl-configs: unknown {unknown}; choose from {','.join(TRL_CONFIGS)}")
    names = args.sftlab_configs or (SFTLAB_QUICK if args.quick else SFTLAB_DEFAULT)
    args.sftlab_configs = [c.strip() for c in names.split(",") if c.strip()]
    unknown = [c for c in args.sftlab_configs if c not in SFTLAB_CONFIGS]
    if unknown or not args.sftlab_configs:
        ap.error(f"--sftlab-configs: unknown {unknown}; choose from {','.join(SFTLAB_CONFIGS)}")
    return args


def bf16_exact_copy(path: str, out: Path) -> str:
    """A copy of the model at `path` with every floating tensor rounded to bf16, saved as float32 (so both
    sides load it as they load the original), with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


def qlora_unavailable(device: str) -> str | None:
    """Why bitsandbytes' nf4 cannot train here (None when it can): a 4-bit linear layer's forward and
    backward on `device`, as QLoRA runs them."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(8, 64, device=device, requires_grad=True)
        layer(x).float().sum().backward()
    except Exception as e:  # ImportError, or no nf4 kernels for this device
        return f"bitsandbytes nf4 does not run on {device} ({type(e).__name__}: {e})"
    return None


def sftlab_overrides(side: str, extra: list[str]) -> list[str]:
    """`sftlab train` overrides of a sftlab side: its train.gradient_checkpointing and train.compile (none where
    the side keeps sftlab's default, `auto`), then --sftlab-override (which wins where it sets the same key)."""
    checkpointing, compiled = SFTLAB_CONFIGS[side.split(":")[1]]
    keys = (("train.gradient_checkpointing", checkpointing), ("train.compile", compiled))
    return [f"{k}={str(v).lower()}" for k, v in keys if v is not None] + extra


def sftlab_label(config: str, overrides: list[str]) -> str:
    checkpointing, compiled = SFTLAB_CONFIGS[config]
    what = {False: "no recompute", True: "recompute", None: "recompute auto"}[checkpointing]
    return f"sftlab ({what}{', compiled' if compiled else ''}{''.join(' ' + o for o in overrides)})"


def trl_label(config: str, version: str | None) -> str:
    bf16, gc, liger, compiled = TRL_CONFIGS[config]
    return (
        f"TRL {version} {'bf16 autocast' if bf16 else 'fp32'}{', act. ckpt' if gc else ''}"
        f"{', Liger' if liger else ''}{', torch.compile' if compiled else ''}"
    )


def plan_data(args, work: Path, model_path: str, model_arg: str | None) -> tuple[Path, int, dict[int, dict]]:
    """The conversations file and sftlab's plan per case (more conversations until every step has full batches)."""
    from make_conversations import make_conversations

    data = work / "conversations.jsonl"
    # ~4.5 conversations per packed row: enough rows that no step crosses an epoch end
    n = args.conversations or max(300, math.ceil(args.steps * max(args.cases) * 4.5 * 1.25))
    plans: dict[int, dict] = {}
    for _ in range(4):
        with data.open("w", encoding="utf-8") as f:
            for row in make_conversations(n, args.seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for mbs in args.cases:
            cfg = work / f"sftlab-mb{mbs}.yaml"
            write_sftlab_config(
                cfg, data, work / "placeholder", mbs, args.steps, args.loss_on, model_arg, args.adapter
            )
            keys, n_rows, warmup, full = sftlab_plan(cfg, args.sftlab_override, args.steps, model_path)
            plans[mbs] = {"keys": keys, "rows": n_rows, "warmup": warmup, "full": full}
        if all(p["full"] for p in plans.values()) or args.conversations:
            break
        n *= 2
    return data, n, plans


def summarize(runs: list[dict]) -> dict:
    mfus = [r["mfu"] for r in runs if r.get("mfu") is not None]
    gpus = [r["peak_gpu_mb"] for r in runs if r.get("peak_gpu_mb") is not None]
    gflops = [g for r in runs if (g := run_gflops(r.get("steps") or [])) is not None]
    return {
        "gflops": statistics.median(gflops) if gflops else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_gpu_mb": statistics.median(gpus) if gpus else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "first_loss": runs[0]["first_loss"],
        "tokens_per_step": statistics.mean(st["tokens"] for st in runs[0]["steps"]),
    }


def print_table(results: dict, names: dict, ceiling: float | None, cuda: bool) -> dict:
    w = max(len(v) for v in names.values())
    print()
    print(
        f"{'side':{w}s} {'case':>11s} {'tokens/s':>9s} {'peak RSS MB':>12s}"
        + (f" {'peak GPU MB':>12s}" if cuda else "")
        + f" {'first-step loss':>16s} {'tokens/step':>12s} {'MFU':>6s} {'GFLOP/s':>8s} {'of 6N ceiling':>14s}"
    )
    summary: dict[tuple[str, int], dict] = {}
    for (side, mbs), runs in results.items():
        s = summary[(side, mbs)] = summarize(runs)
        gpu = (
            f" {s['peak_gpu_mb']:12.0f}"
            if cuda and s["peak_gpu_mb"] is not None
            else (f" {'-':>12s}" if cuda else "")
        )
        mfu = f"{s['mfu']:6.1%}" if s["mfu"] is not None else f"{'-':>6s}"
        mfu += f" {s['gflops']:8.1f}" if s.get("gflops") is not None else f" {'-':>8s}"
        of = f"{s['tokens_per_s'] / ceiling:14.1%}" if ceiling else f"{'-':>14s}"
        print(
            f"{names[side]:{w}s} {f'mb {mbs}x{CAPACITY}':>11s} {s['tokens_per_s']:9.1f} {s['peak_rss_mb']:12.0f}{gpu} "
            f"{s['first_loss']:16.4f} {s['tokens_per_step']:12.0f} {mfu} {of}"
        )
    return summary


def check_pair(tag: str, trl_runs: list[dict], sft_runs: list[dict], t: dict, s: dict) -> list[str]:
    """The fairness checks of one TRL configuration against sftlab: same data at every step, first-step losses."""
    failed = []
    rel = abs(s["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
    if rel > LOSS_TOLERANCE:
        failed.append(f"{tag}: first-step losses differ by {rel:.2%}")
    for tr, sl in zip(trl_runs, sft_runs):
        # sftlab's tokens come from tokens_per_s * step_time_s (rounded): equal within 0.1 %
        same_tok = len(tr["steps"]) == len(sl["steps"]) and all(
            abs(a["tokens"] - b["tokens"]) <= 1 + 1e-3 * a["tokens"] for a, b in zip(tr["steps"], sl["steps"])
        )
        same_tgt = [a["targets"] for a in tr["steps"]] == [b["targets"] for b in sl["steps"]]
        if not (tr.get("same_order_as_sftlab") and same_tok and same_tgt):
            failed.append(
                f"{tag}: the sides saw different data (same order {tr.get('same_order_as_sftlab')}, "
                f"tokens/step equal {same_tok}, target tokens/step equal {same_tgt})"
            )
    return failed


def recomputes(side: str, results: dict, mbs: int) -> bool:
    """Whether a side recomputes activations: TRL's -gc configurations; sftlab's `on`, or what `auto` chose."""
    name = side.split(":")[1]
    if side.startswith("trl:"):
        return TRL_CONFIGS[name][1]
    if SFTLAB_CONFIGS[name][0] is not None:
        return SFTLAB_CONFIGS[name][0]
    return (results[(side, mbs)][0].get("recompute") or "").startswith("gradient checkpointing: on")


def memory_key(rows: list[dict]) -> tuple[str, str]:
    """Peak GPU memory where every side has it (CUDA), else peak RSS."""
    return ("peak GPU", "peak_gpu_mb") if all(r["peak_gpu_mb"] for r in rows) else ("peak RSS", "peak_rss_mb")


def ratio_lines(mbs: int, trl: list[str], sft: list[str], results: dict, summary: dict, names: dict) -> None:
    """sftlab against TRL's best (fastest) configuration, then at equal recompute: each recompute setting's
    fastest sftlab against TRL's fastest and TRL's smallest configuration with the same setting."""
    row = lambda side: summary[(side, mbs)]  # noqa: E731
    mem, key = memory_key([row(x) for x in trl + sft])
    fastest = lambda sides: max(sides, key=lambda x: row(x)["tokens_per_s"])  # noqa: E731
    s, t = fastest(sft), fastest(trl)
    print(
        f"micro-batch {mbs}: {names[s]} / TRL's best here ({names[t]}): tokens/s "
        f"{row(s)['tokens_per_s'] / row(t)['tokens_per_s']:.2f}x, {mem} {row(s)[key] / row(t)[key]:.2f}x"
    )
    for on in (True, False):
        same_s = [x for x in sft if recomputes(x, results, mbs) == on]
        same_t = [x for x in trl if recomputes(x, results, mbs) == on]
        if not (same_s and same_t):
            continue
        s, t = fastest(same_s), fastest(same_t)
        small = min(same_t, key=lambda x: row(x)[key])
        print(
            f"  equal recompute ({'on' if on else 'off'}): {names[s]} / TRL's best ({t.split(':')[1]}): tokens/s "
            f"{row(s)['tokens_per_s'] / row(t)['tokens_per_s']:.2f}x, {mem} {row(s)[key] / row(t)[key]:.2f}x; "
            f"/ TRL's smallest ({small.split(':')[1]}): {mem} {row(s)[key] / row(small)[key]:.2f}x"
        )


def compare(
    cases: list[int], configs: list[str], sft_configs: list[str], results: dict, summary: dict, names: dict
) -> list[str]:
    """Per case: the ratios (`ratio_lines`), then every TRL configuration's checks against the sftlab side
    with the same recompute setting (else the first sftlab side), and the per-step losses."""
    failed: list[str] = []
    fmt = lambda xs, k: [None if x.get(k) is None else round(x[k], 4) for x in xs]  # noqa: E731
    for mbs in cases:
        trl = [f"trl:{c}" for c in configs if (f"trl:{c}", mbs) in summary]
        sft = [f"sftlab:{c}" for c in sft_configs if (f"sftlab:{c}", mbs) in summary]
        if not trl:
            continue
        ratio_lines(mbs, trl, sft, results, summary, names)
        for side in trl:
            partner = next(
                (x for x in sft if recomputes(x, results, mbs) == recomputes(side, results, mbs)), sft[0]
            )
            s, tc = summary[(partner, mbs)], summary[(side, mbs)]
            rel = abs(s["first_loss"] - tc["first_loss"]) / abs(tc["first_loss"])
            tr0, sl0 = results[(side, mbs)][0]["steps"], results[(partner, mbs)][0]["steps"]
            later = max(
                (abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(tr0[1:], sl0[1:])), default=0.0
            )
            print(
                f"  {partner.split(':')[1]:>4s} vs {side.split(':')[1]:8s} tokens/s "
                f"{s['tokens_per_s'] / tc['tokens_per_s']:.2f}x, first-step loss rel. diff {rel:.2%} "
                f"({'within' if rel <= LOSS_TOLERANCE else 'OVER'} {LOSS_TOLERANCE:.0%}), steps 2..N max "
                f"{later:.2%}; TRL losses {fmt(tr0, 'loss')}, grad norms {fmt(tr0, 'grad_norm')}"
            )
            failed += check_pair(
                f"micro-batch {mbs} {partner} vs TRL {side.split(':')[1]}",
                results[(side, mbs)],
                results[(partner, mbs)],
                tc,
                s,
            )
        for side in sft:
            sl0 = results[(side, mbs)][0]["steps"]
            print(f"  {side:20s} losses {fmt(sl0, 'loss')}, grad norms {fmt(sl0, 'grad_norm')}")
        print("  (steps 2..N follow the updates: precision and optimizer details show there)")
    return failed


def trainable_check(results: dict) -> list[str]:
    """With an adapter: every side trains the same number of parameters (printed); else nothing."""
    counts = {side: rs[0].get("trainable_params") for (side, _), rs in results.items()}
    if not any(v is not None and side.startswith("sftlab") for side, v in counts.items()):
        return []
    print(
        "trainable parameters: " + ", ".join(f"{side} {v:,}" for side, v in counts.items() if v is not None)
    )
    if len({v for v in counts.values()}) != 1:
        return [f"the sides train different numbers of parameters: {counts}"]
    grads = {
        side: rs[0].get("frozen_with_grad")
        for (side, _), rs in results.items()
        if rs[0].get("frozen_with_grad")
    }
    return [f"frozen parameters with a gradient after training: {grads}"] if grads else []


def ceiling_line(sft: dict | None, model_path: str) -> float | None:
    """tokens/s at sftlab's measured peak if every FLOP were the 6N matmuls (attention excluded): a ceiling."""
    if not sft or not sft.get("peak_flops"):
        return None
    from bench_env import matmul_params

    n = matmul_params(model_path)
    ceiling = sft["peak_flops"] / (6 * n)
    print(
        f"6N ceiling at the run's probe: {sft['peak_flops'] / 1e12:.2f} TFLOP/s (sftlab's matmul probe on "
        f"{sft.get('device')}, compute {sft.get('compute_dtype') or sft.get('mixed_precision')}) / (6 x {n / 1e6:.1f}M "
        f"matmul parameters) = {ceiling:,.0f} tokens/s; attention FLOPs come on top, so no run reaches it"
    )
    return ceiling


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec, args.out)
        return 0
    steps, cases = args.steps, args.cases

    import torch
    import transformers
    from bench_env import cpu_has_bf16, machine_lines, resolve_model

    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import resolve_model_path

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device")
        return 2
    if args.adapter == "qlora" and (reason := qlora_unavailable(device)):
        print(f"qlora: skipped, {reason}")
        return 0
    configs = [] if args.no_trl else args.trl_configs
    bf16_note = None
    if (
        device == "cpu"
        and not cpu_has_bf16()
        and not args.explicit_trl
        and any(TRL_CONFIGS[c][0] for c in configs)
    ):
        # measured on a 2-core AVX2-only EPYC under load: TRL bf16 autocast ~400 s per 1024-token step (2.7 tokens/s),
        # fp32 20.1 tokens/s; the default run would spend most of an hour on configurations that cannot be the best
        left = [c for c in configs if TRL_CONFIGS[c][0]]
        configs = [c for c in configs if not TRL_CONFIGS[c][0]]
        bf16_note = (
            f"left out {','.join(left)}: this CPU has no bf16 matmul instructions (AVX512-BF16/AMX), where "
            "bf16 autocast is several times slower than fp32 (name them in --trl-configs to run them anyway)"
        )
    trl_version = None
    if configs:
        try:
            import trl

            trl_version = trl.__version__
            if trl_version != TRL_VERSION:
                print(f"warning: TRL {trl_version} installed, the baseline is {TRL_VERSION}")
        except ImportError:
            print(
                f"TRL is not installed (pip install trl=={TRL_VERSION}, or `make bench`); timing sftlab only"
            )
            configs = []

    work = Path(tempfile.mkdtemp(prefix="sftlab-bench-train-"))
    results: dict[tuple[str, int], list[dict]] = {}
    failed_checks: list[str] = []
    try:
        model_path, model_desc = resolve_model(args.model, work, resolve_model_path(ModelConfig()))
        model_arg = model_path if args.model else None
        if args.bf16_exact_weights:
            model_path = model_arg = bf16_exact_copy(model_path, work / "model-bf16-exact")
            model_desc += ", weights rounded to bf16 (stored float32)"
        print(
            f"# sftlab training benchmark: {model_desc}, bfd-packed rows of {CAPACITY}, micro-batch {cases} rows, "
            f"{steps} steps, lr {LR}, loss on {args.loss_on}, {args.repeats} repeat(s), on {device}"
            + (
                f"; {args.adapter}: r={LORA['r']}, alpha {LORA['alpha']}, dropout {LORA['dropout']} on "
                f"{LORA['target_modules']}{', nf4 base' if args.adapter == 'qlora' else ''}, both sides"
                if args.adapter != "none"
                else "; full fine-tuning"
            )
        )
        print(
            f"# {platform.platform()}, python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl {trl_version}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        for line in machine_lines(device):
            print(f"# {line}")
        print(
            f"# TRL configurations: {', '.join(configs) or 'none'}; the fastest is the baseline"
            + (f"; {bf16_note}" if bf16_note else "")
        )
        print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        if args.sftlab_override:
            print(f"# sftlab overrides: {args.sftlab_override}")
        t0 = time.perf_counter()
        try:
            data, n, plans = plan_data(args, work, model_path, model_arg)
        except ValueError as e:  # sftlab's ConfigError: a bad --sftlab-override
            print(f"error: sftlab rejects this config: {e}")
            return 2
        print(
            f"data: {n} conversations (seed {args.seed}) -> {plans[cases[0]]['rows']} packed rows; "
            f"sftlab's order planned in {time.perf_counter() - t0:.1f}s (not timed)"
        )

        for rep in range(args.repeats):
            for mbs in cases:
                for side in [f"trl:{c}" for c in configs] + [f"sftlab:{c}" for c in args.sftlab_configs]:
                    tag = f"{side.replace(':', '-')}-mb{mbs}-r{rep}"
                    out = work / tag
                    if side.startswith("sftlab"):
                        cfg = work / f"{tag}.yaml"
                        write_sftlab_config(cfg, data, out, mbs, steps, args.loss_on, model_arg, args.adapter)
                        spec = {
                            "config": str(cfg),
                            "overrides": sftlab_overrides(side, args.sftlab_override),
                            "output_dir": str(out),
                        }
                    else:
                        plan = plans[mbs]
                        bf16, gc, liger, compiled = TRL_CONFIGS[side.split(":")[1]]
                        spec = {
                            "model_path": model_path,
                            "data": str(data),
                            "micro_batch_size": mbs,
                            "steps": steps,
                            "loss_on": args.loss_on,
                            "output_dir": str(out),
                            "warmup_steps": plan["warmup"],
                            "trl_bf16": bf16,
                            "trl_gc": gc,
                            "trl_liger": liger,
                            "trl_compile": compiled,
                            "adapter": args.adapter,
                            "device": device,
                            "order": plan["keys"] if plan["full"] else None,
                        }
                    try:
                        res = run_worker(side.split(":")[0], spec, work, tag, device)
                    except WorkerFailed as e:
                        if side.startswith("sftlab"):
                            raise SystemExit(str(e)) from None
                        # one TRL configuration that does not run here (e.g. bf16-liger) leaves the others
                        print(f"  repeat {rep + 1}: {side:11s} micro-batch {mbs}: FAILED ({e}); left out")
                        failed_checks.append(f"{side} micro-batch {mbs}: {e}")
                        continue
                    results.setdefault((side, mbs), []).append(res)
                    gpu = f", peak GPU {res['peak_gpu_mb']:6.0f} MB" if res.get("peak_gpu_mb") else ""
                    print(
                        f"  repeat {rep + 1}: {side:11s} micro-batch {mbs}: {res['tokens_per_s']:8.1f} tokens/s, "
                        f"peak RSS {res['peak_rss_mb']:6.0f} MB{gpu}, first-step loss {res['first_loss']:.4f}, "
                        f"step times {[round(s['time_s'], 2) for s in res['steps']]} "
                        f"(worker {res['worker_wall_s']:.0f}s)",
                        flush=True,
                    )
                    if side.startswith("sftlab") and rep == 0:
                        shown = [f"    {side} command: {res['command']}"] if mbs == cases[0] else []
                        if res.get("precision") and mbs == cases[0]:
                            shown += [f"    {side} {note}" for note in res["precision"]]
                        if res.get("recompute"):  # `auto`: its choice, the memory it expects and leaves
                            shown.append(f"    {side} {res['recompute']}")
                        print("\n".join(shown))

        names = {f"trl:{c}": trl_label(c, trl_version) for c in configs}
        for c in args.sftlab_configs:
            names[f"sftlab:{c}"] = sftlab_label(c, args.sftlab_override)
        first_sftlab = results[(f"sftlab:{args.sftlab_configs[0]}", cases[0])][0]
        print()
        ceiling = ceiling_line(first_sftlab, model_path)
        summary = print_table(results, names, ceiling, device == "cuda")
        if ceiling and any(v["tokens_per_s"] > ceiling for v in summary.values()):
            print(
                "note: a run passed the 6N ceiling: sftlab's start-up probe measured less than the machine gave "
                "later (other load during its 0.3 s probe), so its MFU and the ceiling understate the peak here"
            )
        failed_checks += trainable_check(results)
        failed_checks += compare(cases, configs, args.sftlab_configs, results, summary, names)
        if configs:
            print(
                "checks: "
                + (
                    "; ".join(failed_checks)
                    if failed_checks
                    else f"against every TRL configuration: same packed rows in the same order, equal tokens "
                    f"and target tokens at every step, first-step losses within {LOSS_TOLERANCE:.0%}"
                )
            )

        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "steps": steps,
                        "cases": cases,
                        "repeats": args.repeats,
                        "loss_on": args.loss_on,
                        "device": device,
                        "model": model_desc,
                        "sftlab_overrides": args.sftlab_override,
                        "sftlab_configs": args.sftlab_configs,
                        "adapter": args.adapter,
                        "trl_version": trl_version,
                        "trl_configs": configs,
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "cpus": os.cpu_count(),
                        "machine": machine_lines(device),
                        "six_n_ceiling_tokens_per_s": ceiling,
                        "summary": [
                            {"side": k[0], "micro_batch_size": k[1], **v} for k, v in summary.items()
                        ],
                        "runs": [
                            {**r, "side": k[0], "micro_batch_size": k[1]}
                            for k, rs in results.items()
                            for r in rs
                        ],
                        "failed_checks": failed_checks,
                    },
                    indent=2,
                )
            )
            print(f"wrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
