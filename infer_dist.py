"""Distributed speech synthesis of a test set with a (merged) policy checkpoint.

    torchrun --nproc_per_node=N infer_dist.py --model DIR --manifest FILE --output-dir OUT [options]
    python infer_dist.py --model DIR --manifest FILE --output-dir OUT     # one process

Test sets (``--manifest``, read by ttsrl.eval_sets; prompt paths as each layout publishes them):
  - Seed-TTS-eval ``meta.lst`` (zh or en): ``utt|prompt_text|prompt_wav|text`` per line;
  - a CosyVoice3-Eval task folder (``data/zero_shot/zh``): ``text``, ``prompt_text``, ``prompt_wav.scp``;
  - JSONL: ``id``, ``text``, optional ``prompt_text``, ``prompt_wav`` and
    ``prompt_tokens`` (the prompt's CosyVoice2 speech tokens, precomputed).

Each rank generates speech tokens from upstream CosyVoice's LLM input (``ttsrl.frontend``:
the text normalized and split as upstream does, prompt text and text tokenized apart, the
prompt's speech tokens trimmed to its wav, each call between ``--min-token-text-ratio`` and
``--max-token-text-ratio`` times its text tokens) with transformers (batched, left padding,
sampling flags) or vLLM (``--backend vllm``: rank r's engine on
the LOCAL_RANK-th visible GPU, at ``--gpu-memory-utilization``, or
``--shared-gpu-memory-utilization`` on a GPU of the reward server's
``--server-devices``; more ranks than GPUs is refused), turns them
into audio with the reward server's ``token2wav`` model (``--server-url``), and
writes ``OUT/wavs/<id>.wav`` plus ``OUT/records/<id>.json`` (text, token count,
duration, the prompt that conditioned the audio, error) and a line in
``OUT/logs/rank_<r>.log``. Rank 0 then writes ``OUT/manifest.jsonl`` of every
utterance and prints a summary.

Voice (zero-shot protocol): by default every utterance is decoded in the voice of
its own prompt wav, sent to ``token2wav`` with its transcript (or prepared by the
in-process engines); the record's ``prompt_id`` is that prompt's content hash
(``ttsrl.triton_client.speaker_prompt_key``) as the decoder reported it, and audio
the decoder says it conditioned on anything else is refused. ``--prompt-voice bank``
decodes everything in the server's prompt-bank voice instead (``prompt_id``
``bank:<name>``). A row whose prompt wav is missing, unreadable, empty, below 16 kHz,
too long (``--max-prompt-seconds``) or without a prompt transcript is reported with
its file:line; ``--on-bad-prompt fail`` (default) stops before generating anything,
``skip`` leaves those rows out (a record each, OUT/bad_prompts.txt, counted as
``bad_prompt`` in the summary).

Zero-shot prompting of the LLM (prompt text + text, then the prompt's speech tokens as
the start of the answer) is used when an utterance's prompt speech tokens are known:
from the manifest's ``prompt_tokens``, else, for an utterance with a
``prompt_wav``, from the reward server's ``speech_tokenizer`` model (each rank
tokenizes the prompt wavs of its own utterances before generating, each distinct
wav once). When the server does not serve ``speech_tokenizer`` or fails on a wav,
that utterance is prompted with its text only. Each record says which
(``zero_shot``, ``prompt_tokens_source``: manifest, server or none) and the
rank's log line counts them.

Exactly once and resumable: every rank lists the utterances without a record
of success, the ranks agree on that list at a barrier before anyone writes,
and rank r takes every world_size-th of it. Files are written to a temp name
and renamed, so a killed run leaves only whole files; run it again and it does
the rest. A failed utterance (no speech tokens, server error) gets a record
with its reason and is retried by the next run; it does not stop this one.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # torchrun may start us from elsewhere

from ttsrl.eval_sets import LAYOUTS as EVAL_LAYOUTS, EvalSetError  # noqa: E402
from ttsrl.evaluation.prompts import BadPromptError  # noqa: E402
from ttsrl.evaluation.synthesis import run  # noqa: E402
from ttsrl.policy.generation import (OWN_GPU_MEMORY_SHARE, SHARED_GPU_MEMORY_SHARE, PlacementError,  # noqa: E402
                                     make_generator, rank_placement)
from ttsrl.sampling import add_sampling_arguments  # noqa: E402
from ttsrl.triton_client.wire import env_server_url  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (merged or converted)")
    parser.add_argument("--manifest", required=True,
                        help="test set: a Seed-TTS-eval meta.lst, a CV3-Eval task folder (text, prompt_text, "
                             "prompt_wav.scp) or a JSONL (see ttsrl/eval_sets.py)")
    parser.add_argument("--layout", choices=("auto",) + EVAL_LAYOUTS, default="auto",
                        help="layout of --manifest (auto: a folder is cv3-eval, .jsonl is jsonl, else seed-tts)")
    parser.add_argument("--prompt-voice", choices=("utterance", "bank"), default="utterance",
                        help="utterance: decode each utterance in the voice of its own prompt wav (the zero-shot "
                             "protocol); bank: decode every utterance in the server's prompt-bank voice")
    parser.add_argument("--on-bad-prompt", choices=("fail", "skip"), default="fail",
                        help="an utterance whose prompt wav is missing, unreadable, too long or has no transcript: "
                             "fail (stop before generating, listing every such row) or skip it (recorded, counted "
                             "in the summary, listed in OUT/bad_prompts.txt)")
    parser.add_argument("--max-prompt-seconds", type=float, default=None,
                        help="longest prompt wav accepted (default: the server's limit, 30 s)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--server-url", default=env_server_url(),
                        help="reward server serving token2wav (and speech_tokenizer for prompt wavs without "
                             "prompt_tokens) (grpc://host:port or http://host:port; "
                             "default $REWARD_SERVER_URL or grpc://127.0.0.1:8001; first of a list)")
    parser.add_argument("--engines", default="",
                        help="decode in this process with MODULE_OR_FILE:FACTORY engines instead of the server "
                             "(run in the server environment), e.g. token2wav_server.standin:create_engines")
    parser.add_argument("--cosyvoice2-dir", default=None, help="with --engines: the CosyVoice2-0.5B directory")
    parser.add_argument("--prompt-bank", default=None, help="with --engines: speaker prompt wav/JSONL/folder")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: one engine per rank, on the rank's own GPU (LOCAL_RANK-th visible GPU)")
    parser.add_argument("--server-devices", default="0",
                        help="with --backend vllm: the GPUs the reward server uses on this node, as its --devices "
                             "names them (comma-separated indices of the visible GPUs; 'cpu' or 'none': none), so "
                             "a rank on such a GPU takes --shared-gpu-memory-utilization (default: 0, the "
                             "recipe's server_devices)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=OWN_GPU_MEMORY_SHARE,
                        help="with --backend vllm: the share of a GPU of its own that a rank's engine takes "
                             "(vLLM's gpu_memory_utilization; default %(default)s)")
    parser.add_argument("--shared-gpu-memory-utilization", type=float, default=SHARED_GPU_MEMORY_SHARE,
                        help="with --backend vllm: the share on a GPU the reward server also uses, leaving it "
                             "room for token2wav, the ASR and the speaker model (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_sampling_arguments(parser)  # the recipe's rollout sampling (configs/grpo.yaml), so stage 4 scores it
    parser.add_argument("--seed", type=int, default=0, help="rank r samples with seed + r")
    parser.add_argument("--max-utterances", type=int, default=0, help="only the first N of the manifest (0: all)")
    return parser


def generator_factory(args):
    """The vLLM backend gets its placement flags; the transformers backend is the library's default
    (``None``: ``make_generator`` on the rank's device)."""
    if args.backend != "vllm":
        return None
    placement = dict(server_devices=args.server_devices, own_share=args.gpu_memory_utilization,
                     shared_share=args.shared_gpu_memory_utilization)
    rank_placement(**placement)  # a bad flag or too many ranks stops every rank here, before the process group

    def factory(device, sampling):
        return make_generator("vllm", args.model, device, sampling, **placement)
    return factory


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    args.server_url = args.server_url.split(",")[0].strip()
    try:
        run(args, generator_factory=generator_factory(args))
    except (EvalSetError, BadPromptError, PlacementError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
