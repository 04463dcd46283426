"""Write a tiny, randomly initialised CosyVoice2-0.5B-shaped model directory.

Real CosyVoice2 weights cannot be downloaded on CI machines, so tests and CPU smoke runs of
the recipe use this stand-in (``ttsrl.tiny_models``; the layouts are described there):

    python scripts/make_tiny_cosyvoice2.py --output-dir /tmp/tiny_cosyvoice2 --seed 0

writes the LLM side only (``llm.pt`` + ``CosyVoice-BlankEN/``, ``ttsrl.tiny_models.llm``;
torch and tokenizers, about two seconds). ``--model-family cosyvoice3`` writes the LLM side of a
Fun-CosyVoice3-0.5B-shaped directory instead (``write_tiny_cosyvoice3``).

``--full`` (server environment, CosyVoice source importable or given with
``--cosyvoice-src``) writes a complete CosyVoice2-0.5B-layout directory instead, built
from the real CosyVoice classes: what ``CosyVoice2(model_dir)`` loads and the reward
server's real engines run (``ttsrl.tiny_models.cosyvoice2``; with ``--model-family cosyvoice3``
a complete Fun-CosyVoice3-0.5B-layout directory, ``ttsrl.tiny_models.cosyvoice3_audio``).
``--sensevoice-dir`` and ``--paraformer-dir`` also write tiny SenseVoiceSmall and Paraformer
directories in FunASR's layout, ``--whisper-file`` a tiny Whisper in large-v3.pt's format
(``ttsrl.tiny_models.asr``). Nothing is downloaded.

    python scripts/make_tiny_cosyvoice2.py --full --output-dir exp/tiny/CosyVoice2-0.5B \
        --cosyvoice-src CosyVoice --sensevoice-dir exp/tiny/SenseVoiceSmall \
        --paraformer-dir exp/tiny/paraformer-zh
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root holds ttsrl
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The server-side builders import their libraries (CosyVoice, onnx, funasr) only when called.
from ttsrl.tiny_models.asr import write_tiny_paraformer, write_tiny_sensevoice, write_tiny_whisper  # noqa: E402
from ttsrl.tiny_models.cosyvoice2 import TOKEN2WAV_SIZES, write_full_cosyvoice2  # noqa: E402
from ttsrl.tiny_models.cosyvoice3_audio import write_full_cosyvoice3  # noqa: E402
from ttsrl.model_family import COSYVOICE2, COSYVOICE3, FAMILIES  # noqa: E402
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2, write_tiny_cosyvoice3  # noqa: E402


def write_model_dir(args) -> None:
    """--output-dir: the family's LLM side, or with --full its complete directory."""
    if args.model_family == COSYVOICE3.name and args.full:
        path = write_full_cosyvoice3(args.output_dir, seed=args.seed, size=args.size, cosyvoice_src=args.cosyvoice_src)
        print(f"wrote Fun-CosyVoice3-0.5B directory ({args.size} flow/HiFT, tiny LLM, random weights) to {path}")
    elif args.model_family == COSYVOICE3.name:
        path = write_tiny_cosyvoice3(args.output_dir, seed=args.seed, logit_std=args.logit_std)
        print(f"wrote tiny CosyVoice3 model to {path}")
    elif args.full:
        path = write_full_cosyvoice2(args.output_dir, seed=args.seed, size=args.size, cosyvoice_src=args.cosyvoice_src)
        print(f"wrote CosyVoice2 directory ({args.size} flow/HiFT, random weights) to {path}")
    else:
        path = write_tiny_cosyvoice2(args.output_dir, seed=args.seed, logit_std=args.logit_std,
                                     bias_std=args.bias_std)
        print(f"wrote tiny CosyVoice2 model to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None,
                        help="the model directory to write (replaced if present); may be left out when only "
                             "--sensevoice-dir, --paraformer-dir or --whisper-file are wanted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--logit-std", type=float, default=4.0, help="spread of the speech logits (nats)")
    parser.add_argument("--bias-std", type=float, default=0.5, help="spread of llm_decoder.bias")
    parser.add_argument("--model-family", choices=sorted(FAMILIES), default=COSYVOICE2.name,
                        help="the family's layout (default cosyvoice2)")
    parser.add_argument("--full", action="store_true",
                        help="write a complete model directory of the family from the real CosyVoice classes "
                             "(flow, HiFT, ONNX stand-ins; server environment)")
    parser.add_argument("--size", choices=sorted(TOKEN2WAV_SIZES), default="tiny",
                        help="with --full: flow/HiFT size (real: CosyVoice2-0.5B's, about 530 MB)")
    parser.add_argument("--cosyvoice-src", default=None,
                        help="with --full: CosyVoice checkout to import (default: already on PYTHONPATH)")
    parser.add_argument("--sensevoice-dir", default=None, help="also write a tiny SenseVoiceSmall directory here")
    parser.add_argument("--paraformer-dir", default=None, help="also write a tiny Paraformer directory here")
    parser.add_argument("--whisper-file", default=None, help="also write a tiny Whisper (large-v3.pt's format) here")
    args = parser.parse_args(argv)
    if args.output_dir is None and not (args.sensevoice_dir or args.paraformer_dir or args.whisper_file):
        parser.error("give --output-dir (and/or --sensevoice-dir, --paraformer-dir, --whisper-file)")
    if args.output_dir is not None:
        write_model_dir(args)
    if args.sensevoice_dir:
        print(f"wrote tiny SenseVoiceSmall to {write_tiny_sensevoice(args.sensevoice_dir, seed=args.seed)}")
    if args.paraformer_dir:
        print(f"wrote tiny Paraformer to {write_tiny_paraformer(args.paraformer_dir, seed=args.seed)}")
    if args.whisper_file:
        print(f"wrote tiny Whisper to {write_tiny_whisper(args.whisper_file, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
