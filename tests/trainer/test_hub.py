"""Sharing on the Hub: the model card in every final output directory, the access check before training,
the upload at the run's end and by `sftlab push`, against a local server speaking the Hub's API
(tests/hub_server.py); the token never lands in a file or the output."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from hub_server import HubServer
from huggingface_hub import ModelCard

import sftlab
from sftlab.cli import main as cli_main
from sftlab.trainer.hub import HubError, check_access, upload_paths

TOKEN = "hf_sftlabTESTtoken7c1e9aa4b2"  # recognisable: grepped for in every file and in the output
REPO = "tester/tiny-sft"


def run_tree(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 256, "eval_fraction": 0.25},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 3,
            "max_steps": 2,
            "mixed_precision": "no",
            **train,
        },
        "checkpoint": {"every_steps": 1},
    }


@pytest.fixture()
def hub_env(monkeypatch, tmp_path):
    """A fake token and no token file; HF_ENDPOINT set by each test to its server."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    # hf_xet (installed with huggingface_hub) would send LFS files to a Xet CAS: use the LFS batch API
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def assert_token_nowhere(out: Path, *texts: str) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"the token is written in {leaked}"
    assert all(TOKEN not in t for t in texts), "the token was printed"


def test_push_to_hub_uploads_model_card_report_not_checkpoints(
    tiny_model_dir, chat_file, tmp_path, hub_env, monkeypatch, capfd
):
    out = tmp_path / "run"
    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = sftlab.train(
            run_tree(tiny_model_dir, chat_file, out, push_to_hub=True, hub_model_id=REPO, hub_private=True)
        )
    printed = capfd.readouterr()
    assert result.push_error is None and result.hub_url.startswith(f"{server.url}/{REPO}/commit/")
    assert server.create_payloads == [{"name": "tiny-sft", "organization": "tester", "visibility": "private"}]
    assert server.repos[REPO].private is True
    files = server.files(REPO)
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "report.md",
        "loss.png",
        "config.yaml",
        "run.json",
        "metrics.jsonl",
    ):
        assert name in files, f"{name} not uploaded; uploaded: {sorted(files)}"
    assert (out / "checkpoints").is_dir() and not [f for f in files if f.startswith("checkpoints/")]
    assert "FINISHED" not in files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()  # through the LFS batch API
    assert any(p.endswith(".git/info/lfs/objects/batch") for _, p, _, _ in server.requests)
    assert "chat_template" in files["tokenizer_config.json"].decode() or "chat_template.jinja" in files
    # the card: on the Hub with the repository's id, locally too (train.hub_model_id names it)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "sftlab" in card.data.tags and card.data.base_model is None  # a local base: named in the text only
    assert f'model_id = "{REPO}"' in card.text and "| learning rate | 0.003" in card.text
    assert ModelCard.load(out / "README.md").data.library_name == "transformers"
    assert len(server.repos[REPO].commits) == 1
    # the token went to the server, and nowhere else
    assert all(
        h.get("authorization") == f"Bearer {TOKEN}" for m, p, h, _ in server.requests if p.startswith("/api")
    )
    assert_token_nowhere(out, printed.out, printed.err)


def test_no_token_fails_before_training_and_leaves_output_untouched(
    tiny_model_dir, chat_file, tmp_path, hub_env, monkeypatch
):
    out = tmp_path / "previous"
    out.mkdir()
    before = {"FINISHED": "{}", "config.yaml": "train: {}\n", "model.safetensors": "weights"}
    for name, text in before.items():
        (out / name).write_text(text)
    monkeypatch.delenv("HF_TOKEN")
    tree = run_tree(tiny_model_dir, chat_file, out, push_to_hub=True, hub_model_id=REPO, overwrite=True)
    with pytest.raises(
        HubError,
        match=r"train.push_to_hub: no Hugging Face token .* set HF_TOKEN or run `hf auth "
        r"login`.*set train.push_to_hub=false .*`sftlab push RUN_DIR`",
    ):
        sftlab.train(tree)
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # overwrite never ran


def test_unreachable_endpoint_fails_before_training(
    tiny_model_dir, chat_file, tmp_path, hub_env, monkeypatch
):
    with HubServer(TOKEN) as server:
        closed = server.url
    monkeypatch.setenv("HF_ENDPOINT", closed)
    out = tmp_path / "run"
    with pytest.raises(HubError, match=f"cannot reach {closed}"):
        sftlab.train(run_tree(tiny_model_dir, chat_file, out, push_to_hub=True, hub_model_id=REPO))
    assert not out.exists()


@pytest.mark.parametrize("case", ["refused", "read-only", "offline"])
def test_access_check_names_the_fix(case, hub_env, monkeypatch):
    with HubServer(
        "another-token" if case == "refused" else TOKEN, role="read" if case == "read-only" else "write"
    ) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        if case == "offline":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = {
            "refused": "refused the token \\(401",
            "read-only": "the token of tester is read-only",
            "offline": "HF_HUB_OFFLINE is set",
        }[case]
        with pytest.raises(HubError, match=expected) as err:
            check_access(REPO)
        assert TOKEN not in str(err.value)
        assert check_access is not None and (case != "offline" or not server.requests)


