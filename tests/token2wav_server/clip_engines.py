"""Engine factory of the speech-quality test: token id ``k`` decodes to the recorded clip
``<clips>/<k>.wav`` (22.05 kHz mono float32, espeak-ng's rate), so real audio goes through the real reward server.
The ASR and the rest are the stand-in's. Engine option: ``clips=DIR``."""
import pathlib

import numpy as np
import soundfile

from token2wav_server.engines import EngineOptions, Engines
from token2wav_server.standin import create_engines as standin_engines

SAMPLE_RATE = 22050


class ClipToken2Wav:
    sample_rate = SAMPLE_RATE

    def __init__(self, clips: pathlib.Path):
        self.clips = clips

    def prepare_prompt(self, prompt):
        return None

    def synthesize(self, token_batch: list, prompts: list) -> list:
        waves = []
        for tokens in token_batch:
            wave, rate = soundfile.read(self.clips / f"{int(tokens[0])}.wav", dtype="float32")
            assert rate == SAMPLE_RATE
            waves.append(np.asarray(wave, dtype=np.float32))
        return waves


def create_engines(options: EngineOptions) -> Engines:
    extra = dict(options.extra)
    clips = pathlib.Path(extra.pop("clips"))
    engines = standin_engines(EngineOptions(extra=extra, engines=options.engines))
    engines.token2wav = ClipToken2Wav(clips)
    return engines
