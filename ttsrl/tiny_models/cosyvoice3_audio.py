"""The audio half of a Fun-CosyVoice3-0.5B-layout directory with random weights, built from the
real CosyVoice classes (server environment: the pinned CosyVoice source, hyperpyyaml, onnx,
x-transformers for the DiT): what the reward server's CosyVoice3 token2wav engine
(``token2wav_server.engines_cosyvoice3``) loads (``write_cosyvoice3_audio``):

    DIR/cosyvoice3.yaml                  the pinned recipe's cosyvoice3.yaml, its inference blocks
                                         (flow, hift, feat_extractor, the fixed parameters), the
                                         flow's DiT and HiFT at reduced size
    DIR/flow.pt, DIR/hift.pt             random weights of CausalMaskedDiffWithDiT, CausalHiFTGenerator
    DIR/campplus.onnx                    ONNX stand-ins with the real input/output names and shapes
    DIR/speech_tokenizer_v3.onnx         (``ttsrl.tiny_models.cosyvoice2``'s graphs: the v3
                                         tokenizer has the v2 tokenizer's interface)

No LLM (``llm.pt``, ``CosyVoice-BlankEN/``): the reward server never runs it.
``write_full_cosyvoice3`` adds the tiny LLM side (``ttsrl.tiny_models.llm``) for a complete
directory, what run.sh's stage -1 builds with ``model_source=tiny`` and the real CosyVoice3
engines (``bash run.sh --rehearse`` with ``model_family=cosyvoice3``). Nothing is downloaded.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_dir
from ttsrl.cosyvoice_source import add_cosyvoice_to_path
from ttsrl.tiny_models.cosyvoice2 import write_campplus_onnx, write_speech_tokenizer_onnx

RECIPE_YAML = Path("examples") / "libritts" / "cosyvoice3" / "conf" / "cosyvoice3.yaml"
"""cosyvoice3.yaml in the CosyVoice source: the template every size here is derived from."""

INFERENCE_BLOCKS = ("flow", "hift", "feat_extractor")
"""The object blocks of cosyvoice3.yaml that token2wav needs; the fixed parameters (plain
values such as sample_rate, token_mel_ratio) and the seeds are kept too."""

TOKEN2WAV_SIZES = {
    # Reduced: the DiT keeps dim divisible by 16 (its causal position convolution has 16
    # groups) and two blocks, so attention between frames is exercised twice.
    "tiny": {"flow": {"dim": 64, "depth": 2, "heads": 2, "dim_head": 16, "channels": 32},
             "hift": {"base_channels": 32, "cond_channels": 32, "resblock_kernel_sizes": [3],
                      "resblock_dilation_sizes": [[1, 3, 5]]}},
    # The sizes of the pinned cosyvoice3.yaml (Fun-CosyVoice3-0.5B).
    "real": {"flow": {"dim": 1024, "depth": 22, "heads": 16, "dim_head": 64, "channels": 1024},
             "hift": {"base_channels": 512, "cond_channels": 512, "resblock_kernel_sizes": [3, 7, 11],
                      "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]]}},
}
SEED_LINE = re.compile(r"^(__set_seed\d+: !apply:[\w.]+) \[\d+\]$", re.MULTILINE)


def top_level_blocks(yaml_text: str) -> dict:
    """cosyvoice3.yaml's top-level entries: key -> the text of its block (the key's line
    and every indented, blank or comment line after it, up to the next key)."""
    blocks, key = {}, None
    for line in yaml_text.splitlines(keepends=True):
        match = re.match(r"^([A-Za-z_]\w*):", line)
        if match:
            key = match.group(1)
            blocks[key] = line
        elif key is not None:
            blocks[key] += line
    return blocks


def _set_in_block(block: str, where: str, key: str, value) -> str:
    """``key: value`` in one block, where the block has exactly one ``key:`` line (a recipe
    whose layout moved gets an error naming the key, not a silently unchanged size)."""
    pattern = re.compile(rf"^(\s+){re.escape(key)}: .*$", re.MULTILINE)
    found = len(pattern.findall(block))
    if found != 1:
        raise ValueError(f"{RECIPE_YAML}: block {where!r} has {found} lines '{key}: ...', expected exactly 1")
    return pattern.sub(lambda m: f"{m.group(1)}{key}: {value}", block)


def cosyvoice3_yaml(cosyvoice_src: str | Path, size: str = "tiny", seed: int = 0, inference_only: bool = True) -> str:
    """The pinned cosyvoice3.yaml with the flow's DiT and HiFT at ``size`` (a key of
    TOKEN2WAV_SIZES) and its seeds at ``seed``. ``inference_only``: only the blocks
    token2wav loads (INFERENCE_BLOCKS, the fixed parameters and the seeds), so loading it
    builds no LLM and imports no training pipeline; else every block of the recipe."""
    if size not in TOKEN2WAV_SIZES:
        raise ValueError(f"size {size!r}: expected one of {sorted(TOKEN2WAV_SIZES)}")
    path = Path(cosyvoice_src) / RECIPE_YAML
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the pinned CosyVoice source (ace7c47) has it")
    blocks = top_level_blocks(path.read_text(encoding="utf-8"))
    missing = [name for name in INFERENCE_BLOCKS if name not in blocks]
    if missing:
        raise ValueError(f"{path}: no top-level {', '.join(missing)}")
    for name, values in TOKEN2WAV_SIZES[size].items():
        for key, value in values.items():
            blocks[name] = _set_in_block(blocks[name], name, key, value)
    kept = {key: text for key, text in blocks.items()
            if not inference_only or key in INFERENCE_BLOCKS or key.startswith("__set_seed")
            or not re.match(rf"^{key}:[ \t]*(!|\[|\n|#|$)", text)}  # plain values: no objects, lists, maps
    text = "".join(kept.values())
    text = SEED_LINE.sub(lambda m: f"{m.group(1)} [{seed}]", text)
    header = (f"# Fun-CosyVoice3 token2wav with random weights (flow/HiFT size: {size}), derived from the pinned "
              f"{RECIPE_YAML.as_posix()} by ttsrl.tiny_models.cosyvoice3_audio.\n")
    return header + text


def write_cosyvoice3_audio(output_dir: str | Path, seed: int = 0, size: str = "tiny",
                           cosyvoice_src: str | Path | None = None) -> Path:
    """Write the token2wav files of a Fun-CosyVoice3-0.5B-layout directory (see the module
    doc) with random weights, built from the real CosyVoice classes through hyperpyyaml.
    ``cosyvoice_src``: the CosyVoice checkout (default: the pinned source, see
    ``ttsrl.cosyvoice_source``). ``output_dir`` is replaced, atomically."""
    import pydoc

    from ttsrl.cosyvoice_source import find_cosyvoice_source

    source = Path(cosyvoice_src) if cosyvoice_src is not None else find_cosyvoice_source()
    add_cosyvoice_to_path(source)
    from hyperpyyaml import load_hyperpyyaml

    output_dir = Path(output_dir)
    yaml_text = cosyvoice3_yaml(source, size=size, seed=seed)
    with atomic_dir(output_dir) as tmp:
        (tmp / "cosyvoice3.yaml").write_text(yaml_text, encoding="utf-8")
        try:
            configs = load_hyperpyyaml(yaml_text)
        except (ImportError, pydoc.ErrorDuringImport) as error:  # hyperpyyaml imports classes through pydoc
            raise ImportError(f"cannot build CosyVoice3's flow/HiFT from {source / RECIPE_YAML} ({error}); "
                              "CosyVoice3's DiT needs x-transformers (the pinned source's requirements.txt: "
                              "x-transformers==2.11.24)") from error
        torch.save(configs["flow"].state_dict(), tmp / "flow.pt")
        torch.save(configs["hift"].state_dict(), tmp / "hift.pt")
        write_campplus_onnx(tmp / "campplus.onnx", seed=seed)
        write_speech_tokenizer_onnx(tmp / "speech_tokenizer_v3.onnx", seed=seed)
    return output_dir


def write_full_cosyvoice3(output_dir: str | Path, seed: int = 0, size: str = "tiny",
                          cosyvoice_src: str | Path | None = None) -> Path:
    """A complete Fun-CosyVoice3-0.5B-layout directory: the audio half above and the tiny LLM side
    (``llm.pt``, ``CosyVoice-BlankEN/``), so stage -1 converts its LLM and the reward server's
    CosyVoice3 engines load it. ``output_dir`` is replaced, atomically."""
    from ttsrl.atomic_write import replace_dir
    from ttsrl.model_family import COSYVOICE3
    from ttsrl.tiny_models.llm import write_tiny_llm_files

    output_dir = Path(output_dir)
    staged = output_dir.with_name(f".{output_dir.name}.full")
    write_cosyvoice3_audio(staged, seed=seed, size=size, cosyvoice_src=cosyvoice_src)
    try:
        write_tiny_llm_files(staged, seed=seed, family=COSYVOICE3)
        replace_dir(staged, output_dir)
    except BaseException:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
        raise
    return output_dir
