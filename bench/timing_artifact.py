"""Writes an artifact of the model at its random initialisation (depth recurrence on, GPTQ with
identity Hessians), on CPU in ~20 s: what an evaluation-time measurement needs (EVAL_ONLY=1
ARTIFACT_PATH=...) without a training run on the device. The weights do not change the time of
any evaluation stage; the scores are meaningless. Hyperparameters come from the environment.

    python3 bench/timing_artifact.py .devdata/timing_model.pgq
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def timing_artifact(h: tg.Hyperparameters) -> bytes:
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    log = tg.Logger(None)
    torch.manual_seed(0)
    model = tg.GPT(h.model_config(), looping=True)  # a trained model loops: time the forward it runs
    state = model.state_dict()
    hessians = {name: torch.eye(state[name].shape[1]) for name in tg.quantized_matrices(model)}
    return tg.build_artifact(model, hessians, None, 0, h, rt, log, tg.StageTimer(log, rt.device))


if __name__ == "__main__":
    h = tg.Hyperparameters.from_env()
    h.artifact_target_bytes, h.lqer_rank = 0, 0  # no size fit, no corrections: quick, and the size does not matter here
    blob = timing_artifact(h)
    Path(sys.argv[1]).write_bytes(blob)
    print(f"{sys.argv[1]}: {len(blob):,} bytes")
