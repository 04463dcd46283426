"""veRL trainer mode ``tts_sync``: veRL's synchronous GRPO trainer, plus what a TTS run needs to be watched.

Registered with veRL's ``register_trainer`` (``verl.trainer.ppo.v1``) and selected by
``trainer.v1.trainer_mode=tts_sync`` in ``configs/grpo.yaml``; the training loop itself is veRL's
``PPOTrainerSync``, unchanged, and to veRL it is its ``sync`` mode (``trainer_mode``: veRL keys the
synchronous replay buffer, dynamic sampling's drain-then-select and the checkpoint contents on
that name). The additions:

- **Reward components every step.** veRL 0.9.1 logs the extra keys of a dict reward
  (``reward_tts.compute_score``: error rate, speaker similarity, ASR NLL, ...) for validation
  only. After veRL computes a step's metrics, the per-rollout components stored with the step's
  rollouts are summarized as ``reward/<key>/mean`` (and ``/min``, ``/max`` where useful), so they
  reach the console, TensorBoard and the file logger with the step's other metrics.
- **GDPO in this trainer mode.** veRL 0.9.1's ``gdpo`` advantage estimator
  (``algorithm.adv_estimator=gdpo``, ``algorithm.gdpo_reward_keys=[utility_error_rate,...]``)
  normalizes each reward component within its group before summing them. It reads the
  components from the batch's non-tensor fields and the response positions from ``prompts`` and
  ``attention_mask``, but the v1 trainer's ``_compute_advantage`` fetches neither. For ``gdpo``
  this mode fetches the step's reward components (the hook's ``utility_*`` keys) and hands the
  estimator the response mask as its attention mask; the estimator itself is veRL's.
- **Refused rollouts carry no gradient.** A rollout the reward server refused (the hook's
  ``failed`` key, ``on_refused=report``) gets advantage 0 and response mask 0; veRL's own
  estimator computes the group statistics over the scored rollouts only. Refusals are counted
  (``reward/failed/mean``, ``/count``) and logged with their items (``<exp_dir>/reward_failures.jsonl``),
  the step's score statistics leave them out, and the run stops naming the items when a step's
  refusals exceed ``tts.reward_failure_budget`` or recur on ``tts.reward_failure_max_consecutive_steps``
  steps in a row (the weights of the last trained step are saved first). A step with rollouts
  missing (veRL's agent loop drops a rollout whose hook raised, e.g. a reward server unavailable
  past its retry budget) stops the run too. The rules: ``ttsrl.training.refused_rollouts``.
- **Checkpoint retention.** veRL's ``trainer.max_actor_ckpt_to_keep`` keeps the last few
  checkpoints; this mode also keeps the one with the best validation reward so far
  (``tts.keep_best_checkpoint``) and applies the same limit to checkpoints an earlier run left
  before a resume (``ttsrl.training.retention``).
- **Dynamic sampling keeps refused items.** Under ``algorithm.filter_groups`` (the dapo preset) a
  group whose rollouts all got the same reward is dropped; a refused item's group (the placeholder
  score on every rollout) is kept, so the refused-rollout rules see it (``keep_refused_groups``).
- **What each rollout was trained with.** With ``trainer.rollout_data_dir``, veRL's dump of the
  trained rollouts also has each one's advantage, loss tokens and reward components.
- **Audio you can listen to.** At every validation, the first ``trainer.log_val_generations``
  generations are decoded by the reward server's ``token2wav`` and written to
  ``<trainer.default_local_dir>/validation_audio/step_<N>/<i>.wav`` with a ``.json`` beside each
  (text, speech tokens, score, components), and to TensorBoard (``$TENSORBOARD_DIR``) as audio
  with the text and score. A failed decode is logged and never stops training.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib

import numpy as np

from ttsrl.training import refused_rollouts, retention

logger = logging.getLogger(__name__)

TRAINER_MODE = "tts_sync"

STEP_COMPONENTS = {
    # key of compute_score's dict -> statistics logged per training step
    "error_rate": ("mean", "min", "max"),
    "speaker_similarity": ("mean", "min", "max"),
    "asr_nll": ("mean", "max"),
    "num_speech_tokens": ("mean", "min", "max"),
    "transcript_length": ("mean",),
    "ignored_pieces": ("mean",),
    "truncated": ("mean",),  # share of rollouts with no end token within max_response_length
    "utility_error_rate": ("mean",),
    "utility_similarity": ("mean",),
    "utility_confidence": ("mean",),
    "failed": ("mean",),  # share of refused rollouts (reward_tts.py's on_refused=report)
}
"""Statistics of the known keys; every other numeric key of the hook's dict (a plug-in reward
component's utility and reported values: ``utility_quality``, ``quality_sig``, ...) gets its
``mean``. ``score`` itself is veRL's own ``critic/score`` metric."""
NOT_COMPONENTS = ("score",)


