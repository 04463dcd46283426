"""Triton reward server of the CosyVoice2 GRPO recipe (runs in the server environment).

Modules:

- ``engines``: the plugin interface (Token2WavEngine, AsrEngine, SpeakerEngine, the
  ``Engines`` bundle) and loading a factory from ``MODULE_OR_FILE:FACTORY``.
- ``prompt_bank``: speaker prompts (wav + transcript), loaded once, chosen per request
  deterministically.
- ``reward_scoring``: the reward configuration (``configs/reward.yaml``) and per-item scoring
  with ``ttsrl.scoring`` / ``ttsrl.reward_shaping``.
- ``request_items``: reading and checking the served models' inputs, item by item
  (``Limits``, ``ItemError``, per-item speaker prompts).
- ``serving``: the served computations (``Slot``, ``Pipeline``): ``token2wav``, ``asr`` /
  ``asr_eval``, ``speaker``, ``speech_tokenizer`` and ``token2wav_asr``, without PyTriton.
- ``standin``: deterministic stand-in engines (no weights) for tests and smoke runs.
- ``engines_cosyvoice2`` / ``engines_sensevoice``: the real engines.
- ``engines_wavlm_sv``: Seed-TTS-eval's SIM model (WavLM + ECAPA-TDNN) as the ``speaker``
  engine over any other engines.
- ``launch``: the one server lifecycle (start in its own session, wait until ready, stop the
  whole session), for run.sh (its CLI), tests and benchmarks; runs from either environment.
- ``cli``: the command line (``python -m token2wav_server``, ``__main__``): options, the
  front's checks, then the front or the worker.
- ``supervisor`` / ``http_guard``: the front: restarts Triton, guards its public HTTP port.
- ``triton_worker``: the worker: binds the Pipelines as Triton models and serves them.

See docs/reward_server.md.
"""
