"""Resident memory and start-up time of the reward server with the real engines on tiny weights:
every model loaded (before: what each server slot loaded for the whole training run) vs what
training needs (after: ``--models training``), in one run.

    .venv-server/bin/python benchmarks/bench_server_memory.py [--repeats 2] [--instances 1] [--cosyvoice-src DIR]

Builds tiny random models of the real architectures once (CosyVoice2 through the pinned
CosyVoice classes, as ``scripts/make_tiny_cosyvoice2.py --full``; SenseVoiceSmall and Paraformer
through FunASR; a Whisper in large-v3.pt's format; the WavLM + ECAPA-TDNN SIM model in its
published layout), then starts ``python -m token2wav_server`` with the real CosyVoice2 engines on
the CPU, one configuration after another (``--repeats`` rounds, alternating), and measures

- start-up: from the process start to ``token2wav_asr`` ready (what run.sh's stage 1 waits for),
  as wall-clock seconds and as CPU seconds (user + system time of the server's processes by then:
  the work of starting, which other jobs on the machine do not inflate as they do the wall clock);
- memory: the resident set (RSS) and the proportional set (PSS: shared pages split among their
  users, so shared libraries are not counted once per process) summed over every process of the
  server's session (the front, the worker holding the engines, tritonserver, one Python-backend
  stub per model and slot), once ready and idle; and the worker's RSS alone.

Configurations: *all models* (``--models all`` with Paraformer as ``asr_eval``, Whisper as
``asr_eval_en`` and the WavLM SIM model as ``speaker``: what stage 1 started before), *training,
intelligibility* and *training, zero_shot* (``--models training``: token2wav, SenseVoice, the
speech tokenizer, plus CAM++ for the zero-shot preset's similarity). The weights here are tiny,
so the difference is mostly code, imports and Triton stubs; the real evaluation models add their
weights on top (docs/reward_server.md, *Memory and start-up*).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = "token2wav_server.engines_cosyvoice2:create_engines"


def write_tiny_whisper(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny random Whisper in large-v3.pt's format (128 mel bins, its 51866-token vocabulary)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51866, n_text_ctx=32, n_text_state=32, n_text_head=2, n_text_layer=1)
    torch.manual_seed(seed)
    model = Whisper(dims)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def build_models(root: pathlib.Path, cosyvoice_src: pathlib.Path) -> dict:
    from token2wav_server import engines_wavlm_sv
    from ttsrl.tiny_models.asr import write_tiny_paraformer, write_tiny_sensevoice
    from ttsrl.tiny_models.cosyvoice2 import write_full_cosyvoice2

    sim = root / "wavlm_large_finetune.pth"
    engines_wavlm_sv.save_checkpoint(engines_wavlm_sv.random_model(seed=0), str(sim))
    return {"cosyvoice2": write_full_cosyvoice2(root / "CosyVoice2-0.5B", seed=0, cosyvoice_src=cosyvoice_src),
            "sensevoice": write_tiny_sensevoice(root / "SenseVoiceSmall", seed=0),
            "paraformer": write_tiny_paraformer(root / "paraformer-zh", seed=0),
            "whisper": write_tiny_whisper(root / "tiny-large-v3.pt"), "sim": sim,
            "prompt": cosyvoice_src / "asset" / "zero_shot_prompt.wav"}


def configurations(models: dict, instances: int) -> dict:
    common = ["--cosyvoice2-dir", str(models["cosyvoice2"]), "--sensevoice-dir", str(models["sensevoice"]),
              "--prompt-bank", str(models["prompt"]), "--instances-per-device", str(instances)]
    every = ["--engines", "token2wav_server.engines_wavlm_sv:create_engines", "--engine-option",
             f"base_engines={ENGINES}", "--engine-option", f"sim_model={models['sim']}",
             "--asr-eval-dir", str(models["paraformer"]), "--asr-eval-en", str(models["whisper"])]
    return {"before: all models (Paraformer, Whisper, WavLM SIM too)": common + every + ["--models", "all"],
            "after: --models training, intelligibility": common + ["--models", "training"],
            "after: --models training, zero_shot (+ CAM++ similarity)": common + ["--models", "training",
                                                                                  "--reward-preset", "zero_shot"]}


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB from /proc (0, 0 when it is gone)."""
    try:
        text = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (0 when it is gone)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args_list: list, log_dir: pathlib.Path, settle_s: float) -> dict:
    from token2wav_server.launch import start_server

    handle, log_path = tempfile.mkstemp(prefix="server_", suffix=".log", dir=log_dir)
    os.close(handle)
    started = time.monotonic()
    server = start_server(engines=ENGINES, extra_args=args_list, devices="cpu", timeout=1200, log_path=log_path)
    try:
        startup = time.monotonic() - started
        startup_cpu = sum(cpu_seconds(p.pid) for p in server.members())
        time.sleep(settle_s)
        members = server.members()
        usage = [memory_kib(p.pid) for p in members]
        worker = server.worker_pid()
        models = [line.split("serving ", 1)[1].split(":")[0] for line in server.log().splitlines()
                  if "token2wav_server: serving [" in line][-1]
        return {"startup_s": startup, "startup_cpu_s": startup_cpu, "rss_mib": sum(r for r, _ in usage) / 1024,
                "pss_mib": sum(p for _, p in usage) / 1024, "worker_rss_mib": memory_kib(worker)[0] / 1024,
                "processes": len(members), "models": models}
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the configurations (median reported)")
    parser.add_argument("--instances", type=int, default=1, help="slots of each server (--instances-per-device)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="idle seconds after ready before measuring")
    parser.add_argument("--cosyvoice-src", default=None, help="CosyVoice source (default: $cosyvoice_src, else "
                                                              "the pinned tarball unpacked into .cache)")
    args = parser.parse_args(argv)
    from ttsrl.cosyvoice_source import find_cosyvoice_source

    source = pathlib.Path(args.cosyvoice_src) if args.cosyvoice_src else find_cosyvoice_source()
    # The server subprocesses import CosyVoice from the source, as run.sh arranges.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(source),
                                                              str(source / "third_party" / "Matcha-TTS"),
                                                              os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench_server_memory_") as tmp:
        root = pathlib.Path(tmp)
        print("building tiny models...", flush=True)
        models = build_models(root, source)
        configs = configurations(models, args.instances)
        results: dict = {name: [] for name in configs}
        for round_ in range(args.repeats):
            for name, config in configs.items():
                result = measure(config, root, args.settle_s)
                results[name].append(result)
                print(f"  round {round_ + 1}: {name}: {result['startup_s']:.1f} s ({result['startup_cpu_s']:.1f} CPU s), PSS {result['pss_mib']:.0f} MiB, "
                      f"RSS {result['rss_mib']:.0f} MiB, {result['processes']} processes", flush=True)
    print(f"\nreal CosyVoice2 engines on tiny weights, CPU, {args.instances} slot(s); median of {args.repeats}\n")
    print("| server | models served | start-up s | start-up CPU s | PSS MiB | RSS MiB (sum) | worker RSS MiB | "
          "processes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in
                  ("startup_s", "startup_cpu_s", "pss_mib", "rss_mib", "worker_rss_mib", "processes")}
        print(f"| {name} | {runs[0]['models']} | {median['startup_s']:.1f} | {median['startup_cpu_s']:.1f} | "
              f"{median['pss_mib']:.0f} | "
              f"{median['rss_mib']:.0f} | {median['worker_rss_mib']:.0f} | {median['processes']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