def step_keys(extra_infos: list) -> dict:
    """{key: statistics} of the components the rollouts carry: STEP_COMPONENTS, then any other
    key with a number (not a bool) in some rollout, with ("mean",)."""
    keys = dict(STEP_COMPONENTS)
    for info in extra_infos:
        if not isinstance(info, dict):
            continue
        for key, value in info.items():
            if (key not in keys and key not in NOT_COMPONENTS and isinstance(value, (int, float, np.floating))
                    and not isinstance(value, bool)):
                keys[key] = ("mean",)
    return keys


def gdpo_components(extra_fields: list, keys) -> dict[str, np.ndarray]:
    """{key: one float per rollout} of the ``gdpo_reward_keys`` from the rollouts' stored reward
    components; a rollout without one of them is an error naming the key and what it has."""
    columns = {key: [] for key in keys}
    for row, field in enumerate(extra_fields):
        info = field.get("reward_extra_info", {}) if isinstance(field, dict) else {}
        for key in keys:
            if key not in info:
                raise KeyError(f"algorithm.gdpo_reward_keys names {key!r}, but rollout {row}'s reward has only "
                               f"{sorted(info)}: use keys the hook returns (utility_error_rate, utility_similarity "
                               "with the zero_shot preset, utility_confidence)")
            columns[key].append(float(info[key]))
    return {key: np.asarray(values, dtype=np.float32) for key, values in columns.items()}


def gdpo_advantages(rm_scores, response_mask, uids, extra_fields: list, algorithm, n: int):
    """veRL's ``gdpo`` estimator over padded ``rm_scores`` / ``response_mask`` (rows, response
    length), the rollouts' group ids ``uids`` and their stored reward components: (advantages,
    returns), padded. The components are ``algorithm.gdpo_reward_keys``; the estimator finds each
    response's last position as ``attention_mask[:, prompt_length:]`` summed, so it gets an empty
    prompt block and the response mask as its attention mask."""
    import torch
    from tensordict import TensorDict
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    mask = response_mask
    data = DataProto(batch=TensorDict({"rm_scores": rm_scores, "token_level_rewards": rm_scores, "response_mask": mask,
                                       "prompts": torch.zeros((mask.shape[0], 0), dtype=torch.long),
                                       "attention_mask": mask.long()}, batch_size=mask.shape[0]))
    data.non_tensor_batch["uid"] = np.array(list(uids), dtype=object)
    data.non_tensor_batch.update(gdpo_components(extra_fields, list(algorithm.get("gdpo_reward_keys") or [])))
    data = compute_advantage(data, adv_estimator="gdpo", num_repeat=n,
                             norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True), config=algorithm)
    return data.batch["advantages"], data.batch["returns"]


def keep_refused_groups(buffer) -> None:
    """Make veRL's replay ``buffer`` keep, under dynamic sampling (``algorithm.filter_groups``), the
    groups that hold a refused rollout.

    Dynamic sampling drops a group whose rollouts all got the same reward. An item the reward
    server refuses gets the placeholder score on every rollout, so veRL would drop it before this
    trainer sees it: never counted, logged or held against ``tts.reward_failure_budget``. Such a group
    is kept (and trained with no gradient, as every refused rollout); every other tie is dropped
    as veRL decides, and its count (``training/filter_groups/evicted_samples``) is veRL's."""
    import transfer_queue as tq
    from collections import Counter

    choose = buffer._dapo_filtered_keys
    holds_refusal: dict[str, bool] = {}  # group uid -> whether one of its rollouts was refused

    def filtered_keys(partition_id):
        uids, counts = choose(partition_id)
        unseen = {uid for uid in uids if uid not in holds_refusal}
        if unseen:
            keys = [key for key in buffer.partitions[partition_id] if key.split("_")[0] in unseen]
            fields = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["extra_fields"]) \
                if keys else None
            holds_refusal.update(dict.fromkeys(unseen, False))
            for key, info in zip(keys, reward_infos(fields.pop("extra_fields").tolist()) if keys else []):
                if refused_rollouts.is_refused(info):
                    holds_refusal[key.split("_")[0]] = True
        for uid in [uid for uid in holds_refusal if uid not in uids]:  # gone from the buffer
            del holds_refusal[uid]
        kept = {uid for uid in uids if holds_refusal[uid]}
        if not kept:
            return uids, counts
        values = buffer._dapo_classification_cache[partition_id]
        return uids - kept, counts - Counter(values[uid] for uid in kept)

    buffer._dapo_filtered_keys = filtered_keys


