"""Offline preference optimization (stage 2 with ``train_algorithm=dpo``), one step of one round
per call; run.sh calls them in order for each round::

    train_dpo.py sample --exp-dir E --round R --data train.parquet --start-policy DIR ...   # torchrun-able
    train_dpo.py score  --exp-dir E --round R --data train.parquet --server-url URL
    train_dpo.py pairs  --exp-dir E --round R --data train.parquet --max-chosen-error 0.0 ...
    train_dpo.py train  --exp-dir E --round R --start-policy DIR --beta 0.1 --loss sigmoid ...  # torchrun-able

Each step skips what is already done (sampling and scoring resume line by line; a round whose
checkpoint is complete is not trained again). Round 1 starts from --start-policy; round R from
round R-1's checkpoint. Files: $exp_dir/dpo/round_R/{samples.rank*.jsonl, scores.jsonl,
score_errors.jsonl, pairs.jsonl, val_pairs.jsonl, pairs_stats.json, trained.json}; checkpoints:
$exp_dir/global_step_N/hf_model (see ttsrl/training/dpo.py).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttsrl.atomic_write import write_json  # noqa: E402
from ttsrl.sampling import add_sampling_arguments, options_from_args  # noqa: E402
from ttsrl.training import dpo, preference_pairs, preference_samples  # noqa: E402


def say(message: str) -> None:
    print(message, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)

    def common(sub):
        sub.add_argument("--exp-dir", type=Path, required=True)
        sub.add_argument("--round", type=int, default=1, help="1-based round of iterated DPO")
        sub.add_argument("--data", type=Path, help="stage 0's train.parquet")
        sub.add_argument("--start-policy", type=Path, help="the policy round 1 starts from")
        return sub

    sample = common(steps.add_parser("sample", help="N responses per prompt"))
    sample.add_argument("--prompts", type=int, default=0, help="prompts per round (0: every training row)")
    sample.add_argument("--samples-per-prompt", type=int, default=8)
    sample.add_argument("--prompts-per-batch", type=int, default=8)
    sample.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--seed", type=int, default=0, help="prompt choice and sampling; each round adds its number")
    sample.add_argument("--server-devices", default="0", help="with --backend vllm: the reward server's GPUs")
    add_sampling_arguments(sample)

    score = common(steps.add_parser("score", help="score every sample with the reward server"))
    score.add_argument("--server-url", required=True)
    score.add_argument("--max-response-length", type=int, default=None,
                       help="the sampling limit, so the reward's truncation guard applies as in GRPO")
    score.add_argument("--max-token-text-ratio", type=float, default=None,
                       help="upstream's bound the sampler used: a sample that reached it without an end token "
                            "was cut off too (the reward's truncation guard, as in GRPO)")
    score.add_argument("--concurrency", type=int, default=256)

    pairs = common(steps.add_parser("pairs", help="chosen/rejected pairs by the pair rule"))
    pairs.add_argument("--max-chosen-error", type=float, default=0.05)
    pairs.add_argument("--min-margin", type=float, default=1e-6)
    pairs.add_argument("--val-fraction", type=float, default=0.05)
    pairs.add_argument("--seed", type=int, default=0)

    train = common(steps.add_parser("train", help="TRL DPOTrainer on the round's pairs"))
    train.add_argument("--beta", type=float, default=0.1)
    train.add_argument("--loss", choices=dpo.LOSSES, default="sigmoid")
    train.add_argument("--sft-weight", type=float, default=1.0, help="RPO-style SFT term on the chosen answer")
    train.add_argument("--lr", type=float, default=1e-6)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _rows(args) -> dict:
    if args.data is None:
        raise preference_samples.PreferenceDataError("--data (stage 0's train.parquet) is required")
    return {row.index: row for row in preference_samples.read_prompt_rows(args.data)}


def run_sample(args) -> int:
    import torch

    from ttsrl.model_family import check_family, family_from_env, family_of_hf_dir
    from ttsrl.policy.generation import make_generator

    rank, world = preference_samples.rank_and_world()
    policy, _ = dpo.round_start(args.exp_dir, args.round, args.start_policy)
    check_family(family_from_env(), family_of_hf_dir(policy), policy)  # model_family's policy, never another's
    out_dir = dpo.round_dir(args.exp_dir, args.round)
    rows = list(_rows(args).values())
    prompts = preference_samples.choose_prompts(rows, args.prompts, args.seed + args.round)
    sampling = options_from_args(args)
    torch.manual_seed(args.seed + 1000 * args.round + rank)
    device = args.device if args.device != "cuda" else f"cuda:{rank % max(1, torch.cuda.device_count())}"
    vllm_options = {"server_devices": args.server_devices} if args.backend == "vllm" else {}
    generator = make_generator(args.backend, str(policy), device, sampling, **vllm_options)
    say(f"DPO round {args.round}: sampling from {policy}")
    preference_samples.sample_responses(prompts, args.samples_per_prompt, generator.generate, out_dir,
                                        args.prompts_per_batch, rank, world, log=say, family=generator.family)
    return 0


def run_score(args) -> int:
    import reward_tts
    from ttsrl.triton_client.reward_client import RewardServerUnavailable, close_clients

    out_dir = dpo.round_dir(args.exp_dir, args.round)
    rows = _rows(args)
    samples = preference_samples.read_samples(out_dir)
    if not samples:
        raise preference_samples.PreferenceDataError(f"no samples in {out_dir} (run the sample step first)")
    kwargs = {"server_url": args.server_url}
    if args.max_response_length:
        kwargs["max_response_length"] = args.max_response_length
    if args.max_token_text_ratio:
        kwargs["max_token_text_ratio"] = args.max_token_text_ratio

    async def go():
        try:
            return await preference_samples.score_samples(samples, rows, reward_tts.compute_score, out_dir, kwargs,
                                                          args.concurrency, log=say)
        finally:
            await close_clients()

    try:
        counts = asyncio.run(go())
    except RewardServerUnavailable as error:
        print(f"error: the reward server failed while scoring: {error}\n"
              f"the scores so far are kept in {out_dir / preference_samples.SCORES_FILE}; rerun to score the rest",
              file=sys.stderr)
        return 1
    say(f"DPO round {args.round}: {counts['scored']} samples scored, {counts['refused']} refused by the server "
        f"(see {out_dir / preference_samples.SCORE_ERRORS_FILE}), {counts['already']} scored before")
    return 0


def run_pairs(args) -> int:
    out_dir = dpo.round_dir(args.exp_dir, args.round)
    rows = _rows(args)
    samples = preference_samples.read_samples(out_dir)
    scores, refused = preference_samples.read_scores(out_dir)
    rule = preference_pairs.PairRule(args.max_chosen_error, args.min_margin, args.val_fraction, args.seed + args.round)
    try:
        train, validation, stats = preference_pairs.build_pairs(samples, scores, rows, rule, refused)
    except preference_pairs.NoPairsError as error:
        print(f"error: DPO round {args.round}: {error}", file=sys.stderr)
        return 1
    preference_pairs.write_pairs(out_dir, train, validation, stats)
    say(f"DPO round {args.round}: {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['train_pairs']} "
        f"train, {stats['val_pairs']} validation, mean margin {stats['mean_margin']:.3f}); dropped {stats['dropped']}")
    return 0


def run_train(args) -> int:
    out_dir = dpo.round_dir(args.exp_dir, args.round)
    done = dpo.round_trained(args.exp_dir, args.round)
    if done is not None:
        say(f"DPO round {args.round}: already trained (step {done['step']}); skipping")
        return 0
    policy, first_step = dpo.round_start(args.exp_dir, args.round, args.start_policy)
    train = preference_pairs.read_pairs(out_dir / preference_pairs.PAIRS_FILE)
    validation = preference_pairs.read_pairs(out_dir / preference_pairs.VAL_PAIRS_FILE)
    settings = dpo.DpoSettings(args.beta, args.loss, args.sft_weight, args.lr, args.epochs, args.batch_size,
                               args.grad_accum, args.seed + args.round, args.device)
    marker = dpo.train_dpo(policy, train, validation, args.exp_dir, first_step, settings, out_dir, args.round, log=say)
    rank, _ = preference_samples.rank_and_world()
    if rank == 0:
        write_json(out_dir / dpo.ROUND_DONE_FILE, marker, indent=2)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = {"sample": run_sample, "score": run_score, "pairs": run_pairs, "train": run_train}
    try:
        return handlers[args.step](args)
    except (preference_samples.PreferenceDataError, FileNotFoundError, ValueError) as error:  # incl. WrongFamilyError
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
