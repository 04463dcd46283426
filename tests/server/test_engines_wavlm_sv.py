"""The Seed-TTS-eval SIM model (WavLM + ECAPA-TDNN) on a tiny random model of the same classes,
saved in the published UniSpeech checkpoint layout."""
import numpy as np
import pytest
import torch

from token2wav_server import engines_wavlm_sv as sv
from token2wav_server import standin
from token2wav_server.engines import EngineOptions
from token2wav_server.reward_scoring import RewardConfig
from token2wav_server.serving import Limits, Pipeline, Slot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = sv.random_model(seed=3)
    path = tmp_path_factory.mktemp("sim") / "wavlm_large_finetune.pth"
    sv.save_checkpoint(model, str(path))
    return model, path


def test_checkpoint_is_in_the_published_layout_and_loads_back_exactly(tiny):
    model, path = tiny
    state = torch.load(path, weights_only=True)["model"]
    for name in ("feature_extract.model.encoder.layers.0.self_attn.grep_a",
                 "feature_extract.model.encoder.layers.0.self_attn.relative_attention_bias.weight",
                 "feature_extract.model.encoder.pos_conv.0.weight_g", "feature_extract.model.post_extract_proj.weight",
                 "feature_extract.model.feature_extractor.conv_layers.6.2.1.weight",
                 "feature_weight", "layer2.SE_Connect.linear1.weight", "layer4.Res2Conv1dReluBn.convs.6.weight",
                 "pooling.linear2.weight", "bn.running_var", "linear.weight"):
        assert name in state, name
    loaded = sv.WavLMEcapaSpeaker(str(path))
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000, 7000)]
    expected = np.stack([model.embed_one(w) for w in waves])
    got = loaded.embed(waves)
    assert got.shape == (2, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1])


def test_renaming_is_a_bijection_on_wavlm_weights():
    hf_names = set(sv.random_model(seed=1).wavlm.state_dict())
    hf_state = {name: name for name in hf_names}
    for old, new in (("weight_g", "parametrizations.weight.original0"), ("weight_v", "parametrizations.weight.original1")):
        if f"encoder.pos_conv_embed.conv.{old}" in hf_state:
            hf_state[f"encoder.pos_conv_embed.conv.{new}"] = hf_state.pop(f"encoder.pos_conv_embed.conv.{old}")
    fairseq = sv.fairseq_wavlm_state(hf_state)
    assert "encoder.layers.1.fc2.bias" in fairseq and "mask_emb" in fairseq
    assert sv.hf_wavlm_state(fairseq) == hf_state
    with pytest.raises(sv.SpeakerModelError, match="unknown WavLM weight feature_extract.model.bogus"):
        sv.hf_wavlm_state({"bogus": 1})


def test_bad_checkpoints_and_inputs_are_named(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(FileNotFoundError, match="wavlm_large_finetune.pth"):
        sv.load_checkpoint(str(tmp_path / "none.pth"))
    state = torch.load(path, weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state.items() if k != "linear.weight"}}, tmp_path / "headless.pth")
    with pytest.raises(sv.SpeakerModelError, match="ECAPA-TDNN weight 'linear.weight'"):
        sv.load_checkpoint(str(tmp_path / "headless.pth"))
    torch.save({"model": {k: v for k, v in state.items() if "grep_a" not in k}}, tmp_path / "nowavlm.pth")
    with pytest.raises(sv.SpeakerModelError, match="grep_a"):
        sv.load_checkpoint(str(tmp_path / "nowavlm.pth"))
    with pytest.raises(ValueError, match="too short for WavLM"):
        sv.WavLMEcapaSpeaker(str(path)).embed([np.zeros(100, np.float32)])


def test_factory_puts_the_sim_model_behind_the_speaker_interface(tiny):
    _, path = tiny
    options = EngineOptions(extra={"base_engines": "token2wav_server.standin:create_engines", "sim_model": str(path)})
    engines = sv.create_engines(options)
    assert isinstance(engines.speaker, sv.WavLMEcapaSpeaker)
    assert isinstance(engines.reward_speaker, standin.StandinSpeaker)  # the base engines' own: the reward's
    assert engines.similarity_speaker is engines.reward_speaker
    assert isinstance(engines.token2wav, standin.StandinToken2Wav)
    pipeline = Pipeline(Slot(engines, _bank()), RewardConfig(), Limits())
    wave = standin.tokens_to_wave([3, 4, 5], voice=2)
    out = pipeline.speaker([{"WAV": wave[None, :], "SAMPLE_RATE": np.array([[16000]], dtype=np.int32)}])[0]
    np.testing.assert_allclose(out["EMBEDDING"][0], engines.speaker.embed([wave])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the speaker model"):
        sv.create_engines(EngineOptions(extra={"base_engines": "token2wav_server.standin:create_engines"}))


def _bank():
    from token2wav_server.engines import SpeakerPrompt

    return [SpeakerPrompt("p", standin.tokens_to_wave([1]), 16000, "p")]
