"""The synchronous client of the reward server's audio models (evaluation side).

Evaluation needs plain batch calls to ``token2wav`` (speech tokens -> waveform),
``asr`` / ``asr_eval`` (waveform -> transcript), ``speaker`` (waveform -> speaker
embedding) and ``speech_tokenizer`` (waveform -> speech tokens).

Per-item problems come back in the server's ``ERRORS`` output; they are returned
as exceptions in the item's place, so one bad item does not lose the others.
Per-item speaker prompts: ``synthesize`` sends each item's own prompt (waveform,
sample rate, transcript) with its tokens, so the audio is spoken in that prompt's
voice; the server answers with the ``PROMPT_ID`` it conditioned on, which is
``speaker_prompt_key`` of the prompt (or ``bank:<name>`` for the server's bank voice).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .wire import ServerItemError, Synthesis, client_module, infer_request, pad_rows, parse_url, text_column, text_of

REQUEST_ITEMS = 8
"""Items per request at most; fewer when the server takes fewer (its model config's max_batch_size)."""


class TritonModelClient:
    def __init__(self, url: str, model_name: str, timeout_s: float = 600.0):
        self.url = url
        self.model_name = model_name
        self.protocol, address = parse_url(url)
        self.module = client_module(self.protocol)
        if self.protocol == "grpc":
            self.client = self.module.InferenceServerClient(address)
        else:
            self.client = self.module.InferenceServerClient(address, network_timeout=timeout_s,
                                                            connection_timeout=timeout_s)
        self.timeout_s = timeout_s
        self._items: Optional[int] = None

    @property
    def items_per_request(self) -> int:
        """REQUEST_ITEMS, or the server's per-request limit (``--max-batch-size``) when lower."""
        if self._items is None:
            config = self.client.get_model_config(self.model_name)
            limit = int(config["max_batch_size"] if isinstance(config, dict) else config.config.max_batch_size)
            self._items = min(REQUEST_ITEMS, limit) if limit > 0 else 1
        return self._items

    def close(self) -> None:
        self.client.close()

    def _infer(self, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        inputs, requested = infer_request(self.protocol, arrays, outputs)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.client.infer(self.model_name, inputs, outputs=requested, **kwargs)
        return {name: result.as_numpy(name) for name in outputs}

    @staticmethod
    def _error(texts: np.ndarray, index: int) -> str:
        """Row ``index`` of a BYTES output (ERRORS, PROMPT_ID) as str."""
        return text_of(texts.reshape(-1)[index])

    def token2wav(self, token_lists: list[list[int]]) -> list:
        """Speech token id lists -> [(float32 waveform, sample_rate) or ServerItemError],
        in the server's prompt-bank voice."""
        return [r if isinstance(r, Exception) else (r.wave, r.sample_rate) for r in self.synthesize(token_lists)]

    def synthesize(self, token_lists: list[list[int]], prompts: Optional[list] = None) -> list:
        """Speech token id lists, each with its own speaker prompt (``SpeakerPromptAudio``;
        None: the server's prompt bank) -> [Synthesis or ServerItemError] (model ``token2wav``).

        A request carries prompt inputs only when one of its items has a prompt; an item
        without one then gets a zero-length prompt row, which the server reads as "bank voice"."""
        if prompts is None:
            prompts = [None] * len(token_lists)
        if len(prompts) != len(token_lists):
            raise ValueError(f"{len(token_lists)} token lists but {len(prompts)} prompts")
        results: list = []
        outputs = ["WAV", "WAV_LENS", "SAMPLE_RATE", "PROMPT_ID", "ERRORS"]
        step = self.items_per_request if token_lists else REQUEST_ITEMS
        for start in range(0, len(token_lists), step):
            chunk = token_lists[start:start + step]
            chunk_prompts = prompts[start:start + step]
            tokens, lengths = pad_rows([np.asarray(ids, dtype=np.int32) for ids in chunk], np.int32)
            arrays = {"TOKENS": tokens, "TOKEN_LENS": lengths}
            if any(p is not None for p in chunk_prompts):
                wav, wav_lens = pad_rows([None if p is None else np.asarray(p.wave, dtype=np.float32)
                                          for p in chunk_prompts], np.float32)
                arrays.update(
                    PROMPT_WAV=wav, PROMPT_WAV_LENS=wav_lens,
                    PROMPT_SAMPLE_RATE=np.array([[0 if p is None else int(p.sample_rate)] for p in chunk_prompts],
                                                dtype=np.int32),
                    PROMPT_TEXT=text_column("" if p is None else p.text for p in chunk_prompts))
            out = self._infer(arrays, outputs)
            for row in range(len(chunk)):
                error = self._error(out["ERRORS"], row)
                if error:
                    results.append(ServerItemError(error))
                    continue
                length = int(out["WAV_LENS"].reshape(-1)[row])
                results.append(Synthesis(out["WAV"][row, :length].astype(np.float32),
                                         int(out["SAMPLE_RATE"].reshape(-1)[row]), self._error(out["PROMPT_ID"], row)))
        return results

    def _wave_requests(self, waves: list[np.ndarray], sample_rates: list[int], outputs: list[str],
                       languages: list | None = None):
        """Send waveforms in requests of REQUEST_ITEMS (padded, with WAV_LENS and SAMPLE_RATE, and
        LANGUAGE when ``languages`` is given); yields (output arrays, row, error message or "") per
        item, in order."""
        if len(waves) != len(sample_rates):
            raise ValueError(f"{len(waves)} waveforms but {len(sample_rates)} sample rates")
        if languages is not None and len(languages) != len(waves):
            raise ValueError(f"{len(waves)} waveforms but {len(languages)} languages")
        step = self.items_per_request if waves else REQUEST_ITEMS
        for start in range(0, len(waves), step):
            chunk = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves[start:start + step]]
            rates = sample_rates[start:start + step]
            wav, lengths = pad_rows(chunk, np.float32)
            rate_array = np.array([[r] for r in rates], dtype=np.int32)
            arrays = {"WAV": wav, "WAV_LENS": lengths, "SAMPLE_RATE": rate_array}
            if languages is not None:
                arrays["LANGUAGE"] = text_column(x or "" for x in languages[start:start + step])
            out = self._infer(arrays, outputs + ["ERRORS"])
            for row in range(len(chunk)):
                yield out, row, self._error(out["ERRORS"], row)

    def transcribe(self, waves: list[np.ndarray], sample_rates: list[int], languages: list | None = None) -> list:
        """Waveforms -> [transcript str or ServerItemError] (models ``asr``, ``asr_eval``);
        ``languages``: each wave's language, told to the ASR ("" or None: auto)."""
        results: list = []
        for out, row, error in self._wave_requests(waves, sample_rates, ["TRANSCRIPTS"], languages):
            if error:
                results.append(ServerItemError(error))
            else:
                value = out["TRANSCRIPTS"].reshape(-1)[row]
                results.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        return results

    def embed(self, waves: list[np.ndarray], sample_rates: list[int]) -> list:
        """Waveforms -> [float32 speaker embedding (1-D) or ServerItemError] (model ``speaker``)."""
        results: list = []
        for out, row, error in self._wave_requests(waves, sample_rates, ["EMBEDDING"]):
            results.append(ServerItemError(error) if error else out["EMBEDDING"][row].astype(np.float32))
        return results

    def tokenize(self, waves: list[np.ndarray], sample_rates: list[int]) -> list:
        """Waveforms -> [speech token ids (list of int) or ServerItemError] (model ``speech_tokenizer``)."""
        results: list = []
        for out, row, error in self._wave_requests(waves, sample_rates, ["TOKENS", "TOKEN_LENS"]):
            if error:
                results.append(ServerItemError(error))
            else:
                length = int(out["TOKEN_LENS"].reshape(-1)[row])
                results.append([int(i) for i in out["TOKENS"][row, :length]])
        return results
