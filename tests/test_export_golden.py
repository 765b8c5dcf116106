"""saecache export of runs written by saecache 0.1.0, compared byte for byte with what 0.1.0 wrote.

tests/data/saecache-0.1.0/golden holds the README.md of

    saecache export runs/layer01-relu-x2-l1-0.0003 --format pt --out /tmp/exp-pt
    saecache export runs/layer00-topk-x2-k4 --format saelens --out /tmp/exp-sl

and the second one's blocks.0.hook_resid_post/cfg.json, run from tests/data/saecache-0.1.0.
Those cards were written before `saecache eval` added the runs' eval.json (the golden files
are two minutes older and show no "CE loss recovered" column), so the byte-for-byte tests
export copies without eval.json; a second test checks what eval.json adds. Since then the card's
"L1 coefficient" row also gives the coefficient as λ_Anthropic (docs/l1-units.md; for a 0.1.0
run d·l1), and its "Reproducing" command carries every setting that differs from the defaults
(0.1.0's left out --dead-window and --mix-chunks): those two lines changed, nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saecache.cli import cli

FIXTURE = Path(__file__).parent / "data" / "saecache-0.1.0"
GOLDEN = FIXTURE / "golden"
RELU, TOPK = "layer01-relu-x2-l1-0.0003", "layer00-topk-x2-k4"
EXPORTS = {  # format → (run, --out folder, golden README)
    "pt": (RELU, "exp-pt", "export-pt-README.md"),
    "saelens": (TOPK, "exp-sl", "export-saelens-README.md"),
}
METRICS = "## Held-out metrics"


def copy_runs(tmp_path: Path, with_eval: bool) -> Path:
    """The fixture's runs/ in ``tmp_path`` (without the eval.json files unless ``with_eval``)."""
    ignore = None if with_eval else shutil.ignore_patterns("eval.json")
    shutil.copytree(FIXTURE / "runs", tmp_path / "runs", ignore=ignore)
    return tmp_path


def export(folder: Path, fmt: str, monkeypatch) -> Path:
    """`saecache export runs/RUN --format FMT --out OUT`, run from ``folder``, as 0.1.0 was."""
    run, out, _ = EXPORTS[fmt]
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(cli, ["export", f"runs/{run}", "--format", fmt, "--out", out])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote 3 files to {out}\n"
    return folder / out


def golden_card(fmt: str) -> str:
    return (GOLDEN / EXPORTS[fmt][2]).read_text()


def sections(card: str) -> dict[str, str]:
    """The card's "## " sections by heading (the front matter and title under "")."""
    found, heading = {"": []}, ""
    for line in card.splitlines():
        if line.startswith("## "):
            heading = line
            found[heading] = []
        found[heading].append(line)
    return {key: "\n".join(lines) for key, lines in found.items()}


@pytest.mark.parametrize("fmt", ["pt", "saelens"])
def test_card_is_the_one_saecache_0_1_0_wrote(fmt, tmp_path, monkeypatch):
    """Section by section, but for Reproducing, whose commands now give every recorded option
    (0.1.0's left out the harvest's --chunk-rows, among others: issue 12)."""
    out = export(copy_runs(tmp_path, with_eval=False), fmt, monkeypatch)
    card, golden = sections((out / "README.md").read_text()), sections(golden_card(fmt))
    assert {k: v for k, v in card.items() if k != REPRODUCING} == \
        {k: v for k, v in golden.items() if k != REPRODUCING}
    commands, old = (_commands(c[REPRODUCING]) for c in (card, golden))
    for new_command, old_command in zip(commands, old, strict=True):
        assert new_command[:2] == old_command[:2]
        assert set(_pairs(old_command)) <= set(_pairs(new_command)), (old_command, new_command)
    assert "--chunk-rows 64" in " ".join(commands[0])  # 4 sequences of ctx 16 per chunk


REPRODUCING = "## Reproducing"


def _commands(section: str) -> list[list[str]]:
    block = section.split("```bash\n")[1].split("```")[0]
    return [line.split() for line in block.splitlines() if line.strip()]


def _pairs(command: list[str]) -> list[str]:
    """'--flag value' (or '--flag' alone) of a command, in any order."""
    return [f"{a} {b}" if not b.startswith("--") else a
            for a, b in zip(command, command[1:] + ["--"]) if a.startswith("--")]


def test_saelens_cfg_is_the_one_saecache_0_1_0_wrote(tmp_path, monkeypatch):
    out = export(copy_runs(tmp_path, with_eval=False), "saelens", monkeypatch)
    cfg = out / "blocks.0.hook_resid_post" / "cfg.json"
    assert cfg.read_bytes() == (GOLDEN / "saelens-cfg.json").read_bytes()


def test_files_are_the_snapshots_own(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    folder = copy_runs(tmp_path, with_eval=False)
    pt, saelens = export(folder, "pt", monkeypatch), export(folder, "saelens", monkeypatch)
    assert sorted(p.name for p in pt.iterdir()) == ["README.md", "sae_layer01_256.pt",
                                                    "sae_layer01_final.pt"]
    for name in ("sae_layer01_256.pt", "sae_layer01_final.pt"):
        assert (pt / name).read_bytes() == (FIXTURE / "runs" / RELU / name).read_bytes()
    weights = load_file(str(saelens / "blocks.0.hook_resid_post" / "sae_weights.safetensors"))
    state = torch.load(FIXTURE / "runs" / TOPK / "sae_layer00_final.pt", weights_only=True)
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    for key, tensor in weights.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, state[key].float(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pt", "saelens"])
def test_eval_json_adds_only_the_ce_loss_recovered_column(fmt, tmp_path, monkeypatch):
    out = export(copy_runs(tmp_path, with_eval=True), fmt, monkeypatch)
    card, golden = sections((out / "README.md").read_text()), sections(golden_card(fmt))
    assert {k: v for k, v in card.items() if k not in (METRICS, REPRODUCING)} == \
        {k: v for k, v in golden.items() if k not in (METRICS, REPRODUCING)}
    run = EXPORTS[fmt][0]
    results = json.loads((tmp_path / "runs" / run / "eval.json").read_text())["snapshots"]
    ce = results[f"sae_{run.split('-')[0]}_final.pt"]["ce_loss_recovered"]
    expected = golden[METRICS].replace("fired on them.", "fired on them; CE loss recovered "
                                       "from eval.json.")
    expected = expected.replace(" dead |\n", " dead | CE loss recovered |\n")
    expected = expected.replace("| --- |\n", "| --- | --- |\n", 1)
    expected = expected.replace("% |", f"% | {ce:.3f} |")
    assert card[METRICS] == expected
