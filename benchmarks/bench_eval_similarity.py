"""Cost of speaker similarity in evaluation, against a real reward server (stand-in engines).

Writes an infer_dist-shaped folder of N stand-in utterances (``--seconds`` of audio each)
whose records share ``--prompts`` prompt wavs, then times:

- transcription only (``compute_wer.py`` wav mode with ``--no-similarity``): the baseline;
- our similarity path (``speaker_similarity_of_output_dir``: each distinct prompt wav embedded
  once, items sent 8 per request);
- the per-pair approach of seed-tts-eval style scripts: one request per utterance embedding
  its generated wav and its prompt wav together;
- the speech tokenizer over the prompt wavs (what infer_dist does before generating).

and prints one table with seconds and utterances/s. Stand-in engines cost almost nothing,
so the numbers are the client/server overhead, not a GPU model's cost.

    .venv/bin/python benchmarks/bench_eval_similarity.py [--utterances 400] [--prompts 10] [--seconds 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_folder(root: Path, utterances: int, prompts: int, seconds: float) -> Path:
    import numpy as np
    import soundfile

    from token2wav_server import standin

    out = root / "out"
    (out / "wavs").mkdir(parents=True)
    tokens = int(seconds * standin.SAMPLE_RATE / standin.SAMPLES_PER_TOKEN)
    rng = np.random.default_rng(0)
    prompt_paths = []
    for index in range(prompts):
        path = root / f"prompt_{index}.wav"
        soundfile.write(path, standin.tokens_to_wave(rng.integers(0, 6561, 75)), standin.SAMPLE_RATE, subtype="FLOAT")
        prompt_paths.append(str(path))
    records = []
    for index in range(utterances):
        ids = rng.integers(0, 6561, tokens)
        soundfile.write(out / "wavs" / f"u{index}.wav", standin.tokens_to_wave(ids), standin.SAMPLE_RATE,
                        subtype="FLOAT")
        records.append({"id": f"u{index}", "text": standin.tokens_to_text(ids), "prompt_wav": prompt_paths[index % prompts],
                        "error": None})
    (out / "manifest.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                        encoding="utf-8")
    return out


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)

    from token2wav_server.launch import start_server
    from ttsrl.evaluation.output_scoring import speaker_similarity_of_output_dir, transcribe_output_dir
    from ttsrl.evaluation.outputs import read_records, read_wave
    from ttsrl.triton_client import TritonModelClient, cosine_similarity

    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp, start_server() as server:
        out = write_folder(Path(tmp), args.utterances, args.prompts, args.seconds)
        records = read_records(out / "manifest.jsonl")
        url = server.grpc_url

        def per_pair():
            client = TritonModelClient(url, "speaker")
            try:
                for utt_id, record in records.items():
                    generated = read_wave(out / "wavs" / f"{utt_id}.wav")
                    prompt = read_wave(Path(record["prompt_wav"]))
                    a, b = client.embed([generated[0], prompt[0]], [generated[1], prompt[1]])
                    cosine_similarity(a, b)
            finally:
                client.close()

        def tokenize_prompts():
            paths = sorted({r["prompt_wav"] for r in records.values()})
            waves = [read_wave(Path(p)) for p in paths]
            client = TritonModelClient(url, "speech_tokenizer")
            try:
                client.tokenize([w for w, _ in waves], [r for _, r in waves])
            finally:
                client.close()

        timed(lambda: speaker_similarity_of_output_dir(out, records, url, log=quiet))  # warm-up
        n = args.utterances
        rows = [
            ("transcription only (--no-similarity)", n,
             timed(lambda: transcribe_output_dir(out, url, "asr_eval", log=quiet))),
            ("similarity, ours (prompts once, 8 per request)", n,
             timed(lambda: speaker_similarity_of_output_dir(out, records, url, log=quiet))),
            ("similarity, per pair (1 request per utterance)", n, timed(per_pair)),
            ("speech tokenizer over the prompt wavs", args.prompts, timed(tokenize_prompts)),
        ]
    ours = rows[1][2]
    print(f"{args.utterances} utterances of {args.seconds:g} s, {args.prompts} prompt wavs, stand-in engines")
    print(f"| {'what':<50} | {'items':>6} | {'seconds':>8} | {'items/s':>8} | {'vs ours':>7} |")
    print(f"|{'-' * 52}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for name, items, seconds in rows:
        print(f"| {name:<50} | {items:>6} | {seconds:8.2f} | {items / seconds:8.1f} | {seconds / ours:6.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
