"""veRL trainer mode ``tts_sync``: veRL's synchronous GRPO trainer, plus what a TTS run needs to be watched.

Registered with veRL's ``register_trainer`` (``verl.trainer.ppo.v1``) and selected by
``trainer.v1.trainer_mode=tts_sync`` in ``configs/grpo.yaml``; the training loop itself is veRL's
``PPOTrainerSync``, unchanged. Three additions:

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
        """veRL's synchronous trainer with reward components per step and validation audio."""

        def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
            super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
            import transfer_queue as tq
            non_padding = [not tag.get("is_padding", False) for tag in batch.tags]
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
            extra_fields = [field for field, keep in zip(data.pop("extra_fields").tolist(), non_padding) if keep]
            infos = [field.get("reward_extra_info", {}) if isinstance(field, dict) else {} for field in extra_fields]
            metrics.update(component_metrics(infos))

        def _compute_advantage(self, batch, metrics):
            if str(self.config.algorithm.adv_estimator) != "gdpo":
                return super()._compute_advantage(batch, metrics)
            return self._compute_gdpo_advantage(batch, metrics)

        def _compute_gdpo_advantage(self, batch, metrics):
            import torch
            import transfer_queue as tq
            from tensordict import TensorDict
            from verl.protocol import DataProto
            from verl.trainer.ppo.ray_trainer import compute_advantage
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
            data = DataProto(batch=data.to_padded_tensor())
            data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)
            data.non_tensor_batch.update(gdpo_components(extra_fields, list(algorithm.gdpo_reward_keys or [])))
            data.batch["token_level_rewards"] = data.batch["rm_scores"]
            mask = data.batch["response_mask"]
            # the estimator finds each response's last position as attention_mask[:, prompt_length:]
            # summed; with an empty prompt block that is the response mask itself
            data.batch["prompts"] = torch.zeros((mask.shape[0], 0), dtype=torch.long)
            data.batch["attention_mask"] = mask.long()
            data = compute_advantage(data, adv_estimator="gdpo", num_repeat=self.config.actor_rollout_ref.rollout.n,
                                     norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True),
                                     config=algorithm)
            output = TensorDict({field: response_to_nested(data.batch[field], response_mask)
                                 for field in ("advantages", "returns")}, batch_size=len(batch))
            return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

        def _dump_generations(self, inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path):
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