def rollout_dump_fields(keys: list, advantages, response_mask, extra_fields: list) -> dict[str, list]:
    """Per-rollout columns added to veRL's dump of the trained rollouts (``trainer.rollout_data_dir``):
    ``advantage`` (the response's, constant over its tokens for outcome rewards; 0 for a rollout
    trained with no gradient), ``response_tokens`` (its loss tokens) and every numeric reward
    component the hook returned (``utility_*``, ``error_rate``, ``failed``, ...)."""
    columns: dict[str, list] = {"advantage": [], "response_tokens": []}
    infos = reward_infos(extra_fields)
    for advantage, mask in zip(advantages.unbind(), response_mask.unbind()):
        tokens = int(mask.sum())
        columns["advantage"].append(float(advantage[mask.bool()][0]) if tokens else 0.0)
        columns["response_tokens"].append(tokens)
    names = sorted({name for info in infos for name, value in info.items()
                    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)})
    for name in names:
        columns[name] = [float(info[name]) if isinstance(info.get(name), (int, float, np.number)) else None
                         for info in infos]
    assert len(columns["advantage"]) == len(keys)
    return columns


def component_metrics(extra_infos: list) -> dict[str, float]:
    """``reward/<key>/<stat>`` over the finite values of each component in ``extra_infos``
    (one dict per rollout, as the reward loop stores them); keys no rollout has are left out."""
    metrics = {}
    for key, stats in step_keys(extra_infos).items():
        values = []
        for info in extra_infos:
            value = info.get(key) if isinstance(info, dict) else None
            if value is not None and math.isfinite(float(value)):
                values.append(float(value))
        if not values:
            continue
        array = np.asarray(values)
        for stat in stats:
            metrics[f"reward/{key}/{stat}"] = float(getattr(array, stat)())
    return metrics


def reward_infos(extra_fields: list) -> list[dict]:
    """Each rollout's stored reward components (``reward_extra_info``; {} when it has none)."""
    return [field.get("reward_extra_info", {}) if isinstance(field, dict) else {} for field in extra_fields]


def nested_zeros(like, dtype=None):
    """A jagged nested tensor of zeros with the row lengths of ``like`` (a jagged nested tensor)."""
    import torch

    lengths = like.offsets().diff().tolist()
    dtype = dtype or like.dtype
    return torch.nested.as_nested_tensor([torch.zeros(int(n), dtype=dtype) for n in lengths], layout=torch.jagged)


def score_metrics(sequence_scores, keep) -> dict[str, float]:
    """``critic/score/*`` (veRL's names) over the rows in ``keep``: the step's scored rollouts."""
    values = np.asarray(sequence_scores, dtype=np.float64)[np.asarray(keep, dtype=bool)]
    if not len(values):
        return {f"critic/score/{stat}": float("nan") for stat in ("mean", "max", "min")}
    return {"critic/score/mean": float(values.mean()), "critic/score/max": float(values.max()),
            "critic/score/min": float(values.min())}


def validation_samples(inputs, outputs, gts, scores, extra_infos: dict, count: int) -> list[dict]:
    """The first ``count`` validation generations as dicts (what is decoded and written)."""
    samples = []
    for index in range(min(count, len(outputs))):
        sample = {"input": inputs[index], "output": outputs[index], "text": gts[index], "score": float(scores[index])}
        for key in [*STEP_COMPONENTS, *(k for k in extra_infos if k not in STEP_COMPONENTS and k not in NOT_COMPONENTS)]:
            values = extra_infos.get(key)
            if values is not None and len(values) == len(outputs) and values[index] is not None:
                value = values[index]
                if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) or key in STEP_COMPONENTS:
                    sample[key] = float(value)
        samples.append(sample)
    return samples


