"""compute_wer.sh / wav mode against the real server (stand-in ASR), and stage 5's synthesize.py."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import soundfile

from tests.policy_utils import tiny_policy  # noqa: F401 (a fixture)
from token2wav_server import standin

REPO = Path(__file__).resolve().parents[2]


def write_output_dir(out: Path, references: dict[str, str], spoken: dict[str, str]) -> None:
    """An infer_dist-shaped folder whose stand-in wavs say ``spoken`` (ids missing from it get no wav)."""
    (out / "wavs").mkdir(parents=True)
    lines = []
    for utt_id, text in references.items():
        lines.append(json.dumps({"id": utt_id, "text": text, "error": None}, ensure_ascii=False))
        if utt_id in spoken:
            wave = standin.tokens_to_wave(standin.text_to_tokens(spoken[utt_id]))
            soundfile.write(out / "wavs" / f"{utt_id}.wav", wave, standin.SAMPLE_RATE, subtype="FLOAT")
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cer_of_known_transcripts_and_missing_wavs(tmp_path, reward_server):
    references = {"a": "你们好", "b": "今天去公园", "c": "北京", "d": "中国"}
    spoken = {"a": "你们好", "b": "今天去公", "c": "南京"}  # d: no wav
    out = tmp_path / "step_0"
    write_output_dir(out, references, spoken)
    env = dict(os.environ, REWARD_SERVER_URL=f"{reward_server.grpc_url},http://127.0.0.1:1")
    done = subprocess.run(["bash", str(REPO / "scripts" / "compute_wer.sh"), str(out), "test_set"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # a: 0/3, b: 1 deletion/5, c: 1 substitution/2, d: missing -> 2 deletions/2  => 4/12
    expected = "%CER 33.33 [ 4 / 12, 0 ins, 3 del, 1 sub ] 4 utterances, 1 missing from hyp (test_set)"
    assert expected in done.stdout.splitlines()
    summary = json.loads((out / "wer.json").read_text())["summary"]
    assert summary["errors"] == 4 and summary["missing"] == ["d"]
    assert (out / "wer.txt").read_text().rstrip().endswith(expected)
    assert "missing wav:" in done.stdout
    assert (out / "hyp.txt").read_text(encoding="utf-8") == "a 你们好\nb 今天去公\nc 南京\n"
    per = json.loads((out / "per.json").read_text())["summary"]
    assert per["metric"] == "pinyin" and per["missing"] == ["d"]


@pytest.mark.slow
def test_synthesize_writes_a_wav_and_prints_its_path(tmp_path, reward_server, tiny_policy):
    output = tmp_path / "demo.wav"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "synthesize.py"), "--model",
                           str(tiny_policy), "--output", str(output), "--server-url", reward_server.grpc_url,
                           "--max-new-tokens", "16", "--seed", "1"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(output)
    wave, rate = soundfile.read(output, dtype="float32")
    assert rate == standin.SAMPLE_RATE and len(wave) % standin.SAMPLES_PER_TOKEN == 0 and len(wave) > 0
