"""Convert CosyVoice2's or CosyVoice3's LLM (llm.pt + CosyVoice-BlankEN/) to a Hugging Face Qwen2ForCausalLM directory.

    python scripts/convert_cosyvoice2_to_hf.py --cosyvoice2-dir pretrained_models/CosyVoice2-0.5B \
        --output-dir pretrained_models/cosyvoice2_llm_hf [--dtype float32|bfloat16] [--force] [--measure] \
        [--model-family cosyvoice2|cosyvoice3]

--model-family names the family the llm.pt must be (default: detected from it); a file of the
other family is refused (exit code 2, the message names both), never converted as the wrong one.

Skips the work when the output directory already holds a finished conversion
(unless --force). Writes into a temporary directory next to the output and
renames it, so an interrupted run leaves nothing half-written. --measure also
compares the converted model with CosyVoice2's biased distribution on a few
sentences and stores the numbers in cosyvoice2_conversion.json. The layout and
what is not exact are described in docs/conversion.md; the code is ttsrl.policy.hf_conversion.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root holds ttsrl
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ttsrl.model_family import (FAMILIES, HF_FAMILY_KEY, UnknownFamilyError, WrongFamilyError, check_family,  # noqa: E402
                                family_of_hf_dir, get_family)
from ttsrl.policy.conversion_bias import measure_converted  # noqa: E402
from ttsrl.policy.hf_conversion import (DTYPES, LLM_PT, REPORT_FILE, ConversionError, check_output_dir,  # noqa: E402
                                        convert_cosyvoice2, is_complete, save_converted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cosyvoice2-dir", "--cosyvoice3-dir", dest="cosyvoice2_dir", required=True,
                        help="CosyVoice2-0.5B or Fun-CosyVoice3-0.5B directory (llm.pt, CosyVoice-BlankEN/)")
    parser.add_argument("--model-family", choices=sorted(FAMILIES), default=None,
                        help="the family the llm.pt must be (default: detect it from the file)")
    parser.add_argument("--output-dir", required=True, help="Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the saved weights (default float32: lossless)")
    parser.add_argument("--force", action="store_true", help="convert again even if the output is complete")
    parser.add_argument("--measure", action="store_true",
                        help="measure the dropped-bias and non-speech-token effects on a few sentences")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    if is_complete(output) and not args.force:
        if args.model_family is not None:
            try:  # a conversion of the other family is never taken for this one
                check_family(args.model_family, family_of_hf_dir(output), output)
            except WrongFamilyError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
        print(f"{output} already holds a converted model ({REPORT_FILE}); skipping (--force to redo)")
        return 0
    try:
        check_output_dir(output)
        converted = convert_cosyvoice2(args.cosyvoice2_dir, dtype=DTYPES[args.dtype], family=args.model_family)
        family = get_family(converted.report[HF_FAMILY_KEY])
        if args.measure and not family.llm_decoder_bias:
            raise ConversionError(f"--measure measures the dropped llm_decoder bias, and {family.name}'s "
                                  f"{family.upstream_llm_class} has none: its conversion is exact; drop --measure")
        if args.measure:
            converted.report["measured"] = measure_converted(converted, Path(args.cosyvoice2_dir) / LLM_PT,
                                                             DTYPES[args.dtype])
            print(json.dumps(converted.report["measured"], indent=2))
        save_converted(converted, output)
    except (ConversionError, UnknownFamilyError, WrongFamilyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output} ({family.name}, vocab {converted.report['vocab_size']}, <|s_0|> = id "
          f"{converted.report['speech_token_offset']}, dtype {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
