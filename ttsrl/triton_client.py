"""A small synchronous client for the reward server's audio models (evaluation side).

The GRPO reward hook (reward_tts.py) has its own pooled asynchronous client for
``token2wav_asr``; evaluation needs plain batch calls to ``token2wav`` (speech
tokens -> waveform), ``asr`` / ``asr_eval`` (waveform -> transcript), ``speaker``
(waveform -> speaker embedding) and ``speech_tokenizer`` (waveform -> speech
tokens). The tensor names are those the server binds (docs/reward_server.md).

Per-item problems come back in the server's ``ERRORS`` output; they are returned
as exceptions in the item's place, so one bad item does not lose the others.
Per-item speaker prompts: ``synthesize`` sends each item's own prompt (waveform,
sample rate, transcript) with its tokens, so the audio is spoken in that prompt's
voice; the server answers with the ``PROMPT_ID`` it conditioned on, which is
``speaker_prompt_key`` of the prompt (or ``bank:<name>`` for the server's bank voice).

tritonclient is imported lazily (both environments have it).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple, Optional

import numpy as np

REQUEST_ITEMS = 8
"""Items per request; well under the server's default --max-batch-size."""


def pad_rows(rows, dtype) -> tuple[np.ndarray, np.ndarray]:
    """1-D arrays (or None) -> zero-padded (n, width) array and (n, 1) int32 lengths.

    The wire form of every batched tensor the server takes and returns (TOKENS and
    TOKEN_LENS, WAV and WAV_LENS); a None row is all zeros with length 0.
    """
    rows = [None if row is None else np.asarray(row).reshape(-1) for row in rows]
    width = max([row.size for row in rows if row is not None] + [1])
    padded = np.zeros((len(rows), width), dtype=dtype)
    lengths = np.zeros((len(rows), 1), dtype=np.int32)
    for index, row in enumerate(rows):
        if row is not None:
            padded[index, :row.size] = row
            lengths[index, 0] = row.size
    return padded, lengths


class ServerItemError(RuntimeError):
    """The server refused or failed one item; the message is the server's."""


BANK_PROMPT_PREFIX = "bank:"
"""``PROMPT_ID`` of audio conditioned on the server's prompt bank: ``bank:<prompt name>``."""


def speaker_prompt_key(wave, sample_rate: int, text: str) -> str:
    """Content hash of a speaker prompt: sha256 over the sample rate, the transcript and the
    float32 samples. The server caches prepared prompts under it and reports it as
    ``PROMPT_ID``, so a client can check which prompt conditioned its audio."""
    digest = hashlib.sha256()
    digest.update(np.int64(int(sample_rate)).astype("<i8").tobytes())
    digest.update(text.encode("utf-8") + b"\0")
    digest.update(np.ascontiguousarray(np.asarray(wave, dtype="<f4").reshape(-1)).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class SpeakerPromptAudio:
    """One item's speaker prompt as sent to ``token2wav``: mono float32 samples, their
    sample rate and the transcript of what is said in them."""

    wave: np.ndarray
    sample_rate: int
    text: str

    @property
    def key(self) -> str:
        return speaker_prompt_key(self.wave, self.sample_rate, self.text)


class Synthesis(NamedTuple):
    """One decoded item: waveform, its sample rate, and the prompt that conditioned it."""

    wave: np.ndarray
    sample_rate: int
    prompt_id: str


def parse_urls(text: str, protocol: str | None = None) -> tuple[tuple[str, str], ...]:
    """``"grpc://a:1,http://b:2"`` -> (("grpc", "a:1"), ("http", "b:2")).

    The one reading of server URLs (REWARD_SERVER_URL, --server-url): a bare
    ``host:port`` takes ``protocol`` (default grpc); anything else is a ValueError.
    """
    urls = []
    for piece in (p.strip() for p in str(text).split(",")):
        if not piece:
            continue
        scheme, sep, address = piece.partition("://")
        if not sep:
            scheme, address = (protocol or "grpc"), piece
        scheme = scheme.lower()
        if scheme not in ("grpc", "http"):
            raise ValueError(f"reward server URL {piece!r}: protocol must be grpc or http")
        host, colon, port = address.rstrip("/").rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"reward server URL {piece!r}: expected {scheme}://HOST:PORT")
        urls.append((scheme, f"{host}:{port}"))
    if not urls:
        raise ValueError(f"no reward server URL in {text!r}")
    return tuple(urls)


def parse_url(url: str) -> tuple[str, str]:
    """One ``grpc://host:port`` or ``http://host:port`` -> (protocol, "host:port")."""
    urls = parse_urls(url)
    if len(urls) != 1:
        raise ValueError(f"server URL {url!r}: expected one URL, got {len(urls)}")
    return urls[0]


