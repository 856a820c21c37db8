"""The per-rank evaluation timing set: a DATA_DIR whose validation shard is one 170,000-token
document (FineWeb's longest validation document is of that order: its chunks are sequential)
followed by the development validation set tiled to 5,067,000 tokens (one rank's share of
FineWeb's 40.5M), with the sp8192 tokenizer. With bench/timing_artifact.py's artifact:

    python3 bench/timing_set.py /tmp/dev/dev2 /tmp/timing
    DATA_DIR=/tmp/timing/ EVAL_ONLY=1 ARTIFACT_PATH=/tmp/timing_model.pgq LORA_TTT_PHASE_DOCS=312 python3 train_gpt.py

(LORA_TTT_PHASE_DOCS=312: the phase after 2,500 documents of 8 ranks' queue is one after ~312
of one rank's share.)"""
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg

src, out = Path(sys.argv[1]), Path(sys.argv[2])
val = np.asarray(tg.read_shard(src / "datasets/fineweb10B_sp8192/fineweb_val_000000.bin"))
tiled = np.tile(val, 5_067_000 // len(val) + 1)[:5_067_000]
body = val[val != tg.BOS_ID]
long_doc = np.concatenate([[tg.BOS_ID], np.tile(body, 170_000 // len(body) + 1)[: 170_000 - 1]])
(out / "datasets/fineweb10B_sp8192").mkdir(parents=True, exist_ok=True)
(out / "tokenizers").mkdir(parents=True, exist_ok=True)
tg.write_shard(out / "datasets/fineweb10B_sp8192/fineweb_val_000000.bin", np.concatenate([long_doc, tiled]))  # the long one first: the cut to whole windows takes the end
shutil.copy(src / "tokenizers/fineweb_8192_bpe.model", out / "tokenizers/")
print(f"timing set: {len(tiled) + len(long_doc):,} tokens, {int((tiled == tg.BOS_ID).sum()) + 1:,} documents, the longest {len(long_doc):,}")
