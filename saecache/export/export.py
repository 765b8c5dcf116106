"""Export trained runs to share them: saecache snapshots or SAELens folders, with a model card.

    export_pt(runs, out)        out/sae_layer{LL}_{SNAP}.pt (every snapshot, copied) + README.md
    export_saelens(runs, out)   out/blocks.{L}.hook_resid_post/{cfg.json, sae_weights.safetensors}
                                (one SAELens folder per run, one snapshot) + README.md
    push(out, repo_id)          create the Hub model repo (exist_ok) and upload the folder

The entry point of the stage (the CLI imports these three). Where each part lives:

    runs.py        the runs read for export (RunFolder), and the checks that their files
                   do not collide
    pt.py          the pt export
    saelens.py     the SAELens export: cfg.json and safetensors
    layout.py      the names of an export's files
    folder.py      the staging folder swapped in for --out, and what counts as an export
    card.py        the model card (README.md); card_runs.py, its sections about the runs
    hub.py         the push

An export is written into a temporary sibling folder and renamed into place, so ``out`` holds
the previous export or the new one, never a mix. A non-empty ``out`` that is not a saecache
export is refused, never overwritten. The SAELens layout and fields, with their sources, are
in docs/export.md.
"""

from saecache.export.hub import push
from saecache.export.pt import export_pt
from saecache.export.saelens import export_saelens

__all__ = ["export_pt", "export_saelens", "push"]