class TritonModelClient:
    def __init__(self, url: str, model_name: str, timeout_s: float = 600.0):
        self.url = url
        self.model_name = model_name
        self.protocol, address = parse_url(url)
        if self.protocol == "grpc":
            import tritonclient.grpc as client_module

            self.client = client_module.InferenceServerClient(address)
        else:
            import tritonclient.http as client_module

            self.client = client_module.InferenceServerClient(address, network_timeout=timeout_s,
                                                              connection_timeout=timeout_s)
        self.module = client_module
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.client.close()

    def _infer(self, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        inputs = []
        for name, array in arrays.items():
            dtype = "BYTES" if array.dtype == object else {np.int32: "INT32", np.float32: "FP32"}[array.dtype.type]
            tensor = self.module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [self.module.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.client.infer(self.model_name, inputs, outputs=requested, **kwargs)
        return {name: result.as_numpy(name) for name in outputs}

    @staticmethod
    def _error(texts: np.ndarray, index: int) -> str:
        """Row ``index`` of a BYTES output (ERRORS, PROMPT_ID) as str."""
        value = texts.reshape(-1)[index]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

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
        for start in range(0, len(token_lists), REQUEST_ITEMS):
            chunk = token_lists[start:start + REQUEST_ITEMS]
            chunk_prompts = prompts[start:start + REQUEST_ITEMS]
            tokens, lengths = pad_rows([np.asarray(ids, dtype=np.int32) for ids in chunk], np.int32)
            arrays = {"TOKENS": tokens, "TOKEN_LENS": lengths}
            if any(p is not None for p in chunk_prompts):
                wav, wav_lens = pad_rows([None if p is None else np.asarray(p.wave, dtype=np.float32)
                                          for p in chunk_prompts], np.float32)
                arrays.update(
                    PROMPT_WAV=wav, PROMPT_WAV_LENS=wav_lens,
                    PROMPT_SAMPLE_RATE=np.array([[0 if p is None else int(p.sample_rate)] for p in chunk_prompts],
                                                dtype=np.int32),
                    PROMPT_TEXT=np.array([[("" if p is None else p.text).encode("utf-8")] for p in chunk_prompts],
                                         dtype=object))
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

    def _wave_requests(self, waves: list[np.ndarray], sample_rates: list[int], outputs: list[str]):
        """Send waveforms in requests of REQUEST_ITEMS (padded, with WAV_LENS and SAMPLE_RATE);
        yields (output arrays, row, error message or "") per item, in order."""
        if len(waves) != len(sample_rates):
            raise ValueError(f"{len(waves)} waveforms but {len(sample_rates)} sample rates")
        for start in range(0, len(waves), REQUEST_ITEMS):
            chunk = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves[start:start + REQUEST_ITEMS]]
            rates = sample_rates[start:start + REQUEST_ITEMS]
            wav, lengths = pad_rows(chunk, np.float32)
            rate_array = np.array([[r] for r in rates], dtype=np.int32)
            out = self._infer({"WAV": wav, "WAV_LENS": lengths, "SAMPLE_RATE": rate_array}, outputs + ["ERRORS"])
            for row in range(len(chunk)):
                yield out, row, self._error(out["ERRORS"], row)

    def transcribe(self, waves: list[np.ndarray], sample_rates: list[int]) -> list:
        """Waveforms -> [transcript str or ServerItemError] (models ``asr``, ``asr_eval``)."""
        results: list = []
        for out, row, error in self._wave_requests(waves, sample_rates, ["TRANSCRIPTS"]):
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


def cosine_similarity(a, b) -> float:
    """Cosine of two embeddings, in float64; 0.0 when either is all zeros."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes: {a.size} and {b.size}")
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else 0.0


READY_MODEL = "token2wav_asr"
"""The server loads this model last: once it is ready, every model is."""


def server_ready(url: str, timeout_s: float = 5.0, model: str = READY_MODEL) -> bool:
    """Whether the server at ``url`` (grpc:// or http://) is ready and serves ``model``."""
    protocol, address = parse_url(url)
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client_module

            client = client_module.InferenceServerClient(address)
            try:
                return bool(client.is_server_ready(client_timeout=timeout_s)
                            and client.is_model_ready(model, client_timeout=timeout_s))
            finally:
                client.close()
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
        try:
            return bool(client.is_server_ready() and client.is_model_ready(model))
        finally:
            client.close()
    except Exception:  # any transport error means "not ready"
        return False


def main(argv=None) -> int:
    """``python -m ttsrl.triton_client URL [URL ...]``: exit 0 when every server is ready, else name the first that is not."""
    import sys

    try:
        urls = [f"{scheme}://{address}" for scheme, address in parse_urls(",".join(argv if argv is not None
                                                                                    else sys.argv[1:]))]
    except ValueError as error:
        print(f"usage: python -m ttsrl.triton_client URL[,URL...] ({error})", file=sys.stderr)
        return 2
    for url in urls:
        if not server_ready(url):
            print(f"reward server at {url} is not answering (start it with 'bash run.sh 1 1')", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
