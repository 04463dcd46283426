"""Tiny random stand-ins of the downloaded models, in their real layouts, for tests, benchmarks
and the CPU smoke profile (no weights can be downloaded on CI machines):

- ``llm``: a CosyVoice2-shaped LLM directory (``llm.pt`` + ``CosyVoice-BlankEN/``); torch and
  tokenizers, both environments.
- ``cosyvoice2``: a complete CosyVoice2-0.5B directory from the real CosyVoice classes (flow,
  HiFT, ONNX stand-ins); server environment.
- ``asr``: SenseVoiceSmall and Paraformer directories through funasr; server environment.

``scripts/make_tiny_cosyvoice2.py`` is their command line.
"""
