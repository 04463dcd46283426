"""Export a converted (e.g. GRPO-trained and merged) Hugging Face CosyVoice2 or CosyVoice3 LLM back to an llm.pt.

    python scripts/convert_hf_to_cosyvoice2.py --hf-dir exp/NAME/merged_hf_model --output exp/NAME/llm.pt \
        --reference-llm-pt pretrained_models/CosyVoice2-0.5B/llm.pt [--check] [--dtype float32] [--force] \
        [--model-family cosyvoice2|cosyvoice3]

The family is the one the model directory records (its conversion wrote it); --model-family
(default: that one) must agree with it and with the reference llm.pt, else exit code 2 with a
message naming both families.

The result loads with CosyVoice2's ``load_state_dict(..., strict=True)``: copy it
over (or point CosyVoice2 at) ``llm.pt`` of a CosyVoice2-0.5B directory.
--reference-llm-pt (the original llm.pt) fixes keys, shapes, dtype and the
embedding rows no token reaches; without it the layout recorded in the model's
config.json is used. --check converts the export back and compares every
tensor CosyVoice2 can hold with the Hugging Face checkpoint. Skips when the
output exists unless --force; writes atomically. The code is ttsrl.policy.llm_export.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root holds ttsrl
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttsrl.model_family import FAMILIES, UnknownFamilyError, WrongFamilyError, family_of_hf_dir  # noqa: E402
from ttsrl.policy.hf_conversion import DTYPES, ConversionError  # noqa: E402
from ttsrl.policy.llm_export import check_export, export_hf_dir, save_llm_state_dict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (converted by this recipe)")
    parser.add_argument("--output", required=True, help="llm.pt to write")
    parser.add_argument("--reference-llm-pt", help="the original CosyVoice2/CosyVoice3 llm.pt (recommended)")
    parser.add_argument("--model-family", choices=sorted(FAMILIES), default=None,
                        help="the family the model must be (default: the one its directory records)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to write (default: the reference's, "
                        "else float32)")
    parser.add_argument("--check", action="store_true", help="verify the round trip before writing")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.force:
        print(f"{output} exists; skipping (--force to overwrite)")
        return 0
    try:
        exported, hf_state, offset = export_hf_dir(args.hf_dir, args.reference_llm_pt,
                                                   DTYPES[args.dtype] if args.dtype else None, args.model_family)
        family = family_of_hf_dir(args.hf_dir)
        if args.check:
            problems = check_export(exported, hf_state, offset, family)
            if problems:
                raise ConversionError("round-trip check failed: " + "; ".join(problems))
            print(f"check passed: {len(hf_state)} tensors reproduced from the export")
    except (ConversionError, UnknownFamilyError, WrongFamilyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_llm_state_dict(exported, output)
    bias = ", llm_decoder.bias = 0" if family.llm_decoder_bias else ""
    print(f"wrote {output} ({family.name}, {len(exported)} tensors{bias})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
