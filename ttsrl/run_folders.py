"""Which run a folder belongs to (standard library only: either environment runs it).

An experiment folder (``$exp_dir``: checkpoints, merged models, evaluations) belongs to one model
family and one training algorithm: stage 4 ranks every checkpoint it finds there, stages 5-6 export
the best one, and veRL resumes from the newest. A data folder (``$data_dir``) belongs to one model
family: its zero-shot rows carry prompt speech tokens of that family's tokenizer and its prompt
layout. run.sh's stages claim their folder before they write into it (``run.json`` there, written
once); a folder that belongs to another run stops the stage, naming both and the fix.

A folder made before ``run.json`` existed is recognised by what it holds: GRPO checkpoints
(``global_step_N/actor``) or DPO ones (``global_step_N/hf_model``, ``dpo/``), and the family a
converted model in it records (``ttsrl.model_family.family_of_hf_dir``).

    python -m ttsrl.run_folders claim experiment EXP_DIR --model-family cosyvoice2 --train-algorithm grpo
    python -m ttsrl.run_folders claim data DATA_DIR --model-family cosyvoice2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ttsrl.atomic_write import write_json
from ttsrl.model_family import UnknownFamilyError, family_of_hf_dir

OWNER_FILE = "run.json"
KINDS = ("experiment", "data")
HOW_TO_SET = {"experiment": "exp_dir (or exp_name)", "data": "data_dir"}


class FolderOwnerError(RuntimeError):
    """The folder holds another run's outputs."""


def _describe(owner: dict) -> str:
    parts = [f"model_family={owner['model_family']}"] if owner.get("model_family") else []
    if owner.get("train_algorithm"):
        parts.append(f"train_algorithm={owner['train_algorithm']}")
    return ", ".join(parts)


def recognised_owner(folder: Path, kind: str) -> dict | None:
    """What an experiment folder without run.json holds: {model_family?, train_algorithm} or None."""
    if kind != "experiment":
        return None
    steps = sorted(folder.glob("global_step_*"))
    algorithm = None
    if any((step / "actor").is_dir() for step in steps):
        algorithm = "grpo"
    elif (folder / "dpo").is_dir() or any((step / "hf_model").is_dir() for step in steps):
        algorithm = "dpo"
    if algorithm is None:
        return None
    owner = {"train_algorithm": algorithm, "model_family": None}
    for step in steps:
        for model in (step / "merged_hf_model", step / "hf_model", step / "actor" / "huggingface"):
            try:
                owner["model_family"] = family_of_hf_dir(model).name
                return owner
            except (UnknownFamilyError, OSError, ValueError):
                continue
    return owner


def owner_of(folder: Path, kind: str) -> dict | None:
    path = folder / OWNER_FILE
    if path.is_file():
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
            if owner.get("kind") != kind or "model_family" not in owner:
                raise ValueError(f"not a run.json of a {kind} folder")
        except ValueError as error:
            raise FolderOwnerError(f"{path} cannot be read ({error}): it records which run the folder belongs to; "
                                   "fix or delete it (only if the folder's outputs are that run's)") from None
        return owner
    return recognised_owner(folder, kind)


def claim(folder: str | Path, kind: str, model_family: str, train_algorithm: str | None = None) -> str:
    """Check that ``folder`` is free or this run's, then record it as this run's (once).
    Returns what was done; raises FolderOwnerError naming both runs and the way out."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    ours = {"kind": kind, "model_family": model_family}
    if kind == "experiment":
        if train_algorithm is None:
            raise ValueError("an experiment folder needs train_algorithm")
        ours["train_algorithm"] = train_algorithm
    found = owner_of(folder, kind)
    if found is not None:
        clashes = [key for key in ("model_family", "train_algorithm")
                   if key in ours and found.get(key) is not None and found[key] != ours[key]]
        if clashes:
            where = folder / OWNER_FILE if (folder / OWNER_FILE).is_file() else f"{folder} (its checkpoints)"
            raise FolderOwnerError(
                f"the {kind} folder {folder} holds the outputs of another run ({_describe(found)}, recorded in "
                f"{where}), and this run is {_describe(ours)}: set another {HOW_TO_SET[kind]} for this run "
                f"(configs/default.sh's default is one folder per family{' and algorithm' if kind == 'experiment' else ''}), "
                f"or move {folder} aside; nothing was written")
        if (folder / OWNER_FILE).is_file():
            return f"{folder} is this run's ({_describe(ours)})"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(str(folder / OWNER_FILE), ours)
    return f"{folder} recorded as this run's ({_describe(ours)}, {folder / OWNER_FILE})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttsrl.run_folders", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    claim_parser = sub.add_parser("claim", help="check the folder is free or this run's, then record it")
    claim_parser.add_argument("kind", choices=KINDS)
    claim_parser.add_argument("folder")
    claim_parser.add_argument("--model-family", required=True)
    claim_parser.add_argument("--train-algorithm", default=None)
    args = parser.parse_args(argv)
    try:
        print(claim(args.folder, args.kind, args.model_family, args.train_algorithm))
    except (FolderOwnerError, ValueError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