def test_failed_push_keeps_the_run_exits_3_and_sftlab_push_retries(
    tiny_model_dir, chat_file, tmp_path, hub_env, monkeypatch, capfd
):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(run_tree(tiny_model_dir, chat_file, out, push_to_hub=True, hub_model_id=REPO))
    )
    with HubServer(TOKEN, fail_commits=True) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert cli_main(["train", str(cfg)]) == 3
        first = capfd.readouterr()
        assert "push failed" in first.out and f"sftlab push {out} --repo-id {REPO}" in first.out
        assert (
            (out / "FINISHED").is_file()
            and (out / "model.safetensors").is_file()
            and (out / "README.md").is_file()
        )
        assert server.files(REPO) == {}  # the repository was created, nothing committed
        server.fail_commits = False
        assert (
            cli_main(
                [
                    "push",
                    str(out),
                    "--repo-id",
                    "tester/retried",
                    "--private",
                    "--include-checkpoints",
                    "--revision",
                    "dev",
                ]
            )
            == 0
        )
    second = capfd.readouterr()
    files = server.files("tester/retried", "dev")  # the branch was created, main left as it was
    assert server.files("tester/retried") == {}
    assert "model.safetensors" in files and any(f.startswith("checkpoints/step-") for f in files)
    assert server.create_payloads[-1]["visibility"] == "private"
    assert 'model_id = "tester/retried"' in files["README.md"].decode()  # the card names where it is
    assert_token_nowhere(out, first.out, first.err, second.out, second.err)


def test_lora_run_cards_in_run_dir_and_merged(tiny_model_dir, chat_file, tmp_path):
    (tiny_model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    out = tmp_path / "lora"
    tree = run_tree(tiny_model_dir, chat_file, out)
    tree["peft"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "merge_on_save": True}
    result = sftlab.train(tree)
    adapter, merged = ModelCard.load(out / "README.md"), ModelCard.load(out / "merged" / "README.md")
    assert adapter.data.library_name == "peft" and merged.data.library_name == "transformers"
    assert adapter.data.license == merged.data.license == "apache-2.0"  # from the base model's own card
    assert "lora" in adapter.data.tags and adapter.data.pipeline_tag == "text-generation"
    assert "lora r=4 alpha=8.0" in adapter.text and "A LoRA adapter for" in adapter.text
    assert "merged into" in merged.text and f'model_id = "{out / "merged"}"' in merged.text
    assert f"| final training loss | {result.final_loss:.4f} |" in adapter.text
    eval_loss = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    assert f"| final validation loss | {eval_loss:.4f} |" in adapter.text
    assert "chat.jsonl" in adapter.text and "- train:" in adapter.text


def test_upload_selection_and_push_of_an_unfinished_run(tmp_path):
    run = tmp_path / "run"
    for rel in (
        "model.safetensors",
        "README.md",
        "FINISHED",
        ".hidden",
        "checkpoints/step-1/model.safetensors",
        "tensorboard/events",
        "merged/config.json",
        "merged/README.md",
    ):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    assert upload_paths(run) == ["README.md", "merged/README.md", "merged/config.json", "model.safetensors"]
    assert "checkpoints/step-1/model.safetensors" in upload_paths(run, checkpoints=True)
    (run / "FINISHED").unlink()
    assert (
        cli_main(["push", str(run), "--repo-id", REPO]) == 2
    )  # no FINISHED marker: refused before any request


def test_card_metadata_names_hub_base_and_hub_datasets(tmp_path):
    """A hub base model and hub dataset sources go into the metadata; local files only into the text."""
    from sftlab.trainer.card import card_text

    run = tmp_path / "run"
    run.mkdir()
    local = tmp_path / "mine.jsonl"
    local.write_text("{}\n")
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "bfloat16"},
                "data": {
                    "train": [{"path": "allenai/tulu-3-sft-mixture", "weight": 0.1}, {"path": str(local)}],
                    "max_seq_length": 2048,
                    "packing": "bfd",
                    "loss_on": "assistant",
                },
                "optim": {"lr": 2e-5, "scheduler": "cosine", "warmup_ratio": 0.03},
                "train": {"micro_batch_size": 4, "grad_accum_steps": 8, "max_steps": 100},
            }
        )
    )
    (run / "metrics.jsonl").write_text(json.dumps({"step": 100, "loss": 1.25}) + "\n")
    card = ModelCard(card_text(run))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["allenai/tulu-3-sft-mixture"] and card.data.library_name == "transformers"
    assert "| batch | 4 rows per micro-batch x 8 accumulation steps x 1 processes |" in card.text
    assert "| final training loss | 1.2500 |" in card.text
    assert "- train: `allenai/tulu-3-sft-mixture`, weight 0.1" in card.text
    assert "- train: `mine.jsonl`\n" in card.text  # a local data file is named by its file name only
