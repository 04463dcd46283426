"""The reward server's wire format, shared by the sync and the async client (and the server).

Server URLs, the padded batch tensors every model takes and returns, Triton input
tensors built from numpy arrays, BYTES rows as text, per-item errors, speaker-prompt keys.
The tensor names are those the server binds (docs/reward_server.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import NamedTuple

import numpy as np

DEFAULT_SERVER_URL = "grpc://127.0.0.1:8001"
"""Where clients look for the reward server when neither a flag nor $REWARD_SERVER_URL says."""


def env_server_url(first: bool = False) -> str:
    """$REWARD_SERVER_URL (the servers run.sh exports), else DEFAULT_SERVER_URL; ``first``: only
    the first of a comma-separated list (clients that talk to one server)."""
    text = os.environ.get("REWARD_SERVER_URL") or DEFAULT_SERVER_URL
    return text.split(",")[0].strip() if first else text


REWARD_MODEL = "token2wav_asr"
"""The model that scores rollouts (token2wav -> ASR -> reward)."""

BANK_PROMPT_PREFIX = "bank:"
"""``PROMPT_ID`` of audio conditioned on the server's prompt bank: ``bank:<prompt name>``."""

_TRITON_DTYPES = {np.int32: "INT32", np.float32: "FP32"}


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


def client_module(protocol: str):
    """tritonclient's module for ``protocol`` (imported lazily: it is heavy, and the
    server environment imports this package for the wire format alone)."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


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


def text_column(texts) -> np.ndarray:
    """Strings -> the (n, 1) BYTES tensor of one text per item (GT_TEXT, PROMPT_TEXT)."""
    return np.array([[text.encode("utf-8")] for text in texts], dtype=object)


def infer_request(protocol: str, arrays: dict, outputs) -> tuple[list, list]:
    """Named numpy arrays (int32, float32, or object for BYTES) -> (InferInputs,
    InferRequestedOutputs) of ``protocol``'s tritonclient module."""
    module = client_module(protocol)
    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == object else _TRITON_DTYPES[array.dtype.type]
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, [module.InferRequestedOutput(name) for name in outputs]


def text_of(value) -> str:
    """One element of a BYTES output (TRANSCRIPTS, ERRORS, PROMPT_ID) as str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ServerItemError(RuntimeError):
    """The server refused or failed one item; the message is the server's."""


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


def cosine_similarity(a, b) -> float:
    """Cosine of two embeddings, in float64; 0.0 when either is all zeros."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes: {a.size} and {b.size}")
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else 0.0
