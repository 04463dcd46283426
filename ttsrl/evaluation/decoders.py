"""Speech tokens -> audio for evaluation: the reward server's ``token2wav`` model, or the
server's engines loaded in this process (``infer_dist.py --engines``). Both decode each
item in the voice of its own prompt and report which prompt conditioned it."""
from __future__ import annotations


class ServerToken2Wav:
    """The reward server's ``token2wav`` model over gRPC or HTTP (tritonclient)."""

    def __init__(self, url: str, model_name: str = "token2wav", timeout_s: float = 600.0):
        from ttsrl.triton_client import TritonModelClient

        self.client = TritonModelClient(url, model_name, timeout_s)

    def synthesize(self, token_lists: list[list[int]]):
        """In the server's prompt-bank voice -> list of (waveform float32, sample_rate) or an Exception per item."""
        return self.client.token2wav(token_lists)

    def decode(self, token_lists: list[list[int]], prompts: list):
        """Each item in the voice of its own prompt (``SpeakerPromptAudio``; None: the bank's)
        -> list of ``ttsrl.triton_client.Synthesis`` or an Exception per item."""
        return self.client.synthesize(token_lists, prompts)


class InProcessToken2Wav:
    """token2wav engines loaded in this process instead of a server (``--engines MODULE_OR_FILE:FACTORY``).

    For runs in the server environment (it has torch, transformers and the engines'
    packages). Each item is decoded with its own prompt, prepared once per distinct prompt
    (the server's ``PromptCache`` and ``check_prompt``); an item without one uses the prompt
    bank's first prompt (``--prompt-bank``).
    """

    def __init__(self, spec: str, device: str, cosyvoice2_dir: str | None = None, prompt_bank: str | None = None):
        from token2wav_server.engines import EngineOptions, create_engines
        from token2wav_server.prompt_bank import PromptCache, load_prompts

        self.engine = create_engines(EngineOptions(device=device, cosyvoice2_dir=cosyvoice2_dir), spec).token2wav
        self.prompt_bank = prompt_bank
        self._bank = None
        self.cache = PromptCache(self.engine.prepare_prompt)
        self._load_prompts = load_prompts

    def _bank_prompt(self):
        if self._bank is None:
            prompt = self._load_prompts(self.prompt_bank)[0]
            self._bank = (prompt.name, self.engine.prepare_prompt(prompt))
        return self._bank

    def synthesize(self, token_lists: list[list[int]]):
        return [r if isinstance(r, Exception) else (r.wave, r.sample_rate)
                for r in self.decode(token_lists, [None] * len(token_lists))]

    def decode(self, token_lists: list[list[int]], prompts: list):
        import numpy as np

        from token2wav_server.engines import SpeakerPrompt
        from token2wav_server.prompt_bank import PromptBankError, check_prompt
        from ttsrl.triton_client import BANK_PROMPT_PREFIX, Synthesis

        results: list = [None] * len(token_lists)
        todo, features, prompt_ids = [], [], []
        for index, prompt in enumerate(prompts):
            try:
                if prompt is None:
                    name, prepared = self._bank_prompt()
                    prompt_ids.append(BANK_PROMPT_PREFIX + name)
                else:
                    check_prompt(prompt.wave, prompt.sample_rate, prompt.text, "speaker prompt")
                    key = prompt.key
                    prepared = self.cache.features(key, SpeakerPrompt(f"item-{key[:16]}", np.asarray(prompt.wave),
                                                                      prompt.sample_rate, prompt.text))
                    prompt_ids.append(key)
            except (PromptBankError, RuntimeError, ValueError) as error:
                results[index] = error
                continue
            todo.append(index)
            features.append(prepared)
        if todo:
            waves = self.engine.synthesize([np.asarray(token_lists[i], dtype=np.int64) for i in todo], features)
            for index, wave, prompt_id in zip(todo, waves, prompt_ids):
                results[index] = Synthesis(np.asarray(wave, dtype=np.float32), self.engine.sample_rate, prompt_id)
        return results