def write_validation_audio(samples: list[dict], server_url: str, out_dir: pathlib.Path, step: int,
                           tensorboard_dir: str | None = None) -> list[pathlib.Path]:
    """Decode each sample's speech tokens with the server's ``token2wav`` and write wav + json
    (and TensorBoard audio). Returns the wav paths written; items the server refused are logged."""
    import soundfile

    from ttsrl.atomic_write import atomic_file
    from ttsrl.model_family import family_from_env
    from ttsrl.speech_tokens import parse_speech_tokens
    from ttsrl.triton_client import TritonModelClient, parse_urls

    scheme, address = parse_urls(server_url)[0]
    client = TritonModelClient(f"{scheme}://{address}", "token2wav", timeout_s=120.0)
    try:
        family = family_from_env()
        token_lists = [parse_speech_tokens(sample["output"], family).ids for sample in samples]
        decoded = client.token2wav(token_lists)
    finally:
        client.close()
    step_dir = out_dir / f"step_{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=tensorboard_dir)
    written = []
    try:
        for index, (sample, tokens, result) in enumerate(zip(samples, token_lists, decoded)):
            if isinstance(result, Exception) or not tokens:
                logger.warning("validation audio %d of step %d not decoded: %s", index, step,
                               result if isinstance(result, Exception) else "no speech tokens")
                continue
            wave, rate = result
            wav_path = step_dir / f"{index}.wav"
            with atomic_file(wav_path) as partial:
                soundfile.write(partial, wave, rate, format="WAV", subtype="FLOAT")
            record = {key: value for key, value in sample.items() if key != "output"}
            record.update(step=step, speech_tokens=tokens, sample_rate=rate, seconds=len(wave) / rate)
            (step_dir / f"{index}.json").write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n")
            written.append(wav_path)
            if writer is not None:
                caption = f"{sample['text']} | score {sample['score']:.3f}"
                if "error_rate" in sample:
                    caption += f" | error rate {sample['error_rate']:.3f}"
                writer.add_audio(f"val_audio/{index}", np.asarray(wave, dtype=np.float32), step, sample_rate=rate)
                writer.add_text(f"val_audio/{index}", caption, step)
    finally:
        if writer is not None:
            writer.close()
    return written


def register() -> type:
    """Define and register the ``tts_sync`` trainer (needs veRL's trainer package imported)."""
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer

    if TRAINER_MODE in TRAINER_REGISTRY:
        return TRAINER_REGISTRY[TRAINER_MODE]

    @register_trainer(TRAINER_MODE)
    class TTSTrainerSync(PPOTrainerSync):
        """veRL's synchronous trainer with reward components per step, refused rollouts masked
        and bounded, and validation audio."""

        _refusal_tracker = None
        _step_refusals: list = []  # this step's refused rollouts, logged once the actor has trained
        _retention_rules = None

        @property
        def trainer_mode(self) -> str:
            """veRL 0.9.1 keys its synchronous semantics on the mode's name: with any name but "sync"
            it builds the asynchronous replay buffer (a step samples as soon as enough groups are
            done, leaving the rest in flight into the next step, and dynamic sampling refills
            without draining), fetches prompts one by one and checkpoints TransferQueue's state.
            This mode is veRL's synchronous trainer, so to veRL it is "sync"."""
            return "sync"

        @trainer_mode.setter
        def trainer_mode(self, configured: str) -> None:
            pass  # veRL's __init__ stores trainer.v1.trainer_mode (tts_sync) here

        def _build_replay_buffer(self):
            buffer = super()._build_replay_buffer()
            if getattr(buffer, "filter_groups_metric", None) is not None:  # DAPO's dynamic sampling
                keep_refused_groups(buffer)
            return buffer

        def _retention(self):
            if self._retention_rules is None:
                trainer = self.config.trainer
                keep = trainer.get("max_actor_ckpt_to_keep")
                if trainer.get("remove_previous_ckpt_in_save", False):  # veRL's deprecated spelling of 1
                    keep = 1
                settings = self.config.get("tts", None) or {}
                self._retention_rules = retention.Retention(pathlib.Path(trainer.default_local_dir), keep,
                                                            bool(settings.get("keep_best_checkpoint", True)))
            return self._retention_rules

        def _save_checkpoint(self):
            super()._save_checkpoint()
            checkpoint = self.config.actor_rollout_ref.actor.get("checkpoint", {}) or {}
            if not checkpoint.get("async_save", False):  # an asynchronous save may still be writing
                self._retention().apply(self.global_steps)

        def _validate(self):
            metrics = super()._validate()
            try:
                self._retention().after_validation(self.global_steps, metrics)
            except OSError as error:  # keeping a checkpoint must never end the run
                logger.warning("checkpoint retention after the validation of step %d failed: %s",
                               self.global_steps, error)
            return metrics

        def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
            super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
            import transfer_queue as tq
            non_padding = [not tag.get("is_padding", False) for tag in batch.tags]
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["extra_fields", "rm_scores"])
            infos = [info for info, keep in zip(reward_infos(data.pop("extra_fields").tolist()), non_padding) if keep]
            metrics.update(component_metrics(infos))
            refused = [refused_rollouts.is_refused(info) for info in infos]
            if any(info and refused_rollouts.FAILED_KEY in info for info in infos):
                metrics["reward/failed/count"] = float(sum(refused))
            if any(refused):
                # veRL's score statistics counted the refused rollouts' placeholder score
                scores = [float(row.sum()) for row, keep in zip(data["rm_scores"].unbind(), non_padding) if keep]
                metrics.update(score_metrics(scores, [not r for r in refused]))
            self._log_step_refusals(batch.partition_id)

        def _compute_advantage(self, batch, metrics):
            """veRL's estimator over the scored rollouts; refused ones get no gradient (module doc)."""
            import torch
            import transfer_queue as tq
            from tensordict import TensorDict
            from transfer_queue import KVBatchMeta

            no_gradient = self._check_step_rollouts(batch)
            if not any(no_gradient):
                return self._estimate_advantage(batch, metrics)
            self._estimate_advantage(batch.select_keys([k for k, x in zip(batch.keys, no_gradient) if not x]),
                                     metrics)
            dropped = [key for key, x in zip(batch.keys, no_gradient) if x]
            mask = tq.kv_batch_get(keys=dropped, partition_id=batch.partition_id,
                                   select_fields=["response_mask"])["response_mask"]
            fields = TensorDict({"advantages": nested_zeros(mask, torch.float32),
                                 "returns": nested_zeros(mask, torch.float32),
                                 "response_mask": nested_zeros(mask)}, batch_size=len(dropped))
            tq.kv_batch_put(keys=dropped, partition_id=batch.partition_id, fields=fields)
            written = None if batch.fields is None else list(dict.fromkeys([*batch.fields, *fields.keys()]))
            return KVBatchMeta(keys=batch.keys, tags=batch.tags, partition_id=batch.partition_id, fields=written,
                               extra_info=batch.extra_info)

        def _estimate_advantage(self, batch, metrics):
            if str(self.config.algorithm.adv_estimator) != "gdpo":
                return super()._compute_advantage(batch, metrics)
            return self._compute_gdpo_advantage(batch, metrics)

        def _refusal_policy(self):
            if self._refusal_tracker is None:
                settings = self.config.get("tts", None) or {}
                self._refusal_tracker = refused_rollouts.FailureTracker(
                    refused_rollouts.FailurePolicy.from_settings(settings))
            return self._refusal_tracker

        def _check_step_rollouts(self, batch) -> list[bool]:
            """The step's refused rollouts (recorded for the log), which rows get no gradient, and
            the stop when rollouts are missing or refusals are over the limits."""
            import transfer_queue as tq

            tracker = self._refusal_policy()
            tags = batch.tags
            real = [not tag.get("is_padding", False) for tag in tags]
            sessions = {key.rsplit("_", 1)[0] for key, keep in zip(batch.keys, real) if keep}
            n = int(self.config.actor_rollout_ref.rollout.n)
            expected = int(self.config.data.train_batch_size) // int(getattr(self, "parameter_sync_step", 1) or 1) * n
            lost = refused_rollouts.lost_rollouts(expected, len(sessions))
            if lost:
                saved = self._save_before_stopping(self.global_steps - 1)
                raise refused_rollouts.RewardFailureStop(f"step {self.global_steps} was not trained and the run "
                                                         f"stops: {lost}. {saved}")
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
            infos = reward_infos(data.pop("extra_fields").tolist())
            refused = [keep and refused_rollouts.is_refused(info) for info, keep in zip(infos, real)]
            self._step_refusals = self._step_refusals + self._refusal_records(batch, refused, infos)
            reason = tracker.check(sum(refused), sum(real))
            if reason:
                self._stop_for_refusals(reason)
            groups = [key.rsplit("_", 2)[0] for key in batch.keys]
            return refused_rollouts.rows_without_gradient(groups, refused)

        def _refusal_records(self, batch, refused: list, infos: list) -> list[dict]:
            import transfer_queue as tq

            keys = [key for key, bad in zip(batch.keys, refused) if bad]
            if not keys:
                return []
            data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                                   select_fields=["data_source", "extra_info", "reward_model"])
            sources, extra, models = (data.pop(name).tolist() for name in ("data_source", "extra_info", "reward_model"))
            reasons = [info.get(refused_rollouts.REASON_KEY, "") for info, bad in zip(infos, refused) if bad]
            return [refused_rollouts.failure_record(self.global_steps, key, source, info,
                                                    (model or {}).get("ground_truth") if isinstance(model, dict)
                                                    else None, reason)
                    for key, source, info, model, reason in zip(keys, sources, extra, models, reasons)]

        def _failure_log(self) -> pathlib.Path:
            return pathlib.Path(self.config.trainer.default_local_dir) / refused_rollouts.FAILURE_LOG

        def _log_step_refusals(self, partition_id: str) -> None:
            """Log this step's refused rollouts with the advantage and loss tokens the actor got."""
            import transfer_queue as tq

            records, self._step_refusals = self._step_refusals, []
            if not records:
                return
            keys = [record["rollout"] for record in records]
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["advantages", "response_mask"])
            for record, advantage, mask in zip(records, data["advantages"].unbind(), data["response_mask"].unbind()):
                largest = float(advantage.abs().max()) if advantage.numel() else 0.0
                record.update(trained=True, advantage_abs_max=largest, loss_tokens=int(mask.sum()))
            refused_rollouts.append_records(self._failure_log(), records)
            print(f"step {records[0]['step']}: {len(records)} refused rollout(s), trained with no gradient "
                  f"(logged in {self._failure_log()}):\n{refused_rollouts.describe_items(records)}", flush=True)

        def _stop_for_refusals(self, reason: str) -> None:
            """Log the step's refused rollouts, save the last trained step's weights, and stop."""
            step = self.global_steps
            records, self._step_refusals = self._step_refusals, []
            for record in records:
                record["trained"] = False
            refused_rollouts.append_records(self._failure_log(), records)
            saved = self._save_before_stopping(step - 1)
            raise refused_rollouts.RewardFailureStop(
                f"step {step} was not trained and the run stops: {reason}. The refused items:\n"
                f"{refused_rollouts.describe_items(records)}\nEvery refused rollout of the run: {self._failure_log()}. "
                f"{saved} Fix the items (their speaker prompt or text; rerun stage 0) or the reward server, then "
                f"rerun stage 2; or raise {refused_rollouts.BUDGET_KNOB} / {refused_rollouts.CONSECUTIVE_KNOB} "
                f"({refused_rollouts.KNOBS_WHERE}) to train past them.")

        def _save_before_stopping(self, step: int) -> str:
            """Save step ``step``'s weights (the last trained) unless saved already; says what it did."""
            root = pathlib.Path(self.config.trainer.default_local_dir)
            if step < 1:
                return "Nothing was trained yet."
            if (root / f"global_step_{step}" / "actor").is_dir():
                return f"The last trained step ({step}) is saved in {root / f'global_step_{step}'}."
            if int(self.config.trainer.save_freq) <= 0:
                return f"The last trained step ({step}) is not saved (trainer.save_freq <= 0)."
            current = self.global_steps
            self.global_steps = step
            try:
                self._save_checkpoint()
            except Exception as error:  # the refusal is the news; a failed save must not hide it
                return f"Saving step {step} failed ({type(error).__name__}: {error})."
            finally:
                self.global_steps = current
            return (f"The last trained step ({step}) was saved to {root / f'global_step_{step}'}: rerunning "
                    "resumes there.")

        def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns,
                                expected_acc_counts=None):
            """Validation's reward leaves out refused rollouts (their placeholder score); they are
            counted by veRL as ``val-aux/<data source>/failed/mean@N`` and logged."""
            failed = reward_extra_infos_dict.get(refused_rollouts.FAILED_KEY)
            if failed and any(refused_rollouts.is_refused({refused_rollouts.FAILED_KEY: f}) for f in failed):
                rewards = reward_extra_infos_dict["reward"]
                reasons = reward_extra_infos_dict.get(refused_rollouts.REASON_KEY) or [""] * len(failed)
                records = []
                for row, flag in enumerate(failed):
                    if refused_rollouts.is_refused({refused_rollouts.FAILED_KEY: flag}):
                        rewards[row] = None
                        records.append({"step": int(self.global_steps), "split": "validation",
                                        "data_source": data_sources[row], "reason": reasons[row]})
                refused_rollouts.append_records(self._failure_log(), records)
                print(f"validation at step {self.global_steps}: {len(records)} refused rollout(s) left out of the "
                      f"reward (logged in {self._failure_log()}); first: {records[0]['reason']}", flush=True)
            return super()._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict, sample_turns,
                                               expected_acc_counts=expected_acc_counts)

        def _compute_gdpo_advantage(self, batch, metrics):
            import transfer_queue as tq
            from tensordict import TensorDict
            from verl.workers.utils.padding import response_to_nested

            algorithm = self.config.algorithm
            # veRL's rollout correction (importance weights / rejection sampling of rollout vs
            # actor log-probs) is off unless rollout_is or rollout_rs is set; under gdpo it stays off
            correction = algorithm.get("rollout_correction", None) or {}
            if algorithm.use_kl_in_reward or correction.get("rollout_is") or correction.get("rollout_rs"):
                raise ValueError("gdpo in the tts_sync trainer supports neither algorithm.use_kl_in_reward nor "
                                 "algorithm.rollout_correction.rollout_is/rollout_rs; switch them off or use "
                                 "adv_estimator=grpo")
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["uid", "response_mask", "rm_scores", "extra_fields"])
            extra_fields = data.pop("extra_fields").tolist()
            response_mask = data["response_mask"]
            padded = data.to_padded_tensor()
            advantages, returns = gdpo_advantages(padded["rm_scores"], padded["response_mask"],
                                                  list(padded["uid"]), extra_fields, algorithm,
                                                  int(self.config.actor_rollout_ref.rollout.n))
            output = TensorDict({"advantages": response_to_nested(advantages, response_mask),
                                 "returns": response_to_nested(returns, response_mask)}, batch_size=len(batch))
            return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

        def _dump_generations(self, inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path):
            if dump_path == self.config.trainer.get("rollout_data_dir", None) and "uid" in reward_extra_infos_dict:
                # the trained rollouts (keys still in TransferQueue): add what each was trained with
                import transfer_queue as tq

                keys = list(reward_extra_infos_dict["uid"])
                data = tq.kv_batch_get(keys=keys, partition_id="train",
                                       select_fields=["advantages", "response_mask", "extra_fields"])
                reward_extra_infos_dict = {**rollout_dump_fields(keys, data["advantages"], data["response_mask"],
                                                                 data.pop("extra_fields").tolist()),
                                           **reward_extra_infos_dict}
            super()._dump_generations(inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path)
            if dump_path != self.config.trainer.get("validation_data_dir", None):
                return  # a dump of training rollouts (trainer.rollout_data_dir), not a validation
            count = int(self.config.trainer.get("log_val_generations", 0) or 0)
            server_url = os.environ.get("REWARD_SERVER_URL", "")
            if count <= 0 or not server_url:
                return
            samples = validation_samples(inputs, outputs, gts, scores, reward_extra_infos_dict, count)
            out_dir = pathlib.Path(self.config.trainer.default_local_dir) / "validation_audio"
            try:
                written = write_validation_audio(samples, server_url, out_dir, self.global_steps,
                                                 os.environ.get("TENSORBOARD_DIR"))
                print(f"validation audio: {len(written)} wav file(s) in {out_dir / f'step_{self.global_steps}'}")
            except Exception as error:  # listening aid only: never stop training for it
                logger.warning("validation audio of step %d failed: %s", self.global_steps, error)

    return TTSTrainerSync
